//! The in-Lambda shell runner: an invocation asks GitLab for one job and runs it with bash in
//! the Lambda sandbox. Its runner token is the job's own ([`ephemeral_core::lambda_runner`]:
//! made for the job by the provision workflow, taken from its SSM parameter, which is deleted
//! at once, and the runner deleted when the invocation ends), or, when the stack asks for it
//! explicitly, one token shared by every invocation. The job protocol
//! is `gitlab_runner`'s (a fork of collabora's crate, see `crates/gitlab-runner-fork/FORK.md`);
//! every decision (time budget, masking, scripts, environment, checkout, failure reasons) is
//! `ephemeral_core::shell`'s. This crate carries them out: directories, processes, git, files.

pub mod cache;
pub mod function;
pub mod git;
pub mod process;
pub mod sandbox;
pub mod tokens;
pub mod trace;

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ephemeral_core::hook::{JobEvent, JobStatus};
pub use ephemeral_core::lambda_runner::RunnerGrant;
pub use ephemeral_core::secrets::Secret;
use ephemeral_core::shell::{
    self, Checkout, JobVariable, Margins, Masker, RunnerSide, ScriptBudget, failure_reason,
};
use gitlab_runner::job::Job;
use gitlab_runner::{
    CancellableJobHandler, JobDeadline, JobFailure, JobResult, JobRunList, Phase, Runner,
    RunnerBuilder, UploadableFile,
};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_util::compat::{Compat, TokioAsyncReadCompatExt};
use tokio_util::sync::CancellationToken;
use url::Url;

use crate::process::Ended;
pub use crate::tokens::{RunnerTokens, Tokens};
use crate::trace::Trace;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Lambda's longest invocation.
pub const LAMBDA_MAX: Duration = ephemeral_core::lambda_runner::LAMBDA_MAX;

/// What the provision state machine sends (`StartShellRunner`): the job whose hook started
/// this invocation. GitLab hands us whichever pending job fits the runner, not necessarily
/// this one; the payload is for the logs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Invocation {
    pub job_key: String,
    pub job: JobEvent,
    /// The runner to take the job with (the workflow's ProvisionLambdaRunner step). Absent
    /// (a payload from before per-job runners): the shared token, if this runner has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner: Option<RunnerGrant>,
}

/// What an invocation did. Returned to Lambda (async invokes drop it; the log keeps it).
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// GitLab had no job for this runner: another invocation took it, or it was canceled.
    /// Normal with at-least-once delivery.
    NoJob {
        requests: u32,
        waited_ms: u64,
    },
    Ran(JobReport),
    /// No runner token to ask with: the job's parameter is gone (an earlier delivery of this
    /// invoke took it, or the reaper removed it), or the workflow made no runner. The
    /// reconciler gives a job still pending a new attempt.
    NoRunner {
        reason: String,
    },
}

/// How the job's script ended and what it cost, as seen by this runner.
#[derive(Debug, Clone, Serialize, PartialEq, Default)]
pub struct JobReport {
    pub job_id: u64,
    /// `success`, `failed` or `canceled`: the script's result (an artifact upload failure
    /// after a successful script is reported to GitLab as failed, not here).
    pub result: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure_reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// From the start of the invocation to the first byte handed to the trace uploader.
    pub first_trace_ms: Option<u64>,
    /// Runner work before the script: directories, variables, checkout, dependencies.
    pub prepare_ms: u64,
    /// Of which git took this long.
    pub git_ms: u64,
    /// The script and after_script themselves.
    pub steps_ms: u64,
}

/// Configuration read once per cold start. Errors name the variable.
#[derive(Debug, Clone)]
pub struct Config {
    pub gitlab_url: Url,
    /// The SSM parameter with the shared runner token (`glrt-...`), read at cold start: only
    /// with `ShellRunnerMode=shared-token`. Unset: every invocation takes its job's own token.
    pub token_parameter: Option<String>,
    /// Where jobs run; emptied before and after every invocation.
    pub root: PathBuf,
    /// How long to keep asking GitLab for a job before "no job" (Lambda delivers the invoke
    /// right after the hook; GitLab may take a moment to make the job pending for us).
    pub request_wait: Duration,
    pub request_every: Duration,
    pub margins: Margins,
    /// Cancel detection: ask GitLab for the job's status at least this often.
    pub status_poll: Duration,
    /// Variables of the function's environment passed to jobs (not the AWS credentials).
    pub inherit_env: Vec<String>,
    /// The sandbox's scratch root (`/tmp` in Lambda, from `SANDBOX_SCRATCH_ROOT`): when set,
    /// every other process of the sandbox is killed and everything under it removed, before
    /// and after each job ([`sandbox`]). Unset, only the job's own processes and `root` are
    /// cleaned (a test process that shares its process tree and `/tmp`).
    pub sandbox_scratch: Option<PathBuf>,
    /// The job cache's bucket and the credentials to sign for it (`CACHE_BUCKET_NAME` and
    /// Lambda's environment); `None`: `cache:` entries are skipped with a notice.
    pub cache: Option<cache::CacheSettings>,
}

#[derive(Debug, thiserror::Error)]
pub enum ShellRunnerError {
    #[error("configuration: {0}")]
    Config(String),
    /// GitLab could not be asked for a job: Lambda retries the invocation.
    #[error("requesting a job from GitLab: {0}")]
    Request(String),
    #[error("preparing {path}: {error}")]
    Io { path: String, error: std::io::Error },
}

/// The template sets it to `/tmp`: the sweep empties it between jobs.
pub const SANDBOX_SCRATCH_ROOT: &str = "SANDBOX_SCRATCH_ROOT";

/// An absolute directory other than `/`: the sweep removes everything under it.
fn scratch_root(text: &str) -> Result<PathBuf, ShellRunnerError> {
    let path = PathBuf::from(text);
    if !path.is_absolute() || path.parent().is_none() {
        return Err(ShellRunnerError::Config(format!(
            "{SANDBOX_SCRATCH_ROOT}=`{text}`: use an absolute directory other than `/` (in Lambda: /tmp)"
        )));
    }
    Ok(path)
}

const DEFAULT_INHERIT: &str = "PATH,LANG,LC_ALL,TZ,LD_LIBRARY_PATH,AWS_REGION,AWS_DEFAULT_REGION";

impl Config {
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, ShellRunnerError> {
        let value = |name: &str| {
            get(name)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let required = |name: &str| {
            value(name).ok_or_else(|| ShellRunnerError::Config(format!("{name} is not set")))
        };
        let seconds = |name: &str, default: u64| -> Result<Duration, ShellRunnerError> {
            match value(name) {
                None => Ok(Duration::from_secs(default)),
                Some(v) => v.parse::<u64>().map(Duration::from_secs).map_err(|_| {
                    ShellRunnerError::Config(format!("{name}=`{v}` is not a whole number"))
                }),
            }
        };
        let url = required("GITLAB_URL")?;
        let gitlab_url = Url::parse(&url)
            .map_err(|e| ShellRunnerError::Config(format!("GITLAB_URL `{url}`: {e}")))?;
        Ok(Self {
            gitlab_url,
            token_parameter: value("RUNNER_TOKEN_PARAMETER"),
            root: value("SHELL_RUNNER_ROOT")
                .unwrap_or_else(|| "/tmp/shell-runner".into())
                .into(),
            request_wait: seconds("REQUEST_WAIT_SECONDS", 10)?,
            request_every: Duration::from_secs(2),
            margins: Margins {
                reserve: seconds("DEADLINE_RESERVE_SECONDS", 60)?,
                report: seconds("DEADLINE_REPORT_SECONDS", 10)?,
            },
            status_poll: seconds("STATUS_POLL_SECONDS", 2)?,
            inherit_env: value("INHERIT_ENV")
                .unwrap_or_else(|| DEFAULT_INHERIT.into())
                .split(',')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect(),
            sandbox_scratch: value(SANDBOX_SCRATCH_ROOT)
                .map(|root| scratch_root(&root))
                .transpose()?,
            cache: cache::CacheSettings::from_lookup(&get),
        })
    }

    pub fn from_env() -> Result<Self, ShellRunnerError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }
}

