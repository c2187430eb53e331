//! The job cache on the Lambda route, through the real runner and moto's S3 (`MOTO_ENDPOINT`,
//! as for tests/e2e; `.ci/run` starts one): a job saves its `cache:` paths under
//! `cache/project/<id>/<key>`, a later job of the same project with the same key (or a
//! fallback key) gets them, another project's job with the same key does not. Bad paths are
//! refused in the job log and never fail the job. gitlab-runner-mock cannot send `cache:`
//! entries: a bridge in front of it adds them (common/job_rewriter.rs).
//!
//! moto does not enforce IAM here, and the Lambda route's role may read every project's
//! prefix anyway (docs/ec2-runners.md, "Job cache"): what keeps projects apart on this route
//! is the object key the runner computes, tested here, not a permission.

mod common;

use std::time::Instant;

use common::job_rewriter::JobRewriter;
use common::s3::{new_bucket, settings};
use common::*;
use ephemeral_core::secrets::Secret;
use gitlab_runner_mock::{GitlabRunnerMock, MockJob, MockJobState};
use serde_json::json;
use shell_runner::cache::S3;
use shell_runner::{Outcome, ShellRunner};

struct Cache {
    mock: GitlabRunnerMock,
    bridge: JobRewriter,
    runner: ShellRunner,
    bucket: String,
    _root: tempfile::TempDir,
}

impl Cache {
    async fn new() -> Self {
        let bucket = new_bucket().await;
        let mock = GitlabRunnerMock::start().await;
        let bridge = JobRewriter::start(mock.uri()).await;
        let root = tempfile::tempdir().unwrap();
        let mut config = config(&mock, root.path());
        config.gitlab_url = bridge.url();
        config.cache = Some(settings(&bucket));
        let runner = ShellRunner::new(
            config,
            Secret::new(mock.runner_token()),
            shell_runner::new_system_id(),
        )
        .await;
        Self {
            mock,
            bridge,
            runner,
            bucket,
            _root: root,
        }
    }

    /// A job of `project` with `cache` entries, run to the end; its log.
    async fn run(
        &self,
        project: u64,
        script: &[&str],
        cache: serde_json::Value,
    ) -> (MockJob, String) {
        let job = job(&self.mock, "cached", script, &[], 600, |b| {
            b.add_variable("CI_PROJECT_ID".into(), project.to_string(), true, false)
        });
        self.bridge.set_cache(job.id(), cache);
        match invoke(&self.runner, job.id(), LAMBDA).await {
            Outcome::Ran(_) => {}
            other => panic!("expected a job to run, got {other:?}"),
        }
        let text = log(&job);
        (job, text)
    }

    /// The object's bytes in moto, if there is one (a signed GET: moto refuses anonymous
    /// reads).
    async fn object(&self, key: &str) -> Option<Vec<u8>> {
        let s3 = S3 {
            http: reqwest::Client::new(),
            settings: settings(&self.bucket),
        };
        let dir = tempfile::tempdir().unwrap();
        let to = dir.path().join("object");
        s3.download(key, &to)
            .await
            .unwrap()
            .then(|| std::fs::read(&to).unwrap())
    }
}

fn entry(key: &str, paths: &[&str], policy: &str) -> serde_json::Value {
    json!({"key": key, "paths": paths, "policy": policy, "untracked": false, "when": "on_success"})
}

#[tokio::test]
async fn a_second_job_gets_the_first_jobs_cache_and_another_project_does_not() {
    let c = Cache::new().await;
    let started = Instant::now();
    let (first, text) = c
        .run(
            4,
            &[
                "mkdir -p deps/sub",
                "echo from-the-first-job > deps/sub/lib.txt",
                "echo other > elsewhere.txt",
            ],
            json!([entry("deps-$CI_PROJECT_ID", &["deps/"], "pull-push")]),
        )
        .await;
    assert_eq!(first.state(), MockJobState::Success, "{text}");
    assert!(text.contains("no cache archive for deps-4 yet"), "{text}");
    assert!(
        text.contains("Creating cache deps-4...") && text.contains("Created cache (1 files)"),
        "{text}"
    );
    // gitlab-runner's own layout: an EC2 runner of the same project finds this archive.
    let archive = c
        .object("cache/project/4/deps-4")
        .await
        .expect("the archive in S3");
    let zip = zip::ZipArchive::new(std::io::Cursor::new(archive)).unwrap();
    assert_eq!(zip.file_names().collect::<Vec<_>>(), ["deps/sub/lib.txt"]);

    let (second, text) = c
        .run(
            4,
            &["cat deps/sub/lib.txt"],
            json!([entry("deps-$CI_PROJECT_ID", &["deps/"], "pull")]),
        )
        .await;
    assert_eq!(second.state(), MockJobState::Success, "{text}");
    assert!(
        text.contains("Successfully extracted cache (1 files)"),
        "{text}"
    );
    assert!(text.contains("from-the-first-job\n"), "{text}");
    // policy pull: nothing is uploaded.
    assert!(
        text.contains("Not uploading cache deps-4 due to policy"),
        "{text}"
    );
    let round_trip = started.elapsed();

    // Another project, the very same key text: its own prefix, nothing there.
    let (other, text) = c
        .run(
            5,
            &["test ! -e deps/sub/lib.txt && echo no-cache-here"],
            json!([entry("deps-4", &["deps/"], "pull")]),
        )
        .await;
    assert_eq!(other.state(), MockJobState::Success, "{text}");
    assert!(text.contains("no cache archive for deps-4 yet"), "{text}");
    assert!(text.contains("no-cache-here\n"), "{text}");
    // A key that climbs is sanitized to stay under the project's own prefix.
    let (climber, text) = c
        .run(
            5,
            &["test ! -e deps/sub/lib.txt && echo still-none"],
            json!([entry("../4/deps-4", &["deps/"], "pull")]),
        )
        .await;
    assert_eq!(climber.state(), MockJobState::Success, "{text}");
    assert!(
        text.contains("sanitized to \\\"4/deps-4\\\"")
            || text.contains("sanitized to \"4/deps-4\""),
        "{text}"
    );
    assert!(text.contains("still-none\n"), "{text}");
    assert!(c.object("cache/project/5/4/deps-4").await.is_none());
    eprintln!("cache round trip (save, then restore in a second job): {round_trip:?}");
}

