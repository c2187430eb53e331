//! GitLab's REST API, as much as per-job runners need: create a runner (the current way,
//! `POST /api/v4/user/runners` with a `create_runner` token, or the legacy way with a
//! registration token), delete it, ask whether it is running a job, and read a job's tags.
//!
//! Tokens live in [`Secret`], whose `Debug` and `Display` print nothing of them; errors name
//! the endpoint and GitLab's status and message, never a request header or body.
//! Transient failures (timeouts, connection errors, 429, 5xx) are retried with exponential
//! backoff and jitter; the final error says how many attempts were made.
//!
//! Every request carries a token (a `PRIVATE-TOKEN` header, or a registration token in the
//! form), so the client follows no redirect: reqwest drops `Authorization` on a redirect to
//! another host but not `PRIVATE-TOKEN`, and a redirect would hand the token to whoever the
//! `Location` names. For the same reason the base URL must be `https://`, unless its host is
//! loopback (the tests' stand-ins) or the operator allows plain http explicitly
//! ([`ALLOW_INSECURE_URL_ENV`], the stack parameter `AllowInsecureGitLabUrl`).

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable as _};
use serde::Deserialize;

pub use ephemeral_core::secrets::Secret;

mod jobs;
pub use jobs::{GitLabJob, JobPipeline, JobRunner, Listing, RequestBudget};

/// How runners are created.
#[derive(Debug, Clone)]
pub enum Registration {
    /// `POST /api/v4/user/runners` with a token that has the `create_runner` scope (GitLab 15.10+;
    /// the only way by default since 17.0).
    CreateRunnerToken(Secret),
    /// `POST /api/v4/runners` with a registration token (disabled by default since 17.0).
    RegistrationToken(Secret),
}

/// Who may use the runner (`runner_type` of `POST /user/runners`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunnerScope {
    Instance,
    Group(u64),
    Project(u64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRunner {
    pub description: String,
    pub tags: Vec<String>,
    /// Whether it may take jobs without tags (needed when the job's tags are unknown).
    pub run_untagged: bool,
    pub scope: RunnerScope,
    /// `maximum_timeout` in seconds: no job may hold the instance longer.
    pub maximum_timeout_seconds: Option<u64>,
}

/// A created runner: its id (to delete it) and its authentication token (for the instance).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunnerCredentials {
    pub id: u64,
    pub token: Secret,
    /// How many times `POST` was sent (retries included). More than one: an earlier attempt
    /// may have created a runner whose answer was lost (see [`GitLabClient::owned_runners`]).
    pub attempts: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deleted {
    Removed,
    /// GitLab answered 404: someone (or an earlier attempt) already removed it.
    AlreadyGone,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GitLabError {
    #[error(
        "{endpoint}: GitLab answered 410 Gone: runner registration tokens are disabled on this GitLab (the default since 17.0); configure a token with the create_runner scope instead"
    )]
    RegistrationDisabled { endpoint: String },
    #[error("{endpoint}: GitLab answered {status}: {message} (check the token and its scopes)")]
    Unauthorized {
        endpoint: String,
        status: u16,
        message: String,
    },
    #[error("{endpoint}: GitLab answered {status}: {message}{}", attempts_note(*.attempts))]
    Status {
        endpoint: String,
        status: u16,
        message: String,
        attempts: u32,
        /// GitLab's `Retry-After` on a 429: the next attempt waits at least this long.
        retry_after: Option<Duration>,
    },
    #[error("{endpoint}: {message}{}", attempts_note(*.attempts))]
    Transport {
        endpoint: String,
        message: String,
        attempts: u32,
    },
    #[error("{endpoint}: unexpected answer: {message}")]
    Unexpected { endpoint: String, message: String },
    /// GitLab answered a redirect: not followed, since the request carries a token.
    #[error(
        "{endpoint}: GitLab answered {status} redirecting to {location}; requests that carry a GitLab token follow no redirect: set GitLabUrl to the address GitLab answers on (e.g. its https:// URL)"
    )]
    Redirected {
        endpoint: String,
        status: u16,
        /// Scheme and host of the `Location` (no path or query: they may hold anything).
        location: String,
    },
    /// The base URL is plain http to a host that is not loopback, and that is not allowed.
    #[error("{endpoint}: {refusal}")]
    InsecureUrl { endpoint: String, refusal: String },
}

