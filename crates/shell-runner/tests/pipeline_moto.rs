//! docs/how-it-works.md's `test` job ("A typical pipeline") on the Lambda route (the zip package: no git binary), in one job:
//! it checks out its commit over smart HTTP with the job token, restores its cache, builds,
//! saves the cache and uploads its artifacts; the next pipeline's job gets that cache. Against
//! gitlab-runner-mock (behind the bridge that sends `cache:`), `git http-backend` on loopback
//! and moto's S3 (`MOTO_ENDPOINT`).
//!
//! It also prints what users feel, measured here (printed, never asserted): the checkout of
//! the test repository (a job that checks out minus the same job without) and the cache
//! round trip (restore and save of the job's cache: the warm job minus the same job without
//! `cache:`).

mod common;

use std::time::{Duration, Instant};

use common::git_server::{GitServer, commit, git, publish};
use common::job_rewriter::JobRewriter;
use common::s3::{new_bucket, settings};
use common::*;
use ephemeral_core::secrets::Secret;
use gitlab_runner_mock::{GitlabRunnerMock, MockJob, MockJobState};
use serde_json::json;
use shell_runner::{Outcome, ShellRunner};

/// The job's script as docs/how-it-works.md's `.gitlab-ci.yml` has it (its `cache:` too), with a
/// stand-in install (`seq`) and build (`cat`): install dependencies unless the cache brought
/// them, build into `dist/`.
const SCRIPT: &[&str] = &[
    "if [ -f deps/installed ]; then echo 'deps: from the cache'; else mkdir -p deps && seq 1 50000 > deps/lib.txt && touch deps/installed && echo 'deps: installed'; fi",
    "mkdir -p dist && { cat README; wc -l < deps/lib.txt; } > dist/report.txt",
];

struct Pipeline {
    mock: GitlabRunnerMock,
    bridge: JobRewriter,
    runner: ShellRunner,
    git: GitServer,
    sha: String,
    jobs: u64,
    _served: tempfile::TempDir,
    _root: tempfile::TempDir,
}

impl Pipeline {
    async fn new() -> Self {
        let served = tempfile::tempdir().unwrap();
        let work = tempfile::tempdir().unwrap();
        git(work.path(), &["init", "-q", "--initial-branch=main"]);
        commit(work.path(), &[("README", "first\n")], "first");
        let sha = commit(
            work.path(),
            &[
                ("README", "the pipeline commit\n"),
                ("src/app.sh", "echo app\n"),
            ],
            "second",
        );
        publish(work.path(), served.path(), "group/app");
        let mock = GitlabRunnerMock::start().await;
        let bridge = JobRewriter::start(mock.uri()).await;
        let root = tempfile::tempdir().unwrap();
        let mut config = config(&mock, root.path());
        config.gitlab_url = bridge.url();
        config.cache = Some(settings(&new_bucket().await));
        let runner = ShellRunner::new(
            config,
            Secret::new(mock.runner_token()),
            shell_runner::new_system_id(),
        )
        .await;
        // gitlab-runner-mock gives its nth job the token job-token-(265 + n).
        let git = GitServer::start(served.path(), "job-token-266");
        Self {
            mock,
            bridge,
            runner,
            git,
            sha,
            jobs: 0,
            _served: served,
            _root: root,
        }
    }

