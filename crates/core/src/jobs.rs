//! A job's life on our side, and what the router does with each event.
//!
//! One item per job in the jobs table holds its [`JobPhase`]. Phases only move forward, and
//! every move is a conditional write (`phase < target`), so events that arrive twice, late or
//! out of order cannot move a job back. Workflows are started under deterministic execution
//! names; Step Functions Standard treats a repeated name as the same execution. Together:
//! exactly one provision and one teardown per job, whatever the delivery order.

use std::future::Future;

use serde::{Deserialize, Serialize};

use crate::hook::{JobEvent, JobStatus};
use crate::mapping::ExecutorKind;
use crate::metrics::charted;
use crate::webhook::PortError;

/// Where a job is on our side. The numeric rank orders them; moves are only upwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobPhase {
    /// Known, nothing started (an event that triggers nothing).
    Seen = 1,
    /// The provision workflow was started for it.
    Provisioning = 2,
    /// A runner was launched for it (recorded by the provision workflow).
    Running = 3,
    /// GitLab reported it finished; teardown was started. Also the tombstone left when the
    /// finish arrives before the pending event: a late pending event then provisions nothing.
    /// A finished hook is a claim (anyone with one hook secret can forge one), so the
    /// tombstone is not final: the reconciler, which treats GitLab's pending list as the
    /// truth, moves a job GitLab still lists as pending back to provisioning and starts an
    /// attempt (`marked_finished`). That keeps the hook path fast (no GitLab call in the
    /// router) and cannot be defeated by a forger, who can write tombstones but cannot make
    /// GitLab stop listing a job as pending. The teardown a finished hook starts confirms with
    /// GitLab before it destroys anything (`crate::fleet::decide_teardown`).
    Finished = 4,
    /// Teardown completed.
    Cleaned = 5,
}

impl JobPhase {
    pub const ALL: [JobPhase; 5] = [
        Self::Seen,
        Self::Provisioning,
        Self::Running,
        Self::Finished,
        Self::Cleaned,
    ];

    pub fn rank(self) -> u8 {
        self as u8
    }

    pub fn from_rank(rank: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.rank() == rank)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Seen => "seen",
            Self::Provisioning => "provisioning",
            Self::Running => "running",
            Self::Finished => "finished",
            Self::Cleaned => "cleaned",
        }
    }
}

/// Identifies a job across GitLab instances' projects: job ids are global in one GitLab, but
/// the project id makes keys self-describing and lets an operator find a project's jobs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct JobKey {
    pub project_id: u64,
    pub job_id: u64,
}

impl JobKey {
    pub fn of(event: &JobEvent) -> Self {
        Self {
            project_id: event.project_id,
            job_id: event.job_id,
        }
    }

    /// Partition key of the job's item in the jobs table.
    pub fn table_key(&self) -> String {
        format!("project#{}#job#{}", self.project_id, self.job_id)
    }

    /// Step Functions execution name: deterministic, so that starting it twice is one
    /// execution. Fits the 80-character limit and the allowed characters.
    pub fn execution_name(&self, workflow: Workflow) -> String {
        format!(
            "p{}-j{}-{}",
            self.project_id,
            self.job_id,
            workflow.as_str()
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Workflow {
    Provision,
    Teardown,
}

impl Workflow {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Provision => "provision",
            Self::Teardown => "teardown",
        }
    }
}

/// Which GitLab status starts provisioning (a stack parameter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProvisionOn {
    /// The job can run now: the default. A runner started at `created` would idle until the
    /// job's stage comes, or take another job meanwhile.
    #[default]
    Pending,
    /// As soon as the pipeline is created: faster start for single-stage pipelines, at the
    /// cost of idle runners for later stages.
    Created,
}

impl std::str::FromStr for ProvisionOn {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "pending" => Ok(Self::Pending),
            "created" => Ok(Self::Created),
            other => Err(format!(
                "unknown provisioning trigger `{other}`: use pending or created"
            )),
        }
    }
}

