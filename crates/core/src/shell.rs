//! What the in-Lambda shell runner decides, with no I/O: how long a job may run, what the
//! trace may show (masking, also of values split across output chunks), the bash script for
//! a step (commands echoed like GitLab's own runner), the job's environment, the git checkout,
//! and the failure reason GitLab is told. The `shell-runner` crate carries these out.

use std::time::Duration;

use base64::Engine;

use crate::secrets::Secret;

/// What replaces a masked value in the trace (what GitLab's runner prints).
pub const MASK: &str = "[MASKED]";

/// GitLab's failure reasons that the shell runner reports.
pub mod failure_reason {
    pub const SCRIPT_FAILURE: &str = "script_failure";
    pub const JOB_EXECUTION_TIMEOUT: &str = "job_execution_timeout";
    pub const RUNNER_SYSTEM_FAILURE: &str = "runner_system_failure";
    pub const MISSING_DEPENDENCY_FAILURE: &str = "missing_dependency_failure";
}

// ---------------------------------------------------------------------------------------------
// Time

/// What limits the script's time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// The job's own timeout (project setting or `timeout:`).
    JobTimeout,
    /// What is left of this Lambda invocation, minus the margin kept for after_script,
    /// artifacts and reporting.
    LambdaDeadline,
}

/// How long `before_script` + `script` may run, and why that long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScriptBudget {
    pub limit: Duration,
    pub limited_by: Limit,
}

/// The margins kept from the Lambda deadline. `after_script` and artifacts run in the
/// `reserve`; the last `report` is for the final trace and status update, so that a job never
/// stays `running` in GitLab because Lambda killed us first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Margins {
    pub reserve: Duration,
    pub report: Duration,
}

impl Default for Margins {
    fn default() -> Self {
        Self {
            reserve: Duration::from_secs(60),
            report: Duration::from_secs(10),
        }
    }
}

/// GitLab's own runner gives `after_script` 5 minutes.
pub const AFTER_SCRIPT_TIMEOUT: Duration = Duration::from_secs(300);

/// min(job timeout, Lambda time left - reserve). A job without a timeout gets what Lambda
/// leaves. An equal limit is attributed to the job's timeout (it is the user's setting).
pub fn script_budget(
    job_timeout: Option<Duration>,
    lambda_remaining: Duration,
    margins: Margins,
) -> ScriptBudget {
    let lambda = lambda_remaining.saturating_sub(margins.reserve);
    match job_timeout {
        Some(job) if job <= lambda => ScriptBudget {
            limit: job,
            limited_by: Limit::JobTimeout,
        },
        _ => ScriptBudget {
            limit: lambda,
            limited_by: Limit::LambdaDeadline,
        },
    }
}

/// `after_script` gets GitLab's 5 minutes, but never past Lambda's deadline minus the report
/// margin.
pub fn after_script_budget(lambda_remaining: Duration, margins: Margins) -> Duration {
    AFTER_SCRIPT_TIMEOUT.min(lambda_remaining.saturating_sub(margins.report))
}

/// `1h2m3s`, like GitLab's runner prints durations.
pub fn format_duration(d: Duration) -> String {
    let s = d.as_secs();
    let (h, m, s) = (s / 3600, (s / 60) % 60, s % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s}s"),
        _ => format!("{h}h{m}m{s}s"),
    }
}

/// The line appended to the trace when the script ran out of time.
pub fn timeout_message(budget: ScriptBudget) -> String {
    let limit = format_duration(budget.limit);
    match budget.limited_by {
        Limit::JobTimeout => format!(
            "\nERROR: Job failed: execution took longer than {limit} (the job's timeout); \
             its processes were killed\n"
        ),
        Limit::LambdaDeadline => format!(
            "\nERROR: Job failed: execution took longer than {limit}, the time this Lambda \
             invocation had left (Lambda stops at 15 minutes; a margin is kept for \
             after_script, artifacts and reporting); its processes were killed. Route this \
             job to an EC2 runner, or make it shorter.\n"
        ),
    }
}

/// Appended to the trace when the hard deadline stops the job in any phase.
pub fn deadline_message() -> String {
    "\nERROR: Job failed: the Lambda invocation running it was about to end; the job was \
     stopped and its processes were killed\n"
        .to_owned()
}

// ---------------------------------------------------------------------------------------------
// Masking

/// Replaces secrets in a stream of output chunks. A secret split across two chunks is still
/// masked: the tail of a chunk that could be the start of a secret is held back until the
/// next chunk (or [`Masker::finish`]) shows whether it is one.
#[derive(Debug, Clone, Default)]
pub struct Masker {
    /// Longest first, so that a secret containing another is masked whole.
    secrets: Vec<Vec<u8>>,
    pending: Vec<u8>,
}

impl Masker {
    /// Empty values are ignored (they would match everywhere).
    pub fn new<I, S>(secrets: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<[u8]>,
    {
        let mut secrets: Vec<Vec<u8>> = secrets
            .into_iter()
            .map(|s| s.as_ref().to_vec())
            .filter(|s| !s.is_empty())
            .collect();
        secrets.sort_by(|a, b| b.len().cmp(&a.len()).then(a.cmp(b)));
        secrets.dedup();
        Self {
            secrets,
            pending: Vec::new(),
        }
    }

    /// The masked output that can be released now.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<u8> {
        self.pending.extend_from_slice(chunk);
        self.drain(false)
    }

    /// Everything still held back, masked: the stream has ended.
    pub fn finish(&mut self) -> Vec<u8> {
        self.drain(true)
    }

