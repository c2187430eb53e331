//! GitLab's Job Hook payload and the slim [`JobEvent`] we forward in its place.
//!
//! The raw hook is large and carries personal data (`user.email`, commit author); the
//! [`JobEvent`] keeps what routing, provisioning and teardown need and nothing else. Unknown
//! fields are ignored so that newer GitLab versions keep working.

use serde::{Deserialize, Serialize};

/// A job's status as GitLab reports it. Statuses GitLab adds later are kept verbatim
/// (`Other`) rather than rejected: the router decides what to do with them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum JobStatus {
    Created,
    WaitingForResource,
    Preparing,
    Pending,
    Running,
    Success,
    Failed,
    Canceling,
    Canceled,
    Skipped,
    Manual,
    Scheduled,
    Other(String),
}

impl JobStatus {
    /// Every status GitLab reports today, in its lifecycle order (the schema lists these).
    pub const KNOWN: [JobStatus; 12] = [
        Self::Created,
        Self::WaitingForResource,
        Self::Preparing,
        Self::Pending,
        Self::Running,
        Self::Success,
        Self::Failed,
        Self::Canceling,
        Self::Canceled,
        Self::Skipped,
        Self::Manual,
        Self::Scheduled,
    ];

    pub fn as_str(&self) -> &str {
        match self {
            Self::Created => "created",
            Self::WaitingForResource => "waiting_for_resource",
            Self::Preparing => "preparing",
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Success => "success",
            Self::Failed => "failed",
            Self::Canceling => "canceling",
            Self::Canceled => "canceled",
            Self::Skipped => "skipped",
            Self::Manual => "manual",
            Self::Scheduled => "scheduled",
            Self::Other(s) => s,
        }
    }

    /// The job will not run (any more): its runner, if any, can go.
    pub fn is_finished(&self) -> bool {
        matches!(
            self,
            Self::Success | Self::Failed | Self::Canceled | Self::Skipped
        )
    }
}

impl From<&str> for JobStatus {
    /// One of [`JobStatus::KNOWN`] by its name (and GitLab's older spelling `cancelled`), else
    /// `Other`: the names live in `as_str` alone.
    fn from(s: &str) -> Self {
        let s = if s == "cancelled" { "canceled" } else { s };
        Self::KNOWN
            .into_iter()
            .find(|known| known.as_str() == s)
            .unwrap_or_else(|| Self::Other(s.to_owned()))
    }
}

impl Serialize for JobStatus {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for JobStatus {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        if s.is_empty() {
            return Err(serde::de::Error::custom("build_status is empty"));
        }
        Ok(Self::from(s.as_ref()))
    }
}

/// A string: one of [`JobStatus::KNOWN`], or a status GitLab added later, passed on verbatim.
#[cfg(feature = "schema")]
impl schemars::JsonSchema for JobStatus {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "JobStatus".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        let known: Vec<&str> = Self::KNOWN.iter().map(Self::as_str).collect();
        schemars::json_schema!({
            "description": "The job's status as GitLab reports it.",
            "anyOf": [
                { "enum": known },
                {
                    "type": "string",
                    "minLength": 1,
                    "description": "A status a later GitLab version added, passed on verbatim."
                }
            ]
        })
    }
}

impl std::fmt::Display for JobStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The fields of GitLab's Job Hook that we use. Everything else in the payload is ignored.
#[derive(Debug, Deserialize)]
pub struct JobHook {
    pub object_kind: Option<String>,
    pub build_id: u64,
    pub build_name: String,
    #[serde(default)]
    pub build_stage: Option<String>,
    pub build_status: JobStatus,
    #[serde(default)]
    pub build_failure_reason: Option<String>,
    #[serde(default)]
    pub build_allow_failure: Option<bool>,
    #[serde(default)]
    pub build_created_at: Option<String>,
    #[serde(default)]
    pub build_started_at: Option<String>,
    #[serde(default)]
    pub build_finished_at: Option<String>,
    #[serde(default)]
    pub build_duration: Option<f64>,
    #[serde(default)]
    pub build_queued_duration: Option<f64>,
    pub project_id: u64,
    #[serde(default)]
    pub pipeline_id: Option<u64>,
    #[serde(default, rename = "ref")]
    pub git_ref: Option<String>,
    #[serde(default)]
    pub tag: Option<bool>,
    #[serde(default)]
    pub sha: Option<String>,
    #[serde(default)]
    pub retries_count: Option<u32>,
    #[serde(default)]
    pub runner: Option<HookRunner>,
    #[serde(default)]
    pub project: Option<HookProject>,
    #[serde(default)]
    pub repository: Option<HookRepository>,
}

#[derive(Debug, Deserialize)]
pub struct HookRunner {
    pub id: u64,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
}

