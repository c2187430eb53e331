//! The job's trace: everything written to it passes the masker first, our own messages too.

use std::sync::{Arc, Mutex, OnceLock};

use ephemeral_core::shell::Masker;
use gitlab_runner::job::Job;
use tokio::time::Instant;

pub struct Trace {
    job: Arc<Job>,
    masker: Mutex<Masker>,
    first_write: OnceLock<Instant>,
}

impl Trace {
    pub fn new(job: Arc<Job>, masker: Masker) -> Self {
        Self {
            job,
            masker: Mutex::new(masker),
            first_write: OnceLock::new(),
        }
    }

    /// Output as it comes: a possible start of a secret at the end is held back.
    pub fn write(&self, bytes: &[u8]) {
        let out = self.masker.lock().expect("masker lock").push(bytes);
        if !out.is_empty() {
            self.first_write.get_or_init(Instant::now);
            self.job.trace(out);
        }
    }

    /// A whole line of ours: ends what was held back first, so nothing is reordered.
    pub fn line(&self, line: &str) {
        let mut masker = self.masker.lock().expect("masker lock");
        let mut out = masker.finish();
        out.extend(masker.push(line.as_bytes()));
        out.extend(masker.push(b"\n"));
        out.extend(masker.finish());
        drop(masker);
        self.first_write.get_or_init(Instant::now);
        self.job.trace(out);
    }

    /// Releases what the masker held back (the end of a command's output).
    /// A warning line, yellow in GitLab's job log as gitlab-runner writes its own.
    pub fn warning(&self, text: &str) {
        self.line(&format!("\x1b[0;33mWARNING: {text}\x1b[0;m"));
    }

    pub fn flush(&self) {
        let out = self.masker.lock().expect("masker lock").finish();
        if !out.is_empty() {
            self.job.trace(out);
        }
    }

    /// When the first byte was handed to the uploader (for the benchmark and the logs).
    pub fn first_write(&self) -> Option<Instant> {
        self.first_write.get().copied()
    }
}