    fn drain(&mut self, at_end: bool) -> Vec<u8> {
        let buf = std::mem::take(&mut self.pending);
        let mut out = Vec::with_capacity(buf.len());
        let mut i = 0;
        'scan: while i < buf.len() {
            let rest = &buf[i..];
            for secret in &self.secrets {
                if rest.starts_with(secret) {
                    out.extend_from_slice(MASK.as_bytes());
                    i += secret.len();
                    continue 'scan;
                }
            }
            if !at_end
                && self
                    .secrets
                    .iter()
                    .any(|s| s.len() > rest.len() && s.starts_with(rest))
            {
                // Could be the start of a secret: wait for more output.
                self.pending = rest.to_vec();
                return out;
            }
            out.push(buf[i]);
            i += 1;
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Scripts

/// `'...'` for bash: nothing inside is expanded.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The `$ cmd` line GitLab's runner prints before a command (bold green). A multi-line
/// command shows its first line and says it was collapsed, as GitLab's runner does.
pub fn echo_line(command: &str) -> String {
    let trimmed = command.trim_end_matches('\n');
    let shown = match trimmed.split_once('\n') {
        Some((first, _)) => format!("{first} # collapsed multi-line command"),
        None => trimmed.to_owned(),
    };
    format!("\x1b[32;1m$ {shown}\x1b[0;m")
}

/// The bash script for one step: stop at the first failing command (`-e`, `pipefail`, the
/// failing command's exit code is the step's), echo each command before running it.
pub fn step_script(commands: &[String]) -> String {
    let mut script = String::from("set -eo pipefail\nset +o noclobber\n");
    for command in commands {
        script.push_str("printf '%s\\n' ");
        script.push_str(&shell_quote(&echo_line(command)));
        script.push('\n');
        script.push_str(command);
        // A command ending in a comment or without a newline must not swallow the next one.
        script.push('\n');
    }
    script
}

// ---------------------------------------------------------------------------------------------
// Environment

/// A job variable as GitLab sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobVariable {
    pub key: String,
    pub value: String,
    pub masked: bool,
    /// A file-type variable: the value is written to a file and the variable holds its path.
    pub file: bool,
}

/// Where this job runs, and what the runner adds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunnerSide {
    pub builds_dir: String,
    pub project_dir: String,
    pub home_dir: String,
    pub tmp_dir: String,
    /// Directory for file-type variables.
    pub files_dir: String,
    pub job_timeout: Option<Duration>,
    pub runner_version: String,
    /// `linux/arm64`.
    pub arch: String,
    /// Variables of the Lambda's environment passed through (PATH, LANG, ...): an allowlist,
    /// so that the function's AWS credentials are not handed to the job by default.
    pub inherited: Vec<(String, String)>,
}

/// The environment of a step, and the files to write for file-type variables.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StepEnvironment {
    pub vars: Vec<(String, String)>,
    /// (file name inside `files_dir`, contents).
    pub files: Vec<(String, String)>,
}

/// Names a job can give a file-type variable are environment variable names; anything else
/// (a `/`, `..`) must not pick the file's path.
fn file_name_for(key: &str) -> Option<String> {
    let ok = !key.is_empty()
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !key.starts_with(|c: char| c.is_ascii_digit());
    ok.then(|| key.to_owned())
}

/// Inherited variables first, then the runner's, then the job's (the job wins, as with
/// GitLab's runner where user variables override predefined ones), then what the runner must
/// control (the directories), then `CI_JOB_STATUS` for after_script.
pub fn step_environment(
    variables: &[JobVariable],
    runner: &RunnerSide,
    job_status: Option<&str>,
) -> StepEnvironment {
    let mut env: Vec<(String, String)> = runner.inherited.clone();
    let set = |env: &mut Vec<(String, String)>, k: &str, v: String| {
        env.retain(|(key, _)| key != k);
        env.push((k.to_owned(), v));
    };
    set(&mut env, "CI", "true".into());
    set(&mut env, "CI_SERVER", "yes".into());
    set(&mut env, "CI_DISPOSABLE_ENVIRONMENT", "true".into());
    set(&mut env, "CI_RUNNER_VERSION", runner.runner_version.clone());
    set(&mut env, "CI_RUNNER_EXECUTABLE_ARCH", runner.arch.clone());
    set(&mut env, "CI_SHARED_ENVIRONMENT", "false".into());
    if let Some(t) = runner.job_timeout {
        set(&mut env, "CI_JOB_TIMEOUT", t.as_secs().to_string());
    }
    let mut files = Vec::new();
    for v in variables {
        if v.file {
            match file_name_for(&v.key) {
                Some(name) => {
                    set(&mut env, &v.key, format!("{}/{name}", runner.files_dir));
                    files.push((name, v.value.clone()));
                }
                // Not a variable name bash could read anyway.
                None => continue,
            }
        } else {
            set(&mut env, &v.key, v.value.clone());
        }
    }
    set(&mut env, "CI_BUILDS_DIR", runner.builds_dir.clone());
    set(&mut env, "CI_PROJECT_DIR", runner.project_dir.clone());
    set(&mut env, "HOME", runner.home_dir.clone());
    set(&mut env, "TMPDIR", runner.tmp_dir.clone());
    if let Some(status) = job_status {
        set(&mut env, "CI_JOB_STATUS", status.into());
    }
    StepEnvironment { vars: env, files }
}

/// Every value the trace must never show: masked variables and the job token (GitLab's
/// runner masks `CI_JOB_TOKEN` whether or not it is marked masked).
pub fn secrets_to_mask<'a>(
    variables: &'a [JobVariable],
    job_token: &'a str,
) -> impl Iterator<Item = &'a str> {
    variables
        .iter()
        .filter(|v| v.masked || v.key == "CI_JOB_TOKEN" || v.key == "CI_BUILD_TOKEN")
        .map(|v| v.value.as_str())
        .chain(std::iter::once(job_token))
}