#[derive(Debug, Deserialize)]
pub struct HookProject {
    #[serde(default)]
    pub path_with_namespace: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct HookRepository {
    #[serde(default)]
    pub homepage: Option<String>,
}

/// The runner that picked the job, as the hook reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct RunnerRef {
    /// GitLab's id of the runner.
    pub id: u64,
    /// The runner's description (ours name the job they were made for).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The runner's tags.
    #[serde(default)]
    pub tags: Vec<String>,
}

/// Version of the [`JobEvent`] schema; bump on incompatible changes so consumers can tell.
pub const JOB_EVENT_SCHEMA: u32 = 1;

/// The slim, typed event the webhook puts on the bus (EventBridge `detail`).
///
/// Flat on purpose: EventBridge rules match `detail.status` directly. It holds no personal
/// data (no user, no commit author) and no token. Its JSON Schema is
/// `docs/job-event.schema.json` (feature `schema`); the docs and the template's rules are
/// checked against it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct JobEvent {
    /// Version of this schema ([`JOB_EVENT_SCHEMA`]); bumped on incompatible changes.
    pub schema: u32,
    /// `webhook-id` / `Idempotency-Key` of the delivery, or `sha256:<body digest>` when GitLab
    /// sent neither.
    pub delivery_id: String,
    /// When the webhook received the hook, Unix milliseconds (for hook-to-launch latency).
    pub received_at_ms: u64,
    /// GitLab's job id (`build_id`).
    pub job_id: u64,
    /// The job's name in `.gitlab-ci.yml` (`build_name`).
    pub job_name: String,
    /// The job's stage (`build_stage`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    /// The job's status (`build_status`): what the rules match on.
    pub status: JobStatus,
    /// Why the job failed (`build_failure_reason`), on failed jobs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_reason: Option<String>,
    /// Whether the job may fail without failing the pipeline (`build_allow_failure`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_failure: Option<bool>,
    /// How many times GitLab retried the job (`retries_count`).
    pub retries: u32,
    /// The project's id.
    pub project_id: u64,
    /// `group/sub/project`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project_path: Option<String>,
    /// The pipeline's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline_id: Option<u64>,
    /// The branch or tag the job runs on.
    #[serde(default, rename = "ref", skip_serializing_if = "Option::is_none")]
    pub git_ref: Option<String>,
    /// Whether `ref` is a tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<bool>,
    /// The commit the job runs on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha: Option<String>,
    /// `null` until a runner picks the job.
    pub runner: Option<RunnerRef>,
    /// When GitLab created the job, as GitLab formats it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    /// When the job started running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    /// When the job finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// How long the job ran, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_s: Option<f64>,
    /// How long the job waited for a runner, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queued_duration_s: Option<f64>,
}

/// The JSON Schema of a [`JobEvent`] as the webhook writes it (the serialize contract: a
/// field that is skipped when empty is optional, `runner` is always there, maybe `null`).
#[cfg(feature = "schema")]
pub fn job_event_schema() -> serde_json::Value {
    let generator = schemars::generate::SchemaSettings::draft2020_12()
        .for_serialize()
        .into_generator();
    let mut schema = generator.into_root_schema_for::<JobEvent>().to_value();
    never_null_when_optional(&mut schema);
    schema
}

/// schemars types every `Option` as "or null"; ours are left out when empty
/// (`skip_serializing_if`), so an optional field, when there, is never `null`.
#[cfg(feature = "schema")]
fn never_null_when_optional(schema: &mut serde_json::Value) {
    use serde_json::Value;
    let required: Vec<Value> = schema["required"].as_array().cloned().unwrap_or_default();
    // `get_mut`, not `schema["..."]`: indexing a missing key mutably would insert a `null`.
    if let Some(properties) = schema.get_mut("properties").and_then(|p| p.as_object_mut()) {
        for (name, property) in properties.iter_mut() {
            let optional = !required.contains(&Value::from(name.as_str()));
            if let Some(types) = property
                .get("type")
                .and_then(|t| t.as_array())
                .filter(|_| optional)
            {
                let kept: Vec<Value> = types.iter().filter(|t| *t != "null").cloned().collect();
                property["type"] = match <[Value; 1]>::try_from(kept) {
                    Ok([single]) => single,
                    Err(kept) => Value::Array(kept),
                };
            }
        }
    }
    let definitions = schema.get_mut("$defs").and_then(|d| d.as_object_mut());
    for definition in definitions.into_iter().flat_map(|d| d.values_mut()) {
        never_null_when_optional(definition);
    }
}

