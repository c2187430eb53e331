use reqwest::multipart::{Form, Part};
use reqwest::{Body, StatusCode};
use serde::de::Deserializer;
use serde::{Deserialize, Serialize};
use serde_json::Value as JsonValue;
use std::collections::HashMap;
use std::ops::Not;
use std::time::Duration;
use thiserror::Error;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use url::Url;
use zip::result::ZipError;

fn deserialize_null_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    T: Default + Deserialize<'de>,
    D: Deserializer<'de>,
{
    let opt = Option::deserialize(deserializer)?;
    Ok(opt.unwrap_or_default())
}

const GITLAB_TRACE_UPDATE_INTERVAL: &str = "X-GitLab-Trace-Update-Interval";
const JOB_STATUS: &str = "Job-Status";

#[derive(Debug, Default, Clone, Serialize)]
struct FeaturesInfo {
    #[serde(skip_serializing_if = "Not::not")]
    variables: bool,
    #[serde(skip_serializing_if = "Not::not")]
    image: bool,
    #[serde(skip_serializing_if = "Not::not")]
    services: bool,
    #[serde(skip_serializing_if = "Not::not")]
    artifacts: bool,
    #[serde(skip_serializing_if = "Not::not")]
    cache: bool,
    #[serde(skip_serializing_if = "Not::not")]
    shared: bool,
    #[serde(skip_serializing_if = "Not::not")]
    upload_multiple_artifacts: bool,
    #[serde(skip_serializing_if = "Not::not")]
    upload_raw_artifacts: bool,
    #[serde(skip_serializing_if = "Not::not")]
    session: bool,
    #[serde(skip_serializing_if = "Not::not")]
    terminal: bool,
    #[serde(skip_serializing_if = "Not::not")]
    refspecs: bool,
    #[serde(skip_serializing_if = "Not::not")]
    masking: bool,
    #[serde(skip_serializing_if = "Not::not")]
    proxy: bool,
    #[serde(skip_serializing_if = "Not::not")]
    raw_variables: bool,
    #[serde(skip_serializing_if = "Not::not")]
    artifacts_exclude: bool,
    #[serde(skip_serializing_if = "Not::not")]
    multi_build_steps: bool,
    #[serde(skip_serializing_if = "Not::not")]
    trace_reset: bool,
    #[serde(skip_serializing_if = "Not::not")]
    trace_checksum: bool,
    #[serde(skip_serializing_if = "Not::not")]
    trace_size: bool,
    #[serde(skip_serializing_if = "Not::not")]
    vault_secrets: bool,
    #[serde(skip_serializing_if = "Not::not")]
    cancelable: bool,
    #[serde(skip_serializing_if = "Not::not")]
    return_exit_code: bool,
    #[serde(skip_serializing_if = "Not::not")]
    service_variables: bool,
}

/// FORK: what the job response says about the repository (upstream keeps it private).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
pub struct GitInfo {
    /// Clone URL, with the job token as credentials (a secret: never log it).
    #[serde(default)]
    pub repo_url: String,
    /// The pipeline's ref (branch or tag name).
    #[serde(default, rename = "ref")]
    pub git_ref: String,
    /// The commit to check out.
    #[serde(default)]
    pub sha: String,
    /// `branch` or `tag`.
    #[serde(default)]
    pub ref_type: String,
    /// What to fetch, e.g. `+<sha>:refs/pipelines/<id>`.
    #[serde(default, deserialize_with = "deserialize_null_default")]
    pub refspecs: Vec<String>,
    /// Shallow clone depth; 0 means a full clone.
    #[serde(default)]
    pub depth: u32,
}

/// FORK: runner-side settings GitLab sends with the job.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
pub struct RunnerInfo {
    /// The job's timeout in seconds (project or runner setting, or the job's `timeout:`).
    #[serde(default)]
    pub timeout: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
struct VersionInfo<'a> {
    #[serde(flatten)]
    metadata: &'a ClientMetadata,
    features: FeaturesInfo,
}

#[derive(Debug, Clone, Serialize)]
struct JobRequest<'a> {
    token: &'a str,
    system_id: &'a str,
    info: VersionInfo<'a>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "lowercase")]
#[allow(dead_code)]
pub enum JobState {
    Pending,
    Running,
    Success,
    Failed,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename = "lower_case")]
