//! The shell runner against gitlab-runner-mock (GitLab's runner API over HTTP), with real
//! bash processes, invoked through the Lambda handler the binary registers. The checkout is
//! tested in checkout.rs, against a real git server.

mod common;

use std::time::{Duration, Instant};

use common::*;
use gitlab_runner_mock::MockJobState;
use shell_runner::{JobReport, Outcome};

fn ran(outcome: Outcome) -> JobReport {
    match outcome {
        Outcome::Ran(report) => report,
        other => panic!("expected a job to run, got {other:?}"),
    }
}

#[tokio::test]
async fn success_echoes_commands_and_sees_job_and_runner_variables() {
    let s = setup().await;
    let job = job(
        &s.mock,
        "hello",
        &[
            "echo \"hello $GREETING\"",
            "test \"$PWD\" = \"$CI_PROJECT_DIR\" && echo in-project-dir",
            "echo \"server=$CI_SERVER timeout=$CI_JOB_TIMEOUT\"",
        ],
        &[],
        600,
        |b| b.add_variable("GREETING".into(), "world".into(), true, false),
    );
    let report = ran(invoke(&s.runner, job.id(), LAMBDA).await);

    assert_eq!(job.state(), MockJobState::Success);
    assert_eq!(report.result, "success");
    assert_eq!(report.job_id, job.id());
    let log = log(&job);
    assert!(
        log.contains("\x1b[32;1m$ echo \"hello $GREETING\"\x1b[0;m"),
        "{log}"
    );
    assert!(log.contains("hello world\n"), "{log}");
    assert!(log.contains("in-project-dir\n"), "{log}");
    assert!(log.contains("server=yes timeout=600\n"), "{log}");
}

#[tokio::test]
async fn script_failure_reports_the_exit_code_and_after_script_still_runs() {
    let s = setup().await;
    let job = job(
        &s.mock,
        "fails",
        &["echo before", "exit 3", "echo never-printed"],
        &["echo \"after_script sees $CI_JOB_STATUS\""],
        600,
        |_| {},
    );
    let report = ran(invoke(&s.runner, job.id(), LAMBDA).await);

    assert_eq!(job.state(), MockJobState::Failed);
    assert_eq!(report.result, "failed");
    assert_eq!(report.failure_reason.as_deref(), Some("script_failure"));
    assert_eq!(report.exit_code, Some(3));
    let log = log(&job);
    assert!(log.contains("before\n"), "{log}");
    assert!(!log.contains("never-printed\n"), "{log}");
    assert!(log.contains("ERROR: Job failed: exit code 3"), "{log}");
    assert!(log.contains("after_script sees failed\n"), "{log}");
}

#[tokio::test]
async fn masked_values_never_reach_the_trace_even_split_across_writes() {
    let s = setup().await;
    let secret = "s3cr3t-Value-42";
    let job = job(
        &s.mock,
        "masked",
        &[
            "echo \"the secret is $SECRET\"",
            // Two writes with a pause: the value reaches the runner in two reads.
            "printf '%s' \"${SECRET:0:9}\"; sleep 0.3; printf '%s\\n' \"${SECRET:9}\"",
            "echo \"jt: $CI_JOB_TOKEN\"",
        ],
        &["echo \"after: $SECRET\""],
        600,
        |b| b.add_variable("SECRET".into(), secret.into(), false, true),
    );
    let report = ran(invoke(&s.runner, job.id(), LAMBDA).await);

    assert_eq!(report.result, "success");
    let log = log(&job);
    assert!(!log.contains(secret), "{log}");
    assert!(
        !log.contains("s3cr3t-Va"),
        "the split value leaked its first half: {log}"
    );
    assert!(!log.contains(job.token()), "{log}");
    assert!(log.contains("the secret is [MASKED]\n"), "{log}");
    assert!(log.contains("after: [MASKED]\n"), "{log}");
    assert_eq!(log.matches("[MASKED]").count(), 4, "{log}");
}

#[tokio::test]
async fn timeout_shorter_than_the_script_fails_the_job_and_kills_everything() {
    let s = setup().await;
    let job = job(
        &s.mock,
        "too slow",
        &[
            "sleep 7101 &",
            "setsid sleep 7102 &",
            "echo started",
            "sleep 7103",
        ],
        &["echo \"after timeout: $CI_JOB_STATUS\""],
        2,
        |_| {},
    );
    let started = Instant::now();
    let report = ran(invoke(&s.runner, job.id(), LAMBDA).await);

    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(job.state(), MockJobState::Failed);
    assert_eq!(
        report.failure_reason.as_deref(),
        Some("job_execution_timeout")
    );
    let log = log(&job);
    assert!(
        log.contains("ERROR: Job failed: execution took longer than 2s (the job's timeout)"),
        "{log}"
    );
    assert!(log.contains("after timeout: failed\n"), "{log}");
    for n in ["7101", "7102", "7103"] {
        assert_eq!(
            processes_running(&["sleep", n]),
            Vec::<u32>::new(),
            "sleep {n} survived"
        );
    }
}