/// One per execution environment: built at cold start, reused by every warm invocation.
pub struct ShellRunner {
    config: Arc<Config>,
    system_id: String,
    builds: PathBuf,
    tokens: Tokens,
    /// The runner protocol's HTTP client: no redirect is followed (a token goes to GitLab's
    /// address and nowhere else).
    http: reqwest::Client,
    /// GitLab's REST API, for the per-job runner to delete itself (https unless allowed).
    gitlab: ephemeral_gitlab::GitLabClient,
    /// Lambda runs one invocation at a time per environment; the lock makes that explicit.
    one_at_a_time: tokio::sync::Mutex<()>,
    cache: Option<Arc<cache::S3>>,
}

impl ShellRunner {
    /// With a shared token only (`ShellRunnerMode=shared-token`; tests).
    pub async fn new(config: Config, token: Secret, system_id: String) -> Self {
        Self::with_tokens(config, Tokens::shared(token), system_id)
    }

    /// `system_id`: `r_` + 12 characters ([`shell::system_id`]), stable for the environment,
    /// so that each warm environment is one runner manager in GitLab.
    pub fn with_tokens(config: Config, tokens: Tokens, system_id: String) -> Self {
        if config.sandbox_scratch.is_some() {
            sandbox::harden_runner_process();
        }
        let builds = config.root.join("builds");
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(60))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default();
        let gitlab = ephemeral_gitlab::GitLabClient::new(
            config.gitlab_url.as_str(),
            ephemeral_gitlab::RetryPolicy::default(),
        );
        let cache = config.cache.clone().map(|settings| {
            Arc::new(cache::S3 {
                http: http.clone(),
                settings,
            })
        });
        Self {
            config: Arc::new(config),
            system_id,
            builds,
            tokens,
            http,
            gitlab,
            one_at_a_time: tokio::sync::Mutex::new(()),
            cache,
        }
    }

    pub fn system_id(&self) -> &str {
        &self.system_id
    }

    /// Why GitLab's URL is refused (plain http to a host that is not loopback, unless
    /// `ALLOW_INSECURE_GITLAB_URL=true`): checked at cold start.
    pub fn url_refusal(&self) -> Option<&str> {
        self.gitlab.url_refusal()
    }

    /// The runner protocol client for one invocation, with its token.
    async fn runner(&self, token: &Secret) -> Runner {
        RunnerBuilder::new(
            self.config.gitlab_url.clone(),
            token.expose().to_owned(),
            self.builds.clone(),
            JobRunList::new(),
        )
        .system_id(self.system_id.clone())
        .version(format!("ephemeral-shell-runner {VERSION}"))
        .platform("linux")
        .architecture(std::env::consts::ARCH)
        .status_poll_interval(self.config.status_poll)
        .first_trace_after(Duration::from_millis(250))
        .http_client(self.http.clone())
        .build()
        .await
    }

    /// Asks for a job, runs it to the end, and leaves the environment clean. `deadline` is
    /// when Lambda stops this invocation. A per-job runner is deleted at the end, whatever
    /// happened: its token is then worth nothing to whoever read it.
    pub async fn handle(
        &self,
        invocation: &Invocation,
        deadline: Instant,
    ) -> Result<Outcome, ShellRunnerError> {
        let _one = self.one_at_a_time.lock().await;
        let taken = match self.tokens.for_invocation(invocation).await? {
            Ok(taken) => taken,
            Err(reason) => {
                tracing::warn!(job_key = %invocation.job_key, %reason, "no runner for this invocation");
                return Ok(Outcome::NoRunner { reason });
            }
        };
        let outcome = self.run_one(invocation, &taken.token, deadline).await;
        if taken.per_job {
            self.delete_own_runner(invocation, &taken.token).await;
        }
        outcome
    }

    /// A per-job runner removes itself with its own token; failing that, the job's teardown
    /// and the reaper remove it.
    async fn delete_own_runner(&self, invocation: &Invocation, token: &Secret) {
        match self.gitlab.delete_own_runner(token).await {
            Ok(deleted) => tracing::info!(
                job_key = %invocation.job_key,
                deleted = ?deleted,
                "per-job runner deleted"
            ),
            Err(e) => tracing::warn!(
                job_key = %invocation.job_key,
                error = %e,
                "could not delete the per-job runner; the job's teardown or the reaper will"
            ),
        }
    }

    async fn run_one(
        &self,
        invocation: &Invocation,
        token: &Secret,
        deadline: Instant,
    ) -> Result<Outcome, ShellRunnerError> {
        let started = Instant::now();
        let mut runner = self.runner(token).await;
        self.sweep_sandbox("before the job").await;
        self.reset_builds().await?;
        // A previous invocation that Lambda killed may have left processes behind.
        process::kill_marked_prefix(&self.system_id).await;

        let report = Arc::new(Mutex::new(None::<JobReport>));
        let context = Arc::new(JobContext {
            config: self.config.clone(),
            http: self.http.clone(),
            system_id: self.system_id.clone(),
            invoked_at: started,
            lambda_deadline: deadline,
            hard_deadline: deadline
                .checked_sub(self.config.margins.report)
                .unwrap_or(started),
            report: report.clone(),
            cache: self.cache.clone(),
        });
        runner.set_job_deadline(Some(JobDeadline {
            at: context.hard_deadline,
            message: shell::deadline_message(),
        }));

        let mut requests = 0;
        let got = loop {
            requests += 1;
            let ctx = context.clone();
            let got = runner
                .request_job(move |job| ShellJob::start(job, ctx))
                .await
                .map_err(|e| ShellRunnerError::Request(e.to_string()))?;
            if got || started.elapsed() + self.config.request_every > self.config.request_wait {
                break got;
            }
            tokio::time::sleep(self.config.request_every).await;
        };
        if !got {
            let waited_ms = started.elapsed().as_millis() as u64;
            tracing::info!(
                job_key = %invocation.job_key,
                requests,
                waited_ms,
                "no job for this runner: another invocation took it, or it is no longer pending"
            );
            return Ok(Outcome::NoJob {
                requests,
                waited_ms,
            });
        }
        runner.drain().await;
        self.reset_builds().await?;
        self.sweep_sandbox("after the job").await;
        let report = report
            .lock()
            .expect("report lock")
            .take()
            .unwrap_or_default();
        tracing::info!(
            job_key = %invocation.job_key,
            job_id = report.job_id,
            result = %report.result,
            failure_reason = report.failure_reason.as_deref(),
            exit_code = report.exit_code,
            prepare_ms = report.prepare_ms,
            git_ms = report.git_ms,
            steps_ms = report.steps_ms,
            "job finished"
        );
        Ok(Outcome::Ran(report))
    }

    /// Kills every other process of the sandbox and empties its scratch root, when configured.
    async fn sweep_sandbox(&self, when: &'static str) {
        let Some(scratch) = self.config.sandbox_scratch.clone() else {
            return;
        };
        let swept = tokio::task::spawn_blocking(move || sandbox::sweep(&scratch))
            .await
            .unwrap_or_default();
        if swept != sandbox::Swept::default() {
            tracing::warn!(
                when,
                processes_killed = swept.processes_killed,
                entries_removed = swept.entries_removed,
                "sandbox swept: a job left processes or files behind"
            );
        }
    }

    /// Nothing of a previous job survives: its directory tree goes, whatever is in it.
    async fn reset_builds(&self) -> Result<(), ShellRunnerError> {
        let io = |error| ShellRunnerError::Io {
            path: self.builds.display().to_string(),
            error,
        };
        match tokio::fs::remove_dir_all(&self.builds).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        tokio::fs::create_dir_all(&self.builds).await.map_err(io)
    }
}

