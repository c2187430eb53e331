//! Prints what the shell runner costs per job, against gitlab-runner-mock on loopback, through
//! the Lambda handler: invocation to first trace byte (handed to the uploader, and seen by
//! "GitLab"), runner overhead per job excluding the script (target < 100 ms without git),
//! the git checkout (gix over smart HTTP from `git http-backend` on loopback) of a small
//! repository, and the release binary's size.
//!
//! `cargo bench -p shell-runner` (numbers only; nothing is asserted).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::git_server::{GitServer, commit, git, publish};
use common::*;
use shell_runner::Outcome;

const JOBS: usize = 20;

fn stats(name: &str, mut v: Vec<f64>) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let p = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    println!(
        "{name:<46} median {:>7.1} ms   p90 {:>7.1} ms   min {:>7.1} ms   max {:>7.1} ms",
        p(0.5),
        p(0.9),
        v[0],
        v[v.len() - 1]
    );
}

async fn measure(
    with_git: bool,
    script: &str,
    jobs: usize,
) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let s = setup().await;
    // A project of 20 files of 4 KiB behind `git http-backend` (the token is checked).
    let served = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let server = GitServer::start(served.path(), "none-yet");
    let mut sha = String::new();
    if with_git {
        git(work.path(), &["init", "-q", "--initial-branch=custom"]);
        let contents = "x".repeat(4096);
        let files: Vec<(String, &str)> = (0..20)
            .map(|i| (format!("f{i}.txt"), contents.as_str()))
            .collect();
        let files: Vec<(&str, &str)> = files.iter().map(|(n, c)| (n.as_str(), *c)).collect();
        sha = commit(work.path(), &files, "c");
        git(work.path(), &["update-ref", "refs/pipelines/120", &sha]);
        publish(work.path(), served.path(), "p");
    }
    let (mut first_local, mut first_gitlab, mut overhead, mut total, mut git_ms) =
        (vec![], vec![], vec![], vec![], vec![]);
    for i in 0..jobs {
        // gitlab-runner-mock numbers jobs from 266 and gives job N `job-token-N`.
        let token = format!("job-token-{}", 266 + i);
        server.accept(&token);
        let url = server.url_with_token("p.git", &token);
        let job = job(&s.mock, &format!("bench {i}"), &[script], &[], 600, |b| {
            if with_git {
                b.add_variable("GIT_STRATEGY".into(), "fetch".into(), true, false);
                b.add_variable("CI_REPOSITORY_URL".into(), url.clone(), true, false);
                b.add_variable("CI_COMMIT_SHA".into(), sha.clone(), true, false);
                b.add_variable("GIT_DEPTH".into(), "1".into(), true, false);
            }
        });
        let watched = job.clone();
        let started = Instant::now();
        // When the first trace bytes reach the mock GitLab.
        let watcher = tokio::spawn(async move {
            while watched.log().is_empty() && !watched.finished() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            started.elapsed()
        });
        let outcome = invoke(&s.runner, job.id(), LAMBDA).await;
        let elapsed = started.elapsed();
        let seen = watcher.await.unwrap();
        let Outcome::Ran(report) = outcome else {
            panic!("no job ran")
        };
        assert_eq!(report.result, "success", "{}", log(&job));
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        total.push(ms(elapsed));
        overhead.push(ms(elapsed) - report.steps_ms as f64 - report.git_ms as f64);
        first_local.push(report.first_trace_ms.unwrap_or_default() as f64);
        first_gitlab.push(ms(seen));
        git_ms.push(report.git_ms as f64);
    }
    (first_local, first_gitlab, overhead, total, git_ms)
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    println!("shell-runner, {JOBS} jobs per case (script `true`), gitlab-runner-mock on loopback");
    let (first_local, first_gitlab, overhead, total, _) = rt.block_on(measure(false, "true", JOBS));
    stats("invocation -> first trace byte (runner)", first_local);
    stats(
        "first trace byte at GitLab (job ends at once)",
        first_gitlab,
    );
    stats("runner overhead per job, excluding script", overhead);
    stats("whole invocation, no git", total);
    let (_, _, overhead, total, git_ms) = rt.block_on(measure(true, "true", JOBS));
    stats(
        "git checkout (gix, http-backend, 20 files, depth 1)",
        git_ms,
    );
    stats("runner overhead per job, excl. script and git", overhead);
    stats("whole invocation, with git", total);
    // A job that is still running when its first output exists: the output reaches GitLab
    // with the first scheduled upload, not with the final one.
    let (_, first_gitlab, _, _, _) = rt.block_on(measure(false, "echo started; sleep 1", 5));
    stats("first trace byte at GitLab, job running 1 s", first_gitlab);

    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    for (path, build) in [
        (
            format!("{target}/release/shell-runner"),
            "cargo build --release -p shell-runner",
        ),
        (
            format!("{target}/lambda/shell-runner/bootstrap"),
            "cargo lambda build --release --arm64 --bin shell-runner",
        ),
    ] {
        match std::fs::metadata(&path) {
            Ok(m) => println!("binary {path}: {:.2} MB", m.len() as f64 / 1_000_000.0),
            Err(_) => println!("binary {path}: not built ({build})"),
        }
    }
}