/// `CI_PROJECT_DIR` is `<builds>/<project path>` like GitLab's runner, when the path is
/// safe to use as one; otherwise `<builds>/project`.
pub fn project_dir_name(project_path: Option<&str>) -> String {
    match project_path {
        Some(p)
            if !p.is_empty()
                && p.split('/').all(|seg| {
                    !seg.is_empty()
                        && seg != "."
                        && seg != ".."
                        && seg
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
                }) =>
        {
            p.to_owned()
        }
        _ => "project".to_owned(),
    }
}

// ---------------------------------------------------------------------------------------------
// Checkout

/// `GIT_STRATEGY` other than `none`/`empty`. Every job starts in a fresh, empty directory,
/// so `fetch` (reuse a previous clone) and `clone` do the same thing here: a fresh fetch.
/// The strategy only changes the trace line, like GitLab's runner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GitStrategy {
    Fetch,
    Clone,
}

/// `GIT_SUBMODULE_STRATEGY`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubmoduleStrategy {
    /// `none` (or unset): submodules are left empty.
    None,
    /// The submodules of the project, not theirs.
    Normal,
    /// Submodules of submodules too, at any depth.
    Recursive,
}

/// The job token as an HTTP header for the one origin (`scheme://host[:port]`) it belongs to:
/// the project's. A submodule elsewhere gets no token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpAuth {
    pub origin: String,
    /// `Authorization: Basic base64(gitlab-ci-token:<job token>)`: a secret, sent as a
    /// request header; never in a URL, on a command line or in `.git/config`.
    pub header: Secret,
}

/// What to check out, from the job's variables (the project) or from a `.gitmodules` entry
/// (a submodule, [`submodule_checkout`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkout {
    /// The remote URL without credentials (safe to show and to keep in `.git/config`).
    pub url: String,
    /// The full commit id to check out (a detached HEAD).
    pub sha: String,
    /// What to fetch; empty: the commit itself ([`fetch_refspecs`]).
    pub refspecs: Vec<String>,
    /// `None`: full history.
    pub depth: Option<u32>,
    pub auth: Option<HttpAuth>,
    pub strategy: GitStrategy,
    /// `CI_COMMIT_REF_NAME`, for the trace.
    pub ref_name: Option<String>,
    pub submodules: SubmoduleStrategy,
    /// `GIT_SUBMODULE_DEPTH`, by default `GIT_DEPTH` (as GitLab's runner).
    pub submodule_depth: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckoutError {
    #[error("the job has no {0} variable: cannot check out the repository")]
    Missing(&'static str),
    #[error("CI_COMMIT_SHA `{0}` is not a full commit id")]
    BadSha(String),
    #[error("{0} `{1}` is not a whole number")]
    BadDepth(&'static str, String),
    #[error("GIT_SUBMODULE_STRATEGY `{0}` is not one of none, normal, recursive")]
    BadSubmoduleStrategy(String),
    #[error(
        "CI_REPOSITORY_URL `{0}`: only http and https remotes can be checked out (this runner \
         has no git binary, ssh or file transport)"
    )]
    UnsupportedUrl(String),
}

/// Why a submodule cannot be checked out. The job fails, as with `git submodule update`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmoduleError {
    #[error("submodule `{name}`: path `{path}` is not a plain relative path inside the project")]
    BadPath { name: String, path: String },
    #[error(
        "submodule `{name}`: URL `{url}` is not http(s) or relative (ssh and local URLs cannot \
         be fetched by this runner; use a relative URL such as ../other-project.git)"
    )]
    UnsupportedUrl { name: String, url: String },
    #[error("submodule `{name}`: relative URL `{url}` climbs above the host of `{base}`")]
    UrlAboveHost {
        name: String,
        url: String,
        base: String,
    },
}

fn parse_depth(name: &'static str, value: Option<String>) -> Result<Option<u32>, CheckoutError> {
    match value {
        None => Ok(None),
        Some(d) => match d.parse::<u32>() {
            Ok(0) => Ok(None),
            Ok(n) => Ok(Some(n)),
            Err(_) => Err(CheckoutError::BadDepth(name, d)),
        },
    }
}

fn is_full_commit_id(sha: &str) -> bool {
    (sha.len() == 40 || sha.len() == 64) && sha.bytes().all(|b| b.is_ascii_hexdigit())
}

fn is_http(url: &str) -> bool {
    let lower = url.to_ascii_lowercase();
    lower.starts_with("https://") || lower.starts_with("http://")
}

/// `scheme://host[:port]`, lower case: what a token is bound to.
fn origin(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split('/').next()?;
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    (!host.is_empty()).then(|| format!("{scheme}://{host}").to_ascii_lowercase())
}