/// The Lambda entry point, exactly as `main` registers it.
pub async fn lambda_handler(
    runner: &ShellRunner,
    event: lambda_runtime::LambdaEvent<Invocation>,
) -> Result<Outcome, lambda_runtime::Error> {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    // Lambda allows 15 minutes at most; a larger value (a local tool's context) is capped
    // rather than overflowing the clock.
    let remaining =
        Duration::from_millis(event.context.deadline.saturating_sub(now_ms)).min(LAMBDA_MAX);
    runner
        .handle(&event.payload, Instant::now() + remaining)
        .await
        .map_err(lambda_runtime::Error::from)
}

/// What every job of one invocation shares.
struct JobContext {
    config: Arc<Config>,
    /// The runner's HTTP client (no redirects), for git too.
    http: reqwest::Client,
    system_id: String,
    invoked_at: Instant,
    lambda_deadline: Instant,
    hard_deadline: Instant,
    report: Arc<Mutex<Option<JobReport>>>,
    cache: Option<Arc<cache::S3>>,
}

/// One job: its directories, environment, trace, and how it went.
struct ShellJob {
    job: Arc<Job>,
    ctx: Arc<JobContext>,
    trace: Arc<Trace>,
    marker: String,
    variables: Vec<JobVariable>,
    runner_side: RunnerSide,
    project_dir: PathBuf,
    checkout: Option<Checkout>,
    started: Instant,
    prepare: Duration,
    git: Duration,
    steps: Duration,
    outcome: JobOutcome,
    files: Option<Vec<ProjectFile>>,
}

/// How the job has gone so far, as GitLab is told it: the script step's result and failure
/// reason, after_script's `CI_JOB_STATUS`, whether caches are saved, the invocation's report.
#[derive(Debug, Clone, PartialEq, Eq)]
enum JobOutcome {
    /// Nothing has failed (yet).
    Succeeded,
    /// The job cannot run (its checkout was refused before any step): the script step fails
    /// at once with this, running nothing. Until it does, nothing has failed.
    CannotRun(JobFailure),
    /// The script step failed; GitLab is told why.
    ScriptFailed(JobFailure),
    /// The job was canceled, in its script or its after_script. Canceled wins over a failed
    /// script, whose failure GitLab is still told with the failed update.
    Canceled { failure: Option<JobFailure> },
}

impl JobOutcome {
    /// The failure GitLab is told when the script step failed.
    fn failure(&self) -> Option<JobFailure> {
        match self {
            Self::Succeeded => None,
            Self::CannotRun(failure) | Self::ScriptFailed(failure) => Some(failure.clone()),
            Self::Canceled { failure } => failure.clone(),
        }
    }

    /// The script failed with `failure`; a canceled job stays canceled.
    fn script_failed(&mut self, failure: JobFailure) {
        *self = match self {
            Self::Canceled { .. } => Self::Canceled {
                failure: Some(failure),
            },
            _ => Self::ScriptFailed(failure),
        };
    }

    /// The job was canceled: that wins over whatever happened before.
    fn canceled(&mut self) {
        *self = Self::Canceled {
            failure: self.failure(),
        };
    }

    fn is_canceled(&self) -> bool {
        matches!(self, Self::Canceled { .. })
    }

    /// after_script's `CI_JOB_STATUS`, and the report's result: canceled, else failed when
    /// the script failed, else success (a job that could not run has not failed until its
    /// script step).
    fn status(&self) -> JobStatus {
        match self {
            Self::Canceled { .. } => JobStatus::Canceled,
            Self::ScriptFailed(_) => JobStatus::Failed,
            Self::Succeeded | Self::CannotRun(_) => JobStatus::Success,
        }
    }

    /// The invocation's report: its status, with the failure only when it failed.
    fn reported(&self) -> (JobStatus, Option<JobFailure>) {
        let status = self.status();
        let failure = match status {
            JobStatus::Failed => self.failure(),
            _ => None,
        };
        (status, failure)
    }
}

/// The job's directories, made, and what the steps are told of them.
struct JobDirs {
    project: PathBuf,
    files: PathBuf,
    runner_side: RunnerSide,
}

fn lambda_remaining(ctx: &JobContext) -> Duration {
    ctx.lambda_deadline
        .saturating_duration_since(Instant::now())
}

/// The job's variables as GitLab sent them.
fn job_variables(job: &Job) -> Vec<JobVariable> {
    job.variables()
        .map(|v| JobVariable {
            key: v.key().to_owned(),
            value: v.value().to_owned(),
            masked: v.masked(),
            file: v.file(),
        })
        .collect()
}

/// The job's log, masking its secrets (the checkout's credentials too), opened with the
/// runner's banner.
fn open_trace(
    job: &Arc<Job>,
    ctx: &JobContext,
    variables: &[JobVariable],
    checkout: &Result<Option<Checkout>, shell::CheckoutError>,
) -> Arc<Trace> {
    let mut secrets: Vec<String> = shell::secrets_to_mask(variables, job.token())
        .map(str::to_owned)
        .collect();
    if let Ok(Some(Checkout {
        auth: Some(auth), ..
    })) = checkout
    {
        secrets.push(auth.header.expose().to_owned());
    }
    let trace = Arc::new(Trace::new(job.clone(), Masker::new(&secrets)));
    trace.line(&format!(
        "Running with ephemeral-runners shell-runner {VERSION} on AWS Lambda (system id {})",
        ctx.system_id
    ));
    trace
}

/// The project, home, tmp and file-variable directories under the job's builds directory,
/// made; a failure is in the job's log.
async fn make_dirs(
    job: &Job,
    ctx: &JobContext,
    trace: &Trace,
    project_path: Option<&str>,
) -> Result<JobDirs, ()> {
    let builds_dir = job.build_dir().to_path_buf();
    let project_dir = builds_dir.join(shell::project_dir_name(project_path));
    let home = builds_dir.join(".home");
    let tmp = builds_dir.join(".tmp");
    let files = builds_dir.join(".files");
    for dir in [&project_dir, &home, &tmp, &files] {
        if let Err(e) = tokio::fs::create_dir_all(dir).await {
            trace.line(&format!("ERROR: creating {}: {e}", dir.display()));
            return Err(());
        }
    }
    let inherited = ctx
        .config
        .inherit_env
        .iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| (k.clone(), v)))
        .collect();
    let runner_side = RunnerSide {
        builds_dir: builds_dir.display().to_string(),
        project_dir: project_dir.display().to_string(),
        home_dir: home.display().to_string(),
        tmp_dir: tmp.display().to_string(),
        files_dir: files.display().to_string(),
        job_timeout: job.timeout(),
        runner_version: VERSION.to_owned(),
        arch: format!("linux/{}", std::env::consts::ARCH),
        inherited,
    };
    Ok(JobDirs {
        project: project_dir,
        files,
        runner_side,
    })
}

/// File-type variables: written once, owner-only, under the job's directory.
async fn write_file_variables(
    trace: &Trace,
    variables: &[JobVariable],
    dirs: &JobDirs,
) -> Result<(), ()> {
    for (name, contents) in shell::step_environment(variables, &dirs.runner_side, None).files {
        let path = dirs.files.join(name);
        let written = async {
            tokio::fs::write(&path, contents).await?;
            use std::os::unix::fs::PermissionsExt;
            tokio::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).await
        };
        if let Err(e) = written.await {
            trace.line(&format!("ERROR: writing a file variable: {e}"));
            return Err(());
        }
    }
    Ok(())
}