/// Why a body that passed authentication still cannot be used. The message is short enough
/// for GitLab's "Recent events" view and names the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unusable {
    #[error("body is {bytes} bytes, over the {limit}-byte limit")]
    TooLarge { bytes: usize, limit: usize },
    #[error("body is not valid UTF-8 (byte {valid_up_to})")]
    NotUtf8 { valid_up_to: usize },
    #[error("body is not a Job Hook: {0}")]
    Invalid(String),
    #[error("X-Gitlab-Event says Job Hook but object_kind is `{0}`")]
    KindMismatch(String),
}

/// Parses a Job Hook body. Errors name the line, column and field GitLab's payload broke.
pub fn parse_job_hook(body: &[u8]) -> Result<JobHook, Unusable> {
    let text = std::str::from_utf8(body).map_err(|e| Unusable::NotUtf8 {
        valid_up_to: e.valid_up_to(),
    })?;
    serde_json::from_str(text).map_err(|e| Unusable::Invalid(short_json_error(&e)))
}

fn short_json_error(e: &serde_json::Error) -> String {
    let mut message = e.to_string();
    // serde_json quotes offending input in some messages; keep the reply short.
    if message.len() > 200 {
        let mut cut = 200;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
        message.push('…');
    }
    message
}

/// The project path (`group/sub/project`): `project.path_with_namespace` when the hook has it
/// (GitLab 12+), else the path part of `repository.homepage` (older hooks).
fn project_path(hook: &JobHook) -> Option<String> {
    if let Some(path) = hook
        .project
        .as_ref()
        .and_then(|p| p.path_with_namespace.clone())
        .filter(|p| !p.is_empty())
    {
        return Some(path);
    }
    let homepage = hook.repository.as_ref()?.homepage.as_deref()?;
    let after_scheme = homepage
        .split_once("://")
        .map_or(homepage, |(_, rest)| rest);
    let (_, path) = after_scheme.split_once('/')?;
    let path = path.trim_matches('/');
    (!path.is_empty()).then(|| path.to_owned())
}

impl JobEvent {
    pub fn from_hook(hook: JobHook, delivery_id: String, received_at_ms: u64) -> Self {
        let project_path = project_path(&hook);
        Self {
            schema: JOB_EVENT_SCHEMA,
            delivery_id,
            received_at_ms,
            job_id: hook.build_id,
            job_name: hook.build_name,
            stage: hook.build_stage,
            status: hook.build_status,
            failure_reason: hook.build_failure_reason,
            allow_failure: hook.build_allow_failure,
            retries: hook.retries_count.unwrap_or(0),
            project_id: hook.project_id,
            project_path,
            pipeline_id: hook.pipeline_id,
            git_ref: hook.git_ref,
            tag: hook.tag,
            sha: hook.sha,
            runner: hook.runner.map(|r| RunnerRef {
                id: r.id,
                description: r.description,
                tags: r.tags,
            }),
            created_at: hook.build_created_at,
            started_at: hook.build_started_at,
            finished_at: hook.build_finished_at,
            duration_s: hook.build_duration,
            queued_duration_s: hook.build_queued_duration,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"{"object_kind":"build","build_id":1,"build_name":"test",
        "build_status":"pending","project_id":2,"runner":null}"#;

    #[test]
    fn minimal_hook_slims() {
        let hook = parse_job_hook(MINIMAL.as_bytes()).unwrap();
        let ev = JobEvent::from_hook(hook, "d".into(), 5);
        assert_eq!(ev.job_id, 1);
        assert_eq!(ev.status, JobStatus::Pending);
        assert_eq!(ev.runner, None);
        assert_eq!(ev.retries, 0);
        let json = serde_json::to_value(&ev).unwrap();
        assert_eq!(json["status"], "pending");
        assert_eq!(json["runner"], serde_json::Value::Null);
    }

    #[test]
    fn unknown_status_is_kept_verbatim() {
        let body = MINIMAL.replace("pending", "waiting_for_callback");
        let hook = parse_job_hook(body.as_bytes()).unwrap();
        assert_eq!(hook.build_status.as_str(), "waiting_for_callback");
        assert!(!hook.build_status.is_finished());
    }

    #[test]
    fn missing_field_is_named() {
        let body = MINIMAL.replace(r#""build_id":1,"#, "");
        let err = parse_job_hook(body.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("build_id"), "{err}");
        let err = parse_job_hook(b"\xff\xfe").unwrap_err();
        assert_eq!(err, Unusable::NotUtf8 { valid_up_to: 0 });
    }

    #[test]
    fn project_path_falls_back_to_homepage() {
        let body = MINIMAL.replace(
            r#""runner":null"#,
            r#""runner":null,"repository":{"homepage":"http://gitlab.example:3005/gitlab-org/gitlab-test"}"#,
        );
        let ev = JobEvent::from_hook(parse_job_hook(body.as_bytes()).unwrap(), "d".into(), 0);
        assert_eq!(ev.project_path.as_deref(), Some("gitlab-org/gitlab-test"));
    }
}