/// What an event asks of the router, before looking at the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intent {
    /// Move to [`JobPhase::Provisioning`] and start the provision workflow.
    Provision,
    /// Move to [`JobPhase::Finished`] and start the teardown workflow.
    Teardown,
    /// A runner took the job (`running`): record it once, and measure how long the job waited
    /// (GitLab's `queued_duration`). Moves no phase and starts nothing.
    PickUp,
    /// Nothing to do for this status (e.g. `manual`, or `pending` when provisioning starts at
    /// `created`).
    Nothing,
}

pub fn intent(status: &JobStatus, provision_on: ProvisionOn) -> Intent {
    match (status, provision_on) {
        (JobStatus::Pending, ProvisionOn::Pending) | (JobStatus::Created, ProvisionOn::Created) => {
            Intent::Provision
        }
        (s, _) if s.is_finished() => Intent::Teardown,
        (JobStatus::Running, _) => Intent::PickUp,
        _ => Intent::Nothing,
    }
}

/// Result of a conditional move in the jobs table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Advance {
    /// The item moved to the target phase (`from` is `None` when it was created).
    Moved { from: Option<JobPhase> },
    /// The item was already at or past the target; nothing was written.
    AlreadyAt(JobPhase),
}

/// The route the provision workflow recorded on a job's item (`route_type`, `route_matched`),
/// as far as it holds one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecordedRoute {
    /// `EC2`, `LAMBDA` (or `SKIP`); `None` when the item holds none (or a text that is no
    /// kind).
    pub executor: Option<ExecutorKind>,
    /// The mapping item that matched (`pk/sk`), or `default`.
    pub matched: Option<String>,
    /// When the provision step had the runner ready (`runner_ready_at_ms`), if it did.
    pub runner_ready_at_ms: Option<u64>,
}

/// Result of recording a job's running hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PickupRecord {
    /// The job's first running hook: recorded, with the route its item holds.
    First(RecordedRoute),
    /// A running hook was already recorded for the job (a repeated delivery): nothing written.
    Again,
}

/// The jobs table.
pub trait JobStore {
    /// Moves the job to `to` if its phase is lower (or it has none), recording the event's
    /// status and runner; returns what the item held when the condition failed.
    fn advance(
        &self,
        key: JobKey,
        to: JobPhase,
        event: &JobEvent,
        now_ms: u64,
    ) -> impl Future<Output = Result<Advance, PortError>> + Send;

    /// Records the job's running hook once ([`crate::jobs_table::PICKUP_CONDITION`]), leaving
    /// its phase alone, and returns the route the item holds.
    fn record_pickup(
        &self,
        key: JobKey,
        event: &JobEvent,
        now_ms: u64,
    ) -> impl Future<Output = Result<PickupRecord, PortError>> + Send;
}

/// Whether a start created an execution or found it already there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Started {
    New,
    AlreadyExists,
}

/// Step Functions.
pub trait Workflows {
    fn start(
        &self,
        workflow: Workflow,
        execution_name: &str,
        input: &WorkflowInput,
    ) -> impl Future<Output = Result<Started, PortError>> + Send;
}

/// The input of both workflows: the job and nothing secret.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkflowInput {
    pub job_key: String,
    pub job: JobEvent,
}

/// What the router did with one event; logged, and asserted by tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouterOutcome {
    Started {
        workflow: Workflow,
        execution: String,
        started: Started,
    },
    /// A job's first running hook, recorded: the router emits its pickup metric.
    PickedUp(Pickup),
    /// Logged no-op, with why.
    Skipped(&'static str),
}

/// A job a runner took, as the router measures it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pickup {
    /// GitLab's `queued_duration` (seconds between pending and running), in ms; `None` when
    /// the hook had none.
    pub queued_ms: Option<u64>,
    pub route: RecordedRoute,
    /// When the webhook received the running hook: the metric's timestamp.
    pub at_ms: u64,
}