impl ShellJob {
    async fn start(job: Job, ctx: Arc<JobContext>) -> Result<Self, ()> {
        let started = Instant::now();
        let job = Arc::new(job);
        let variables = job_variables(&job);
        let lookup = |k: &str| {
            variables
                .iter()
                .find(|v| v.key == k)
                .map(|v| v.value.clone())
        };
        let checkout = shell::checkout_plan(lookup, job.token());
        let trace = open_trace(&job, &ctx, &variables, &checkout);
        let dirs = make_dirs(&job, &ctx, &trace, lookup("CI_PROJECT_PATH").as_deref()).await?;
        write_file_variables(&trace, &variables, &dirs).await?;
        let mut this = Self {
            marker: format!("{}-{}", ctx.system_id, job.id()),
            job,
            ctx,
            trace,
            variables,
            runner_side: dirs.runner_side,
            project_dir: dirs.project,
            checkout: None,
            started,
            prepare: Duration::ZERO,
            git: Duration::ZERO,
            steps: Duration::ZERO,
            outcome: JobOutcome::Succeeded,
            files: None,
        };
        match checkout {
            Ok(plan) => this.checkout = plan,
            Err(e) => {
                // Reported when the script step starts, so the job fails with a reason.
                this.trace.line(&format!("ERROR: {e}"));
                this.outcome =
                    JobOutcome::CannotRun(JobFailure::new(failure_reason::RUNNER_SYSTEM_FAILURE));
            }
        }
        Ok(this)
    }

    fn fail(&mut self, reason: &str, exit_code: Option<i32>) -> JobResult {
        self.outcome.script_failed(JobFailure {
            reason: reason.to_owned(),
            exit_code,
        });
        Err(())
    }

    /// The result of a command that did not succeed, as a job failure.
    fn ended_badly(&mut self, ended: Ended, budget: Option<ScriptBudget>) -> JobResult {
        match ended {
            Ended::Exited(0) => Ok(()),
            Ended::Exited(code) => {
                self.trace.line(&format!(
                    "\x1b[31;1mERROR: Job failed: exit code {code}\x1b[0;m"
                ));
                self.fail(failure_reason::SCRIPT_FAILURE, Some(code))
            }
            Ended::Signaled(sig) => {
                self.trace.line(&format!(
                    "\x1b[31;1mERROR: Job failed: killed by signal {sig}\x1b[0;m"
                ));
                self.fail(failure_reason::SCRIPT_FAILURE, Some(128 + sig))
            }
            Ended::TimedOut => {
                if let Some(budget) = budget {
                    self.trace.line(shell::timeout_message(budget).trim_end());
                }
                self.fail(failure_reason::JOB_EXECUTION_TIMEOUT, None)
            }
            Ended::Canceled => {
                self.outcome.canceled();
                self.trace
                    .line("\nERROR: Job was canceled; its processes were killed");
                Err(())
            }
        }
    }

    /// The checkout the plan describes: the project, then its submodules as
    /// `GIT_SUBMODULE_STRATEGY` asks, each fetched and written by gix on a blocking thread.
    async fn run_git(
        &mut self,
        checkout: &Checkout,
        deadline: Instant,
        cancel: &CancellationToken,
    ) -> Result<(), Ended> {
        self.trace.line(&shell::fetch_message(checkout));
        self.trace.line("Created fresh repository.");
        let project = self
            .git_checkout(
                checkout,
                self.project_dir.clone(),
                Some(shell::checkout_message(checkout)),
                deadline,
                cancel,
            )
            .await?;
        self.trace
            .line(shell::submodules_message(checkout.submodules));
        // Breadth first, like `git submodule update --init --recursive`; paths as git prints
        // them, relative to the project.
        let mut pending =
            std::collections::VecDeque::from([(checkout.clone(), String::new(), project.gitlinks)]);
        while let Some((parent, prefix, gitlinks)) = pending.pop_front() {
            if parent.submodules == shell::SubmoduleStrategy::None {
                continue;
            }
            let dir = self.project_dir.join(&prefix);
            let entries =
                tokio::task::spawn_blocking(move || git::submodule_entries(&dir, &gitlinks)).await;
            let entries = match entries {
                Ok(Ok(entries)) => entries,
                Ok(Err(e)) => {
                    self.trace.line(&format!("ERROR: {e}"));
                    return Err(Ended::Exited(1));
                }
                Err(e) => {
                    self.trace.line(&format!("ERROR: reading submodules: {e}"));
                    return Err(Ended::Exited(1));
                }
            };
            for entry in entries {
                let sub = match shell::submodule_checkout(&parent, &entry) {
                    Ok(Some(sub)) => sub,
                    Ok(None) => continue,
                    Err(e) => {
                        self.trace.line(&format!("ERROR: {e}"));
                        return Err(Ended::Exited(1));
                    }
                };
                let path = if prefix.is_empty() {
                    entry.path.clone()
                } else {
                    format!("{prefix}/{}", entry.path)
                };
                if !no_symlink_on_the_way(&self.project_dir, &path) {
                    // A checked-out symlink must not point the submodule's files elsewhere.
                    self.trace.line(&format!(
                        "ERROR: submodule `{}`: a symlink is on the way to `{path}`",
                        entry.name
                    ));
                    return Err(Ended::Exited(1));
                }
                self.trace.line(&format!(
                    "Submodule '{}' ({}) registered for path '{path}'",
                    entry.name, sub.url
                ));
                let checked = self
                    .git_checkout(&sub, self.project_dir.join(&path), None, deadline, cancel)
                    .await?;
                self.trace.line(&format!(
                    "Submodule path '{path}': checked out '{}'",
                    sub.sha
                ));
                pending.push_back((sub, path, checked.gitlinks));
            }
        }
        Ok(())
    }

    /// One repository: gix on a blocking thread, interrupted at the deadline or on cancel
    /// (its HTTP requests also time out at the deadline, so the thread ends soon after).
    /// `fetched` goes to the trace between the fetch and the checkout.
    async fn git_checkout(
        &self,
        plan: &Checkout,
        dir: PathBuf,
        fetched: Option<String>,
        deadline: Instant,
        cancel: &CancellationToken,
    ) -> Result<git::CheckedOut, Ended> {
        let interrupt = Arc::new(AtomicBool::new(false));
        let http = git::HttpClient {
            client: self.ctx.http.clone(),
            runtime: tokio::runtime::Handle::current(),
        };
        let mut task = tokio::task::spawn_blocking({
            let (plan, trace, interrupt) = (plan.clone(), self.trace.clone(), interrupt.clone());
            let until = deadline.into_std();
            move || {
                git::checkout(&plan, &dir, &http, &interrupt, until, &|| {
                    if let Some(line) = &fetched {
                        trace.line(line);
                    }
                })
            }
        });
        let stopped = tokio::select! {
            done = &mut task => {
                return match done {
                    Ok(Ok(checked_out)) => Ok(checked_out),
                    Ok(Err(e)) => {
                        self.trace.line(&format!("ERROR: {e}"));
                        Err(Ended::Exited(1))
                    }
                    Err(e) => {
                        self.trace.line(&format!("ERROR: the checkout stopped: {e}"));
                        Err(Ended::Exited(1))
                    }
                };
            }
            _ = tokio::time::sleep_until(deadline) => Ended::TimedOut,
            _ = cancel.cancelled() => Ended::Canceled,
        };
        interrupt.store(true, Ordering::Relaxed);
        // gix checks the flag between reads and files; give it a moment to leave the
        // directory alone before the job goes on to fail and clean up.
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        Err(stopped)
    }