/// The environment variable that allows a plain `http://` GitLab URL to a host that is not
/// loopback (`true`; anything else refuses it). The template sets it from the stack
/// parameter `AllowInsecureGitLabUrl` on every function that talks to GitLab's API.
pub const ALLOW_INSECURE_URL_ENV: &str = "ALLOW_INSECURE_GITLAB_URL";

/// Whether a plain-http base URL may be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UrlPolicy {
    /// `https://`, or `http://` to a loopback host (127.0.0.0/8, `::1`, `localhost`).
    #[default]
    HttpsOrLoopback,
    /// Also `http://` to any host: tokens cross the network in clear.
    AllowInsecureHttp,
}

impl UrlPolicy {
    /// From [`ALLOW_INSECURE_URL_ENV`] as `lookup` reads it: only `true` (any case) allows.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Self {
        match lookup(ALLOW_INSECURE_URL_ENV) {
            Some(v) if v.trim().eq_ignore_ascii_case("true") => Self::AllowInsecureHttp,
            _ => Self::HttpsOrLoopback,
        }
    }

    /// From the process environment.
    pub fn from_env() -> Self {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Why `base_url` may not be used under this policy, if it may not.
    pub fn refusal(self, base_url: &str) -> Option<String> {
        let url = match reqwest::Url::parse(base_url) {
            Ok(url) => url,
            Err(e) => return Some(format!("GitLab URL `{base_url}` is not a URL ({e})")),
        };
        match url.scheme() {
            "https" => None,
            "http" if self == Self::AllowInsecureHttp || is_loopback(&url) => None,
            "http" => Some(format!(
                "GitLab URL `{base_url}` is plain http: GitLab tokens would cross the network in clear. Use https://, or set the stack parameter AllowInsecureGitLabUrl to true ({ALLOW_INSECURE_URL_ENV}=true) if you accept that"
            )),
            other => Some(format!(
                "GitLab URL `{base_url}` has scheme `{other}`: use https://"
            )),
        }
    }
}

fn is_loopback(url: &reqwest::Url) -> bool {
    let Some(host) = url.host_str() else {
        return false;
    };
    // An IPv6 host comes bracketed ("[::1]").
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A final answer that is neither success nor a case the caller handles: 401/403 say the token
/// is wrong or lacks a scope; anything else is reported as is.
fn refused(endpoint: &str, status: u16, body: &str) -> GitLabError {
    match status {
        401 | 403 => GitLabError::Unauthorized {
            endpoint: endpoint.to_owned(),
            status,
            message: message_of(body),
        },
        _ => GitLabError::Status {
            endpoint: endpoint.to_owned(),
            status,
            message: message_of(body),
            attempts: 1,
            retry_after: None,
        },
    }
}

fn attempts_note(attempts: u32) -> String {
    if attempts > 1 {
        format!(" (after {attempts} attempts)")
    } else {
        String::new()
    }
}

impl GitLabError {
    /// Worth trying again: GitLab or the network may recover.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Transport { .. } => true,
            Self::Status { status, .. } => *status == 429 || *status >= 500,
            _ => false,
        }
    }

    /// How long GitLab asked us to wait (`Retry-After`), if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    fn with_attempts(mut self, n: u32) -> Self {
        if let Self::Status { attempts, .. } | Self::Transport { attempts, .. } = &mut self {
            *attempts = n;
        }
        self
    }
}

/// Retry settings: transient failures are retried `max_retries` times, waiting from
/// `min_delay` doubling up to `max_delay`, with jitter.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub max_retries: usize,
    pub min_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_retries: 4,
            min_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone)]
pub struct GitLabClient {
    http: reqwest::Client,
    base_url: String,
    retry: RetryPolicy,
    /// Set when the base URL is refused ([`UrlPolicy::refusal`]): every call fails with it.
    refusal: Option<String>,
}

/// One HTTP answer: status, body, and GitLab's `x-next-page` (absent on the last page).
struct Answer {
    status: u16,
    body: String,
    next_page: Option<u64>,
}

#[derive(Deserialize)]
struct CreatedRunner {
    id: u64,
    token: String,
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    message: Option<serde_json::Value>,
    #[serde(default)]
    error: Option<String>,
}