#[tokio::test]
async fn lambda_time_left_limits_the_script_when_shorter_than_the_job_timeout() {
    // 6 s of Lambda left, 3 s kept back: the script gets 3 s although the job allows 1 h.
    let s = setup_with(|c| {
        c.margins.reserve = Duration::from_secs(3);
        c.margins.report = Duration::from_secs(1);
    })
    .await;
    let job = job(&s.mock, "long", &["sleep 7201"], &[], 3600, |_| {});
    let started = Instant::now();
    let report = ran(invoke(&s.runner, job.id(), Duration::from_secs(6)).await);

    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(job.state(), MockJobState::Failed);
    assert_eq!(
        report.failure_reason.as_deref(),
        Some("job_execution_timeout")
    );
    let log = log(&job);
    // 3 s less what the invocation spent before the script started.
    assert!(
        log.contains("s, the time this Lambda invocation had left"),
        "{log}"
    );
    assert_eq!(processes_running(&["sleep", "7201"]), Vec::<u32>::new());
}

#[tokio::test]
async fn less_lambda_time_than_the_reporting_margin_fails_the_job_before_its_script() {
    // 5 s left, 10 s needed to report: the hard deadline has passed when the job arrives.
    // GitLab hears failed, and so does the function's own answer (it once said success).
    let s = setup().await;
    // Outside the builds directory, which is emptied after every job.
    let witness = s.root.path().join("ran-anyway");
    let script = format!("touch '{}'", witness.display());
    let job = job(&s.mock, "late", &[script.as_str()], &[], 600, |_| {});
    let report = ran(invoke(&s.runner, job.id(), Duration::from_secs(5)).await);

    assert_eq!(job.state(), MockJobState::Failed);
    assert_eq!(report.result, "failed");
    assert_eq!(
        report.failure_reason.as_deref(),
        Some("job_execution_timeout")
    );
    assert!(log(&job).contains("about to end"), "{}", log(&job));
    assert!(!witness.exists(), "the script ran");
}