struct JobUpdate<'a> {
    token: &'a str,
    state: JobState,
    // FORK: GitLab shows these on the job page (and `failure_reason` decides whether a retry
    // rule such as `retry: when: runner_system_failure` applies). Upstream sends neither.
    #[serde(skip_serializing_if = "Option::is_none")]
    failure_reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    exit_code: Option<i32>,
}

/// FORK: why a job failed, as GitLab's job update API names it, and the script's exit code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobFailure {
    /// One of GitLab's failure reasons: `script_failure`, `job_execution_timeout`,
    /// `runner_system_failure`, ...
    pub reason: String,
    /// The exit code of the failed script, when a script ran and exited.
    pub exit_code: Option<i32>,
}

impl JobFailure {
    /// A failure with the given GitLab failure reason and no exit code.
    pub fn new(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
            exit_code: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct JobUpdateReply {
    // GitLabs job update endpoint can include a suggested request rate in the response's HTTP header.
    // Currently we only use this value from trace calls (e.g. appending to the jobs log).
    // This field is kept around to document it's existence.
    #[allow(dead_code)]
    pub trace_update_interval: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct TraceReply {
    pub trace_update_interval: Option<Duration>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub(crate) struct JobVariable {
    pub key: String,
    #[serde(deserialize_with = "deserialize_null_default")]
    pub value: String,
    pub public: bool,
    pub masked: bool,
    // FORK: a file-type variable (the runner writes the value to a file).
    #[serde(default)]
    pub file: bool,
}

fn variable_hash<'de, D>(deserializer: D) -> Result<HashMap<String, JobVariable>, D::Error>
where
    D: Deserializer<'de>,
{
    let hash = Vec::<JobVariable>::deserialize(deserializer)?
        .drain(..)
        .map(|v| (v.key.clone(), v))
        .collect();
    Ok(hash)
}

#[derive(Copy, Clone, Deserialize, Debug, Eq, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum JobStepWhen {
    Always,
    OnFailure,
    OnSuccess,
}

/// Phase of the gitlab job steps
#[derive(Copy, Clone, Deserialize, Debug, Eq, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// script step; Practically this is before_script + script as defined in the gitlab job yaml
    Script,
    /// after_script step
    AfterScript,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub(crate) struct JobStep {
    pub name: Phase,
    pub script: Vec<String>,
    pub timeout: u32,
    pub when: JobStepWhen,
    pub allow_failure: bool,
}

#[derive(Copy, Clone, Deserialize, Debug, Eq, PartialEq)]
#[serde(rename_all = "snake_case")]
#[derive(Default)]
pub enum ArtifactWhen {
    Always,
    OnFailure,
    #[default]
    OnSuccess,
}

#[derive(Copy, Clone, Deserialize, Debug, Eq, PartialEq)]
#[serde(rename_all = "snake_case")]
#[derive(Default)]
pub enum ArtifactFormat {
    #[default]
    Zip,
    Gzip,
    Raw,
}

impl std::fmt::Display for ArtifactFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            Self::Zip => "zip",
            Self::Gzip => "gzip",
            Self::Raw => "raw",
        };
        write!(f, "{s}")
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub(crate) struct JobArtifact {
    pub name: Option<String>,
    #[serde(default, deserialize_with = "deserialize_null_default")]
    pub untracked: bool,
    pub paths: Vec<String>,
    #[serde(deserialize_with = "deserialize_null_default")]
    pub when: ArtifactWhen,
    pub artifact_type: String,
    #[serde(deserialize_with = "deserialize_null_default")]
    pub artifact_format: ArtifactFormat,
    pub expire_in: Option<String>,
    // FORK: `artifacts:exclude` (upstream ignores it and uploads excluded files).
    #[serde(default, deserialize_with = "deserialize_null_default")]
    pub exclude: Vec<String>,
}

// FORK: a `cache:` entry of the job (upstream leaves `cache` in `unparsed`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, Default)]
pub(crate) struct JobCache {
    #[serde(default, deserialize_with = "deserialize_null_default")]
    pub key: String,
    #[serde(default, deserialize_with = "deserialize_null_default")]
    pub untracked: bool,
    #[serde(default, deserialize_with = "deserialize_null_default")]
    pub policy: String,
    #[serde(default, deserialize_with = "deserialize_null_default")]
    pub paths: Vec<String>,
    #[serde(default, deserialize_with = "deserialize_null_default")]
    pub when: String,
    #[serde(default, deserialize_with = "deserialize_null_default")]
    pub fallback_keys: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub(crate) struct JobArtifactFile {
    pub filename: String,
    pub size: usize,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub(crate) struct JobDependency {
    pub id: u64,
    pub name: String,
    pub token: String,
    pub artifacts_file: Option<JobArtifactFile>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub(crate) struct JobResponse {
    pub id: u64,
    pub token: String,
    pub allow_git_fetch: bool,
    #[serde(deserialize_with = "variable_hash")]
    pub variables: HashMap<String, JobVariable>,
    pub steps: Vec<JobStep>,
    #[serde(deserialize_with = "deserialize_null_default")]
    pub dependencies: Vec<JobDependency>,
    #[serde(deserialize_with = "deserialize_null_default")]
    pub artifacts: Vec<JobArtifact>,
    // FORK: typed instead of left in `unparsed`.
    #[serde(default)]
    pub git_info: Option<GitInfo>,
    #[serde(default)]
    pub runner_info: Option<RunnerInfo>,
    // FORK: the job's `cache:` entries.
    #[serde(default, deserialize_with = "deserialize_null_default")]
    pub cache: Vec<JobCache>,
    #[serde(flatten)]
    unparsed: JsonValue,
}

impl JobResponse {
    pub fn step(&self, name: Phase) -> Option<&JobStep> {
        self.steps.iter().find(|s| s.name == name)
    }
}

#[derive(Error, Debug)]
pub enum Error {
    #[error("Unexpected reply code {0}")]
    UnexpectedStatus(StatusCode),
    #[error("Job cancelled")]
    JobCancelled,
    #[error("Request failure {0}")]
    Request(#[from] reqwest::Error),
    #[error("Failed to write to destination {0}")]
    WriteFailure(#[source] futures::io::Error),
    #[error("Failed to parse zip file: {0}")]
    ZipFile(#[from] ZipError),
    #[error("Empty trace")]
    EmptyTrace,
}

pub(crate) struct ArtifactInfo<'a> {
    pub name: &'a str,
    pub artifact_format: &'a str,
    pub artifact_type: &'a str,
    pub expire_in: Option<&'a str>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct ClientMetadata {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) revision: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) platform: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) architecture: Option<String>,
}

#[derive(Clone, Debug)]
pub(crate) struct Client {
    client: reqwest::Client,
    url: Url,
    token: String,
    system_id: String,
    metadata: ClientMetadata,
}

impl Client {
    // FORK: only upstream's tests build a client this way now.
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn new(url: Url, token: String, system_id: String, metadata: ClientMetadata) -> Self {
        Self::with_http_client(url, token, system_id, metadata, reqwest::Client::new())
    }

    /// FORK: a caller-built HTTP client (timeouts, connection reuse across Lambda invokes).
    pub fn with_http_client(
        url: Url,
        token: String,
        system_id: String,
        metadata: ClientMetadata,
        client: reqwest::Client,
    ) -> Self {
        Self {
            client,
            url,
            token,
            system_id,
            metadata,
        }
    }

    pub async fn request_job(&self) -> Result<Option<JobResponse>, Error> {
        let request = JobRequest {
            token: &self.token,
            system_id: &self.system_id,
            info: VersionInfo {
                // Setting `refspecs` is required to run detached MR pipelines.
                features: FeaturesInfo {
                    refspecs: true,
                    upload_multiple_artifacts: true,
                    // FORK: what the fork implements on top of upstream.
                    artifacts_exclude: true,
                    return_exit_code: true,
                    // FORK: `Job::caches()`; the handler restores and saves them.
                    cache: true,
                    ..Default::default()
                },
                metadata: &self.metadata,
            },
        };

        let mut url = self.url.clone();
        url.path_segments_mut()
            .unwrap()
            .extend(&["api", "v4", "jobs", "request"]);

        let r = self
            .client
            .post(url)
            .json(&request)
            .send()
            .await?
            .error_for_status()?;

        match r.status() {
            StatusCode::CREATED => Ok(Some(r.json().await?)),
            StatusCode::NO_CONTENT => Ok(None),
            _ => Err(Error::UnexpectedStatus(r.status())),
        }
    }

    fn check_for_job_cancellation(&self, response: &reqwest::Response) -> Result<(), Error> {
        match response.headers().get(JOB_STATUS) {
            // FORK: "canceling" too: GitLab's graceful cancel (we have no graceful path).
            Some(header) if header == "canceled" || header == "canceling" => {
                Err(Error::JobCancelled)
            }
            _ => Ok(()),
        }
    }

    pub async fn update_job(
        &self,
        id: u64,
        token: &str,
        state: JobState,
        failure: Option<&JobFailure>,
    ) -> Result<JobUpdateReply, Error> {
        let mut url = self.url.clone();
        let id_s = format!("{id}");
        url.path_segments_mut()
            .unwrap()
            .extend(&["api", "v4", "jobs", &id_s]);

        let update = JobUpdate {
            token,
            state,
            failure_reason: failure.map(|f| f.reason.as_str()),
            exit_code: failure.and_then(|f| f.exit_code),
        };

        let r = self.client.put(url).json(&update).send().await?;

        self.check_for_job_cancellation(&r)?;

        let trace_update_interval = r
            .headers()
            .get(GITLAB_TRACE_UPDATE_INTERVAL)
            .and_then(|v| Some(Duration::from_secs(v.to_str().ok()?.parse().ok()?)));
        match r.status() {
            StatusCode::OK => Ok(JobUpdateReply {
                trace_update_interval,
            }),
            _ => Err(Error::UnexpectedStatus(r.status())),
        }
    }

    pub async fn trace<B>(
        &self,
        id: u64,
        token: &str,
        body: B,
        start: usize,
        length: usize,
    ) -> Result<TraceReply, Error>
    where
        B: Into<Body>,
    {
        if length == 0 {
            return Err(Error::EmptyTrace);
        }

        let mut url = self.url.clone();
        let id_s = format!("{id}");
        url.path_segments_mut()
            .unwrap()
            .extend(&["api", "v4", "jobs", &id_s, "trace"]);

        let range = format!("{}-{}", start, start + length - 1);

        let r = self
            .client
            .patch(url)
            .header("JOB-TOKEN", token)
            .header(reqwest::header::CONTENT_RANGE, range)
            .header(reqwest::header::CONTENT_TYPE, "text/plain")
            .body(body)
            .send()
            .await?;

        self.check_for_job_cancellation(&r)?;

        let trace_update_interval = r
            .headers()
            .get(GITLAB_TRACE_UPDATE_INTERVAL)
            .and_then(|v| Some(Duration::from_secs(v.to_str().ok()?.parse().ok()?)));

        match r.status() {
            StatusCode::ACCEPTED => Ok(TraceReply {
                trace_update_interval,
            }),
            _ => Err(Error::UnexpectedStatus(r.status())),
        }
    }

    pub async fn download_artifact<D: AsyncWrite + Unpin>(
        &self,
        id: u64,
        token: &str,
        mut dest: D,
    ) -> Result<(), Error> {
        let mut url = self.url.clone();
        let id_s = format!("{id}");
        url.path_segments_mut()
            .unwrap()
            .extend(&["api", "v4", "jobs", &id_s, "artifacts"]);

        let mut r = self
            .client
            .get(url)
            .header("JOB-TOKEN", token)
            .send()
            .await?;

        match r.status() {
            StatusCode::OK => {
                while let Some(ref chunk) = r.chunk().await? {
                    dest.write_all(chunk).await.map_err(Error::WriteFailure)?
                }
                Ok(())
            }
            _ => Err(Error::UnexpectedStatus(r.status())),
        }
    }

    pub async fn upload_artifact<D>(
        &self,
        id: u64,
        token: &str,
        info: ArtifactInfo<'_>,
        data: D,
    ) -> Result<(), Error>
    where
        D: Into<Body>,
    {
        let part = Part::stream(data).file_name(info.name.to_string());
        let form = Form::new()
            .part("file", part)
            .text("artifact_format", info.artifact_format.to_string())
            .text("artifact_type", info.artifact_type.to_string());

        let form = if let Some(expiry) = info.expire_in {
            form.text("expire_in", expiry.to_string())
        } else {
            form
        };

        let mut url = self.url.clone();
        let id_s = format!("{id}");
        url.path_segments_mut()
            .unwrap()
            .extend(&["api", "v4", "jobs", &id_s, "artifacts"]);

        let r = self
            .client
            .post(url)
            .header("JOB-TOKEN", token)
            .multipart(form)
            .send()
            .await?;

        match r.status() {
            StatusCode::CREATED => Ok(()),
            _ => Err(Error::UnexpectedStatus(r.status())),
        }
    }
}

#[cfg(test)]
mod test {
    use super::*;
    use gitlab_runner_mock::GitlabRunnerMock;
    use serde_json::json;

    #[test]
    fn deserialize_variables() {
        #[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
        struct Test {
            #[serde(deserialize_with = "variable_hash")]
            variables: HashMap<String, JobVariable>,
        }

        let json = json!({
            "variables": [
                { "key": "VAR1", "value": "1", "public": true, "masked": false },
                { "key": "VAR2", "value": "2", "public": false, "masked": true }
            ]
        });

        let t: Test = serde_json::from_str(&json.to_string()).expect("Failed to deserialize json");
        assert_eq!(2, t.variables.len());
        let v = t.variables.get("VAR1").unwrap();
        assert_eq!(
            &JobVariable {
                key: "VAR1".to_string(),
                value: "1".to_string(),
                public: true,
                masked: false,
                file: false
            },
            v
        );
        let v = t.variables.get("VAR2").unwrap();
        assert_eq!(
            &JobVariable {
                key: "VAR2".to_string(),
                value: "2".to_string(),
                public: false,
                masked: true,
                file: false
            },
            v
        );
    }

    /// FORK: GitLab's `cache` entries, with the nulls GitLab sends for unset fields.
    #[test]
    fn deserialize_cache_entries() {
        #[derive(Debug, Deserialize)]
        struct Test {
            #[serde(default, deserialize_with = "deserialize_null_default")]
            cache: Vec<JobCache>,
        }
        let json = json!({"cache": [
            {"key": "deps-main", "untracked": false, "policy": "pull-push",
             "paths": ["node_modules/"], "when": "on_success", "fallback_keys": ["deps"]},
            {"key": "x", "untracked": null, "policy": null, "paths": null, "when": null}
        ]});
        let t: Test = serde_json::from_value(json).unwrap();
        assert_eq!(t.cache[0].paths, ["node_modules/"]);
        assert_eq!(t.cache[0].fallback_keys, ["deps"]);
        assert_eq!(
            t.cache[1],
            JobCache {
                key: "x".into(),
                ..Default::default()
            }
        );
        let t: Test = serde_json::from_value(json!({"cache": null})).unwrap();
        assert!(t.cache.is_empty());
    }

    #[test]
    fn failed_update_carries_reason_and_exit_code() {
        let failure = JobFailure {
            reason: "script_failure".into(),
            exit_code: Some(3),
        };
        let update = JobUpdate {
            token: "t",
            state: JobState::Failed,
            failure_reason: Some(&failure.reason),
            exit_code: failure.exit_code,
        };
        assert_eq!(
            serde_json::to_value(&update).unwrap(),
            serde_json::json!({"token": "t", "state": "failed",
                               "failure_reason": "script_failure", "exit_code": 3})
        );
        let ok = JobUpdate {
            token: "t",
            state: JobState::Success,
            failure_reason: None,
            exit_code: None,
        };
        assert_eq!(
            serde_json::to_value(&ok).unwrap(),
            serde_json::json!({"token": "t", "state": "success"})
        );
    }

    #[tokio::test]
    async fn no_job() {
        let mock = GitlabRunnerMock::start().await;

        let client = Client::new(
            mock.uri(),
            mock.runner_token().to_string(),
            "s_ystem_id1234".to_string(),
            ClientMetadata::default(),
        );

        let job = client.request_job().await.unwrap();

        assert_eq!(None, job);
    }

    #[tokio::test]
    async fn process_job() {
        let mock = GitlabRunnerMock::start().await;
        mock.add_dummy_job("process job".to_string());

        let client = Client::new(
            mock.uri(),
            mock.runner_token().to_string(),
            "s_ystem_id1234".to_string(),
            ClientMetadata::default(),
        );

        if let Some(job) = client.request_job().await.unwrap() {
            client
                .update_job(job.id, &job.token, JobState::Success, None)
                .await
                .unwrap();
        } else {
            panic!("No job!")
        }

        let job = client.request_job().await.unwrap();
        assert_eq!(None, job);
    }
}