/// `None` when `GIT_STRATEGY` is `none` or `empty` (the job wants no checkout).
pub fn checkout_plan(
    lookup: impl Fn(&str) -> Option<String>,
    job_token: &str,
) -> Result<Option<Checkout>, CheckoutError> {
    let get = |k: &str| lookup(k).filter(|v| !v.is_empty());
    let strategy = match get("GIT_STRATEGY").as_deref() {
        Some("none" | "empty") => return Ok(None),
        Some("clone") => GitStrategy::Clone,
        _ => GitStrategy::Fetch,
    };
    let raw_url = get("CI_REPOSITORY_URL").ok_or(CheckoutError::Missing("CI_REPOSITORY_URL"))?;
    let sha = get("CI_COMMIT_SHA").ok_or(CheckoutError::Missing("CI_COMMIT_SHA"))?;
    if !is_full_commit_id(&sha) {
        return Err(CheckoutError::BadSha(sha));
    }
    let depth = parse_depth("GIT_DEPTH", get("GIT_DEPTH"))?;
    let submodule_depth = match get("GIT_SUBMODULE_DEPTH") {
        None => depth,
        some => parse_depth("GIT_SUBMODULE_DEPTH", some)?,
    };
    let submodules = match get("GIT_SUBMODULE_STRATEGY").as_deref() {
        None | Some("none") => SubmoduleStrategy::None,
        Some("normal") => SubmoduleStrategy::Normal,
        Some("recursive") => SubmoduleStrategy::Recursive,
        Some(other) => return Err(CheckoutError::BadSubmoduleStrategy(other.to_owned())),
    };
    let mut refspecs = Vec::new();
    // GitLab keeps a ref per pipeline: it holds the pipeline's commit even for merge request
    // pipelines and deleted branches.
    if let Some(id) = get("CI_PIPELINE_ID") {
        refspecs.push(format!("+refs/pipelines/{id}:refs/pipelines/{id}"));
    }
    if let Some(tag) = get("CI_COMMIT_TAG") {
        refspecs.push(format!("+refs/tags/{tag}:refs/tags/{tag}"));
    } else if let Some(branch) = get("CI_COMMIT_BRANCH") {
        refspecs.push(format!("+refs/heads/{branch}:refs/remotes/origin/{branch}"));
    }
    let (url, _) = strip_credentials(&raw_url);
    if !is_http(&url) {
        return Err(CheckoutError::UnsupportedUrl(url));
    }
    // GitLab's URL carries `gitlab-ci-token:<token>`; the job's own token is what we send.
    let auth = (!job_token.is_empty())
        .then(|| origin(&url))
        .flatten()
        .map(|origin| HttpAuth {
            origin,
            header: basic_auth_header(job_token),
        });
    Ok(Some(Checkout {
        url,
        sha,
        refspecs,
        depth,
        auth,
        strategy,
        ref_name: get("CI_COMMIT_REF_NAME"),
        submodules,
        submodule_depth,
    }))
}

fn basic_auth_header(job_token: &str) -> Secret {
    let basic =
        base64::engine::general_purpose::STANDARD.encode(format!("gitlab-ci-token:{job_token}"));
    Secret::new(format!("Authorization: Basic {basic}"))
}

/// `https://user:pass@host/p.git` -> (`https://host/p.git`, true). GitLab puts
/// `gitlab-ci-token:[MASKED]` (or the token itself, on older versions) there.
fn strip_credentials(url: &str) -> (String, bool) {
    if let Some((scheme, rest)) = url.split_once("://") {
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if let Some((_, host)) = authority.rsplit_once('@') {
            return (format!("{scheme}://{host}{path}"), true);
        }
    }
    (url.to_owned(), false)
}

/// The refspecs to fetch: the plan's, or the commit itself when there are none (a submodule,
/// or a job without pipeline and branch variables). Servers speaking git protocol v2 (GitLab,
/// `git http-backend`) give any reachable commit asked for by id.
pub fn fetch_refspecs(plan: &Checkout) -> Vec<String> {
    if plan.refspecs.is_empty() {
        vec![plan.sha.clone()]
    } else {
        plan.refspecs.clone()
    }
}

/// The trace line before the fetch, as GitLab's runner prints it.
pub fn fetch_message(plan: &Checkout) -> String {
    let what = match plan.strategy {
        GitStrategy::Fetch => "Fetching changes",
        GitStrategy::Clone => "Cloning repository",
    };
    match plan.depth {
        Some(d) => format!("{what} with git depth set to {d}..."),
        None => format!("{what}..."),
    }
}

/// `Checking out 1a2b3c4d as detached HEAD (ref is main)...`
pub fn checkout_message(plan: &Checkout) -> String {
    let short = &plan.sha[..plan.sha.len().min(8)];
    match &plan.ref_name {
        Some(r) => format!("Checking out {short} as detached HEAD (ref is {r})..."),
        None => format!("Checking out {short} as detached HEAD..."),
    }
}

/// The trace line before the submodules are set up (or skipped).
pub fn submodules_message(strategy: SubmoduleStrategy) -> &'static str {
    match strategy {
        SubmoduleStrategy::None => "Skipping Git submodules setup",
        SubmoduleStrategy::Normal => "Updating/initializing submodules...",
        SubmoduleStrategy::Recursive => "Updating/initializing submodules recursively...",
    }
}

/// One `.gitmodules` entry of a checked-out repository, with the commit its index records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubmoduleEntry {
    pub name: String,
    pub path: String,
    pub url: String,
    /// The gitlink's commit; `None`: `.gitmodules` names a path the commit has no gitlink
    /// for (git skips it).
    pub commit: Option<String>,
    /// `submodule.<name>.update`.
    pub update: Option<String>,
}

