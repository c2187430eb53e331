use bytes::Bytes;
use normalize_path::NormalizePath;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::time::{Duration, Instant, Interval, MissedTickBehavior, interval_at};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tracing::instrument::WithSubscriber;
use tracing::warn;

use crate::client::{ArtifactWhen, Client, JobArtifact, JobResponse, JobState};
use crate::job::TRACE_RESEND_ATTEMPTS;
use crate::job::{Job, JobLog};
use crate::runlist::{RunList, RunListEntry};
use crate::uploader::Uploader;
use crate::{CancellableJobHandler, JobDeadline, JobFailure, UploadableFile};
use crate::{JobResult, Phase};

async fn run<F, J, U, Ret>(
    job: Job,
    client: Client,
    response: Arc<JobResponse>,
    process: F,
    build_dir: PathBuf,
    cancel_token: CancellationToken,
) -> (JobResult, Option<JobFailure>)
where
    F: FnOnce(Job) -> Ret,
    J: CancellableJobHandler<U>,
    U: UploadableFile + Send + 'static,
    Ret: Future<Output = Result<J, ()>>,
{
    if let Err(e) = tokio::fs::create_dir(&build_dir).await {
        job.trace(format!("Failed to create build dir: {e}\n"));
        return (Err(()), Some(JobFailure::new(RUNNER_SYSTEM_FAILURE)));
    }
    let Ok(mut handler) = process(job).await else {
        let _ = tokio::fs::remove_dir_all(&build_dir).await;
        return (Err(()), Some(JobFailure::new(RUNNER_SYSTEM_FAILURE)));
    };

    let script_result = if !cancel_token.is_cancelled() {
        let Some(script) = response.step(Phase::Script) else {
            handler.cleanup().await;
            let _ = tokio::fs::remove_dir_all(&build_dir).await;
            return (Err(()), Some(JobFailure::new(RUNNER_SYSTEM_FAILURE)));
        };
        let script_result = handler
            .step(&script.script, Phase::Script, &cancel_token)
            .await;

        if !cancel_token.is_cancelled()
            && let Some(after) = response.step(Phase::AfterScript)
        {
            // gitlab ignores the after_script result; so do the same
            let _ = handler
                .step(&after.script, Phase::AfterScript, &cancel_token)
                .await;
        }

        script_result
    } else {
        Ok(())
    };

    let mut overall_result = script_result;
    let mut failure = if script_result.is_err() {
        handler.failure()
    } else {
        None
    };

    if !cancel_token.is_cancelled() {
        for artifact in response.artifacts.iter() {
            if process_artifact(
                artifact,
                script_result,
                client.clone(),
                build_dir.as_ref(),
                response.as_ref(),
                &mut handler,
            )
            .await
            .is_err()
            {
                overall_result = Err(());
                failure.get_or_insert_with(|| JobFailure::new(RUNNER_SYSTEM_FAILURE));
                break;
            }
        }
    }

    handler.cleanup().await;

    if let Err(e) = tokio::fs::remove_dir_all(build_dir).await {
        warn!("Failed to remove build dir: {}", e);
    }

    (overall_result, failure)
}

const RUNNER_SYSTEM_FAILURE: &str = "runner_system_failure";
const JOB_EXECUTION_TIMEOUT: &str = "job_execution_timeout";

/// FORK: whether a file belongs in an artifact: matched by `paths` (or untracked by git
/// when `untracked: true`), and not matched by `exclude`.
pub fn artifact_selects<P, E>(
    file_path: &Path,
    file_untracked: bool,
    paths: P,
    untracked: bool,
    exclude: E,
) -> bool
where
    P: IntoIterator,
    P::Item: AsRef<str>,
    E: IntoIterator,
    E::Item: AsRef<str>,
{
    (artifact_path_matches(file_path, paths) || (untracked && file_untracked))
        && !artifact_path_matches(file_path, exclude)
}

