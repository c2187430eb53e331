//! What the in-Lambda shell runner decides, with no I/O: how long a job may run, what the
//! trace may show (masking, also of values split across output chunks), the bash script for
//! a step (commands echoed like GitLab's own runner), the job's environment, the git checkout,
//! and the failure reason GitLab is told. The `shell-runner` crate carries these out.

use std::time::Duration;

use base64::Engine;

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

/// What to check out, from the job's variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkout {
    /// The remote URL without credentials (safe to show and to keep in `.git/config`).
    pub url: String,
    pub sha: String,
    pub refspecs: Vec<String>,
    /// `None`: full history.
    pub depth: Option<u32>,
    /// `http.extraHeader` for https remotes: `Authorization: Basic gitlab-ci-token:<job
    /// token>`. Given to git through the environment (`GIT_CONFIG_*`), never on a command
    /// line or in `.git/config`. A secret.
    pub auth_header: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckoutError {
    #[error("the job has no {0} variable: cannot check out the repository")]
    Missing(&'static str),
    #[error("CI_COMMIT_SHA `{0}` is not a commit id")]
    BadSha(String),
    #[error("GIT_DEPTH `{0}` is not a whole number")]
    BadDepth(String),
}

/// `None` when `GIT_STRATEGY` is `none` (the job wants no checkout).
pub fn checkout_plan(
    lookup: impl Fn(&str) -> Option<String>,
    job_token: &str,
) -> Result<Option<Checkout>, CheckoutError> {
    let get = |k: &str| lookup(k).filter(|v| !v.is_empty());
    if get("GIT_STRATEGY").as_deref() == Some("none") {
        return Ok(None);
    }
    let raw_url = get("CI_REPOSITORY_URL").ok_or(CheckoutError::Missing("CI_REPOSITORY_URL"))?;
    let sha = get("CI_COMMIT_SHA").ok_or(CheckoutError::Missing("CI_COMMIT_SHA"))?;
    if !(sha.len() >= 7 && sha.len() <= 64 && sha.bytes().all(|b| b.is_ascii_hexdigit())) {
        return Err(CheckoutError::BadSha(sha));
    }
    let depth = match get("GIT_DEPTH") {
        None => None,
        Some(d) => match d.parse::<u32>() {
            Ok(0) => None,
            Ok(n) => Some(n),
            Err(_) => return Err(CheckoutError::BadDepth(d)),
        },
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
    let (url, had_credentials) = strip_credentials(&raw_url);
    let https = url.starts_with("https://") || url.starts_with("http://");
    let auth_header = (https && (had_credentials || !job_token.is_empty())).then(|| {
        let basic = base64::engine::general_purpose::STANDARD
            .encode(format!("gitlab-ci-token:{job_token}"));
        format!("Authorization: Basic {basic}")
    });
    Ok(Some(Checkout {
        url,
        sha,
        refspecs,
        depth,
        auth_header,
    }))
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

/// The git commands, as argument lists, run in the project directory.
pub fn checkout_commands(plan: &Checkout) -> Vec<Vec<String>> {
    let s = |v: &str| v.to_owned();
    let mut fetch = vec![s("fetch"), s("--quiet"), s("--prune"), s("--no-tags")];
    if let Some(depth) = plan.depth {
        fetch.push(format!("--depth={depth}"));
    }
    fetch.push(s("origin"));
    fetch.extend(plan.refspecs.iter().cloned());
    if plan.refspecs.is_empty() {
        // Without a pipeline or branch ref, ask for the commit itself (GitLab allows it).
        fetch.push(plan.sha.clone());
    }
    vec![
        vec![s("init"), s("--quiet"), s("--initial-branch=main"), s(".")],
        vec![s("remote"), s("add"), s("origin"), plan.url.clone()],
        fetch,
        vec![
            s("-c"),
            s("advice.detachedHead=false"),
            s("checkout"),
            s("--quiet"),
            s("--force"),
            plan.sha.clone(),
        ],
    ]
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
            ("GIT_DEPTH", "20"),
        ];
        let plan = checkout_plan(lookup(&vars), "jobtok").unwrap().unwrap();
        assert_eq!(plan.url, "https://gitlab.example.com/g/p.git");
        assert_eq!(plan.depth, Some(20));
        assert_eq!(
            plan.refspecs,
            [
                "+refs/pipelines/120:refs/pipelines/120",
                "+refs/heads/main:refs/remotes/origin/main"
            ]
        );
        let header = plan.auth_header.clone().unwrap();
        assert_eq!(
            header,
            format!(
                "Authorization: Basic {}",
                base64::engine::general_purpose::STANDARD.encode("gitlab-ci-token:jobtok")
            )
        );
        let commands = checkout_commands(&plan);
        assert!(commands.iter().flatten().all(|a| !a.contains("jobtok")));
        assert_eq!(commands[2][4], "--depth=20");
        assert_eq!(commands[3].last().unwrap(), sha);
    }

    #[test]
    fn checkout_of_a_tag_a_local_repo_or_none() {
        let vars = [
            ("CI_REPOSITORY_URL", "file:///srv/repo.git"),
            ("CI_COMMIT_SHA", "abcdef1"),
            ("CI_COMMIT_TAG", "v1"),
        ];
        let plan = checkout_plan(lookup(&vars), "t").unwrap().unwrap();
        assert_eq!(plan.refspecs, ["+refs/tags/v1:refs/tags/v1"]);
        assert_eq!(plan.auth_header, None);
        assert_eq!(plan.depth, None);
        let none = [("GIT_STRATEGY", "none")];
        assert_eq!(checkout_plan(lookup(&none), "t").unwrap(), None);
        let bad = [
            ("CI_REPOSITORY_URL", "x"),
            ("CI_COMMIT_SHA", "main; rm -rf"),
        ];
        assert!(matches!(
            checkout_plan(lookup(&bad), "t"),
            Err(CheckoutError::BadSha(_))
        ));
        assert_eq!(
            checkout_plan(lookup(&[]), "t"),
            Err(CheckoutError::Missing("CI_REPOSITORY_URL"))
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