    async fn download_dependencies(
        &mut self,
        deadline: Instant,
        cancel: &CancellationToken,
    ) -> Result<(), Ended> {
        let job = self.job.clone();
        for dep in job.dependencies() {
            if dep.artifact_filename().is_none() {
                continue;
            }
            self.trace.line(&format!(
                "Downloading artifacts for {} ({})...",
                dep.name(),
                dep.id()
            ));
            let downloaded = tokio::select! {
                r = dep.download() => r,
                _ = tokio::time::sleep_until(deadline) => return Err(Ended::TimedOut),
                _ = cancel.cancelled() => return Err(Ended::Canceled),
            };
            let artifact = match downloaded {
                Ok(Some(a)) => a,
                Ok(None) => continue,
                Err(e) => {
                    self.trace.line(&format!(
                        "ERROR: downloading artifacts of {}: {e}",
                        dep.name()
                    ));
                    return Err(Ended::Exited(-1));
                }
            };
            let dir = self.project_dir.clone();
            let extracted = tokio::task::spawn_blocking(move || extract(artifact, &dir)).await;
            match extracted {
                Ok(Ok(n)) => self.trace.line(&format!("Extracted {n} files")),
                Ok(Err(e)) => {
                    self.trace.line(&format!(
                        "ERROR: extracting artifacts of {}: {e}",
                        dep.name()
                    ));
                    return Err(Ended::Exited(-1));
                }
                Err(e) => {
                    self.trace
                        .line(&format!("ERROR: extracting artifacts: {e}"));
                    return Err(Ended::Exited(-1));
                }
            }
        }
        Ok(())
    }

    async fn run_script(
        &mut self,
        name: &str,
        commands: &[String],
        env: Vec<(String, String)>,
        deadline: Instant,
        cancel: &CancellationToken,
    ) -> std::io::Result<Ended> {
        let path = Path::new(&self.runner_side.tmp_dir).join(format!("{name}.sh"));
        tokio::fs::write(&path, shell::step_script(commands)).await?;
        let args = vec![
            "--noprofile".to_owned(),
            "--norc".to_owned(),
            path.display().to_string(),
        ];
        let ended = process::run(
            "bash",
            &args,
            &self.project_dir,
            &env,
            &self.marker,
            deadline,
            cancel,
            &self.trace,
        )
        .await;
        self.trace.flush();
        ended
    }

    async fn script_step(&mut self, script: &[String], cancel: &CancellationToken) -> JobResult {
        if let Some(failure) = self.outcome.failure() {
            // A job that cannot run fails here, running nothing.
            if let JobOutcome::CannotRun(_) = self.outcome {
                self.outcome = JobOutcome::ScriptFailed(failure);
            }
            return Err(());
        }
        let budget = shell::script_budget(
            self.job.timeout(),
            lambda_remaining(&self.ctx),
            self.ctx.config.margins,
        );
        let deadline = Instant::now() + budget.limit;

        if let Some(checkout) = self.checkout.clone() {
            let git_started = Instant::now();
            let fetched = self.run_git(&checkout, deadline, cancel).await;
            self.git = git_started.elapsed();
            if let Err(ended) = fetched {
                return match ended {
                    Ended::TimedOut | Ended::Canceled => self.ended_badly(ended, Some(budget)),
                    _ => self.fail(failure_reason::SCRIPT_FAILURE, None),
                };
            }
        } else {
            self.trace.line("Skipping git checkout (GIT_STRATEGY=none)");
        }
        self.restore_caches(deadline, cancel).await;
        if let Err(ended) = self.download_dependencies(deadline, cancel).await {
            return match ended {
                Ended::TimedOut | Ended::Canceled => self.ended_badly(ended, Some(budget)),
                _ => self.fail(failure_reason::MISSING_DEPENDENCY_FAILURE, None),
            };
        }

        let env = shell::step_environment(&self.variables, &self.runner_side, None).vars;
        self.prepare = self.started.elapsed();
        let steps_started = Instant::now();
        let ended = self
            .run_script("script", script, env, deadline, cancel)
            .await;
        self.steps += steps_started.elapsed();
        match ended {
            Ok(ended) => self.ended_badly(ended, Some(budget)),
            Err(e) => {
                self.trace.line(&format!("ERROR: cannot run bash: {e}"));
                self.fail(failure_reason::RUNNER_SYSTEM_FAILURE, None)
            }
        }
    }

    async fn after_script_step(&mut self, script: &[String], cancel: &CancellationToken) {
        self.trace.line("\x1b[36;1mRunning after_script\x1b[0;m");
        let status = self.outcome.status();
        let env =
            shell::step_environment(&self.variables, &self.runner_side, Some(status.as_str())).vars;
        let limit =
            shell::after_script_budget(lambda_remaining(&self.ctx), self.ctx.config.margins);
        let started = Instant::now();
        let ended = self
            .run_script("after_script", script, env, Instant::now() + limit, cancel)
            .await;
        self.steps += started.elapsed();
        match ended {
            Ok(Ended::Exited(0)) => {}
            Ok(Ended::TimedOut) => self.trace.line(&format!(
                "WARNING: after_script timed out after {}",
                shell::format_duration(limit)
            )),
            Ok(Ended::Canceled) => self.outcome.canceled(),
            // GitLab ignores after_script's result; so do we, but say it.
            Ok(other) => self
                .trace
                .line(&format!("WARNING: after_script failed: {other:?}")),
            Err(e) => self.trace.line(&format!("WARNING: cannot run bash: {e}")),
        }
    }

    /// The job's variables by name, for cache keys.
    fn variable_map(&self) -> std::collections::HashMap<String, String> {
        self.variables
            .iter()
            .map(|v| (v.key.clone(), v.value.clone()))
            .collect()
    }