/// The value `route` dimensions get when the job's item holds no route (the running hook
/// came before the provision workflow recorded one, or the job was never provisioned here).
pub const UNKNOWN_ROUTE: &str = "unknown";

/// GitLab's `queued_duration` of the event, in ms (`None` when absent or not a duration).
pub fn queued_ms(event: &JobEvent) -> Option<u64> {
    event
        .queued_duration_s
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(|s| (s * 1000.0).round() as u64)
}

impl Pickup {
    pub fn of(event: &JobEvent, route: RecordedRoute) -> Self {
        Self {
            queued_ms: queued_ms(event),
            route,
            at_ms: event.received_at_ms,
        }
    }

    /// The `PickupLatency` EMF line (ms, by route and executor), when GitLab gave a duration.
    pub fn metric_line(&self) -> Option<String> {
        let queued_ms = self.queued_ms?;
        Some(charted::PICKUP_LATENCY.value_by(
            &self.dimensions().each_ref().map(String::as_str),
            queued_ms,
            "Milliseconds",
            self.at_ms,
        ))
    }

    /// The `ReadyToRunning` EMF line (ms, by route and executor), when the provision step
    /// recorded its runner ready before the hook arrived (a runner we did not make, or a clock
    /// that disagrees, gives none).
    pub fn ready_metric_line(&self) -> Option<String> {
        let ready = self.route.runner_ready_at_ms.filter(|r| *r <= self.at_ms)?;
        Some(charted::READY_TO_RUNNING.value_by(
            &self.dimensions().each_ref().map(String::as_str),
            self.at_ms - ready,
            "Milliseconds",
            self.at_ms,
        ))
    }

    fn dimensions(&self) -> [String; 2] {
        [
            self.route
                .matched
                .as_deref()
                .unwrap_or(UNKNOWN_ROUTE)
                .to_owned(),
            self.route
                .executor
                .map_or_else(|| UNKNOWN_ROUTE.to_owned(), |k| k.to_string()),
        ]
    }
}