#[test]
fn test_artifact_selects() {
    let none: [&str; 0] = [];
    assert!(artifact_selects(
        Path::new("out/a.txt"),
        false,
        ["out"],
        false,
        none
    ));
    assert!(!artifact_selects(
        Path::new("out/a.o"),
        false,
        ["out"],
        false,
        ["out/*.o"]
    ));
    assert!(!artifact_selects(
        Path::new("out/x/a.o"),
        false,
        ["out"],
        false,
        ["**/*.o"]
    ));
    assert!(!artifact_selects(
        Path::new("out/tmp/a"),
        false,
        ["out/"],
        false,
        ["out/tmp"]
    ));
    assert!(artifact_selects(
        Path::new("new.log"),
        true,
        none,
        true,
        none
    ));
    assert!(!artifact_selects(
        Path::new("new.log"),
        false,
        none,
        true,
        none
    ));
    assert!(!artifact_selects(
        Path::new("new.log"),
        true,
        none,
        false,
        none
    ));
    assert!(!artifact_selects(
        Path::new("new.log"),
        true,
        none,
        true,
        ["*.log"]
    ));
}

fn artifact_path_matches<I: IntoIterator>(file_path: &Path, patterns: I) -> bool
where
    I::Item: AsRef<str>,
{
    patterns.into_iter().any(|test_path| {
        let test_path = Path::new(test_path.as_ref());
        let Some(test_path) = test_path.try_normalize() else {
            return false;
        };
        // FORK: `.` (the whole project): normalize-path 0.2.2 normalizes it to `.` (0.2.1
        // gave an empty path, which matched the empty ancestor); say it directly.
        if test_path.as_os_str().is_empty() || test_path == Path::new(".") {
            return true;
        }
        match glob::Pattern::new(&test_path.to_string_lossy()) {
            Ok(pattern) => file_path.ancestors().any(|p| {
                pattern.matches_path_with(
                    p,
                    glob::MatchOptions {
                        require_literal_separator: true,
                        ..glob::MatchOptions::new()
                    },
                )
            }),
            Err(_) => file_path.ancestors().any(|p| p == test_path),
        }
    })
}

#[test]
fn test_artifact_path_matches() {
    assert!(artifact_path_matches(Path::new("abc"), &["abc"]));
    assert!(artifact_path_matches(Path::new("abc"), &["a*c"]));
    assert!(artifact_path_matches(Path::new("abc/d"), &["abc"]));
    assert!(artifact_path_matches(Path::new("abc/d"), &["a*c"]));
    assert!(!artifact_path_matches(Path::new("ab/c"), &["a*c"]));
    assert!(artifact_path_matches(Path::new("abc"), &["."]));
    assert!(artifact_path_matches(Path::new("abc"), &["./abc//"]));
    assert!(artifact_path_matches(Path::new("a/b/c"), &["a/**/c"]));
    assert!(artifact_path_matches(Path::new("a/b/d/e/f/c"), &["a/**/c"]));
    assert!(artifact_path_matches(
        Path::new("a/b/c.yaml"),
        &["**/*.yaml"]
    ));
    assert!(artifact_path_matches(Path::new("["), &["["]));
}

async fn process_artifact<J, U>(
    artifact: &JobArtifact,
    script_result: JobResult,
    client: Client,
    build_dir: &Path,
    response: &JobResponse,
    handler: &mut J,
) -> JobResult
where
    J: CancellableJobHandler<U>,
    U: UploadableFile + Send + 'static,
{
    let upload = match artifact.when {
        ArtifactWhen::Always => true,
        ArtifactWhen::OnSuccess => script_result.is_ok(),
        ArtifactWhen::OnFailure => script_result.is_err(),
    };

    if !upload {
        return Ok(());
    }

    let mut uploader = match Uploader::new(
        client,
        build_dir,
        response.id,
        response.token.clone(),
        artifact,
    ) {
        Ok(uploader) => uploader,
        Err(_) => {
            warn!("Failed to create uploader");
            return Err(());
        }
    };

    let mut uploaded = 0;

    for file in handler.get_uploadable_files().await? {
        let file_path = Path::new(&file.get_path().as_ref()).normalize();

        if artifact_selects(
            &file_path,
            file.untracked(),
            &artifact.paths,
            artifact.untracked,
            &artifact.exclude,
        ) {
            match uploader
                .file(file_path.to_string_lossy().into_owned())
                .await
            {
                Ok(mut upload) => {
                    let mut data = file.get_data().await?;
                    match futures::io::copy(&mut data, &mut upload).await {
                        Ok(_) => {
                            uploaded += 1;
                        }
                        Err(e) => {
                            warn!("Failed to upload file: {:?}", e);
                            return Err(());
                        }
                    }
                }
                Err(e) => {
                    warn!("Failed to begin new file upload: {:?}", e);
                    return Err(());
                }
            }
        }
    }

    if uploaded > 0
        && let Err(e) = uploader.upload().await
    {
        warn!("Failed to upload artifact: {:?}", e);
        return Err(());
    }

    Ok(())
}