#[tokio::test]
async fn cancel_of_a_silent_job_is_noticed_within_5_s_and_kills_it() {
    let s = setup().await;
    let job = job(&s.mock, "silent", &["sleep 7301"], &[], 600, |_| {});
    let runner = std::sync::Arc::new(s.runner);
    let invoking = {
        let runner = runner.clone();
        let id = job.id();
        tokio::spawn(async move { invoke(&runner, id, LAMBDA).await })
    };
    // Let the job start and print its header, then go quiet long enough that only the status
    // poll can notice the cancel (the trace has nothing new to upload).
    let deadline = Instant::now() + Duration::from_secs(10);
    while processes_running(&["sleep", "7301"]).is_empty() {
        assert!(Instant::now() < deadline, "the script never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    let canceled_at = Instant::now();
    job.cancel();
    let report = ran(invoking.await.unwrap());
    let noticed = canceled_at.elapsed();

    assert!(noticed < Duration::from_secs(5), "took {noticed:?}");
    assert_eq!(report.result, "canceled");
    assert_eq!(job.state(), MockJobState::Cancelled);
    assert_eq!(processes_running(&["sleep", "7301"]), Vec::<u32>::new());
}

#[tokio::test]
async fn artifacts_are_uploaded_with_their_paths() {
    let s = setup().await;
    let job = job(
        &s.mock,
        "artifacts",
        &[
            "mkdir -p out/sub",
            "echo a > out/a.txt",
            "echo b > out/sub/b.txt",
            "echo c > elsewhere.txt",
        ],
        &[],
        600,
        |b| b.add_artifact_paths(vec!["out/".into()]),
    );
    let report = ran(invoke(&s.runner, job.id(), LAMBDA).await);
    assert_eq!(report.result, "success");
    assert_eq!(job.state(), MockJobState::Success);

    let uploaded: Vec<_> = job.uploaded_artifacts().collect();
    assert_eq!(uploaded.len(), 1);
    assert_eq!(uploaded[0].artifact_type.as_deref(), Some("archive"));
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(uploaded[0].data.to_vec())).unwrap();
    let mut names: Vec<_> = zip.file_names().map(str::to_owned).collect();
    names.sort();
    assert_eq!(names, ["out/a.txt", "out/sub/b.txt"]);
    let mut contents = String::new();
    std::io::Read::read_to_string(&mut zip.by_name("out/sub/b.txt").unwrap(), &mut contents)
        .unwrap();
    assert_eq!(contents, "b\n");
}

#[tokio::test]
async fn dependency_artifacts_are_extracted_before_the_script() {
    let s = setup().await;
    // A build job uploads an artifact through the runner; a later job depends on it.
    let build = job(
        &s.mock,
        "build",
        &[
            "mkdir dist",
            "printf 'echo tool-from-build-job\\n' > dist/tool.sh",
        ],
        &[],
        600,
        |b| b.add_artifact_paths(vec!["dist/".into()]),
    );
    let test = job(&s.mock, "test", &["sh dist/tool.sh"], &[], 600, |b| {
        b.dependency(build.clone())
    });
    assert_eq!(
        ran(invoke(&s.runner, build.id(), LAMBDA).await).result,
        "success"
    );
    let report = ran(invoke(&s.runner, test.id(), LAMBDA).await);

    let log = log(&test);
    assert_eq!(report.result, "success", "{log}");
    assert!(
        log.contains(&format!("Downloading artifacts for build ({})", build.id())),
        "{log}"
    );
    assert!(log.contains("tool-from-build-job\n"), "{log}");
}

#[tokio::test]
async fn two_jobs_in_one_warm_environment_share_no_files_or_processes() {
    let s = setup().await;
    let first = job(
        &s.mock,
        "first",
        &[
            "echo data > leftover.txt",
            "echo x > \"$HOME/.leftover\"",
            "echo y > \"$TMPDIR/leftover\"",
            "sleep 7401 &",
            "setsid sleep 7402 &",
            "echo done",
        ],
        &[],
        600,
        |_| {},
    );
    let report = ran(invoke(&s.runner, first.id(), LAMBDA).await);
    assert_eq!(report.result, "success", "{}", log(&first));
    assert_eq!(processes_running(&["sleep", "7401"]), Vec::<u32>::new());
    assert_eq!(processes_running(&["sleep", "7402"]), Vec::<u32>::new());
    let builds = s.root.path().join("builds");
    assert_eq!(
        std::fs::read_dir(&builds).unwrap().count(),
        0,
        "builds dir not emptied"
    );

    let second = job(
        &s.mock,
        "second",
        &[
            "test ! -e leftover.txt",
            "test ! -e \"$HOME/.leftover\"",
            "test ! -e \"$TMPDIR/leftover\"",
            "ls -A \"$CI_BUILDS_DIR/..\"",
        ],
        &[],
        600,
        |_| {},
    );
    let report = ran(invoke(&s.runner, second.id(), LAMBDA).await);
    let log2 = log(&second);
    assert_eq!(report.result, "success", "{log2}");
    // Only the second job's own directory exists under the builds root while it runs.
    assert!(log2.contains(&format!("\n{}\n", second.id())), "{log2}");
    assert!(!log2.contains(&format!("\n{}\n", first.id())), "{log2}");
}

#[tokio::test]
async fn no_pending_job_is_a_normal_outcome() {
    let s = setup().await;
    match invoke(&s.runner, 999, LAMBDA).await {
        Outcome::NoJob { requests, .. } => assert_eq!(requests, 1),
        other => panic!("expected no job, got {other:?}"),
    }
    // A repeated invoke after the job ran (at-least-once delivery) finds nothing either.
    let job = job(&s.mock, "once", &["true"], &[], 600, |_| {});
    assert!(matches!(
        invoke(&s.runner, job.id(), LAMBDA).await,
        Outcome::Ran(_)
    ));
    assert!(matches!(
        invoke(&s.runner, job.id(), LAMBDA).await,
        Outcome::NoJob { .. }
    ));
}

#[tokio::test]
async fn a_refused_runner_token_is_an_error_that_does_not_show_the_token() {
    let mock = gitlab_runner_mock::GitlabRunnerMock::start().await;
    let root = tempfile::tempdir().unwrap();
    let runner = shell_runner::ShellRunner::new(
        config(&mock, root.path()),
        ephemeral_core::secrets::Secret::new("glrt-not-the-right-one"),
        shell_runner::new_system_id(),
    )
    .await;
    let payload = serde_json::from_value(payload(1)).unwrap();
    let mut context = lambda_runtime::Context::default();
    context.deadline = u64::MAX;
    // Lambda retries an invocation that errs: GitLab may be briefly unreachable.
    let err =
        shell_runner::lambda_handler(&runner, lambda_runtime::LambdaEvent::new(payload, context))
            .await
            .unwrap_err()
            .to_string();
    assert!(err.contains("requesting a job from GitLab"), "{err}");
    assert!(err.contains("403"), "{err}");
    assert!(!err.contains("glrt-not-the-right-one"), "{err}");
}