    /// The cache's bucket and the job's project, or why the job's `cache:` is skipped.
    fn cache_target(&self) -> Result<(Arc<cache::S3>, u64), &'static str> {
        let s3 = self
            .ctx
            .cache
            .clone()
            .ok_or("this stack keeps no cache (the stack parameter RunnerCache is off)")?;
        let project = self
            .variables
            .iter()
            .find(|v| v.key == "CI_PROJECT_ID")
            .and_then(|v| v.value.parse().ok())
            .ok_or("the job has no CI_PROJECT_ID")?;
        Ok((s3, project))
    }

    /// Whether the cache entry's `policy` lets this transfer happen, saying in the job's log
    /// (as gitlab-runner does) why not.
    fn cache_policy_allows(
        &mut self,
        policy: &str,
        vars: &std::collections::HashMap<String, String>,
        key: &str,
        transfer: Transfer,
    ) -> bool {
        let parsed =
            ephemeral_core::cache::Policy::parse(&ephemeral_core::cache::expand(policy, vars));
        match parsed {
            Ok(p) if transfer == Transfer::Download && p.pulls() => true,
            Ok(p) if transfer == Transfer::Upload && p.pushes() => true,
            Ok(_) => {
                let verb = match transfer {
                    Transfer::Download => "downloading",
                    Transfer::Upload => "uploading",
                };
                self.trace
                    .line(&format!("Not {verb} cache {key} due to policy"));
                false
            }
            Err(e) => {
                self.trace.warning(&format!("{e} for {key}"));
                false
            }
        }
    }

    /// gitlab-runner's restore_cache stage: for each `cache:` entry that pulls, its key, then
    /// its fallback keys, then CACHE_FALLBACK_KEY, until one is found. Never fails the job.
    async fn restore_caches(&mut self, deadline: Instant, cancel: &CancellationToken) {
        let job = self.job.clone();
        let specs: Vec<_> = job
            .caches()
            .filter(|c| !c.paths().is_empty() || c.untracked())
            .collect();
        if specs.is_empty() {
            return;
        }
        self.trace.line("\x1b[36;1mRestoring cache\x1b[0;m");
        let (s3, project) = match self.cache_target() {
            Ok(target) => target,
            Err(why) => {
                self.trace
                    .line(&format!("Skipping cache extraction: {why}"));
                return;
            }
        };
        let vars = self.variable_map();
        let archive = self.cache_archive();
        for spec in specs {
            let mut warnings = Vec::new();
            let keys = ephemeral_core::cache::restore_keys(
                spec.key(),
                spec.fallback_keys(),
                &vars,
                &mut warnings,
            );
            for warning in warnings {
                self.trace.warning(&warning);
            }
            let Some(first) = keys.first() else {
                self.trace
                    .line("Skipping cache extraction due to empty cache key");
                continue;
            };
            if !self.cache_policy_allows(spec.policy(), &vars, first, Transfer::Download) {
                continue;
            }
            let from = CacheStore {
                s3: &s3,
                project,
                archive: &archive,
            };
            self.restore_first_found(from, &keys, deadline, cancel)
                .await;
        }
    }

    /// Where a cache archive is written on its way to or from the bucket.
    fn cache_archive(&self) -> PathBuf {
        Path::new(&self.runner_side.tmp_dir).join(format!("{}-cache.zip", self.marker))
    }

    /// One `cache:` entry: each of its keys in turn, until one is downloaded and extracted.
    async fn restore_first_found(
        &mut self,
        from: CacheStore<'_>,
        keys: &[String],
        deadline: Instant,
        cancel: &CancellationToken,
    ) {
        for key in keys {
            self.trace.line(&format!("Checking cache for {key}..."));
            let Some(object) = ephemeral_core::cache::object_key(from.project, key) else {
                self.trace
                    .warning(&format!("cache key {key:?} leaves the project's cache"));
                continue;
            };
            let downloaded = tokio::select! {
                r = from.s3.download(&object, from.archive) => r,
                _ = tokio::time::sleep_until(deadline) => Err("the job's time ran out".into()),
                _ = cancel.cancelled() => Err("the job was canceled".into()),
            };
            match downloaded {
                Ok(true) => {}
                Ok(false) => {
                    self.trace
                        .warning(&format!("no cache archive for {key} yet"));
                    continue;
                }
                Err(e) => {
                    self.trace
                        .warning(&format!("Failed to download cache {key}: {e}"));
                    continue;
                }
            }
            if self.extract_cache(from.archive, key).await {
                break;
            }
        }
    }

    /// The downloaded archive of `key` into the project directory (then removed); whether
    /// it was extracted.
    async fn extract_cache(&mut self, archive: &Path, key: &str) -> bool {
        let (from, dir) = (archive.to_path_buf(), self.project_dir.clone());
        let extracted =
            joined(tokio::task::spawn_blocking(move || cache::extract(&from, &dir)).await);
        let _ = tokio::fs::remove_file(archive).await;
        match extracted {
            Ok(done) => {
                for refused in &done.refused {
                    self.trace.warning(&format!(
                        "{refused}: not extracted, it would be written outside the project directory"
                    ));
                }
                self.trace.line(&format!(
                    "Successfully extracted cache ({} files)",
                    done.files
                ));
                true
            }
            Err(e) => {
                self.trace
                    .warning(&format!("Failed to extract cache {key}: {e}"));
                false
            }
        }
    }

    /// gitlab-runner's archive_cache stage, after the steps (and the artifacts): each
    /// `cache:` entry whose `when` matches the job's result and whose policy pushes is zipped
    /// and uploaded under its key. Canceled or out of time: nothing is saved. Never fails the
    /// job.
    async fn save_caches(&mut self) {
        let job = self.job.clone();
        let succeeded = self.outcome.status() == JobStatus::Success;
        let specs: Vec<_> = job
            .caches()
            .filter(|c| !c.paths().is_empty() || c.untracked())
            .filter(|c| ephemeral_core::cache::saves_when(c.when(), succeeded))
            .collect();
        let until = self
            .ctx
            .hard_deadline
            .checked_sub(Duration::from_secs(5))
            .unwrap_or(self.ctx.hard_deadline);
        if specs.is_empty() || self.outcome.is_canceled() || Instant::now() >= until {
            return;
        }
        self.trace.line(if succeeded {
            "\x1b[36;1mSaving cache for successful job\x1b[0;m"
        } else {
            "\x1b[36;1mSaving cache for failed job\x1b[0;m"
        });
        let (s3, project) = match self.cache_target() {
            Ok(target) => target,
            Err(why) => {
                self.trace.line(&format!("Skipping cache archiving: {why}"));
                return;
            }
        };
        let vars = self.variable_map();
        let files = self.list_files(specs.iter().any(|c| c.untracked())).await;
        let archive = self.cache_archive();
        for spec in specs {
            let Some((key, object)) = self.upload_key(&spec, &vars, project) else {
                continue;
            };
            let Some(count) = self.archive_cache(&spec, &key, &files, &archive).await else {
                continue;
            };
            let uploaded = tokio::select! {
                r = s3.upload(&object, &archive) => r,
                _ = tokio::time::sleep_until(until) => Err("the job's time ran out".into()),
            };
            let _ = tokio::fs::remove_file(&archive).await;
            match uploaded {
                Ok(()) => self.trace.line(&format!("Created cache ({count} files)")),
                Err(e) => self
                    .trace
                    .warning(&format!("Failed to upload cache {key}: {e}")),
            }
        }
        self.trace.flush();
    }

    /// The key a `cache:` entry is saved under and its object in the bucket, or `None`
    /// (saying why in the job's log) when it is not saved: no key, a policy that does not
    /// push, a key that would leave the project's cache.
    fn upload_key(
        &mut self,
        spec: &gitlab_runner::job::CacheSpec<'_>,
        vars: &std::collections::HashMap<String, String>,
        project: u64,
    ) -> Option<(String, String)> {
        let (key, warning) = ephemeral_core::cache::sanitize_key(
            &ephemeral_core::cache::primary_key(spec.key(), vars),
        );
        if let Some(warning) = warning {
            self.trace.warning(&warning);
        }
        let Some(key) = key else {
            self.trace
                .line("Skipping cache archiving due to empty cache key");
            return None;
        };
        if !self.cache_policy_allows(spec.policy(), vars, &key, Transfer::Upload) {
            return None;
        }
        let Some(object) = ephemeral_core::cache::object_key(project, &key) else {
            self.trace
                .warning(&format!("cache key {key:?} leaves the project's cache"));
            return None;
        };
        Some((key, object))
    }

    /// The files of a `cache:` entry zipped into `archive`: how many, or `None` (saying why
    /// in the job's log, with no archive left) when there is nothing to upload.
    async fn archive_cache(
        &mut self,
        spec: &gitlab_runner::job::CacheSpec<'_>,
        key: &str,
        files: &[ProjectFile],
        archive: &Path,
    ) -> Option<usize> {
        let mut paths = Vec::new();
        for path in spec.paths() {
            match ephemeral_core::cache::path_problem(path) {
                Some(problem) => self
                    .trace
                    .line(&format!("\x1b[31;1mERROR: {problem}: not cached\x1b[0;m")),
                None => paths.push(path.clone()),
            }
        }
        self.trace.line(&format!("Creating cache {key}..."));
        let candidates: Vec<cache::Candidate> = files
            .iter()
            .map(|f| cache::Candidate {
                rel: f.rel.clone(),
                abs: f.abs.clone(),
                untracked: f.untracked,
            })
            .collect();
        let (untracked, out) = (spec.untracked(), archive.to_path_buf());
        let archived = tokio::task::spawn_blocking(move || {
            cache::archive(&candidates, &paths, untracked, &out)
        })
        .await;
        let count = match joined(archived) {
            Ok(count) => count,
            Err(e) => {
                self.trace
                    .warning(&format!("Failed to create cache {key}: {e}"));
                return None;
            }
        };
        if count == 0 {
            self.trace.warning(&format!(
                "no files match the cache paths of {key}: nothing uploaded"
            ));
            let _ = tokio::fs::remove_file(archive).await;
            return None;
        }
        Some(count)
    }

    /// Every regular file of the project directory, relative to it, once.
    async fn project_files(&mut self) -> Vec<ProjectFile> {
        if let Some(files) = &self.files {
            return files.clone();
        }
        self.trace.line("Uploading artifacts...");
        let wants_untracked = self.job.artifacts().any(|a| a.untracked());
        let files = self.list_files(wants_untracked).await;
        self.files = Some(files.clone());
        files
    }

    /// Every regular file of the project directory now, marked untracked (by git's index)
    /// when `wants_untracked` and there is a checkout.
    async fn list_files(&self, wants_untracked: bool) -> Vec<ProjectFile> {
        let with_index = wants_untracked && self.checkout.is_some();
        let dir = self.project_dir.clone();
        tokio::task::spawn_blocking(move || {
            let files = walk(&dir);
            let untracked: BTreeSet<String> = if with_index {
                let (tracked, gitlinks) = git::tracked(&dir);
                shell::untracked_files(
                    files.iter().map(|(rel, _)| rel.as_str()),
                    &tracked,
                    &gitlinks,
                )
                .into_iter()
                .collect()
            } else {
                BTreeSet::new()
            };
            files
                .into_iter()
                .map(|(rel, abs)| ProjectFile {
                    untracked: untracked.contains(&rel),
                    rel,
                    abs,
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default()
    }
}

#[async_trait::async_trait]
impl CancellableJobHandler<ProjectFile> for ShellJob {
    async fn step(
        &mut self,
        script: &[String],
        phase: Phase,
        cancel_token: &CancellationToken,
    ) -> JobResult {
        match phase {
            Phase::Script => self.script_step(script, cancel_token).await,
            Phase::AfterScript => {
                self.after_script_step(script, cancel_token).await;
                Ok(())
            }
        }
    }

    async fn get_uploadable_files(
        &mut self,
    ) -> Result<Box<dyn Iterator<Item = ProjectFile> + Send>, ()> {
        Ok(Box::new(self.project_files().await.into_iter()))
    }

    fn failure(&self) -> Option<JobFailure> {
        self.outcome.failure()
    }

    async fn cleanup(&mut self) {
        process::kill_marked(&self.marker).await;
        self.save_caches().await;
        self.trace.flush();
        let hard_deadline_hit = Instant::now() >= self.ctx.hard_deadline;
        // The hard deadline fails the job in GitLab whatever phase it stopped, even before
        // the script started (the fork then runs no step, so the job is not canceled).
        let (result, failure) = if hard_deadline_hit {
            (
                JobStatus::Failed,
                Some(JobFailure::new(failure_reason::JOB_EXECUTION_TIMEOUT)),
            )
        } else {
            self.outcome.reported()
        };
        let report = JobReport {
            job_id: self.job.id(),
            result: result.as_str().to_owned(),
            failure_reason: failure.as_ref().map(|f| f.reason.clone()),
            exit_code: failure.as_ref().and_then(|f| f.exit_code),
            first_trace_ms: self
                .trace
                .first_write()
                .map(|t| t.saturating_duration_since(self.ctx.invoked_at).as_millis() as u64),
            prepare_ms: self.prepare.as_millis() as u64,
            git_ms: self.git.as_millis() as u64,
            steps_ms: self.steps.as_millis() as u64,
        };
        *self.ctx.report.lock().expect("report lock") = Some(report);
    }
}

/// `root/rel` and every directory between them are real directories (or not there yet),
/// none a symlink.
fn no_symlink_on_the_way(root: &Path, rel: &str) -> bool {
    let mut at = root.to_path_buf();
    rel.split('/').all(|segment| {
        at.push(segment);
        match std::fs::symlink_metadata(&at) {
            Ok(m) => m.file_type().is_dir(),
            Err(_) => true,
        }
    })
}

/// A file of the project directory that an artifact may include.
#[derive(Debug, Clone)]
pub struct ProjectFile {
    rel: String,
    abs: PathBuf,
    untracked: bool,
}

#[async_trait::async_trait]
impl UploadableFile for ProjectFile {
    type Data<'a> = Compat<tokio::fs::File>;

    fn get_path(&self) -> Cow<'_, str> {
        Cow::Borrowed(&self.rel)
    }

    async fn get_data(&self) -> Result<Self::Data<'_>, ()> {
        tokio::fs::File::open(&self.abs)
            .await
            .map(|f| f.compat())
            .map_err(|e| tracing::warn!(error = %e, "cannot open an artifact file"))
    }

    fn untracked(&self) -> bool {
        self.untracked
    }
}

/// Regular files under `root` (symlinks are not followed), as (relative, absolute) paths.
fn walk(root: &Path) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            let path = entry.path();
            if kind.is_dir() {
                stack.push(path);
            } else if kind.is_file()
                && let Ok(rel) = path.strip_prefix(root)
                && let Some(rel) = rel.to_str()
            {
                out.push((rel.to_owned(), path.clone()));
            }
        }
    }
    out.sort();
    out
}