const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// FORK: how long the handler gets to stop after the hard deadline cancels it.
const DEADLINE_GRACE: Duration = Duration::from_secs(3);

pub(crate) struct Run {
    client: Client,
    response: Arc<JobResponse>,
    log_offset: usize,
    interval: Interval,
    // Last time a communication to gitlab was done so it knows the job is alive
    last_alive: Instant,
    joblog: RunListEntry<u64, JobLog>,
    status_poll: Option<Duration>,
    deadline: Option<JobDeadline>,
}

impl Run {
    pub(crate) fn new(
        client: Client,
        response: JobResponse,
        run_list: &mut RunList<u64, JobLog>,
        status_poll: Option<Duration>,
        first_trace: Option<Duration>,
        deadline: Option<JobDeadline>,
    ) -> Self {
        let response = Arc::new(response);
        let now = Instant::now();
        let joblog = JobLog::new();
        let joblog = run_list.insert(response.id, joblog);
        Self {
            client,
            response,
            log_offset: 0,
            interval: match first_trace {
                // FORK: first tick sooner, then every 3 s until GitLab says otherwise.
                Some(first) => {
                    let mut i = interval_at(now + first, Duration::from_secs(3));
                    i.set_missed_tick_behavior(MissedTickBehavior::Delay);
                    i
                }
                None => Self::create_interval(now, Duration::from_secs(3)),
            },
            last_alive: now,
            joblog,
            status_poll,
            deadline,
        }
    }

    fn create_interval(instant: Instant, period: Duration) -> Interval {
        let mut interval = interval_at(instant + period, period);
        interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
        interval
    }

    async fn update(
        &self,
        state: JobState,
        failure: Option<&JobFailure>,
        cancel_token: &CancellationToken,
    ) -> bool {
        match self
            .client
            .update_job(self.response.id, &self.response.token, state, failure)
            .await
        {
            Ok(_reply) => true,
            Err(crate::client::Error::JobCancelled) => {
                cancel_token.cancel();
                true
            }
            Err(err) => {
                warn!("Failed to update job status: {:?}", err);
                false
            }
        }
    }

    /// FORK: a chunk that could not be sent goes back to the front of the log, so the next
    /// attempt sends it again from the same offset (upstream drops it: lost output).
    async fn send_trace(
        &mut self,
        buf: Bytes,
        cancel_token: &CancellationToken,
    ) -> Option<Duration> {
        assert!(!buf.is_empty());
        let len = buf.len();

        match self
            .client
            .trace(
                self.response.id,
                &self.response.token,
                buf.clone(),
                self.log_offset,
                len,
            )
            .await
        {
            Ok(reply) => {
                self.log_offset += len;
                reply.trace_update_interval
            }
            Err(crate::client::Error::JobCancelled) => {
                cancel_token.cancel();
                None
            }
            Err(err) => {
                warn!("Failed to send job trace, will resend it: {:?}", err);
                self.joblog.requeue(buf);
                None
            }
        }
    }