#[tokio::test]
async fn fallback_keys_are_tried_in_order_and_when_decides_what_is_saved() {
    let c = Cache::new().await;
    let (_, text) = c
        .run(
            7,
            &["mkdir -p deps", "echo main > deps/x"],
            json!([entry("deps-main", &["deps/"], "")]),
        )
        .await;
    assert!(text.contains("Created cache (1 files)"), "{text}");
    // A branch without its own cache starts from main's (fallback_keys), then saves its own.
    let (job, text) = c
        .run(
            7,
            &["cat deps/x", "echo feature > deps/x"],
            json!([{"key": "deps-feature", "paths": ["deps/"], "fallback_keys": ["deps-none", "deps-main"]}]),
        )
        .await;
    assert_eq!(job.state(), MockJobState::Success, "{text}");
    let checked: Vec<_> = text
        .lines()
        .filter(|l| l.starts_with("Checking cache for"))
        .collect();
    assert_eq!(
        checked,
        [
            "Checking cache for deps-feature...",
            "Checking cache for deps-none...",
            "Checking cache for deps-main..."
        ],
        "{text}"
    );
    assert!(text.contains("main\n"), "{text}");
    assert!(c.object("cache/project/7/deps-feature").await.is_some());
    // on_success (the default) is not saved by a failed job; on_failure is.
    let (failed, text) = c
        .run(
            7,
            &["mkdir -p a b", "echo a > a/f", "echo b > b/f", "exit 1"],
            json!([
                {"key": "when-success", "paths": ["a/"]},
                {"key": "when-failure", "paths": ["b/"], "when": "on_failure"}
            ]),
        )
        .await;
    assert_eq!(failed.state(), MockJobState::Failed, "{text}");
    assert!(text.contains("Saving cache for failed job"), "{text}");
    assert!(
        c.object("cache/project/7/when-success").await.is_none(),
        "{text}"
    );
    assert!(
        c.object("cache/project/7/when-failure").await.is_some(),
        "{text}"
    );
}

#[tokio::test]
async fn bad_paths_are_refused_in_the_log_and_never_fail_the_job() {
    let c = Cache::new().await;
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("secret");
    std::fs::write(&secret, "not for the cache").unwrap();
    let (job, text) = c
        .run(
            9,
            &["mkdir -p ok", "echo ok > ok/f"],
            json!([entry(
                "paths",
                &["../../..", &secret.display().to_string(), "ok/"],
                ""
            )]),
        )
        .await;
    assert_eq!(job.state(), MockJobState::Success, "{text}");
    assert!(
        text.contains("is not a subpath of the project directory: not cached"),
        "{text}"
    );
    assert!(
        text.contains("is absolute: cache paths are relative"),
        "{text}"
    );
    let archive = c
        .object("cache/project/9/paths")
        .await
        .expect("ok/ is cached");
    let zip = zip::ZipArchive::new(std::io::Cursor::new(archive)).unwrap();
    assert_eq!(zip.file_names().collect::<Vec<_>>(), ["ok/f"]);

    // No bucket at all (RunnerCache off): a notice, the job runs.
    let (job, text) = {
        let mock = GitlabRunnerMock::start().await;
        let bridge = JobRewriter::start(mock.uri()).await;
        let root = tempfile::tempdir().unwrap();
        let mut config = config(&mock, root.path());
        config.gitlab_url = bridge.url();
        let runner = ShellRunner::new(
            config,
            Secret::new(mock.runner_token()),
            shell_runner::new_system_id(),
        )
        .await;
        let job = common::job(&mock, "no-bucket", &["echo ran"], &[], 600, |_| {});
        bridge.set_cache(job.id(), json!([entry("k", &["x/"], "")]));
        invoke(&runner, job.id(), LAMBDA).await;
        let text = log(&job);
        (job, text)
    };
    assert_eq!(job.state(), MockJobState::Success, "{text}");
    assert!(
        text.contains("Skipping cache extraction: this stack keeps no cache"),
        "{text}"
    );
}