/// Extracts an artifact into `dir`; paths that would leave `dir` are skipped (the archive's
/// safe path check). Returns how many files were written.
fn extract(mut artifact: gitlab_runner::artifact::Artifact, dir: &Path) -> std::io::Result<usize> {
    use std::os::unix::fs::PermissionsExt;
    let mut written = 0;
    for i in 0..artifact.len() {
        let Some(mut file) = artifact.by_index(i) else {
            continue;
        };
        let Some(rel) = file.path() else {
            continue;
        };
        let target = dir.join(rel);
        if file.is_dir() {
            std::fs::create_dir_all(&target)?;
            continue;
        }
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let mut out = std::fs::File::create(&target)?;
        std::io::copy(&mut file, &mut out)?;
        if let Some(mode) = file.unix_mode() {
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode & 0o777))?;
        }
        written += 1;
    }
    Ok(written)
}

/// The SSM client, configured from the environment Lambda gives the function: `AWS_REGION`,
/// the role's credentials in `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`/`AWS_SESSION_TOKEN`
/// (valid for the execution environment's lifetime), and `AWS_ENDPOINT_URL[_SSM]` (local
/// tests). What `aws_config::load_from_env` would find in Lambda, without its other
/// credential sources (profiles, SSO, web identity through STS, IMDS): 0.5 MB of binary this
/// function never runs.
pub fn ssm_client_from_env() -> aws_sdk_ssm::Client {
    ssm_client(|k| std::env::var(k).ok())
}

fn ssm_client(get: impl Fn(&str) -> Option<String>) -> aws_sdk_ssm::Client {
    use aws_sdk_ssm::config::{BehaviorVersion, Credentials, Region};
    let get = |k: &str| get(k).filter(|v| !v.is_empty());
    let mut config = aws_sdk_ssm::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(
            get("AWS_REGION")
                .or_else(|| get("AWS_DEFAULT_REGION"))
                .map(Region::new),
        );
    if let (Some(id), Some(secret)) = (get("AWS_ACCESS_KEY_ID"), get("AWS_SECRET_ACCESS_KEY")) {
        config = config.credentials_provider(Credentials::new(
            id,
            secret,
            get("AWS_SESSION_TOKEN"),
            None,
            "environment",
        ));
    }
    if let Some(url) = get("AWS_ENDPOINT_URL_SSM").or_else(|| get("AWS_ENDPOINT_URL")) {
        config = config.endpoint_url(url);
    }
    aws_sdk_ssm::Client::from_conf(config.build())
}