/// How to check out one submodule of `parent` (with `parent.submodules` not `None`), or
/// `None` when git would skip it (no gitlink, `update = none`). A relative URL is resolved
/// against the parent's URL; the token goes only to the origin it was given for. The commit
/// is fetched by id, `GIT_SUBMODULE_DEPTH` deep; its own submodules follow when recursive.
pub fn submodule_checkout(
    parent: &Checkout,
    entry: &SubmoduleEntry,
) -> Result<Option<Checkout>, SubmoduleError> {
    let Some(commit) = entry.commit.clone().filter(|c| is_full_commit_id(c)) else {
        return Ok(None);
    };
    if entry.update.as_deref() == Some("none") {
        return Ok(None);
    }
    if !is_plain_relative_path(&entry.path) {
        return Err(SubmoduleError::BadPath {
            name: entry.name.clone(),
            path: entry.path.clone(),
        });
    }
    let url = resolve_submodule_url(&parent.url, &entry.url).map_err(|e| match e {
        UrlError::Unsupported => SubmoduleError::UnsupportedUrl {
            name: entry.name.clone(),
            url: strip_credentials(&entry.url).0,
        },
        UrlError::AboveHost => SubmoduleError::UrlAboveHost {
            name: entry.name.clone(),
            url: entry.url.clone(),
            base: parent.url.clone(),
        },
    })?;
    let auth = parent
        .auth
        .clone()
        .filter(|a| origin(&url).as_deref() == Some(a.origin.as_str()));
    Ok(Some(Checkout {
        url,
        sha: commit,
        refspecs: Vec::new(),
        depth: parent.submodule_depth,
        auth,
        strategy: parent.strategy,
        ref_name: None,
        submodules: match parent.submodules {
            SubmoduleStrategy::Recursive => SubmoduleStrategy::Recursive,
            _ => SubmoduleStrategy::None,
        },
        submodule_depth: parent.submodule_depth,
    }))
}

#[derive(Debug, PartialEq, Eq)]
enum UrlError {
    Unsupported,
    AboveHost,
}

/// git's rule: `./x` and `../x` are relative to the superproject's remote URL, each `../`
/// dropping one path segment of it; anything else must be an http(s) URL (credentials in it
/// are dropped: the token, if any, is ours to add).
fn resolve_submodule_url(base: &str, url: &str) -> Result<String, UrlError> {
    if !(url.starts_with("./") || url.starts_with("../")) {
        let (url, _) = strip_credentials(url);
        return if is_http(&url) {
            Ok(url)
        } else {
            Err(UrlError::Unsupported)
        };
    }
    let (scheme, rest) = base.split_once("://").ok_or(UrlError::Unsupported)?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let mut segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let mut relative = url;
    loop {
        if let Some(rest) = relative.strip_prefix("./") {
            relative = rest;
        } else if let Some(rest) = relative.strip_prefix("../") {
            segments.pop().ok_or(UrlError::AboveHost)?;
            relative = rest;
        } else {
            break;
        }
    }
    segments.extend(relative.split('/').filter(|s| !s.is_empty()));
    Ok(format!("{scheme}://{authority}/{}", segments.join("/")))
}

/// Relative, no `.`/`..`/`.git` segment, no empty segment: cannot leave the work tree or
/// write into a repository's own files.
fn is_plain_relative_path(path: &str) -> bool {
    !path.is_empty()
        && !path.starts_with('/')
        && !path.contains('\\')
        && path.split('/').all(|seg| {
            !seg.is_empty() && seg != "." && seg != ".." && !seg.eq_ignore_ascii_case(".git")
        })
}

