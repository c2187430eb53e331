//! The Lambda sandbox between jobs (issue 12, finding 1): a warm environment is reused, and a
//! job's processes run as the runner's own user, so a job can leave a process behind (frozen
//! with the sandbox, awake in the next job) or files outside its build directory. Process
//! groups and marker variables do not catch a process that left both
//! (`(set -m; exec -c sleep 1e6 &)`), so the sweep goes by ancestry instead: the runner is the
//! *child subreaper* of everything it starts, so an orphan is re-parented to it, never to
//! init, and every process of the sandbox but the runner itself descends from it.
//!
//! Before and after each job, the sweep kills every descendant (walking `/proc`) and empties
//! the scratch root (`/tmp` in Lambda). It runs only where the runner owns the whole process
//! tree and the scratch root: in Lambda, or in a test process of its own.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

/// Makes this process the subreaper of its descendants, and not dumpable: its `/proc/<pid>/`
/// files (environ, with the function's AWS credentials; mem) then belong to root, so a job
/// running as the same non-root user cannot read them.
pub fn harden_runner_process() {
    // SAFETY: prctl with these options takes integer arguments only and has no memory-safety
    // preconditions; failure leaves the process as it was (logged).
    let reaper = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let dumpable = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    if reaper != 0 || dumpable != 0 {
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            "could not harden the runner process (subreaper, not dumpable)"
        );
    }
}

/// Live descendants of `root` (its children, theirs, ...), from `/proc/<pid>/stat`.
pub fn descendants_of(root: libc::pid_t) -> Vec<libc::pid_t> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut children: HashMap<libc::pid_t, Vec<libc::pid_t>> = HashMap::new();
    for pid in entries.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<libc::pid_t>().ok()) {
        if let Some(ppid) = parent_of(pid) {
            children.entry(ppid).or_default().push(pid);
        }
    }
    let mut found = Vec::new();
    let mut seen = HashSet::new();
    let mut todo = vec![root];
    while let Some(pid) = todo.pop() {
        for &child in children.get(&pid).into_iter().flatten() {
            if seen.insert(child) {
                found.push(child);
                todo.push(child);
            }
        }
    }
    found
}

/// The parent pid in `/proc/<pid>/stat`: the field after the command name, which is in
/// parentheses and may itself hold spaces and parentheses.
fn parent_of(pid: libc::pid_t) -> Option<libc::pid_t> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace();
    let _state = fields.next()?;
    fields.next()?.parse().ok()
}

/// What a sweep found and did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Swept {
    pub processes_killed: usize,
    pub entries_removed: usize,
}

/// Kills every descendant of this process until none is left (they may fork while we look;
/// gives up after two seconds), reaps those that were re-parented to us, and removes every
/// entry under `scratch_root`.
pub fn sweep(scratch_root: &Path) -> Swept {
    let me = std::process::id() as libc::pid_t;
    let started = Instant::now();
    let mut killed = HashSet::new();
    loop {
        let live: Vec<_> = descendants_of(me)
            .into_iter()
            .filter(|pid| !is_zombie(*pid))
            .collect();
        if live.is_empty() || started.elapsed() > Duration::from_secs(2) {
            if !live.is_empty() {
                tracing::warn!(
                    remaining = live.len(),
                    "processes survived the sandbox sweep"
                );
            }
            break;
        }
        for pid in live {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            killed.insert(pid);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    for pid in descendants_of(me) {
        if parent_of(pid) == Some(me) && is_zombie(pid) {
            // SAFETY: waitpid on one pid we were given as a child; status is not read.
            unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
        }
    }
    Swept {
        processes_killed: killed.len(),
        entries_removed: empty_dir(scratch_root),
    }
}

fn is_zombie(pid: libc::pid_t) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let after = &stat[stat.rfind(')')? + 1..];
            after
                .split_whitespace()
                .next()
                .map(|s| s == "Z" || s == "X")
        })
        .unwrap_or(true)
}

/// Removes everything under `dir` (not `dir` itself); how many top-level entries went.
fn empty_dir(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        let gone = match entry.file_type() {
            Ok(t) if t.is_dir() => std::fs::remove_dir_all(&path),
            _ => std::fs::remove_file(&path),
        };
        match gone {
            Ok(()) => removed += 1,
            Err(error) => tracing::warn!(path = %path.display(), %error,
                "could not remove a file the previous job left in the sandbox"),
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parent_is_read_past_a_command_name_with_spaces_and_parentheses() {
        let me = std::process::id() as libc::pid_t;
        // Our own parent is whatever started the test; it is a positive pid.
        assert!(parent_of(me).is_some_and(|p| p > 0));
        assert_eq!(parent_of(-1), None);
    }
}