/// Handles one job event: conditional move, then (re)start of the workflow under its
/// deterministic name. Restarting when the move had already happened covers a crash between
/// the write and the start: the retried event finds the phase set and starts the workflow,
/// and if it had been started the name makes it the same execution. A running event is
/// recorded once on the job's item ([`PickupRecord`]) and moves nothing.
pub async fn route_event<S: JobStore, W: Workflows>(
    event: &JobEvent,
    provision_on: ProvisionOn,
    store: &S,
    workflows: &W,
    now_ms: u64,
) -> Result<RouterOutcome, PortError> {
    let key = JobKey::of(event);
    let (workflow, target) = match intent(&event.status, provision_on) {
        Intent::Nothing => return Ok(RouterOutcome::Skipped("status triggers nothing")),
        Intent::PickUp => {
            return Ok(match store.record_pickup(key, event, now_ms).await? {
                PickupRecord::First(route) => RouterOutcome::PickedUp(Pickup::of(event, route)),
                PickupRecord::Again => RouterOutcome::Skipped("running hook already recorded"),
            });
        }
        Intent::Provision => (Workflow::Provision, JobPhase::Provisioning),
        Intent::Teardown => (Workflow::Teardown, JobPhase::Finished),
    };
    match store.advance(key, target, event, now_ms).await? {
        Advance::Moved { .. } => {}
        Advance::AlreadyAt(phase) if phase == target => {}
        Advance::AlreadyAt(phase) => {
            return Ok(RouterOutcome::Skipped(match (workflow, phase) {
                (Workflow::Provision, JobPhase::Finished | JobPhase::Cleaned) => {
                    "job already finished: a late pending event provisions nothing"
                }
                (Workflow::Provision, _) => "job already provisioned",
                (Workflow::Teardown, _) => "job already cleaned up",
            }));
        }
    }
    let execution = key.execution_name(workflow);
    let input = WorkflowInput {
        job_key: key.table_key(),
        job: event.clone(),
    };
    let started = workflows.start(workflow, &execution, &input).await?;
    Ok(RouterOutcome::Started {
        workflow,
        execution,
        started,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_round_trip_and_order() {
        for p in JobPhase::ALL {
            assert_eq!(JobPhase::from_rank(p.rank()), Some(p));
        }
        assert!(JobPhase::Provisioning < JobPhase::Finished);
        assert_eq!(JobPhase::from_rank(0), None);
    }

    #[test]
    fn intents_follow_the_configured_trigger() {
        use JobStatus::*;
        assert_eq!(intent(&Pending, ProvisionOn::Pending), Intent::Provision);
        assert_eq!(intent(&Created, ProvisionOn::Pending), Intent::Nothing);
        assert_eq!(intent(&Created, ProvisionOn::Created), Intent::Provision);
        assert_eq!(intent(&Pending, ProvisionOn::Created), Intent::Nothing);
        for s in [Success, Failed, Canceled, Skipped] {
            assert_eq!(intent(&s, ProvisionOn::Pending), Intent::Teardown);
        }
        assert_eq!(intent(&Running, ProvisionOn::Pending), Intent::PickUp);
        assert_eq!(intent(&Running, ProvisionOn::Created), Intent::PickUp);
        assert_eq!(intent(&Manual, ProvisionOn::Pending), Intent::Nothing);
    }

    #[test]
    fn a_pickup_is_measured_in_ms_by_route_and_unknown_without_one() {
        let mut event = crate::testing::job_event(3, 4, "build", JobStatus::Running);
        event.queued_duration_s = Some(12.3456);
        event.received_at_ms = 99;
        let routed = Pickup::of(
            &event,
            RecordedRoute {
                executor: Some(ExecutorKind::Ec2),
                matched: Some("default".into()),
                runner_ready_at_ms: Some(40),
            },
        );
        assert_eq!(routed.queued_ms, Some(12_346));
        let ready: serde_json::Value =
            serde_json::from_str(&routed.ready_metric_line().unwrap()).unwrap();
        assert_eq!(ready["ReadyToRunning"], 99 - 40);
        assert_eq!(ready["Executor"], "EC2");
        // No runner of ours recorded ready (or after the hook): nothing to measure.
        assert_eq!(
            Pickup::of(&event, RecordedRoute::default()).ready_metric_line(),
            None
        );
        let late = RecordedRoute {
            runner_ready_at_ms: Some(100),
            ..RecordedRoute::default()
        };
        assert_eq!(Pickup::of(&event, late).ready_metric_line(), None);
        let line: serde_json::Value = serde_json::from_str(&routed.metric_line().unwrap()).unwrap();
        assert_eq!(line["PickupLatency"], 12_346);
        assert_eq!(line["_aws"]["Timestamp"], 99);
        assert_eq!(
            (line["Route"].as_str(), line["Executor"].as_str()),
            (Some("default"), Some("EC2"))
        );
        let unrouted: serde_json::Value = serde_json::from_str(
            &Pickup::of(&event, RecordedRoute::default())
                .metric_line()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(
            (unrouted["Route"].as_str(), unrouted["Executor"].as_str()),
            (Some(UNKNOWN_ROUTE), Some(UNKNOWN_ROUTE))
        );
        for odd in [None, Some(-1.0), Some(f64::NAN)] {
            event.queued_duration_s = odd;
            assert_eq!(
                Pickup::of(&event, RecordedRoute::default()).metric_line(),
                None
            );
        }
    }

    #[test]
    fn execution_names_are_valid_for_step_functions() {
        let key = JobKey {
            project_id: u64::MAX,
            job_id: u64::MAX,
        };
        for w in [Workflow::Provision, Workflow::Teardown] {
            let name = key.execution_name(w);
            assert!(name.len() <= 80, "{name}");
            assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
        }
    }
}