/// A fresh `system_id` for this execution environment, from the kernel's randomness.
pub fn new_system_id() -> String {
    let mut random = [0u8; 12];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut random);
    }
    shell::system_id(&random)
}

/// A blocking task's answer, its own error and a panic alike as text (for the job's log).
fn joined<T, E: std::fmt::Display>(
    answer: Result<Result<T, E>, tokio::task::JoinError>,
) -> Result<T, String> {
    answer
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()))
}

/// The bucket, the job's project and the local archive file a cache goes through.
#[derive(Clone, Copy)]
struct CacheStore<'a> {
    s3: &'a cache::S3,
    project: u64,
    archive: &'a Path,
}

/// Which way a cache archive goes: restored before the script, saved after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transfer {
    Download,
    Upload,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What GitLab and the report are told, as the job's steps go: canceled wins over a
    /// failed script (whose reason GitLab still gets), a job that could not run has not
    /// failed until its script step.
    #[test]
    fn a_job_outcome_keeps_the_precedence_gitlab_is_told() {
        let script = JobFailure {
            reason: failure_reason::SCRIPT_FAILURE.into(),
            exit_code: Some(2),
        };
        let told = |o: &JobOutcome| (o.status(), o.failure(), o.reported());
        let mut ok = JobOutcome::Succeeded;
        assert_eq!(
            told(&ok),
            (JobStatus::Success, None, (JobStatus::Success, None))
        );
        let refused = JobFailure::new(failure_reason::RUNNER_SYSTEM_FAILURE);
        let cannot = JobOutcome::CannotRun(refused.clone());
        assert_eq!(
            told(&cannot),
            (
                JobStatus::Success,
                Some(refused.clone()),
                (JobStatus::Success, None)
            )
        );
        let mut failed = JobOutcome::Succeeded;
        failed.script_failed(script.clone());
        assert_eq!(
            told(&failed),
            (
                JobStatus::Failed,
                Some(script.clone()),
                (JobStatus::Failed, Some(script.clone()))
            )
        );
        // Canceled in after_script, after the script failed: canceled, the reason kept.
        failed.canceled();
        assert_eq!(
            told(&failed),
            (
                JobStatus::Canceled,
                Some(script.clone()),
                (JobStatus::Canceled, None)
            )
        );
        assert!(failed.is_canceled());
        // Canceled in the script (or in after_script after it succeeded): no reason.
        ok.canceled();
        assert_eq!(ok, JobOutcome::Canceled { failure: None });
        assert_eq!(
            told(&ok),
            (JobStatus::Canceled, None, (JobStatus::Canceled, None))
        );
        // A failure after a cancel leaves the job canceled.
        ok.script_failed(script.clone());
        assert_eq!(
            ok,
            JobOutcome::Canceled {
                failure: Some(script)
            }
        );
    }

    #[test]
    fn the_sample_event_is_an_invocation() {
        let sample = include_str!("../../../events/shell-runner/invocation.json");
        let invocation: Invocation = serde_json::from_str(sample).unwrap();
        assert_eq!(invocation.job_key, "project#380#job#1977");
        assert_eq!(invocation.job.job_id, 1977);
    }

    #[test]
    fn configuration_errors_name_the_variable_and_defaults_apply() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let err = Config::from_lookup(env(&[("REQUEST_WAIT_SECONDS", "5")])).unwrap_err();
        assert_eq!(err.to_string(), "configuration: GITLAB_URL is not set");
        // Per-job runners: no shared token parameter at all.
        let per_job =
            Config::from_lookup(env(&[("GITLAB_URL", "https://gitlab.example.com")])).unwrap();
        assert_eq!(per_job.token_parameter, None);
        let err = Config::from_lookup(env(&[
            ("GITLAB_URL", "https://gitlab.example.com"),
            ("RUNNER_TOKEN_PARAMETER", "/runners/shell"),
            ("STATUS_POLL_SECONDS", "soon"),
        ]))
        .unwrap_err();
        assert!(
            err.to_string().contains("STATUS_POLL_SECONDS=`soon`"),
            "{err}"
        );
        let config = Config::from_lookup(env(&[
            ("GITLAB_URL", "https://gitlab.example.com"),
            ("RUNNER_TOKEN_PARAMETER", "/runners/shell"),
        ]))
        .unwrap();
        assert_eq!(config.root, PathBuf::from("/tmp/shell-runner"));
        assert_eq!(config.status_poll, Duration::from_secs(2));
        assert_eq!(config.margins, Margins::default());
        assert!(config.inherit_env.contains(&"PATH".to_owned()));
        assert!(
            !config
                .inherit_env
                .iter()
                .any(|k| k.starts_with("AWS_SECRET"))
        );
        assert_eq!(config.sandbox_scratch, None);
        for root in ["/", "tmp", "./tmp"] {
            let err = Config::from_lookup(|k| match k {
                "GITLAB_URL" => Some("https://gitlab.example.com".into()),
                "RUNNER_TOKEN_PARAMETER" => Some("/runners/shell".into()),
                SANDBOX_SCRATCH_ROOT => Some(root.into()),
                _ => None,
            })
            .unwrap_err();
            assert!(
                err.to_string()
                    .contains("absolute directory other than `/`"),
                "{err}"
            );
        }
    }

    /// The template turns the sweep on in Lambda: the sandbox's /tmp is emptied between jobs.
    #[test]
    fn the_template_sweeps_the_sandbox_tmp() {
        let template =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../template.yaml"))
                .unwrap();
        let function = &template[template.find("\n  ShellRunnerFunction:\n").unwrap()..];
        let function = &function[..function[1..]
            .find("\n  ShellRunnerFunctionLogGroup:")
            .unwrap()];
        assert!(
            function.contains(&format!("{SANDBOX_SCRATCH_ROOT}: /tmp\n")),
            "{function}"
        );
    }

    #[test]
    fn the_ssm_client_takes_region_credentials_and_endpoint_from_the_environment() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let client = ssm_client(env(&[
            ("AWS_DEFAULT_REGION", "eu-west-1"),
            ("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE"),
            ("AWS_SECRET_ACCESS_KEY", "secret"),
            ("AWS_ENDPOINT_URL", "http://127.0.0.1:5000"),
        ]));
        let config = client.config();
        assert_eq!(config.region().map(|r| r.as_ref()), Some("eu-west-1"));
        let client = ssm_client(env(&[
            ("AWS_REGION", "us-east-1"),
            ("AWS_DEFAULT_REGION", "eu-west-1"),
        ]));
        assert_eq!(
            client.config().region().map(|r| r.as_ref()),
            Some("us-east-1")
        );
    }

    #[test]
    fn a_submodule_path_through_a_symlink_is_refused() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("vendor/lib")).unwrap();
        std::os::unix::fs::symlink("/tmp", root.path().join("link")).unwrap();
        assert!(no_symlink_on_the_way(root.path(), "vendor/lib"));
        assert!(no_symlink_on_the_way(root.path(), "vendor/new/lib"));
        assert!(!no_symlink_on_the_way(root.path(), "link/lib"));
    }

    #[test]
    fn the_runner_token_is_never_printed() {
        let token = Secret::new("glrt-secret");
        assert!(!format!("{token:?}").contains("glrt-secret"));
    }
}
