//! The router: an EventBridge target for "GitLab Job Event"s. Decisions are the core's
//! (`ephemeral_core::jobs::route_event`); this crate parses the event and provides the jobs
//! table and Step Functions behind the core's ports. It emits one metric: `PickupLatency`, once
//! per job, from its first running event ([`metric_line`]).

pub mod aws;
pub mod function;

use aws_lambda_events::eventbridge::EventBridgeEvent;
use ephemeral_core::hook::JobEvent;
use ephemeral_core::jobs::{JobStore, ProvisionOn, RouterOutcome, Workflows, route_event};
use ephemeral_core::webhook::{EVENT_SOURCE, JOB_EVENT_DETAIL_TYPE, PortError};
use serde_json::Value;

/// Configuration read once at cold start. Errors name the variable.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    pub jobs_table_name: String,
    pub provision_state_machine_arn: String,
    pub teardown_state_machine_arn: String,
    pub provision_on: ProvisionOn,
    pub job_ttl_seconds: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("configuration: {0}")]
    Config(String),
    /// The event cannot be a job event: retrying will not help; Lambda files it in the
    /// on-failure destination (the router dead-letter queue) after its retries.
    #[error("malformed event: {0}")]
    Malformed(String),
    /// DynamoDB or Step Functions failed: Lambda retries the event.
    #[error("{0}")]
    Dependency(#[from] PortError),
}

impl RouterConfig {
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, RouterError> {
        let value = |name: &str| {
            get(name)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let required = |name: &str| {
            value(name).ok_or_else(|| RouterError::Config(format!("{name} is not set")))
        };
        Ok(Self {
            jobs_table_name: required("JOBS_TABLE_NAME")?,
            provision_state_machine_arn: required("PROVISION_STATE_MACHINE_ARN")?,
            teardown_state_machine_arn: required("TEARDOWN_STATE_MACHINE_ARN")?,
            provision_on: match value("PROVISION_ON") {
                None => ProvisionOn::default(),
                Some(v) => v
                    .parse()
                    .map_err(|e| RouterError::Config(format!("PROVISION_ON: {e}")))?,
            },
            job_ttl_seconds: match value("JOB_TTL_SECONDS") {
                None => 14 * 24 * 3600,
                Some(v) => v.parse().map_err(|_| {
                    RouterError::Config(format!("JOB_TTL_SECONDS=`{v}` is not a whole number"))
                })?,
            },
        })
    }

    pub fn from_env() -> Result<Self, RouterError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }
}

pub struct Router<S, W> {
    pub store: S,
    pub workflows: W,
    pub provision_on: ProvisionOn,
}

/// The EMF line an outcome emits: `PickupLatency` for a job's first running event (a repeated
/// one is `Skipped`, so at most one per job), nothing for any other.
pub fn metric_line(outcome: &RouterOutcome) -> Option<String> {
    match outcome {
        RouterOutcome::PickedUp(pickup) => pickup.metric_line(),
        _ => None,
    }
}

/// The `ReadyToRunning` EMF line of a job's first running event, when its runner was ours.
pub fn ready_metric_line(outcome: &RouterOutcome) -> Option<String> {
    match outcome {
        RouterOutcome::PickedUp(pickup) => pickup.ready_metric_line(),
        _ => None,
    }
}

/// The job event inside an EventBridge envelope, or why it is not one.
pub fn job_event(envelope: &EventBridgeEvent<Value>) -> Result<Option<JobEvent>, RouterError> {
    if envelope.source != EVENT_SOURCE || envelope.detail_type != JOB_EVENT_DETAIL_TYPE {
        // A rule misconfigured to send us other events: not ours to act on.
        return Ok(None);
    }
    serde_json::from_value(envelope.detail.clone())
        .map(Some)
        .map_err(|e| RouterError::Malformed(format!("detail is not a JobEvent: {e}")))
}

impl<S: JobStore, W: Workflows> Router<S, W> {
    pub async fn handle(
        &self,
        envelope: &EventBridgeEvent<Value>,
        now_ms: u64,
    ) -> Result<RouterOutcome, RouterError> {
        let event = match job_event(envelope) {
            Ok(Some(event)) => event,
            Ok(None) => {
                tracing::warn!(source = %envelope.source, detail_type = %envelope.detail_type, "not a job event; ignored");
                return Ok(RouterOutcome::Skipped("not a job event"));
            }
            Err(e) => {
                tracing::error!(error = %e, event_id = envelope.id.as_deref(), "malformed event");
                return Err(e);
            }
        };
        let result = route_event(
            &event,
            self.provision_on,
            &self.store,
            &self.workflows,
            now_ms,
        )
        .await;
        log_outcome(&event, &result);
        let outcome = result?;
        for line in [metric_line(&outcome), ready_metric_line(&outcome)]
            .into_iter()
            .flatten()
        {
            println!("{line}");
        }
        Ok(outcome)
    }
}

/// The router's one log line per event: what it decided, with the job's ids.
fn log_outcome(event: &JobEvent, result: &Result<RouterOutcome, PortError>) {
    let (project_id, pipeline_id, job_id, status) = (
        event.project_id,
        event.pipeline_id,
        event.job_id,
        event.status.as_str(),
    );
    let delivery_id = event.delivery_id.as_str();
    match result {
        Ok(RouterOutcome::Started {
            workflow,
            execution,
            started,
        }) => tracing::info!(
            decision = "started",
            workflow = workflow.as_str(),
            execution,
            already = matches!(started, ephemeral_core::jobs::Started::AlreadyExists),
            project_id,
            pipeline_id,
            job_id,
            status,
            delivery_id,
            "job routed"
        ),
        Ok(RouterOutcome::PickedUp(pickup)) => tracing::info!(
            decision = "picked_up",
            queued_duration_ms = pickup.queued_ms,
            route_type = pickup.route.executor.map(tracing::field::display),
            route_matched = pickup.route.matched.as_deref(),
            runner_id = event.runner.as_ref().map(|r| r.id),
            project_id,
            pipeline_id,
            job_id,
            status,
            delivery_id,
            "job picked up"
        ),
        Ok(RouterOutcome::Skipped(why)) => tracing::info!(
            decision = "skipped",
            reason = why,
            project_id,
            pipeline_id,
            job_id,
            status,
            delivery_id,
            "job event needs nothing"
        ),
        Err(e) => tracing::error!(
            decision = "failed", error = %e, project_id, pipeline_id, job_id, status, delivery_id, "routing failed; Lambda will retry"
        ),
    }
}