    /// One job of project 4 run to the end: checked out unless `strategy` is `none`, with the
    /// `cache:` entries given; its wall time and log.
    async fn run(
        &mut self,
        strategy: &str,
        script: &[&str],
        cache: serde_json::Value,
    ) -> (MockJob, Duration, String) {
        self.jobs += 1;
        let token = format!("job-token-{}", 265 + self.jobs);
        self.git.accept(&token);
        let url = self.git.url_with_token("group/app.git", &token);
        let job = job(&self.mock, "test", script, &[], 600, |b| {
            let mut set = |k: &str, v: &str| b.add_variable(k.into(), v.into(), true, false);
            set("GIT_STRATEGY", strategy);
            set("CI_REPOSITORY_URL", &url);
            set("CI_PROJECT_PATH", "group/app");
            set("CI_PROJECT_ID", "4");
            set("CI_COMMIT_SHA", &self.sha);
            set("CI_COMMIT_BRANCH", "main");
            set("CI_COMMIT_REF_NAME", "main");
            set("CI_COMMIT_REF_SLUG", "main");
            b.add_artifact(
                None,
                false,
                vec!["dist/".into()],
                None,
                "archive".into(),
                Some("zip".into()),
                None,
            );
        });
        assert_eq!(job.token(), token, "the mock numbers its jobs as assumed");
        self.bridge.set_cache(job.id(), cache);
        let started = Instant::now();
        match invoke(&self.runner, job.id(), LAMBDA).await {
            Outcome::Ran(_) => {}
            other => panic!("expected a job to run, got {other:?}"),
        }
        let took = started.elapsed();
        let text = log(&job);
        assert_eq!(job.state(), MockJobState::Success, "{text}");
        (job, took, text)
    }
}

fn deps_cache() -> serde_json::Value {
    json!([{"key": "deps-$CI_COMMIT_REF_SLUG", "paths": ["deps/"], "policy": "pull-push", "untracked": false, "when": "on_success"}])
}

/// The artifact's files and the report it holds.
fn artifact(job: &MockJob) -> (Vec<String>, String) {
    let uploaded: Vec<_> = job.uploaded_artifacts().collect();
    assert_eq!(uploaded.len(), 1, "one artifacts archive");
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(uploaded[0].data.to_vec())).unwrap();
    let names = zip.file_names().map(str::to_owned).collect();
    let mut report = String::new();
    std::io::Read::read_to_string(&mut zip.by_name("dist/report.txt").unwrap(), &mut report)
        .unwrap();
    (names, report)
}

#[tokio::test]
async fn one_job_checks_out_restores_and_saves_its_cache_and_uploads_artifacts() {
    let mut p = Pipeline::new().await;

    // Pipeline 1: a cold cache.
    let (first, cold, text) = p.run("clone", SCRIPT, deps_cache()).await;
    assert!(text.contains("Cloning repository...\n"), "{text}");
    assert!(text.contains("\ndeps: installed\n"), "{text}");
    assert!(!text.contains("\ndeps: from the cache\n"), "{text}");
    let (names, report) = artifact(&first);
    assert_eq!(
        names,
        ["dist/report.txt"],
        "dist/ only: not the checkout or deps/"
    );
    assert_eq!(
        report, "the pipeline commit\n50000\n",
        "built from the checkout"
    );

    // Pipeline 2: the same job gets the cache the first one saved.
    let (second, warm, text) = p.run("clone", SCRIPT, deps_cache()).await;
    assert!(text.contains("\ndeps: from the cache\n"), "{text}");
    assert_eq!(artifact(&second).1, "the pipeline commit\n50000\n");

    // The numbers: the same job without `cache:`, and without a checkout.
    let (_, uncached, text) = p.run("clone", SCRIPT, json!([])).await;
    assert!(text.contains("\ndeps: installed\n"), "{text}");
    // No checkout: the README the script reads is written by the job itself.
    let baseline = [&["echo the pipeline commit > README"], SCRIPT].concat();
    let (_, no_checkout, text) = p.run("none", &baseline, json!([])).await;
    assert!(!text.contains("Cloning repository"), "{text}");
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "pipeline job on the Lambda route: cold cache {:.0} ms, warm {:.0} ms; checkout of a \
         2-commit repository ≈ {:.0} ms (job {:.0} ms vs {:.0} ms without); cache round trip \
         (restore + save of 50,000 lines) ≈ {:.0} ms (warm job vs {:.0} ms without cache:)",
        ms(cold),
        ms(warm),
        ms(uncached) - ms(no_checkout),
        ms(uncached),
        ms(no_checkout),
        ms(warm) - ms(uncached),
        ms(uncached),
    );
}