/// What GitLab's `artifacts: untracked: true` takes: the files of the project directory git
/// does not track, ignored ones included (`git ls-files --others`), leaving out `.git` and
/// the inside of submodules (`gitlinks`: their paths).
pub fn untracked_files<'a>(
    files: impl IntoIterator<Item = &'a str>,
    tracked: &std::collections::BTreeSet<String>,
    gitlinks: &[String],
) -> Vec<String> {
    files
        .into_iter()
        .filter(|f| !tracked.contains(*f))
        .filter(|f| !f.split('/').any(|seg| seg == ".git"))
        .filter(|f| {
            !gitlinks.iter().any(|g| {
                f.strip_prefix(g.as_str())
                    .is_some_and(|r| r.starts_with('/'))
            })
        })
        .map(str::to_owned)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Identity

/// `r_` + 12 characters from [a-z0-9], as GitLab's runner forms a random system id. `random`
/// supplies the entropy (12 bytes or more).
pub fn system_id(random: &[u8]) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut id = String::from("r_");
    for b in random.iter().take(12) {
        id.push(ALPHABET[usize::from(*b) % ALPHABET.len()] as char);
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn budget_is_the_smaller_of_job_timeout_and_lambda_time_left() {
        let m = Margins::default();
        let b = script_budget(Some(secs(3600)), secs(900), m);
        assert_eq!(b.limit, secs(840));
        assert_eq!(b.limited_by, Limit::LambdaDeadline);
        let b = script_budget(Some(secs(120)), secs(900), m);
        assert_eq!((b.limit, b.limited_by), (secs(120), Limit::JobTimeout));
        let b = script_budget(None, secs(900), m);
        assert_eq!((b.limit, b.limited_by), (secs(840), Limit::LambdaDeadline));
        // Less Lambda time than the margin: no time at all, never an underflow.
        let b = script_budget(Some(secs(10)), secs(30), m);
        assert_eq!((b.limit, b.limited_by), (secs(0), Limit::LambdaDeadline));
        assert_eq!(after_script_budget(secs(900), m), secs(300));
        assert_eq!(after_script_budget(secs(40), m), secs(30));
    }

    #[test]
    fn timeout_messages_say_which_limit_and_how_long() {
        let job = timeout_message(ScriptBudget {
            limit: secs(3723),
            limited_by: Limit::JobTimeout,
        });
        assert!(
            job.contains("longer than 1h2m3s (the job's timeout)"),
            "{job}"
        );
        let lambda = timeout_message(ScriptBudget {
            limit: secs(840),
            limited_by: Limit::LambdaDeadline,
        });
        assert!(
            lambda.contains("longer than 14m0s, the time this Lambda"),
            "{lambda}"
        );
        assert_eq!(format_duration(secs(2)), "2s");
    }

    #[test]
    fn masks_whole_values_and_longest_first() {
        let mut m = Masker::new(["s3cr3t-value", "s3cr3t", ""]);
        let mut out = m.push(b"a s3cr3t-value b s3cr3t c");
        out.extend(m.finish());
        assert_eq!(String::from_utf8(out).unwrap(), "a [MASKED] b [MASKED] c");
    }

    #[test]
    fn masks_a_value_split_across_chunks_and_holds_back_only_a_possible_start() {
        let mut m = Masker::new(["hunter22"]);
        let first = m.push(b"pw=hunt");
        assert_eq!(first, b"pw=");
        let second = m.push(b"er22!\n");
        assert_eq!(second, b"[MASKED]!\n");
        // A prefix that turns out not to be the secret is released unchanged.
        assert_eq!(m.push(b"hunt"), b"");
        assert_eq!(m.push(b"ing"), b"hunting");
        assert_eq!(m.push(b"hun"), b"");
        assert_eq!(m.finish(), b"hun");
    }

    proptest! {
        /// However the output is cut into chunks, the masked stream equals masking the whole,
        /// and the secret never appears.
        #[test]
        fn chunking_never_reveals_a_secret(
            prefix in "[a-z ]{0,20}", suffix in "[a-z ]{0,20}",
            cuts in proptest::collection::vec(0usize..60, 0..6),
        ) {
            let secret = "Zq9-secret-Zq9";
            let text = format!("{prefix}{secret}{suffix}{secret}");
            let mut whole = Masker::new([secret]);
            let mut expected = whole.push(text.as_bytes());
            expected.extend(whole.finish());

            let mut cuts = cuts.into_iter().map(|c| c.min(text.len())).collect::<Vec<_>>();
            cuts.sort();
            let mut m = Masker::new([secret]);
            let mut out = Vec::new();
            let mut last = 0;
            for c in cuts.into_iter().chain([text.len()]) {
                out.extend(m.push(&text.as_bytes()[last..c]));
                last = c;
            }
            out.extend(m.finish());
            prop_assert_eq!(&out, &expected);
            let shown = String::from_utf8(out).unwrap();
            prop_assert!(!shown.contains(secret));
            prop_assert_eq!(shown.matches(MASK).count(), 2);
        }
    }

    #[test]
    fn step_script_echoes_each_command_then_runs_it() {
        let script = step_script(&[
            "echo 'hi'".into(),
            "for i in 1 2; do\n  echo $i\ndone".into(),
        ]);
        assert!(script.starts_with("set -eo pipefail\n"));
        assert!(
            script.contains("printf '%s\\n' '\x1b[32;1m$ echo '\\''hi'\\''\x1b[0;m'\necho 'hi'\n")
        );
        assert!(script.contains("$ for i in 1 2; do # collapsed multi-line command"));
        assert!(script.ends_with("done\n"));
    }

    fn runner() -> RunnerSide {
        RunnerSide {
            builds_dir: "/tmp/r/builds/7".into(),
            project_dir: "/tmp/r/builds/7/g/p".into(),
            home_dir: "/tmp/r/builds/7/.home".into(),
            tmp_dir: "/tmp/r/builds/7/.tmp".into(),
            files_dir: "/tmp/r/builds/7/.files".into(),
            job_timeout: Some(secs(600)),
            runner_version: "0.1.0".into(),
            arch: "linux/arm64".into(),
            inherited: vec![
                ("PATH".into(), "/usr/bin:/bin".into()),
                ("CI".into(), "x".into()),
            ],
        }
    }

    fn var(key: &str, value: &str, masked: bool, file: bool) -> JobVariable {
        JobVariable {
            key: key.into(),
            value: value.into(),
            masked,
            file,
        }
    }

    #[test]
    fn environment_has_runner_and_job_variables_and_file_variables_as_paths() {
        let vars = vec![
            var("FOO", "bar", false, false),
            var("CI_JOB_TIMEOUT", "1", false, false),
            var("KUBECONFIG", "apiVersion: v1\n", true, true),
            var("../evil", "x", false, true),
            var("CI_PROJECT_DIR", "/elsewhere", false, false),
        ];
        let env = step_environment(&vars, &runner(), Some("failed"));
        let get = |k: &str| {
            env.vars
                .iter()
                .filter(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
                .collect::<Vec<_>>()
        };
        assert_eq!(get("FOO"), ["bar"]);
        assert_eq!(get("CI"), ["true"]);
        assert_eq!(get("PATH"), ["/usr/bin:/bin"]);
        // The job may override predefined values, not the directories the runner controls.
        assert_eq!(get("CI_JOB_TIMEOUT"), ["1"]);
        assert_eq!(get("CI_PROJECT_DIR"), ["/tmp/r/builds/7/g/p"]);
        assert_eq!(get("KUBECONFIG"), ["/tmp/r/builds/7/.files/KUBECONFIG"]);
        assert_eq!(
            env.files,
            vec![("KUBECONFIG".into(), "apiVersion: v1\n".into())]
        );
        assert!(get("../evil").is_empty());
        assert_eq!(get("CI_JOB_STATUS"), ["failed"]);
        assert_eq!(get("HOME"), ["/tmp/r/builds/7/.home"]);
    }

    #[test]
    fn the_job_token_is_always_masked() {
        let vars = vec![
            var("A", "plain", false, false),
            var("B", "masked-value", true, false),
            var("CI_JOB_TOKEN", "tok", false, false),
        ];
        let secrets: Vec<_> = secrets_to_mask(&vars, "tok").collect();
        assert_eq!(secrets, ["masked-value", "tok", "tok"]);
    }

    #[test]
    fn project_dir_is_the_project_path_when_safe() {
        assert_eq!(project_dir_name(Some("group/sub/proj")), "group/sub/proj");
        assert_eq!(project_dir_name(Some("group/../etc")), "project");
        assert_eq!(project_dir_name(Some("/abs")), "project");
        assert_eq!(project_dir_name(None), "project");
    }

    fn lookup<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            pairs
                .iter()
                .find(|(key, _)| *key == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn checkout_fetches_the_pipeline_ref_and_the_branch_and_keeps_the_token_out_of_the_url() {
        let sha = "265c14cf140a66cfc61e40e4ab45c95ba8df5ed1";
        let vars = [
            (
                "CI_REPOSITORY_URL",
                "https://gitlab-ci-token:[MASKED]@gitlab.example.com/g/p.git",
            ),
            ("CI_COMMIT_SHA", sha),
            ("CI_PIPELINE_ID", "120"),
            ("CI_COMMIT_BRANCH", "main"),
            ("CI_COMMIT_REF_NAME", "main"),
            ("GIT_DEPTH", "20"),
        ];
        let plan = checkout_plan(lookup(&vars), "jobtok").unwrap().unwrap();
        assert_eq!(plan.url, "https://gitlab.example.com/g/p.git");
        assert_eq!(plan.depth, Some(20));
        assert_eq!(plan.strategy, GitStrategy::Fetch);
        assert_eq!(
            plan.refspecs,
            [
                "+refs/pipelines/120:refs/pipelines/120",
                "+refs/heads/main:refs/remotes/origin/main"
            ]
        );
        assert_eq!(fetch_refspecs(&plan), plan.refspecs);
        let auth = plan.auth.clone().unwrap();
        assert_eq!(auth.origin, "https://gitlab.example.com");
        assert_eq!(
            auth.header.expose(),
            format!(
                "Authorization: Basic {}",
                base64::engine::general_purpose::STANDARD.encode("gitlab-ci-token:jobtok")
            )
        );
        // Nothing printable carries the token.
        assert!(!format!("{plan:?}").contains(auth.header.expose()));
        assert_eq!(
            fetch_message(&plan),
            "Fetching changes with git depth set to 20..."
        );
        assert_eq!(
            checkout_message(&plan),
            "Checking out 265c14cf as detached HEAD (ref is main)..."
        );
        // No submodules unless asked; their depth follows GIT_DEPTH.
        assert_eq!(plan.submodules, SubmoduleStrategy::None);
        assert_eq!(plan.submodule_depth, Some(20));
    }

    #[test]
    fn checkout_of_a_tag_or_the_bare_commit_or_none() {
        let sha = "abcdef1234567890abcdef1234567890abcdef12";
        let vars = [
            ("CI_REPOSITORY_URL", "http://127.0.0.1:8080/g/p.git"),
            ("CI_COMMIT_SHA", sha),
            ("CI_COMMIT_TAG", "v1"),
            ("CI_COMMIT_BRANCH", "ignored-for-a-tag"),
            ("GIT_STRATEGY", "clone"),
        ];
        let plan = checkout_plan(lookup(&vars), "t").unwrap().unwrap();
        assert_eq!(plan.refspecs, ["+refs/tags/v1:refs/tags/v1"]);
        assert_eq!(plan.depth, None);
        assert_eq!(plan.auth.unwrap().origin, "http://127.0.0.1:8080");
        assert_eq!(plan.strategy, GitStrategy::Clone);
        // Neither pipeline nor ref: the commit itself is fetched.
        let bare = [
            ("CI_REPOSITORY_URL", "https://h/g/p.git"),
            ("CI_COMMIT_SHA", sha),
        ];
        let plan = checkout_plan(lookup(&bare), "t").unwrap().unwrap();
        assert_eq!(fetch_refspecs(&plan), [sha]);
        assert_eq!(fetch_message(&plan), "Fetching changes...");
        // No token, no header.
        assert_eq!(
            checkout_plan(lookup(&bare), "").unwrap().unwrap().auth,
            None
        );
        for none in ["none", "empty"] {
            let vars = [("GIT_STRATEGY", none)];
            assert_eq!(checkout_plan(lookup(&vars), "t").unwrap(), None);
        }
    }

    #[test]
    fn checkout_refuses_what_it_cannot_fetch() {
        let sha = "abcdef1234567890abcdef1234567890abcdef12";
        let plan = |vars: &[(&str, &str)]| checkout_plan(lookup(vars), "t");
        assert!(matches!(
            plan(&[
                ("CI_REPOSITORY_URL", "x"),
                ("CI_COMMIT_SHA", "main; rm -rf")
            ]),
            Err(CheckoutError::BadSha(_))
        ));
        // A short id cannot be asked for by id.
        assert!(matches!(
            plan(&[
                ("CI_REPOSITORY_URL", "https://h/p.git"),
                ("CI_COMMIT_SHA", "abcdef1")
            ]),
            Err(CheckoutError::BadSha(_))
        ));
        assert_eq!(plan(&[]), Err(CheckoutError::Missing("CI_REPOSITORY_URL")));
        for url in [
            "file:///srv/repo.git",
            "git@h:g/p.git",
            "ssh://git@h/g/p.git",
        ] {
            assert!(
                matches!(
                    plan(&[("CI_REPOSITORY_URL", url), ("CI_COMMIT_SHA", sha)]),
                    Err(CheckoutError::UnsupportedUrl(_))
                ),
                "{url}"
            );
        }
        let err = plan(&[
            ("CI_REPOSITORY_URL", "ssh://gitlab-ci-token:tok@h/p.git"),
            ("CI_COMMIT_SHA", sha),
        ])
        .unwrap_err();
        assert!(!err.to_string().contains("tok@"), "{err}");
        assert!(matches!(
            plan(&[
                ("CI_REPOSITORY_URL", "https://h/p.git"),
                ("CI_COMMIT_SHA", sha),
                ("GIT_SUBMODULE_STRATEGY", "sometimes"),
            ]),
            Err(CheckoutError::BadSubmoduleStrategy(_))
        ));
        assert_eq!(
            plan(&[
                ("CI_REPOSITORY_URL", "https://h/p.git"),
                ("CI_COMMIT_SHA", sha),
                ("GIT_SUBMODULE_DEPTH", "x"),
            ]),
            Err(CheckoutError::BadDepth("GIT_SUBMODULE_DEPTH", "x".into()))
        );
    }

    fn parent(strategy: SubmoduleStrategy) -> Checkout {
        let vars = [
            (
                "CI_REPOSITORY_URL",
                "https://gitlab-ci-token:tok@gitlab.example.com/group/sub/project.git",
            ),
            ("CI_COMMIT_SHA", "abcdef1234567890abcdef1234567890abcdef12"),
            ("GIT_DEPTH", "3"),
            ("GIT_SUBMODULE_DEPTH", "1"),
        ];
        let mut plan = checkout_plan(lookup(&vars), "tok").unwrap().unwrap();
        plan.submodules = strategy;
        plan
    }

    fn entry(url: &str) -> SubmoduleEntry {
        SubmoduleEntry {
            name: "lib".into(),
            path: "vendor/lib".into(),
            url: url.into(),
            commit: Some("1111111111111111111111111111111111111111".into()),
            update: None,
        }
    }

    #[test]
    fn submodules_resolve_relative_urls_and_get_the_token_only_on_the_projects_host() {
        let p = parent(SubmoduleStrategy::Normal);
        let sub = |url: &str| submodule_checkout(&p, &entry(url)).unwrap().unwrap();
        for (url, resolved) in [
            ("../lib.git", "https://gitlab.example.com/group/sub/lib.git"),
            (
                "../../other/lib.git",
                "https://gitlab.example.com/group/other/lib.git",
            ),
            (
                "./lib",
                "https://gitlab.example.com/group/sub/project.git/lib",
            ),
            (
                "https://gitlab.example.com/x/lib.git",
                "https://gitlab.example.com/x/lib.git",
            ),
        ] {
            let s = sub(url);
            assert_eq!(s.url, resolved, "{url}");
            assert_eq!(s.auth, p.auth, "same host: the job token, {url}");
        }
        let s = sub("https://user:secret@GitHub.com/o/lib.git");
        assert_eq!(s.url, "https://GitHub.com/o/lib.git");
        assert_eq!(s.auth, None, "another host never sees the job token");
        let s = sub("http://gitlab.example.com/x/lib.git");
        assert_eq!(s.auth, None, "another scheme is another origin");
        // Fetched by id at GIT_SUBMODULE_DEPTH; no submodules of its own unless recursive.
        let s = sub("../lib.git");
        assert_eq!(
            fetch_refspecs(&s),
            ["1111111111111111111111111111111111111111"]
        );
        assert_eq!(s.depth, Some(1));
        assert_eq!(s.submodules, SubmoduleStrategy::None);
        let r = submodule_checkout(&parent(SubmoduleStrategy::Recursive), &entry("../lib.git"));
        assert_eq!(r.unwrap().unwrap().submodules, SubmoduleStrategy::Recursive);
    }

    #[test]
    fn submodules_git_would_skip_or_refuse() {
        let p = parent(SubmoduleStrategy::Normal);
        let mut no_gitlink = entry("../lib.git");
        no_gitlink.commit = None;
        assert_eq!(submodule_checkout(&p, &no_gitlink), Ok(None));
        let mut update_none = entry("../lib.git");
        update_none.update = Some("none".into());
        assert_eq!(submodule_checkout(&p, &update_none), Ok(None));
        for url in [
            "git@gitlab.example.com:g/lib.git",
            "/srv/lib.git",
            "file:///srv/lib.git",
        ] {
            assert!(
                matches!(
                    submodule_checkout(&p, &entry(url)),
                    Err(SubmoduleError::UnsupportedUrl { .. })
                ),
                "{url}"
            );
        }
        assert!(matches!(
            submodule_checkout(&p, &entry("../../../../lib.git")),
            Err(SubmoduleError::UrlAboveHost { .. })
        ));
        for path in ["../escape", "/abs", "a/.git/hooks", "a//b", "./a", ""] {
            let mut e = entry("../lib.git");
            e.path = path.into();
            assert!(
                matches!(
                    submodule_checkout(&p, &e),
                    Err(SubmoduleError::BadPath { .. })
                ),
                "{path}"
            );
        }
        assert_eq!(
            submodules_message(SubmoduleStrategy::None),
            "Skipping Git submodules setup"
        );
    }

    #[test]
    fn untracked_files_leave_out_the_index_git_and_submodules() {
        let tracked: std::collections::BTreeSet<String> =
            ["README".to_owned(), "src/a.rs".to_owned()].into();
        let files = [
            "README",
            "src/a.rs",
            "build.log",
            "src/gen.rs",
            ".git/config",
            "vendor/lib/file",
            "vendor/library.txt",
        ];
        assert_eq!(
            untracked_files(files, &tracked, &["vendor/lib".to_owned()]),
            ["build.log", "src/gen.rs", "vendor/library.txt"]
        );
    }

    #[test]
    fn system_id_looks_like_gitlab_runners() {
        let id = system_id(&[0, 1, 2, 35, 36, 255, 9, 9, 9, 9, 9, 9, 9, 9]);
        assert_eq!(id.len(), 14);
        assert_eq!(&id[..5], "r_abc");
        assert!(
            id[2..]
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        );
    }
}