    // the gitlab_runner::gitlab::job target is specified for crate users to depend on; Also it's
    // at max verbosity (error), so it always shows up regardless of level.
    #[tracing::instrument(target = "gitlab_runner::gitlab::job",
                          level = "error",
                          skip_all,
                          fields(gitlab.job=self.response.id))]
    pub(crate) async fn run<F, J, U, Ret>(&mut self, process: F, build_dir: PathBuf)
    where
        F: FnOnce(Job) -> Ret + Send + Sync + 'static,
        J: CancellableJobHandler<U> + 'static,
        U: UploadableFile + Send + 'static,
        Ret: Future<Output = Result<J, ()>> + Send + 'static,
    {
        let cancel_token = CancellationToken::new();

        let job = Job::new(
            self.client.clone(),
            self.response.clone(),
            build_dir.clone(),
            self.joblog.clone(),
        );
        let join = tokio::spawn(
            run(
                job,
                self.client.clone(),
                self.response.clone(),
                process,
                build_dir,
                cancel_token.clone(),
            )
            .in_current_span()
            .with_current_subscriber(),
        );
        tokio::pin!(join);

        // FORK: the status poll and the hard deadline; both never fire when not configured.
        let far = Instant::now() + Duration::from_secs(86400 * 365);
        let mut poll = match self.status_poll {
            Some(every) => Self::create_interval(Instant::now(), every),
            None => Self::create_interval(far, Duration::from_secs(86400)),
        };
        let deadline = self.deadline.as_ref().map_or(far, |d| d.at);
        let mut deadline_hit = false;

        let result = loop {
            tokio::select! {
                _ = self.interval.tick() => {
                    // Compare against *now* rather then the tick returned instant as that is the
                    // deadline which might have been missed; especially when testing.
                    let now = Instant::now();
                    if let Some(buf) = self.joblog.split_trace() {
                        if let Some(interval) = self.send_trace(buf, &cancel_token).await
                            && interval != self.interval.period() {
                                self.interval = Self::create_interval(now, interval);
                            }
                        self.last_alive = now;
                    } else if now - self.last_alive > KEEPALIVE_INTERVAL {
                        // In case of errors another update will be sent at the next tick
                        self.update(JobState::Running, None, &cancel_token).await;
                        self.last_alive = now;
                    }
                },
                _ = poll.tick() => {
                    let now = Instant::now();
                    let every = self.status_poll.unwrap_or(KEEPALIVE_INTERVAL);
                    // Half a period of slack: a trace upload just before counts as a poll.
                    if now - self.last_alive >= every / 2 {
                        self.update(JobState::Running, None, &cancel_token).await;
                        self.last_alive = now;
                    }
                },
                _ = tokio::time::sleep_until(deadline), if !deadline_hit => {
                    deadline_hit = true;
                    cancel_token.cancel();
                    // The handler gets a moment to kill what it started and clean up; after
                    // that its task is dropped.
                    match tokio::time::timeout(DEADLINE_GRACE, &mut join).await {
                        Ok(r) => break r,
                        Err(_) => {
                            join.abort();
                            break Ok((Err(()), None));
                        }
                    }
                },
                r = &mut join => break r
            }
        };

        let failure = if deadline_hit {
            if let Some(d) = &self.deadline {
                self.joblog.trace(d.message.as_bytes());
            }
            Some(JobFailure::new(JOB_EXECUTION_TIMEOUT))
        } else {
            match &result {
                Ok((_, failure)) => failure.clone(),
                // The handler panicked.
                Err(_) => Some(JobFailure::new(RUNNER_SYSTEM_FAILURE)),
            }
        };

        // Send the remaining trace buffer back to gitlab. FORK: a failed upload is retried
        // (a short pause between attempts) before giving up on the tail of the log.
        for attempt in 0..TRACE_RESEND_ATTEMPTS {
            let Some(buf) = self.joblog.split_trace() else {
                break;
            };
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
            }
            self.send_trace(buf, &cancel_token).await;
            if cancel_token.is_cancelled() && !deadline_hit {
                break;
            }
        }

        // Don't bother updating the status if cancelled by GitLab, since it will just fail.
        if deadline_hit || !cancel_token.is_cancelled() {
            let state = match result {
                Ok((Ok(_), _)) if !deadline_hit => JobState::Success,
                _ => JobState::Failed,
            };
            let failure = match state {
                JobState::Failed => failure,
                _ => None,
            };
            // FORK: retried: a job left `running` in GitLab waits for its stuck-job timeout.
            for attempt in 0..TRACE_RESEND_ATTEMPTS {
                if attempt > 0 {
                    tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                }
                let fresh = CancellationToken::new();
                if self.update(state.clone(), failure.as_ref(), &fresh).await {
                    break;
                }
            }
        }
    }
}
