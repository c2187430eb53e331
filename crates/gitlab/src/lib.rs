//! GitLab's REST API, as much as per-job runners need: create a runner (the current way,
//! `POST /api/v4/user/runners` with a `create_runner` token, or the legacy way with a
//! registration token), delete it, ask whether it is running a job, and read a job's tags.
//!
//! Tokens live in [`Secret`], whose `Debug` and `Display` print nothing of them; errors name
//! the endpoint and GitLab's status and message, never a request header or body.
//! Transient failures (timeouts, connection errors, 429, 5xx) are retried with exponential
//! backoff and jitter; the final error says how many attempts were made.

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
    pub fn new(base_url: &str, retry: RetryPolicy) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .connect_timeout(Duration::from_secs(3))
            .build()
            .expect("HTTP client with static settings");
        Self {
            http,
            base_url: base_url.trim_end_matches('/').to_owned(),
            retry,
        }
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
        let attempt = || async {
            let response = build().send().await.map_err(|e| GitLabError::Transport {
                endpoint: endpoint.to_owned(),
                // reqwest's text names the URL and the failure, never headers or bodies.
                message: e.without_url().to_string(),
                attempts: 1,
            })?;
            let status = response.status().as_u16();
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
        };
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
        let (status, body) = self
            .send(endpoint, || {
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