/// GitLab's error message from a body, short and on one line.
fn message_of(body: &str) -> String {
    let text = match serde_json::from_str::<ErrorBody>(body) {
        Ok(ErrorBody {
            message: Some(serde_json::Value::String(s)),
            ..
        }) => s,
        Ok(ErrorBody {
            message: Some(other),
            ..
        }) => other.to_string(),
        Ok(ErrorBody { error: Some(e), .. }) => e,
        _ => body.to_owned(),
    };
    let mut one_line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.len() > 200 {
        let mut cut = 200;
        while !one_line.is_char_boundary(cut) {
            cut -= 1;
        }
        one_line.truncate(cut);
        one_line.push('…');
    }
    one_line
}

impl GitLabClient {
    /// A client for `base_url`, with the URL policy of the environment
    /// ([`ALLOW_INSECURE_URL_ENV`]): see [`Self::with_url_policy`].
    pub fn new(base_url: &str, retry: RetryPolicy) -> Self {
        Self::with_url_policy(base_url, retry, UrlPolicy::from_env())
    }

    /// A client for `base_url`. A URL the policy refuses makes every call fail with
    /// [`GitLabError::InsecureUrl`] before anything is sent (see [`Self::url_refusal`] to
    /// check at start). No redirect is followed: a 3xx is [`GitLabError::Redirected`].
    pub fn with_url_policy(base_url: &str, retry: RetryPolicy, policy: UrlPolicy) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .connect_timeout(Duration::from_secs(3))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("HTTP client with static settings");
        let base_url = base_url.trim_end_matches('/').to_owned();
        Self {
            http,
            refusal: policy.refusal(&base_url),
            base_url,
            retry,
        }
    }

    /// Why this client's base URL is refused, if it is.
    pub fn url_refusal(&self) -> Option<&str> {
        self.refusal.as_deref()
    }

    fn url(&self, path: &str) -> String {
        format!("{}/api/v4{path}", self.base_url)
    }

    /// Sends a request built by `build` (again on each retry); returns status and body text.
    async fn send(
        &self,
        endpoint: &str,
        build: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<(u16, String), GitLabError> {
        let answer = self.send_for_answer(endpoint, build).await?;
        Ok((answer.status, answer.body))
    }

    /// [`Self::send`], with the headers a paginated list needs. A 429's `Retry-After` (in
    /// seconds, at most `max_delay` x 10) stretches the wait before the next attempt.
    async fn send_for_answer(
        &self,
        endpoint: &str,
        build: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<Answer, GitLabError> {
        if let Some(refusal) = &self.refusal {
            return Err(GitLabError::InsecureUrl {
                endpoint: endpoint.to_owned(),
                refusal: refusal.clone(),
            });
        }
        let attempt = || one_attempt(endpoint, build());
        let longest_wait = self.retry.max_delay * 10;
        let mut attempts = 0u32;
        let backoff = ExponentialBuilder::default()
            .with_min_delay(self.retry.min_delay)
            .with_max_delay(self.retry.max_delay)
            .with_max_times(self.retry.max_retries)
            .with_jitter();
        (|| {
            attempts += 1;
            attempt()
        })
        .retry(backoff)
        .when(GitLabError::is_transient)
        .adjust(|e, planned| {
            planned.map(|d| {
                e.retry_after()
                    .map_or(d, |asked| asked.min(longest_wait).max(d))
            })
        })
        .await
        .map_err(|e| e.with_attempts(attempts))
    }

    /// Creates a runner for one job.
    pub async fn create_runner(
        &self,
        registration: &Registration,
        runner: &NewRunner,
    ) -> Result<RunnerCredentials, GitLabError> {
        let tag_list = runner.tags.join(",");
        let mut form: Vec<(&str, String)> = vec![
            ("description", runner.description.clone()),
            ("run_untagged", runner.run_untagged.to_string()),
            ("locked", "true".into()),
        ];
        if !tag_list.is_empty() {
            form.push(("tag_list", tag_list));
        }
        if let Some(t) = runner.maximum_timeout_seconds {
            form.push(("maximum_timeout", t.to_string()));
        }
        let (endpoint, path) = match registration {
            Registration::CreateRunnerToken(_) => {
                match runner.scope {
                    RunnerScope::Instance => form.push(("runner_type", "instance_type".into())),
                    RunnerScope::Group(id) => {
                        form.push(("runner_type", "group_type".into()));
                        form.push(("group_id", id.to_string()));
                    }
                    RunnerScope::Project(id) => {
                        form.push(("runner_type", "project_type".into()));
                        form.push(("project_id", id.to_string()));
                    }
                }
                ("POST /user/runners", "/user/runners")
            }
            Registration::RegistrationToken(token) => {
                form.push(("token", token.expose().to_owned()));
                ("POST /runners", "/runners")
            }
        };
        let sent = std::sync::atomic::AtomicU32::new(0);
        let (status, body) = self
            .send(endpoint, || {
                sent.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let request = self.http.post(self.url(path)).form(&form);
                match registration {
                    Registration::CreateRunnerToken(t) => {
                        request.header("PRIVATE-TOKEN", t.expose())
                    }
                    Registration::RegistrationToken(_) => request,
                }
            })
            .await?;
        match status {
            200 | 201 => {
                let created: CreatedRunner =
                    serde_json::from_str(&body).map_err(|e| GitLabError::Unexpected {
                        endpoint: endpoint.into(),
                        // The body holds the token: name the parse error only.
                        message: format!("body is not a created runner ({:?})", e.classify()),
                    })?;
                Ok(RunnerCredentials {
                    id: created.id,
                    token: Secret::new(created.token),
                    attempts: sent.load(std::sync::atomic::Ordering::SeqCst),
                })
            }
            410 if matches!(registration, Registration::RegistrationToken(_)) => {
                Err(GitLabError::RegistrationDisabled {
                    endpoint: endpoint.into(),
                })
            }
            _ => Err(refused(endpoint, status, &body)),
        }
    }

    /// Deletes a runner by id (`DELETE /api/v4/runners/:id`); a runner already gone is done.
    pub async fn delete_runner(&self, api_token: &Secret, id: u64) -> Result<Deleted, GitLabError> {
        let endpoint = format!("DELETE /runners/{id}");
        let (status, body) = self
            .send(&endpoint, || {
                self.http
                    .delete(self.url(&format!("/runners/{id}")))
                    .header("PRIVATE-TOKEN", api_token.expose())
            })
            .await?;
        match status {
            200..=299 => Ok(Deleted::Removed),
            404 => Ok(Deleted::AlreadyGone),
            _ => Err(refused(&endpoint, status, &body)),
        }
    }

    /// Deletes the runner that `runner_token` authenticates (`DELETE /api/v4/runners`, GitLab's
    /// "delete a runner by authentication token"): a per-job runner removes itself when its
    /// job is done, with nothing but its own token. A token GitLab no longer knows (403) is a
    /// runner already gone.
    pub async fn delete_own_runner(&self, runner_token: &Secret) -> Result<Deleted, GitLabError> {
        let endpoint = "DELETE /runners";
        let (status, body) = self
            .send(endpoint, || {
                self.http
                    .delete(self.url("/runners"))
                    .form(&[("token", runner_token.expose())])
            })
            .await?;
        match status {
            200..=299 => Ok(Deleted::Removed),
            403 | 404 => Ok(Deleted::AlreadyGone),
            _ => Err(refused(endpoint, status, &body)),
        }
    }

    /// Whether the runner is running a job now (`GET /runners/:id/jobs?status=running`).
    pub async fn runner_busy(&self, api_token: &Secret, id: u64) -> Result<bool, GitLabError> {
        let endpoint = format!("GET /runners/{id}/jobs");
        let (status, body) = self
            .send(&endpoint, || {
                self.http
                    .get(self.url(&format!("/runners/{id}/jobs")))
                    .query(&[("status", "running"), ("per_page", "1")])
                    .header("PRIVATE-TOKEN", api_token.expose())
            })
            .await?;
        match status {
            200 => serde_json::from_str::<Vec<serde_json::Value>>(&body)
                .map(|jobs| !jobs.is_empty())
                .map_err(|e| GitLabError::Unexpected {
                    endpoint,
                    message: format!("not a list of jobs ({e})"),
                }),
            // A runner that no longer exists runs nothing.
            404 => Ok(false),
            _ => Err(refused(&endpoint, status, &body)),
        }
    }

    /// The job's `tag_list` (`GET /projects/:id/jobs/:job_id`, a `read_api` token).
    pub async fn job_tags(
        &self,
        api_token: &Secret,
        project_id: u64,
        job_id: u64,
    ) -> Result<Vec<String>, GitLabError> {
        #[derive(Deserialize)]
        struct Job {
            #[serde(default)]
            tag_list: Vec<String>,
        }
        let endpoint = format!("GET /projects/{project_id}/jobs/{job_id}");
        let (status, body) = self
            .send(&endpoint, || {
                self.http
                    .get(self.url(&format!("/projects/{project_id}/jobs/{job_id}")))
                    .header("PRIVATE-TOKEN", api_token.expose())
            })
            .await?;
        match status {
            200 => serde_json::from_str::<Job>(&body)
                .map(|j| j.tag_list)
                .map_err(|e| GitLabError::Unexpected {
                    endpoint,
                    message: format!("not a job ({e})"),
                }),
            _ => Err(refused(&endpoint, status, &body)),
        }
    }
}

/// One attempt of a request: its answer, or the error that says whether to retry (429 and
/// 5xx are transient; a redirect is refused, naming only where it pointed).
async fn one_attempt(
    endpoint: &str,
    request: reqwest::RequestBuilder,
) -> Result<Answer, GitLabError> {
    let response = request.send().await.map_err(|e| GitLabError::Transport {
        endpoint: endpoint.to_owned(),
        // reqwest's text names the URL and the failure, never headers or bodies.
        message: e.without_url().to_string(),
        attempts: 1,
    })?;
    let status = response.status().as_u16();
    if response.status().is_redirection() {
        let location = response
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| response.url().join(v).ok())
            .map_or_else(
                || "an unreadable Location".to_owned(),
                |u| format!("{}://{}", u.scheme(), u.authority()),
            );
        return Err(GitLabError::Redirected {
            endpoint: endpoint.to_owned(),
            status,
            location,
        });
    }
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    let retry_after = header("retry-after").map(Duration::from_secs);
    let next_page = header("x-next-page");
    let body = response.text().await.unwrap_or_default();
    if status == 429 || status >= 500 {
        return Err(GitLabError::Status {
            endpoint: endpoint.to_owned(),
            status,
            message: message_of(&body),
            attempts: 1,
            retry_after: retry_after.filter(|_| status == 429),
        });
    }
    Ok(Answer {
        status,
        body,
        next_page,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_is_refused_unless_loopback_or_allowed() {
        let strict = UrlPolicy::HttpsOrLoopback;
        for ok in [
            "https://gitlab.example.com",
            "https://gitlab.example.com:8443/gitlab",
            "http://127.0.0.1:8080",
            "http://127.1.2.3",
            "http://localhost:3000",
            "http://LOCALHOST",
            "http://[::1]:9000",
        ] {
            assert_eq!(strict.refusal(ok), None, "{ok}");
        }
        for refused in [
            "http://gitlab.example.com",
            "http://10.0.0.5",
            "http://localhost.example.com",
            "http://[::2]",
            "ftp://gitlab.example.com",
            "gitlab.example.com",
        ] {
            assert!(strict.refusal(refused).is_some(), "{refused}");
        }
        let text = strict.refusal("http://gitlab.example.com").unwrap();
        assert!(text.contains("AllowInsecureGitLabUrl"), "{text}");
        assert_eq!(
            UrlPolicy::AllowInsecureHttp.refusal("http://gitlab.example.com"),
            None
        );
        assert!(
            UrlPolicy::AllowInsecureHttp
                .refusal("ftp://gitlab.example.com")
                .is_some()
        );
    }

    #[test]
    fn only_true_allows_insecure_http() {
        let with = |v: &'static str| {
            UrlPolicy::from_lookup(move |name| {
                (name == ALLOW_INSECURE_URL_ENV).then(|| v.to_owned())
            })
        };
        assert_eq!(with("true"), UrlPolicy::AllowInsecureHttp);
        assert_eq!(with("TRUE"), UrlPolicy::AllowInsecureHttp);
        for no in ["false", "", "1", "yes"] {
            assert_eq!(with(no), UrlPolicy::HttpsOrLoopback, "{no}");
        }
        assert_eq!(UrlPolicy::from_lookup(|_| None), UrlPolicy::HttpsOrLoopback);
    }
}
