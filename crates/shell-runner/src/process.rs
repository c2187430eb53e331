//! Running a job's processes so that none outlives its job: each command runs in its own
//! process group, with a marker in its environment; on exit, timeout or cancel the group is
//! killed and then every process still carrying the marker (a `setsid` daemon escapes the
//! group, not its environment). A warm Lambda environment thus starts the next job clean.

use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::process::Command;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::trace::Trace;

/// Environment variable that marks every process of a job.
pub const MARKER_VAR: &str = "EPHEMERAL_SHELL_RUNNER_JOB";

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Exited(i32),
    /// Killed by a signal it did not get from us.
    Signaled(i32),
    TimedOut,
    Canceled,
}

/// After the command's main process ends, how long output from the pipe is still read (a
/// process that escaped the kill may hold it open).
const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(500);

/// Runs `program args` in `cwd` with exactly `env` (plus the marker), its stdout and stderr
/// merged in order into `trace`, until it exits, `deadline` passes or `cancel` fires. Whatever
/// it started is killed before this returns.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    program: &str,
    args: &[String],
    cwd: &Path,
    env: &[(String, String)],
    marker: &str,
    deadline: Instant,
    cancel: &CancellationToken,
    trace: &Arc<Trace>,
) -> std::io::Result<Ended> {
    // One pipe for both streams keeps stdout and stderr interleaved as the program wrote them.
    let (reader, writer) = std::io::pipe()?;
    let mut command = Command::new(program);
    command
        .args(args)
        .current_dir(cwd)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env(MARKER_VAR, marker)
        .stdin(Stdio::null())
        .stdout(Stdio::from(OwnedFd::from(writer.try_clone()?)))
        .stderr(Stdio::from(OwnedFd::from(writer)))
        .process_group(0)
        .kill_on_drop(true);
    let mut child = command.spawn()?;
    // Our copies of the write end are gone with `command`: EOF comes when the job's processes
    // close theirs.
    drop(command);
    let pgid = child.id().map(|id| id as libc::pid_t);

    let mut pipe = tokio::net::unix::pipe::Receiver::from_owned_fd(OwnedFd::from(reader))?;
    let reader_trace = trace.clone();
    let mut reading = tokio::spawn(async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match pipe.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => reader_trace.write(&buf[..n]),
            }
        }
    });

    let ended = tokio::select! {
        status = child.wait() => {
            let status = status?;
            use std::os::unix::process::ExitStatusExt;
            match (status.code(), status.signal()) {
                (Some(code), _) => Ended::Exited(code),
                (None, Some(sig)) => Ended::Signaled(sig),
                (None, None) => Ended::Exited(-1),
            }
        }
        _ = tokio::time::sleep_until(deadline) => Ended::TimedOut,
        _ = cancel.cancelled() => Ended::Canceled,
    };
    // Background processes of a finished script are killed too, as GitLab's runner does.
    if let Some(pgid) = pgid {
        // SAFETY: killpg has no memory-safety preconditions; pgid is our child's own group.
        unsafe { libc::killpg(pgid, libc::SIGKILL) };
    }
    kill_marked(marker).await;
    let _ = child.wait().await;
    if tokio::time::timeout(DRAIN_AFTER_EXIT, &mut reading)
        .await
        .is_err()
    {
        reading.abort();
    }
    Ok(ended)
}

/// Pids of live processes whose environment carries `MARKER_VAR=marker`.
pub fn marked_processes(marker: &str) -> Vec<libc::pid_t> {
    let needle = format!("{MARKER_VAR}={marker}");
    processes_where(|kv| kv == needle.as_bytes())
}

fn processes_where(matches: impl Fn(&[u8]) -> bool) -> Vec<libc::pid_t> {
    let me = std::process::id() as libc::pid_t;
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<libc::pid_t>().ok())
        .filter(|pid| *pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .map(|env| env.split(|b| *b == 0).any(&matches))
                .unwrap_or(false)
        })
        .collect()
}

/// Kills what any earlier job of this runner (`system_id`) left: a previous invocation that
/// Lambda stopped had no chance to.
pub async fn kill_marked_prefix(system_id: &str) {
    let prefix = format!("{MARKER_VAR}={system_id}-");
    let pids = processes_where(|kv| kv.starts_with(prefix.as_bytes()));
    if !pids.is_empty() {
        tracing::warn!(
            count = pids.len(),
            "killing processes left by an earlier job"
        );
    }
    for pid in pids {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// Kills every process carrying the marker, until none is left (a process may fork while
/// we look); gives up after a second and says how many remain.
pub async fn kill_marked(marker: &str) -> usize {
    let started = Instant::now();
    loop {
        let pids = marked_processes(marker);
        if pids.is_empty() {
            return 0;
        }
        for pid in &pids {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(*pid, libc::SIGKILL) };
        }
        if started.elapsed() > Duration::from_secs(1) {
            tracing::warn!(
                remaining = pids.len(),
                "processes of the job survived SIGKILL"
            );
            return pids.len();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
