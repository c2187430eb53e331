//! Per-job EC2 runners, acted out: provision one runner for a job, tear down what ran a
//! finished job, and the reaper's pass over everything this stack launched.
//!
//! The steps talk to AWS and GitLab through four small ports ([`Fleet`] for EC2,
//! [`TokenVault`] for the SSM token parameters, [`RunnerApi`] for GitLab, [`RunnerLedger`] for
//! our tables); the pure decisions they use live in [`crate::ec2`].
//!
//! Every step may run twice (Step Functions retries, Lambda retries, a redelivered hook):
//! - provision looks for the instance of the job's current attempt by its tags before
//!   launching, and the instance's `runner-id` tag, set only after the token is stored, says
//!   the runner is complete;
//! - every removal treats "already gone" as done;
//! - the runner registry ([`RunnerLedger`]) holds every runner we created until it is removed,
//!   so nothing we made can be forgotten, even when its instance is long gone.
//! - with caps (`MaxRunnerInstances`, `MaxRunnerInstancesPerProject`), an instance holds its
//!   (job, attempt)'s slot ([`crate::slots`]): taken once per attempt before the launch (a job
//!   over a cap waits: [`Provisioned::WaitingForSlot`]), given back wherever the instance is
//!   removed (failed launch or runner, teardown, reaper), and by the reaper when it leaked.
//! - while the fleet is drained ([`crate::drain`]), a provision launches nothing and takes no
//!   slot: the job waits as it would over a full cap ([`CapReached::Drained`]).
//!
//! One instance per (job, **attempt**): the jobs table's `attempt` (absent: 1; the reconciler
//! claims the next one before it starts a provision again) is tagged on the instance
//! ([`TAG_ATTEMPT`]; untagged: 1). GitLab gives a runner the oldest pending job its tags
//! allow, so the runner launched for job A may run job B; the reconciler then starts A's next
//! attempt, which must launch a runner of its own rather than find A's old instance, busy
//! with B, and call it done. A live instance of an older attempt is left alone: it runs
//! another job (whose teardown removes it) or expires (the reaper).
//!
//! Known window: if the provision function dies between storing the token and tagging the
//! instance, the retry replaces the runner; had the instance already read the old token, that
//! runner stops working and the instance shuts down, and the new runner is then reaped as an
//! orphan. The job itself waits for its next hook (a retry in GitLab). This needs a crash in a
//! window of a few milliseconds.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;

use serde::Serialize;

use crate::drain::Drain;
use crate::ec2::{
    Ec2Defaults, InstanceFacts, LaunchFailure, LaunchPlan, PlanError, ReaperAction, ReaperSettings,
    RunnerRelease, SPOT_ROLE_FIX, SPOT_ROLE_MISSING, TAG_ATTEMPT, TAG_JOB_ID, TAG_PROJECT_ID,
    TAG_REAPER_BYPASS, TAG_REAPER_MARK, TAG_RUNNER_ID, UserDataError, UserDataValues,
    classify_launch_error, launch_plan, reap, render_user_data,
};
use crate::hook::{JobEvent, JobStatus};
use crate::jobs::{JobKey, JobPhase};
use crate::lambda_runner::{self, is_lambda_host};
use crate::mapping::{AmiRef, Ec2Settings, Market};
use crate::pool::{self, PoolKey, PoolReport};
use crate::secrets::Secret;
use crate::slots::{CapReached, Capped, SlotClaim, SlotStore, claim_slot, leaked_slots, slot_name};
use crate::webhook::PortError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum InstanceState {
    Pending,
    Running,
    Stopping,
    Stopped,
    ShuttingDown,
    Terminated,
}

impl InstanceState {
    /// The states [`is_live`](Self::is_live) accepts, for a query to ask EC2 for them only.
    pub const LIVE: [Self; 4] = [Self::Pending, Self::Running, Self::Stopping, Self::Stopped];

    /// Still costs money or may still run a job.
    pub fn is_live(self) -> bool {
        Self::LIVE.contains(&self)
    }
}

/// An instance this stack launched (tagged `managed-by` with the stack's name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub id: String,
    pub state: InstanceState,
    pub launched_at_ms: u64,
    pub tags: BTreeMap<String, String>,
}

impl Instance {
    pub fn tag(&self, key: &str) -> Option<&str> {
        self.tags.get(key).map(String::as_str)
    }

    pub fn runner_id(&self) -> Option<u64> {
        self.tag(TAG_RUNNER_ID)?.parse().ok()
    }

    pub fn job_key(&self) -> Option<JobKey> {
        Some(JobKey {
            project_id: self.tag(TAG_PROJECT_ID)?.parse().ok()?,
            job_id: self.tag(TAG_JOB_ID)?.parse().ok()?,
        })
    }

    /// The provision attempt it was launched for ([`TAG_ATTEMPT`]); 1 without the tag (an
    /// instance launched before attempts were tagged) or with a value that is no attempt.
    pub fn attempt(&self) -> u32 {
        self.tag(TAG_ATTEMPT)
            .and_then(|t| t.parse().ok())
            .filter(|a| *a >= 1)
            .unwrap_or(1)
    }
}

/// Which of the stack's instances to list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceQuery {
    /// Launched for this job (any attempt), terminated ones included: what an operator reads.
    Job(JobKey),
    /// Launched for this job and [live](InstanceState::is_live): what provisioning may reuse.
    LiveForJob(JobKey),
    /// Running this GitLab runner, terminated ones included: their tags still say which
    /// job's slot to give back.
    Runner(u64),
    /// All of them.
    All,
    /// Every [live](InstanceState::is_live) one: what the reaper acts on. Terminated instances
    /// stay listed for about an hour; asking for live ones keeps a busy stack's reaper and
    /// provisioning from reading (and paging through) every job of the last hour.
    Live,
    /// Every live one with a [warm pool](crate::pool) tag (claimed ones included: the tag's
    /// value tells them apart).
    Pooled,
}

/// One RunInstances call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchRequest {
    pub instance_type: String,
    pub image_id: String,
    pub subnet: String,
    pub market: Market,
    pub tags: Vec<(String, String)>,
    /// Rendered from the repository's template; holds no secret.
    pub user_data: String,
    /// Makes the SDK's own retries of this call idempotent (EC2 returns the same instance).
    pub client_token: String,
    /// `shutdown` stops the instance instead of terminating it: a [warm pool](crate::pool)
    /// instance, which stops after its first boot and is started again for a job.
    pub stop_on_shutdown: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct LaunchError {
    /// EC2's error code, e.g. `InsufficientInstanceCapacity`.
    pub code: String,
    pub message: String,
}

/// EC2, limited to instances tagged `managed-by` this stack.
pub trait Fleet {
    /// The stack's instances matching `query`, in any state EC2 still reports.
    fn instances(
        &self,
        query: InstanceQuery,
    ) -> impl Future<Output = Result<Vec<Instance>, PortError>> + Send;
    /// The AMI id to launch (an `ssm:` reference is read from Parameter Store).
    fn resolve_image(&self, ami: &AmiRef)
    -> impl Future<Output = Result<String, PortError>> + Send;
    /// Launches one instance; the id of the new instance.
    fn launch(
        &self,
        request: &LaunchRequest,
    ) -> impl Future<Output = Result<String, LaunchError>> + Send;
    fn tag(
        &self,
        instance_id: &str,
        tags: &[(String, String)],
    ) -> impl Future<Output = Result<(), PortError>> + Send;
    /// Terminates; an instance already terminated or unknown is done.
    fn terminate(&self, instance_id: &str) -> impl Future<Output = Result<(), PortError>> + Send;
    /// Starts a stopped [warm pool](crate::pool) instance for its job, its shutdown behaviour
    /// set to terminate first; a running one is done. EC2 may refuse for capacity, like a
    /// launch.
    fn start(&self, instance_id: &str) -> impl Future<Output = Result<(), LaunchError>> + Send;
}

/// The per-instance runner token parameters (SSM SecureString `<prefix>/<instance id>`).
pub trait TokenVault {
    fn put(
        &self,
        instance_id: &str,
        token: &Secret,
    ) -> impl Future<Output = Result<(), PortError>> + Send;
    /// Deletes; a parameter already gone is done.
    fn delete(&self, instance_id: &str) -> impl Future<Output = Result<(), PortError>> + Send;
    /// Every token parameter: (instance id, last modified, ms since the epoch).
    fn list(&self) -> impl Future<Output = Result<Vec<(String, u64)>, PortError>> + Send;
}

/// What the GitLab runner is created with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunnerRequest {
    pub description: String,
    /// The job's project (a project-scoped runner is registered there).
    pub project_id: u64,
    /// The job's tags; empty when unknown (then the runner takes untagged jobs).
    pub tags: Vec<String>,
}

/// The description a runner is created with: the request's, marked with `mark` (unique per
/// creation), so that a runner whose creation answer was lost can be told from every other.
pub fn marked_description(description: &str, mark: &str) -> String {
    format!("{description} #{mark}")
}

/// Runners a retried creation left behind: listed with this creation's marked description,
/// other than the one it returned (`kept`). A lost answer's runner has a token nobody holds.
pub fn lost_duplicates(listed: &[(u64, String)], marked: &str, kept: u64) -> Vec<u64> {
    listed
        .iter()
        .filter(|(id, description)| *id != kept && description == marked)
        .map(|(id, _)| *id)
        .collect()
}

/// GitLab's runner API (retries with backoff are the adapter's business).
pub trait RunnerApi {
    fn create(
        &self,
        request: &RunnerRequest,
    ) -> impl Future<Output = Result<(u64, Secret), PortError>> + Send;
    /// Deletes; a runner already gone (404) is done.
    fn delete(&self, runner_id: u64) -> impl Future<Output = Result<(), PortError>> + Send;
    /// Whether it is running a job now.
    fn busy(&self, runner_id: u64) -> impl Future<Output = Result<bool, PortError>> + Send;
}

/// A runner we created, kept until it is removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RunnerEntry {
    pub runner_id: u64,
    pub project_id: u64,
    pub job_id: u64,
    /// The provision attempt its instance was launched for (the instance's [`TAG_ATTEMPT`]),
    /// whose slot that instance holds; 1 for an entry registered without one.
    pub attempt: u32,
    pub instance_id: String,
    pub created_at_ms: u64,
}

/// What the jobs table says about a job, as far as runners go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRecord {
    pub phase: Option<JobPhase>,
    pub runner_id: Option<u64>,
    pub instance_id: Option<String>,
    /// The job's current provision attempt (`attempt`; absent: 1, the router's start).
    pub attempt: u32,
}

impl Default for JobRecord {
    /// A job without an item: its first attempt.
    fn default() -> Self {
        Self {
            phase: None,
            runner_id: None,
            instance_id: None,
            attempt: 1,
        }
    }
}

/// The jobs table (job -> runner -> instance) and the runner registry.
pub trait RunnerLedger {
    fn job(&self, key: JobKey)
    -> impl Future<Output = Result<Option<JobRecord>, PortError>> + Send;
    /// Registers a runner the moment it exists (before its token is stored), and notes it on
    /// the job's item, so that nothing we created can be lost by a crash.
    fn note_runner(
        &self,
        entry: &RunnerEntry,
    ) -> impl Future<Output = Result<(), PortError>> + Send;
    /// Moves the job to `running` with its runner and instance, only from a lower phase, and
    /// notes `now_ms` as when its runner was first ready (`runner_ready_at_ms`, kept by a
    /// repeat). `false` when the job is already further (it finished while we provisioned).
    fn record_running(
        &self,
        key: JobKey,
        runner_id: u64,
        instance_id: &str,
        now_ms: u64,
    ) -> impl Future<Output = Result<bool, PortError>> + Send;
    /// Notes on the job's item that it waits for a slot of `cap` (a counter key), since the
    /// first time it did. `false` when the job has finished (nothing is noted).
    fn record_waiting(
        &self,
        key: JobKey,
        cap: &str,
        now_ms: u64,
    ) -> impl Future<Output = Result<bool, PortError>> + Send;
    fn runner(
        &self,
        runner_id: u64,
    ) -> impl Future<Output = Result<Option<RunnerEntry>, PortError>> + Send;
    fn runners(&self) -> impl Future<Output = Result<Vec<RunnerEntry>, PortError>> + Send;
    fn forget_runner(&self, runner_id: u64) -> impl Future<Output = Result<(), PortError>> + Send;
    /// The drain switch ([`crate::drain`]; the jobs table's control item): `Some` while no
    /// new runner may start.
    fn drained(&self) -> impl Future<Output = Result<Option<Drain>, PortError>> + Send;
    /// Claims the [warm pool](crate::pool) instance `instance_id` for the job's `attempt`, in
    /// one conditional write: `true` if it was free or already this attempt's, `false` if
    /// another attempt (of any job) has it.
    fn claim_pooled(
        &self,
        instance_id: &str,
        key: JobKey,
        attempt: u32,
        now_ms: u64,
    ) -> impl Future<Output = Result<bool, PortError>> + Send;
}

/// The four ports together, and the slots table when instances are capped.
#[derive(Debug)]
pub struct FleetPorts<F, V, A, L, S> {
    pub fleet: F,
    pub vault: V,
    pub api: A,
    pub ledger: L,
    /// `None`: no cap (`MaxRunnerInstances` and `MaxRunnerInstancesPerProject` unset or 0).
    pub slots: Option<Capped<S>>,
}

/// Gives back the slot of the (job, attempt) an instance was launched for (nothing without
/// caps, or when it holds none).
async fn give_back_slot<F, V, A, L, S: SlotStore>(
    ports: &FleetPorts<F, V, A, L, S>,
    job: JobKey,
    attempt: u32,
) -> Result<(), PortError> {
    match &ports.slots {
        Some(slots) => slots.store.give_back(job, attempt, None).await.map(|_| ()),
        None => Ok(()),
    }
}

/// After a cleanup that terminated the attempt's own instance, gives its slot back too.
async fn free_slot_after<F, V, A, L, S: SlotStore>(
    ports: &FleetPorts<F, V, A, L, S>,
    job: JobKey,
    attempt: u32,
    cleanup: &mut Vec<(&'static str, Result<(), PortError>)>,
) {
    let terminated = cleanup
        .iter()
        .any(|(what, r)| *what == TERMINATING && r.is_ok());
    if terminated && ports.slots.is_some() {
        cleanup.push((
            "giving back its slot",
            give_back_slot(ports, job, attempt).await,
        ));
    }
}

const TERMINATING: &str = "terminating the instance";

/// Stack settings for the EC2 steps (template parameters).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetSettings {
    pub defaults: Ec2Defaults,
    pub user_data_template: String,
    pub gitlab_url: String,
    pub token_parameter_prefix: String,
    pub wait_timeout_seconds: u64,
    pub region: String,
    /// The gitlab-runner release instances download and check (`GitLabRunnerVersion`,
    /// `GitLabRunnerSha256`), rendered into the user-data.
    pub runner: RunnerRelease,
    /// The stack's cache bucket (`CACHE_BUCKET_NAME`), rendered into the user-data; `None`:
    /// no cache.
    pub cache_bucket: Option<String>,
    pub reaper: ReaperSettings,
    /// A token parameter or a registered runner whose instance is gone is removed once it is
    /// this old (provisioning in flight is younger).
    pub orphan_grace_ms: u64,
}

/// What provisioning did; the provision workflow's output (no secret in it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Provisioned {
    Launched {
        instance_id: String,
        runner_id: u64,
        subnet: String,
        market: Market,
        /// Attempts that failed before this one: `<subnet> <market>: <error>`.
        failed_attempts: Vec<String>,
        /// The route's warm pool: taken from, refilled (routes with `warm_pool` only).
        #[serde(skip_serializing_if = "Option::is_none")]
        warm_pool: Option<PoolReport>,
    },
    /// An earlier run of this step finished the runner of the job's current attempt (a retry
    /// or a repeated start).
    AlreadyProvisioned { instance_id: String, runner_id: u64 },
    /// The job finished before we started: nothing launched.
    JobAlreadyFinished,
    /// The job finished while we provisioned: what we made was removed again.
    FinishedMeanwhile { instance_id: String, runner_id: u64 },
    /// Every slot of a cap is taken: nothing launched, the job's item notes that it waits
    /// (`waiting_for_slot_since_ms`), and the reconciler starts it when a slot frees.
    WaitingForSlot { waiting_for: CapReached },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProvisionError {
    #[error("cannot plan the launch: {0}")]
    Plan(#[from] PlanError),
    #[error("cannot render the user-data: {0}")]
    UserData(#[from] UserDataError),
    #[error(
        "no capacity for {instance_type} in any subnet or market ({}); add subnets in other zones or allow other instance types",
        tried.join("; ")
    )]
    NoCapacity {
        instance_type: String,
        tried: Vec<String>,
    },
    #[error(
        "RunInstances refused {instance_type} in {subnet} ({market:?}): {error}; check the route's and the stack's EC2 settings (AMI, subnets, security group, instance profile) and the provision function's permissions"
    )]
    LaunchRefused {
        instance_type: String,
        subnet: String,
        market: Market,
        error: LaunchError,
    },
    #[error(
        "RunInstances failed in {subnet} after the SDK's retries: {error}; the step may be retried"
    )]
    LaunchUnavailable { subnet: String, error: LaunchError },
    #[error("GitLab could not create the runner: {error}{cleanup}")]
    RunnerNotCreated { error: PortError, cleanup: String },
    #[error(
        "another run of this step took the job's runner instance slot {taken_ms_ago} ms ago and may be launching its instance; the step is retried and then finds that instance"
    )]
    SlotInFlight { taken_ms_ago: u64 },
    #[error("{what}: {error}{cleanup}")]
    Step {
        what: &'static str,
        error: PortError,
        cleanup: String,
    },
}

pub(crate) fn step(what: &'static str) -> impl FnOnce(PortError) -> ProvisionError {
    move |error| ProvisionError::Step {
        what,
        error,
        cleanup: String::new(),
    }
}

/// What cleaning up after a failed step did, for the error message.
pub(crate) fn cleanup_note(results: &[(&str, Result<(), PortError>)]) -> String {
    let failed: Vec<_> = results
        .iter()
        .filter_map(|(what, r)| r.as_ref().err().map(|e| format!("{what} failed: {e}")))
        .collect();
    if failed.is_empty() {
        let done: Vec<_> = results.iter().map(|(what, _)| *what).collect();
        format!("; cleaned up: {}", done.join(", "))
    } else {
        format!(
            "; cleanup incomplete ({}), the reaper will retry",
            failed.join("; ")
        )
    }
}

/// Provisions one EC2 runner for `job`'s current attempt (its item's `attempt`): instance
/// first (it waits for its token), then the GitLab runner, its token into the instance's
/// parameter, the `runner-id` tag, and the job's item. See the module documentation for why
/// each step is safe to repeat.
pub async fn provision<F: Fleet, V: TokenVault, A: RunnerApi, L: RunnerLedger, S: SlotStore>(
    ports: &FleetPorts<F, V, A, L, S>,
    settings: &FleetSettings,
    job: &JobEvent,
    route: &Ec2Settings,
    job_tags: Option<&[String]>,
    now_ms: u64,
) -> Result<Provisioned, ProvisionError> {
    let key = JobKey::of(job);
    let record = ports
        .ledger
        .job(key)
        .await
        .map_err(step("reading the job's item"))?
        .unwrap_or_default();
    if record.phase.is_some_and(|p| p >= JobPhase::Finished) {
        return Ok(Provisioned::JobAlreadyFinished);
    }
    let attempt = record.attempt.max(1);
    let mut plan = launch_plan(job, route, &settings.defaults, job_tags)?;
    plan.tags
        .push((TAG_ATTEMPT.to_owned(), attempt.to_string()));
    let instances = ports
        .fleet
        .instances(InstanceQuery::LiveForJob(key))
        .await
        .map_err(step("looking for the job's instance"))?;
    let launched =
        match ensure_instance(ports, settings, &plan, &instances, key, attempt, now_ms).await? {
            Ok(instance) => instance,
            Err(outcome) => return Ok(outcome),
        };
    let instance_id = launched.instance_id.clone();
    remove_stale_runner(ports, record.runner_id, &instances).await?;
    let (runner_id, token) = create_runner(ports, &plan, key, attempt, &instance_id).await?;
    let entry = RunnerEntry {
        runner_id,
        project_id: key.project_id,
        job_id: key.job_id,
        attempt,
        instance_id: instance_id.clone(),
        created_at_ms: now_ms,
    };
    deliver_runner(ports, &entry, token, key).await?;
    if !record_running_or_undo(ports, key, attempt, runner_id, &instance_id, now_ms).await? {
        return Ok(Provisioned::FinishedMeanwhile {
            instance_id,
            runner_id,
        });
    }
    // Last: the job's runner is on its way, and a refill's launches must not delay it.
    let warm_pool = match launched.pool {
        Some(mut visit) => {
            let pool = (visit.key, visit.image_id.as_str(), visit.user_data.as_str());
            pool::refill(ports, &plan, pool, now_ms, &mut visit.report).await;
            Some(visit.report)
        }
        None => None,
    };
    Ok(Provisioned::Launched {
        instance_id,
        runner_id,
        subnet: launched.subnet,
        market: launched.market,
        failed_attempts: launched.failed_attempts,
        warm_pool,
    })
}

/// This attempt's instance, found among the job's live `instances` or launched in a slot.
/// `Ok(Err(outcome))` when provisioning ends here: the instance already has its runner (it is
/// recorded on the job's item again, as the run that made it may have died before), or no slot
/// is free.
async fn ensure_instance<F: Fleet, V, A, L: RunnerLedger, S: SlotStore>(
    ports: &FleetPorts<F, V, A, L, S>,
    settings: &FleetSettings,
    plan: &LaunchPlan,
    instances: &[Instance],
    key: JobKey,
    attempt: u32,
    now_ms: u64,
) -> Result<Result<Launched, Provisioned>, ProvisionError> {
    // Only this attempt's instance is this step's: an older attempt's may be running another
    // job (that is why this attempt was started), and is left alone.
    let Some(existing) = instances
        .iter()
        .find(|i| i.state.is_live() && i.attempt() == attempt)
    else {
        return launch_in_slot(ports, settings, plan, key, attempt, now_ms).await;
    };
    if let Some(runner_id) = existing.runner_id() {
        ports
            .ledger
            .record_running(key, runner_id, &existing.id, now_ms)
            .await
            .map_err(step("recording the runner on the job's item"))?;
        return Ok(Err(Provisioned::AlreadyProvisioned {
            instance_id: existing.id.clone(),
            runner_id,
        }));
    }
    // A warm pool instance claimed and tagged by an earlier run that did not start it.
    if existing.state == InstanceState::Stopped {
        ports.fleet.start(&existing.id).await.map_err(|error| {
            ProvisionError::LaunchUnavailable {
                subnet: "(warm pool)".into(),
                error,
            }
        })?;
    }
    Ok(Ok(Launched {
        instance_id: existing.id.clone(),
        subnet: "(launched by an earlier attempt)".to_owned(),
        market: plan.attempts[0].1,
        failed_attempts: Vec::new(),
        pool: None,
    }))
}

/// A runner from an earlier run that never reached its instance (no runner-id tag): its
/// token was lost with that run, so it can never be used. Remove it first. A runner an
/// instance is tagged with is complete (an older attempt's, maybe running another job):
/// not this step's to remove.
async fn remove_stale_runner<F, V, A: RunnerApi, L: RunnerLedger, S>(
    ports: &FleetPorts<F, V, A, L, S>,
    recorded_runner: Option<u64>,
    instances: &[Instance],
) -> Result<(), ProvisionError> {
    let complete = |id: u64| {
        instances
            .iter()
            .any(|i| i.state.is_live() && i.runner_id() == Some(id))
    };
    let Some(stale) = recorded_runner.filter(|id| !complete(*id)) else {
        return Ok(());
    };
    ports.api.delete(stale).await.map_err(step(
        "removing the runner of an earlier, interrupted attempt",
    ))?;
    ports
        .ledger
        .forget_runner(stale)
        .await
        .map_err(step("forgetting the runner of an earlier attempt"))
}

/// Creates the GitLab runner for this attempt's instance. When GitLab refuses, the instance
/// and its slot are removed again, so the failed step leaves nothing running.
async fn create_runner<F: Fleet, V, A: RunnerApi, L, S: SlotStore>(
    ports: &FleetPorts<F, V, A, L, S>,
    plan: &LaunchPlan,
    key: JobKey,
    attempt: u32,
    instance_id: &str,
) -> Result<(u64, Secret), ProvisionError> {
    let request = RunnerRequest {
        description: plan.runner_description.clone(),
        project_id: key.project_id,
        tags: plan.runner_tags.clone(),
    };
    match ports.api.create(&request).await {
        Ok(created) => Ok(created),
        Err(error) => {
            let mut cleanup = vec![(TERMINATING, ports.fleet.terminate(instance_id).await)];
            free_slot_after(ports, key, attempt, &mut cleanup).await;
            Err(ProvisionError::RunnerNotCreated {
                error,
                cleanup: cleanup_note(&cleanup),
            })
        }
    }
}

/// Delivers the new runner to its instance: registers it, stores its token in the instance's
/// parameter, then tags the instance with it, the tag that says the runner is complete (so it
/// comes last). On failure the runner, its instance and slot are removed again.
async fn deliver_runner<F: Fleet, V: TokenVault, A: RunnerApi, L: RunnerLedger, S: SlotStore>(
    ports: &FleetPorts<F, V, A, L, S>,
    entry: &RunnerEntry,
    token: Secret,
    key: JobKey,
) -> Result<(), ProvisionError> {
    let delivered = async {
        register_and_store(ports, entry, &token).await?;
        ports
            .fleet
            .tag(
                &entry.instance_id,
                &[(TAG_RUNNER_ID.to_owned(), entry.runner_id.to_string())],
            )
            .await
            .map_err(|e| ("tagging the instance with its runner", e))
    }
    .await;
    // Stored or not, the token is needed no longer: out of memory before the cleanup's calls.
    drop(token);
    let Err((what, error)) = delivered else {
        return Ok(());
    };
    let mut cleanup = remove_runner(ports, entry.runner_id, Some(&entry.instance_id)).await;
    free_slot_after(ports, key, entry.attempt, &mut cleanup).await;
    Err(ProvisionError::Step {
        what,
        error,
        cleanup: cleanup_note(&cleanup),
    })
}

/// Moves the job to `running` with the runner on `host` (an instance or a Lambda host). If the
/// job finished meanwhile (its teardown may have found nothing yet), removes what was made
/// again: the runner, its instance and slot, its parameter; then `Ok(false)`.
pub(crate) async fn record_running_or_undo<
    F: Fleet,
    V: TokenVault,
    A: RunnerApi,
    L: RunnerLedger,
    S: SlotStore,
>(
    ports: &FleetPorts<F, V, A, L, S>,
    key: JobKey,
    attempt: u32,
    runner_id: u64,
    host: &str,
    now_ms: u64,
) -> Result<bool, ProvisionError> {
    let moved = ports
        .ledger
        .record_running(key, runner_id, host, now_ms)
        .await
        .map_err(step("recording the runner on the job's item"))?;
    if moved {
        return Ok(true);
    }
    let mut cleanup = remove_runner(ports, runner_id, Some(host)).await;
    free_slot_after(ports, key, attempt, &mut cleanup).await;
    match cleanup.into_iter().find(|(_, r)| r.is_err()) {
        Some((what, Err(error))) => Err(ProvisionError::Step {
            what,
            error,
            cleanup: "; the job finished while its runner was being provisioned".into(),
        }),
        _ => Ok(false),
    }
}

/// Registers a runner the moment it exists, then puts its token in the parameter of its
/// instance (or Lambda host): the first two steps of delivering any runner we made.
pub(crate) async fn register_and_store<F, V: TokenVault, A, L: RunnerLedger, S>(
    ports: &FleetPorts<F, V, A, L, S>,
    entry: &RunnerEntry,
    token: &Secret,
) -> Result<(), (&'static str, PortError)> {
    ports
        .ledger
        .note_runner(entry)
        .await
        .map_err(|e| ("registering the runner", e))?;
    ports
        .vault
        .put(&entry.instance_id, token)
        .await
        .map_err(|e| ("storing the runner token", e))
}

/// The job's instance, as the provision got it.
#[derive(Debug)]
struct Launched {
    instance_id: String,
    subnet: String,
    market: Market,
    /// The attempts that failed before it.
    failed_attempts: Vec<String>,
    /// The route's warm pool as this provision saw it, to refill it at the end.
    pool: Option<PoolVisit>,
}

/// What [`pool::refill`] needs after [`pool::take`]: the pool, and how its instances launch.
#[derive(Debug)]
struct PoolVisit {
    key: PoolKey,
    image_id: String,
    user_data: String,
    report: PoolReport,
}

/// A new instance for the job's attempt, in a slot: takes the attempt's slot first (without
/// caps there is none to take) and gives it back when nothing was launched.
/// `Ok(Err(outcome))` when no slot is free: the job's item notes that it waits, and nothing
/// is launched.
async fn launch_in_slot<F: Fleet, V, A, L: RunnerLedger, S: SlotStore>(
    ports: &FleetPorts<F, V, A, L, S>,
    settings: &FleetSettings,
    plan: &LaunchPlan,
    key: JobKey,
    attempt: u32,
    now_ms: u64,
) -> Result<Result<Launched, Provisioned>, ProvisionError> {
    if let Some(waits) = take_slot(ports, key, attempt, now_ms).await? {
        return Ok(Err(waits));
    }
    let launched = launch_or_take_pooled(ports, settings, plan, key, attempt, now_ms).await;
    match &launched {
        // The instance may run (tagged with the job and attempt at launch): the slot stays
        // taken, or another job could launch in it and pass the cap. The step's retry finds
        // that instance; if there is none, the reaper gives the slot back once it is older
        // than ORPHAN_GRACE_SECONDS.
        Err(ProvisionError::LaunchUnavailable { error, .. })
            if crate::ec2::launch_may_have_run(&error.code) => {}
        // Nothing runs: the slot is free again. Should this fail, the reaper gives it back
        // as above.
        Err(_) => {
            let _ = give_back_slot(ports, key, attempt).await;
        }
        Ok(_) => {}
    }
    Ok(Ok(launched?))
}

/// The attempt's slot, when there are caps. `Some(outcome)` when the job waits instead:
/// the fleet is drained (no slot taken), or every slot is taken (noted on the job's item).
async fn take_slot<F, V, A, L: RunnerLedger, S: SlotStore>(
    ports: &FleetPorts<F, V, A, L, S>,
    key: JobKey,
    attempt: u32,
    now_ms: u64,
) -> Result<Option<Provisioned>, ProvisionError> {
    // Drained: waits like a job over a full cap, and takes no slot.
    if let Some(waiting) = wait_if_drained(&ports.ledger, key, now_ms).await? {
        return Ok(Some(match waiting {
            Waiting::Noted(waiting_for) => Provisioned::WaitingForSlot { waiting_for },
            Waiting::JobFinished => Provisioned::JobAlreadyFinished,
        }));
    }
    let Some(slots) = &ports.slots else {
        return Ok(None);
    };
    let claim = claim_slot(slots, key, attempt, now_ms)
        .await
        .map_err(step("taking a runner instance slot (the slots table)"))?;
    match claim {
        SlotClaim::InFlight { taken_at_ms } => Err(ProvisionError::SlotInFlight {
            taken_ms_ago: now_ms.saturating_sub(taken_at_ms),
        }),
        SlotClaim::Full(cap) => {
            let noted = ports
                .ledger
                .record_waiting(key, &cap.counter(), now_ms)
                .await
                .map_err(step("noting on the job's item that it waits for a slot"))?;
            Ok(Some(if noted {
                Provisioned::WaitingForSlot { waiting_for: cap }
            } else {
                Provisioned::JobAlreadyFinished
            }))
        }
        SlotClaim::Granted { .. } => Ok(None),
    }
}

/// The job's instance: one from the warm pool when the plan has one and an instance is
/// ready there, else a new one.
async fn launch_or_take_pooled<F: Fleet, V, A, L: RunnerLedger, S>(
    ports: &FleetPorts<F, V, A, L, S>,
    settings: &FleetSettings,
    plan: &LaunchPlan,
    key: JobKey,
    attempt: u32,
    now_ms: u64,
) -> Result<Launched, ProvisionError> {
    let user_data = plan_user_data(settings, plan, false)?;
    let image_id = ports
        .fleet
        .resolve_image(&plan.ami)
        .await
        .map_err(step("resolving the AMI"))?;
    if plan.warm_pool == 0 {
        return launch(ports, plan, &key, image_id, user_data, now_ms).await;
    }
    let pooled_user_data = plan_user_data(settings, plan, true)?;
    let pool_key = PoolKey::of(plan, &image_id, &pooled_user_data);
    let mut visit = PoolVisit {
        key: pool_key,
        image_id,
        user_data: pooled_user_data,
        report: PoolReport {
            pool: pool_key.to_string(),
            ..PoolReport::default()
        },
    };
    let taken = pool::take(
        ports,
        plan,
        key,
        attempt,
        visit.key,
        now_ms,
        &mut visit.report,
    )
    .await
    .map_err(step("taking an instance from the warm pool"))?;
    let mut launched = match taken {
        Some(instance_id) => Launched {
            instance_id,
            subnet: "(warm pool)".into(),
            market: Market::OnDemand,
            failed_attempts: visit.report.not_started.clone(),
            pool: None,
        },
        None => launch(ports, plan, &key, visit.image_id.clone(), user_data, now_ms).await?,
    };
    launched.pool = Some(visit);
    Ok(launched)
}

/// The user-data of the plan's instances (`pooled`: of its warm pool's).
fn plan_user_data(
    settings: &FleetSettings,
    plan: &LaunchPlan,
    pooled: bool,
) -> Result<String, UserDataError> {
    render_user_data(
        &settings.user_data_template,
        &UserDataValues {
            gitlab_url: settings.gitlab_url.clone(),
            token_parameter_prefix: settings.token_parameter_prefix.clone(),
            executor: plan.executor,
            docker_image: plan.docker_image.clone(),
            privileged: plan.privileged,
            wait_timeout_seconds: settings.wait_timeout_seconds,
            region: settings.region.clone(),
            runner: settings.runner.clone(),
            cache_bucket: settings.cache_bucket.clone(),
            pooled,
        },
    )
}

/// What [`wait_if_drained`] did.
pub(crate) enum Waiting {
    /// The job's item notes that it waits for this.
    Noted(CapReached),
    /// The job has finished: nothing was noted, nothing is to start.
    JobFinished,
}

/// While the fleet is drained, notes on the job's item that it waits ([`CapReached::Drained`],
/// the way a full cap is noted) and answers what was done; `None`: not drained, go on.
pub(crate) async fn wait_if_drained<L: RunnerLedger>(
    ledger: &L,
    key: JobKey,
    now_ms: u64,
) -> Result<Option<Waiting>, ProvisionError> {
    if ledger
        .drained()
        .await
        .map_err(step("reading the drain switch (the jobs table)"))?
        .is_none()
    {
        return Ok(None);
    }
    let cap = CapReached::Drained;
    let noted = ledger
        .record_waiting(key, &cap.counter(), now_ms)
        .await
        .map_err(step("noting on the job's item that it waits (drained)"))?;
    Ok(Some(if noted {
        Waiting::Noted(cap)
    } else {
        Waiting::JobFinished
    }))
}

/// Tries each (subnet, market) of the plan in turn: capacity errors move on (spot, then
/// on-demand), configuration errors stop at once. Spot refused for the whole account (no spot
/// service-linked role) skips the remaining spot attempts: only on demand can work then.
async fn launch<F: Fleet, V, A, L, S>(
    ports: &FleetPorts<F, V, A, L, S>,
    plan: &LaunchPlan,
    key: &JobKey,
    image_id: String,
    user_data: String,
    now_ms: u64,
) -> Result<Launched, ProvisionError> {
    let mut tried = Vec::new();
    let mut spot_refused = false;
    for (n, (subnet, market)) in plan.attempts.iter().enumerate() {
        if spot_refused && *market == Market::Spot {
            continue;
        }
        let request = LaunchRequest {
            instance_type: plan.instance_type.clone(),
            image_id: image_id.clone(),
            subnet: subnet.clone(),
            market: *market,
            tags: plan.tags.clone(),
            user_data: user_data.clone(),
            // Unique per call and attempt: EC2 would hand back an instance an earlier (failed,
            // cleaned up) call launched under the same token.
            client_token: format!("p{}-j{}-{now_ms}-{n}", key.project_id, key.job_id),
            stop_on_shutdown: false,
        };
        match ports.fleet.launch(&request).await {
            Ok(id) => {
                return Ok(Launched {
                    instance_id: id,
                    subnet: subnet.clone(),
                    market: *market,
                    failed_attempts: tried,
                    pool: None,
                });
            }
            Err(error) => match classify_launch_error(&error.code) {
                LaunchFailure::SpotRefused if *market == Market::Spot => {
                    spot_refused = true;
                    tried.push(format!(
                        "{subnet} spot: {} (spot refused for this account: the remaining spot attempts were skipped)",
                        error.code
                    ));
                }
                LaunchFailure::Capacity | LaunchFailure::Subnet => {
                    tried.push(format!("{subnet} {}: {}", market_name(*market), error.code));
                }
                LaunchFailure::Transient => {
                    return Err(ProvisionError::LaunchUnavailable {
                        subnet: subnet.clone(),
                        error,
                    });
                }
                LaunchFailure::Fatal | LaunchFailure::SpotRefused => {
                    return Err(ProvisionError::LaunchRefused {
                        instance_type: plan.instance_type.clone(),
                        subnet: subnet.clone(),
                        market: *market,
                        error,
                    });
                }
            },
        }
    }
    Err(ProvisionError::NoCapacity {
        instance_type: plan.instance_type.clone(),
        tried,
    })
}

/// What the operator should hear about a launch that succeeded: the fix for a refusal that
/// made it fall back (today only spot refused for the account; see [`SPOT_ROLE_FIX`]).
pub fn launch_warnings(outcome: &Provisioned) -> Vec<&'static str> {
    match outcome {
        Provisioned::Launched {
            failed_attempts, ..
        } if failed_attempts
            .iter()
            .any(|a| a.contains(SPOT_ROLE_MISSING)) =>
        {
            vec![SPOT_ROLE_FIX]
        }
        _ => Vec::new(),
    }
}

/// The market as items and the operator write it (its serde name: `spot`, `on-demand`).
pub fn market_name(market: Market) -> String {
    market.to_string()
}

/// Removes one runner and everything of it: the instance (a Lambda host has none), the
/// GitLab runner, the token parameter, the registry entry (last, so a failure leaves it for
/// the reaper). Every step runs even if an earlier one failed; each result is reported.
pub(crate) async fn remove_runner<F: Fleet, V: TokenVault, A: RunnerApi, L: RunnerLedger, S>(
    ports: &FleetPorts<F, V, A, L, S>,
    runner_id: u64,
    instance_id: Option<&str>,
) -> Vec<(&'static str, Result<(), PortError>)> {
    let mut results = Vec::new();
    if let Some(instance_id) = instance_id.filter(|id| !is_lambda_host(id)) {
        results.push((TERMINATING, ports.fleet.terminate(instance_id).await));
    }
    results.push((
        "deleting the GitLab runner",
        ports.api.delete(runner_id).await,
    ));
    if let Some(instance_id) = instance_id {
        results.push((
            "deleting the token parameter",
            ports.vault.delete(instance_id).await,
        ));
    }
    if results.iter().all(|(_, r)| r.is_ok()) {
        results.push((
            "forgetting the runner",
            ports.ledger.forget_runner(runner_id).await,
        ));
    }
    results
}

/// What teardown did; the teardown workflow's output.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TornDown {
    pub removed: Vec<RemovedRunner>,
    /// Runners left in place, with why.
    pub kept: Vec<KeptRunner>,
    /// The runner that ran the job, when it is not one of ours (a shared runner).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_ours: Option<u64>,
    /// Why nothing was looked at (EC2 runners not configured in this stack).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
    /// GitLab did not confirm the hook: nothing was removed. The teardown workflow ends
    /// without marking the job cleaned; the reaper and the reconciler finish the job later.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unconfirmed: Option<Unconfirmed>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RemovedRunner {
    pub runner_id: u64,
    pub instance_id: Option<String>,
    pub why: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeptRunner {
    pub runner_id: u64,
    pub why: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{what} (runner {runner_id}): {error}; the step may be retried, and the reaper retries too"
)]
pub struct TeardownError {
    pub what: &'static str,
    pub runner_id: u64,
    pub error: PortError,
}

/// What a finished hook claims: its status and the runner it names. A claim only: any holder
/// of one hook secret can send it for any project, job and runner id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookClaim {
    pub status: JobStatus,
    pub runner_id: Option<u64>,
}

impl HookClaim {
    pub fn of(job: &JobEvent) -> Self {
        Self {
            status: job.status.clone(),
            runner_id: job.runner.as_ref().map(|r| r.id),
        }
    }
}

/// What GitLab answered to `GET /projects/:id/jobs/:job_id` (after the client's retries).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobAnswer {
    /// The job as GitLab has it: its status and the runner it ran on (if any).
    Job {
        status: JobStatus,
        runner_id: Option<u64>,
    },
    /// 404: no such job in that project (a forged id, or a token that cannot see it).
    NotFound,
    /// No answer GitLab stands behind: unreachable, 5xx after retries, 401/403, garbage.
    Unavailable(String),
    /// No `read_api` token configured (`GitLabApiTokenParameterName` empty): nothing to ask.
    NoToken,
}

/// Why a finished hook was not acted on. Logged as `unconfirmed` with the reason's code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Unconfirmed {
    /// No `read_api` token: a hook alone is never trusted with a teardown.
    NoReadApiToken,
    GitLabUnavailable {
        error: String,
    },
    JobNotFound,
    /// GitLab says the job is not finished (`running`, `pending`, ...).
    NotFinished {
        gitlab_status: String,
    },
    /// GitLab says another runner (or none) ran the job.
    RunnerMismatch {
        hook_runner_id: Option<u64>,
        gitlab_runner_id: Option<u64>,
    },
}

impl Unconfirmed {
    pub fn code(&self) -> &'static str {
        match self {
            Self::NoReadApiToken => "no_read_api_token",
            Self::GitLabUnavailable { .. } => "gitlab_unavailable",
            Self::JobNotFound => "job_not_found",
            Self::NotFinished { .. } => "not_finished",
            Self::RunnerMismatch { .. } => "runner_mismatch",
        }
    }
}

impl std::fmt::Display for Unconfirmed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NoReadApiToken => f.write_str(
                "no read_api token is configured (GitLabApiTokenParameterName), so the hook cannot be confirmed; the reaper removes the runner once its job is over",
            ),
            Self::GitLabUnavailable { error } => write!(
                f,
                "GitLab could not confirm the job ({error}); the reconciler and the reaper finish it later"
            ),
            Self::JobNotFound => f.write_str("GitLab does not know the job (404)"),
            Self::NotFinished { gitlab_status } => {
                write!(f, "GitLab says the job is {gitlab_status}, not finished")
            }
            Self::RunnerMismatch {
                hook_runner_id,
                gitlab_runner_id,
            } => write!(
                f,
                "the hook names runner {}, GitLab says {} ran the job",
                runner_text(*hook_runner_id),
                runner_text(*gitlab_runner_id)
            ),
        }
    }
}

fn runner_text(id: Option<u64>) -> String {
    id.map_or_else(|| "none".into(), |id| id.to_string())
}

/// What teardown does about a finished hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TeardownAction {
    /// GitLab confirms the job finished on the runner the hook names. `remove`: that runner,
    /// one of ours; `not_ours`: that runner, not ours (left alone). Either way the runner
    /// launched for the job is removed too if it is idle.
    Confirmed {
        remove: Option<u64>,
        not_ours: Option<u64>,
    },
    /// Destroy nothing.
    Unconfirmed(Unconfirmed),
}

/// The teardown's decision, from the hook's claim, GitLab's answer about the job, and whether
/// the runner the hook names is one of ours (the runner registry, or an instance of ours
/// tagged with it). Only GitLab's word lets anything be destroyed: the job must be finished,
/// and the runner GitLab says ran it must be the one the hook names.
pub fn decide_teardown(
    claim: &HookClaim,
    answer: &JobAnswer,
    named_is_ours: bool,
) -> TeardownAction {
    let gitlab_runner_id = match answer {
        JobAnswer::NoToken => return TeardownAction::Unconfirmed(Unconfirmed::NoReadApiToken),
        JobAnswer::Unavailable(error) => {
            return TeardownAction::Unconfirmed(Unconfirmed::GitLabUnavailable {
                error: error.clone(),
            });
        }
        JobAnswer::NotFound => return TeardownAction::Unconfirmed(Unconfirmed::JobNotFound),
        JobAnswer::Job { status, .. } if !status.is_finished() => {
            return TeardownAction::Unconfirmed(Unconfirmed::NotFinished {
                gitlab_status: status.as_str().to_owned(),
            });
        }
        JobAnswer::Job { runner_id, .. } => *runner_id,
    };
    if gitlab_runner_id != claim.runner_id {
        return TeardownAction::Unconfirmed(Unconfirmed::RunnerMismatch {
            hook_runner_id: claim.runner_id,
            gitlab_runner_id,
        });
    }
    match claim.runner_id {
        Some(id) if named_is_ours => TeardownAction::Confirmed {
            remove: Some(id),
            not_ours: None,
        },
        Some(id) => TeardownAction::Confirmed {
            remove: None,
            not_ours: Some(id),
        },
        None => TeardownAction::Confirmed {
            remove: None,
            not_ours: None,
        },
    }
}

/// Tears down after a finished job, once GitLab confirms it ([`decide_teardown`]; `answer` is
/// what GitLab said about the job): the runner that ran it (if it is ours), and the runner
/// launched for it if that one is idle (it never got a job: the job was canceled, skipped, or
/// taken by another runner). A runner launched for this job that is busy took another job;
/// that job's teardown removes it. Unconfirmed: nothing is removed.
pub async fn teardown<F: Fleet, V: TokenVault, A: RunnerApi, L: RunnerLedger, S: SlotStore>(
    ports: &FleetPorts<F, V, A, L, S>,
    job: &JobEvent,
    answer: &JobAnswer,
) -> Result<TornDown, TeardownError> {
    let key = JobKey::of(job);
    let mut out = TornDown::default();
    let fail = |what: &'static str, runner_id: u64| {
        move |error: PortError| TeardownError {
            what,
            runner_id,
            error,
        }
    };
    let claim = HookClaim::of(job);
    // Looked up before deciding (a read: harmless), so the decision stays one pure function.
    let named = match claim.runner_id {
        Some(runner_id) if matches!(answer, JobAnswer::Job { .. }) => locate(ports, runner_id)
            .await
            .map_err(fail("looking up the runner that ran the job", runner_id))?
            .map(|located| (runner_id, located)),
        _ => None,
    };
    let (remove, not_ours) = match decide_teardown(&claim, answer, named.is_some()) {
        TeardownAction::Unconfirmed(why) => {
            out.unconfirmed = Some(why);
            return Ok(out);
        }
        TeardownAction::Confirmed { remove, not_ours } => (remove, not_ours),
    };
    out.not_ours = not_ours;
    if let (Some(runner_id), Some((_, (instance_id, launched_for)))) = (remove, named) {
        finish_removal(ports, runner_id, instance_id.as_deref(), launched_for).await?;
        out.removed.push(RemovedRunner {
            runner_id,
            instance_id,
            why: "it ran the job",
        });
    }
    let ran_on = claim.runner_id;
    let record = ports
        .ledger
        .job(key)
        .await
        .map_err(fail("reading the job's item", 0))?
        .unwrap_or_default();
    if let Some(own) = record.runner_id.filter(|id| Some(*id) != ran_on) {
        let Some((instance_id, launched_for)) = locate(ports, own)
            .await
            .map_err(fail("looking up the job's own runner", own))?
        else {
            return Ok(out);
        };
        match ports.api.busy(own).await {
            Ok(false) => {
                finish_removal(ports, own, instance_id.as_deref(), launched_for).await?;
                out.removed.push(RemovedRunner {
                    runner_id: own,
                    instance_id,
                    why: "launched for the job and idle",
                });
            }
            Ok(true) => out.kept.push(KeptRunner {
                runner_id: own,
                why: "launched for the job but running another job; that job's teardown removes it"
                    .into(),
            }),
            Err(e) => out.kept.push(KeptRunner {
                runner_id: own,
                why: format!("GitLab could not say whether it is busy ({e}); left to the reaper"),
            }),
        }
    }
    Ok(out)
}

/// One of our runners: its instance, and the (job, attempt) that instance was launched for
/// (whose slot it holds; a runner may have run another job).
type Located = (Option<String>, Option<(JobKey, u32)>);

/// Where one of our runners lives: `Some` if it is ours (registered, or on an instance tagged
/// with it), `None` if not ours.
async fn locate<F: Fleet, V, A, L: RunnerLedger, S>(
    ports: &FleetPorts<F, V, A, L, S>,
    runner_id: u64,
) -> Result<Option<Located>, PortError> {
    if let Some(entry) = ports.ledger.runner(runner_id).await? {
        let launched_for = JobKey {
            project_id: entry.project_id,
            job_id: entry.job_id,
        };
        return Ok(Some((
            Some(entry.instance_id),
            Some((launched_for, entry.attempt.max(1))),
        )));
    }
    let tagged = ports
        .fleet
        .instances(InstanceQuery::Runner(runner_id))
        .await?;
    Ok(tagged.into_iter().next().map(|i| {
        let launched_for = i.job_key().map(|job| (job, i.attempt()));
        (Some(i.id), launched_for)
    }))
}

/// Removes the runner and its instance, then gives back the slot of the (job, attempt) the
/// instance was launched for.
async fn finish_removal<F: Fleet, V: TokenVault, A: RunnerApi, L: RunnerLedger, S: SlotStore>(
    ports: &FleetPorts<F, V, A, L, S>,
    runner_id: u64,
    instance_id: Option<&str>,
    launched_for: Option<(JobKey, u32)>,
) -> Result<(), TeardownError> {
    for (what, result) in remove_runner(ports, runner_id, instance_id).await {
        result.map_err(|error| TeardownError {
            what,
            runner_id,
            error,
        })?;
    }
    // A Lambda host holds no slot: the Lambda route is capped by reserved concurrency.
    let on_instance = instance_id.is_some_and(|id| !is_lambda_host(id));
    if let (true, Some((job, attempt))) = (on_instance, launched_for) {
        give_back_slot(ports, job, attempt)
            .await
            .map_err(|error| TeardownError {
                what: "giving back the instance's slot (the slots table)",
                runner_id,
                error,
            })?;
    }
    Ok(())
}

/// One reaper pass: what it did, for the log and the metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ReapReport {
    pub instances_seen: usize,
    pub killed: Vec<Reaped>,
    pub marked: Vec<Reaped>,
    pub stale_parameters: Vec<String>,
    pub orphan_runners: Vec<u64>,
    /// Slots given back because their (job, attempt) has no live instance (a leak: see
    /// [`crate::slots`]): [`crate::slots::slot_name`]s (the job's table key, with
    /// `#attempt#<n>` after the first attempt).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub leaked_slots: Vec<String>,
    /// Failures; the pass goes on with the next item, and the next pass retries.
    pub errors: Vec<String>,
    /// Why the pass did nothing: EC2 runners not configured, or another pass holds the lease.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
}

impl ReapReport {
    pub fn skipped(why: String) -> Self {
        Self {
            skipped: Some(why),
            ..Self::default()
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reaped {
    pub instance_id: String,
    pub runner_id: Option<u64>,
    pub why: &'static str,
}

/// The reaper's pass: every live instance of the stack through [`reap`], then token
/// parameters and registered runners whose instance is gone.
pub async fn reaper_pass<F: Fleet, V: TokenVault, A: RunnerApi, L: RunnerLedger, S: SlotStore>(
    ports: &FleetPorts<F, V, A, L, S>,
    settings: &FleetSettings,
    now_ms: u64,
) -> Result<ReapReport, PortError> {
    let mut report = ReapReport::default();
    let instances = ports.fleet.instances(InstanceQuery::Live).await?;
    let live: HashSet<String> = instances
        .iter()
        .filter(|i| i.state.is_live())
        .map(|i| i.id.clone())
        .collect();
    report.instances_seen = live.len();
    for instance in instances.iter().filter(|i| i.state.is_live()) {
        if let Err(e) = reap_instance(ports, settings, instance, now_ms, &mut report).await {
            report.errors.push(format!("instance {}: {e}", instance.id));
        }
    }
    if let Some(slots) = &ports.slots {
        // Listed before the slots are read: see `leaked_slots`.
        let live_slots: HashSet<(JobKey, u32)> = instances
            .iter()
            .filter(|i| i.state.is_live())
            .filter_map(|i| Some((i.job_key()?, i.attempt())))
            .collect();
        reap_slots(slots, &live_slots, settings, now_ms, &mut report).await;
    }

    match ports.vault.list().await {
        Ok(parameters) => {
            for (instance_id, modified_ms) in parameters {
                let stale =
                    now_ms.saturating_sub(modified_ms) >= orphan_after(settings, &instance_id);
                if stale && !live.contains(&instance_id) {
                    match ports.vault.delete(&instance_id).await {
                        Ok(()) => report.stale_parameters.push(instance_id),
                        Err(e) => report
                            .errors
                            .push(format!("token parameter of {instance_id}: {e}")),
                    }
                }
            }
        }
        Err(e) => report.errors.push(format!("listing token parameters: {e}")),
    }

    match ports.ledger.runners().await {
        Ok(entries) => {
            for entry in entries {
                let age = now_ms.saturating_sub(entry.created_at_ms);
                let old = age >= orphan_after(settings, &entry.instance_id);
                if old && !live.contains(&entry.instance_id) {
                    // A Lambda host's token parameter goes with its runner; an instance's
                    // went with the instance.
                    let host = Some(entry.instance_id.as_str()).filter(|id| is_lambda_host(id));
                    let results = remove_runner(ports, entry.runner_id, host).await;
                    match results
                        .iter()
                        .find_map(|(what, r)| Some((what, r.as_ref().err()?)))
                    {
                        None => report.orphan_runners.push(entry.runner_id),
                        Some((what, e)) => report
                            .errors
                            .push(format!("runner {}: {what}: {e}", entry.runner_id)),
                    }
                }
            }
        }
        Err(e) => report
            .errors
            .push(format!("listing registered runners: {e}")),
    }
    Ok(report)
}

/// How old a token parameter or registered runner without a live instance must be before
/// the reaper removes it: the orphan grace (longer than a provision runs), or for a Lambda
/// host the time its invocation may still use it ([`lambda_runner::usable_for`]). The
/// invocation deletes both when it is done, and the job's teardown the runner.
fn orphan_after(settings: &FleetSettings, instance_id: &str) -> u64 {
    if is_lambda_host(instance_id) {
        lambda_runner::usable_for().as_millis() as u64
    } else {
        settings.orphan_grace_ms
    }
}

/// Gives back the slots whose (job, attempt) has no live instance (older than the orphan
/// grace, which is longer than a provision can run).
async fn reap_slots<S: SlotStore>(
    slots: &Capped<S>,
    live_slots: &HashSet<(JobKey, u32)>,
    settings: &FleetSettings,
    now_ms: u64,
    report: &mut ReapReport,
) {
    let held = match slots.store.held().await {
        Ok(held) => held,
        Err(e) => {
            report.errors.push(format!("listing the held slots: {e}"));
            return;
        }
    };
    for slot in leaked_slots(&held, live_slots, now_ms, settings.orphan_grace_ms) {
        let name = slot_name(slot.job, slot.attempt);
        match slots
            .store
            .give_back(slot.job, slot.attempt, Some(slot.taken_at_ms))
            .await
        {
            Ok(true) => report.leaked_slots.push(name),
            // Taken again (a retried provision of the attempt) or given back meanwhile: not a
            // leak any more.
            Ok(false) => {}
            Err(e) => report
                .errors
                .push(format!("giving back the slot of {name}: {e}")),
        }
    }
}

/// One live instance through the reaper: what [`reaper_action`] decides, then done.
async fn reap_instance<F: Fleet, V: TokenVault, A: RunnerApi, L: RunnerLedger, S: SlotStore>(
    ports: &FleetPorts<F, V, A, L, S>,
    settings: &FleetSettings,
    instance: &Instance,
    now_ms: u64,
    report: &mut ReapReport,
) -> Result<(), PortError> {
    let runner_id = instance.runner_id();
    match reaper_action(ports, settings, instance, now_ms).await? {
        ReaperAction::Keep(_) => {}
        ReaperAction::Mark(why) => {
            ports
                .fleet
                .tag(
                    &instance.id,
                    &[(TAG_REAPER_MARK.to_owned(), now_ms.to_string())],
                )
                .await?;
            report.marked.push(Reaped {
                instance_id: instance.id.clone(),
                runner_id,
                why,
            });
        }
        ReaperAction::Kill(why) => {
            let results = match runner_id {
                Some(id) => remove_runner(ports, id, Some(&instance.id)).await,
                None => vec![
                    (
                        "terminating the instance",
                        ports.fleet.terminate(&instance.id).await,
                    ),
                    (
                        "deleting the token parameter",
                        ports.vault.delete(&instance.id).await,
                    ),
                ],
            };
            if let Some((what, Err(e))) = results.into_iter().find(|(_, r)| r.is_err()) {
                return Err(PortError(format!("{what}: {e}")));
            }
            if let Some(job) = instance.job_key() {
                give_back_slot(ports, job, instance.attempt())
                    .await
                    .map_err(|e| PortError(format!("giving back its slot: {e}")))?;
            }
            report.killed.push(Reaped {
                instance_id: instance.id.clone(),
                runner_id,
                why,
            });
        }
    }
    Ok(())
}

/// What the reaper does with `instance`: [`reap`] over its tags and its job's item, asking
/// GitLab whether its runner is busy only when the answer could change the decision.
async fn reaper_action<F, V, A: RunnerApi, L: RunnerLedger, S>(
    ports: &FleetPorts<F, V, A, L, S>,
    settings: &FleetSettings,
    instance: &Instance,
    now_ms: u64,
) -> Result<ReaperAction, PortError> {
    let job_finished = match instance.job_key() {
        Some(key) => ports
            .ledger
            .job(key)
            .await?
            .and_then(|r| r.phase)
            .is_some_and(|p| p >= JobPhase::Finished),
        None => false,
    };
    let mut facts = InstanceFacts {
        launched_at_ms: instance.launched_at_ms,
        bypass: instance.tag(TAG_REAPER_BYPASS).is_some(),
        pooled: pool::is_ready(instance),
        marked_at_ms: instance.tag(TAG_REAPER_MARK).and_then(|t| t.parse().ok()),
        // First as if idle: only an instance that would then be marked or killed is worth a
        // question to GitLab (below). Without a runner it cannot have picked anything.
        picked_a_job: false,
        job_finished,
        runner_busy: None,
        busy_unknown: false,
    };
    let mut action = reap(&facts, &settings.reaper, now_ms);
    if !matches!(action, ReaperAction::Keep(_))
        && let Some(id) = instance.runner_id()
    {
        // Asked once, right before acting: a runner that looks orphaned may have just taken
        // a job. An unanswered question counts as busy: nothing is destroyed on a guess.
        facts.runner_busy = ports.api.busy(id).await.ok();
        facts.busy_unknown = facts.runner_busy.is_none();
        // Busy now means it has a job. Idle now means it never got one, or its job ended
        // and the finished hook was lost: either way it is done. Unknown: assume busy.
        facts.picked_a_job = facts.runner_busy.unwrap_or(true);
        action = reap(&facts, &settings.reaper, now_ms);
    }
    Ok(action)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ec2::{LaunchPlan, default_ami_parameter_prefix};
    use crate::mapping::RunnerExecutor;
    use crate::testing::{block_on, job_event};
    use std::sync::Mutex;

    /// EC2 that answers each launch with `answer(subnet, market)` and records the attempts.
    struct ScriptedFleet {
        answer: fn(&str, Market) -> Result<String, &'static str>,
        attempts: Mutex<Vec<(String, Market)>>,
    }

    impl Fleet for ScriptedFleet {
        async fn instances(&self, _: InstanceQuery) -> Result<Vec<Instance>, PortError> {
            Ok(vec![])
        }
        async fn resolve_image(&self, _: &AmiRef) -> Result<String, PortError> {
            Ok("ami-00000000".into())
        }
        async fn launch(&self, request: &LaunchRequest) -> Result<String, LaunchError> {
            self.attempts
                .lock()
                .unwrap()
                .push((request.subnet.clone(), request.market));
            (self.answer)(&request.subnet, request.market).map_err(|code| LaunchError {
                code: code.into(),
                message: "scripted".into(),
            })
        }
        async fn tag(&self, _: &str, _: &[(String, String)]) -> Result<(), PortError> {
            Ok(())
        }
        async fn terminate(&self, _: &str) -> Result<(), PortError> {
            Ok(())
        }
        async fn start(&self, _: &str) -> Result<(), LaunchError> {
            unreachable!("no warm pool here")
        }
    }

    fn plan(market: Market) -> LaunchPlan {
        let defaults = Ec2Defaults {
            instance_type: "t4g.medium".into(),
            ami: AmiRef::Id("ami-00000000".into()),
            market,
            subnets: vec!["subnet-a".into(), "subnet-b".into()],
            executor: RunnerExecutor::Docker,
            docker_image: crate::ec2::DEFAULT_DOCKER_IMAGE.into(),
            stack: "ci".into(),
            cost_tags: vec![],
            ami_parameter_prefix: default_ami_parameter_prefix("ci"),
        };
        let job = job_event(1, 2, "build", JobStatus::Pending);
        launch_plan(&job, &Ec2Settings::default(), &defaults, None).unwrap()
    }

    fn run(
        answer: fn(&str, Market) -> Result<String, &'static str>,
        market: Market,
    ) -> (Result<Launched, ProvisionError>, Vec<(String, Market)>) {
        let ports = FleetPorts {
            fleet: ScriptedFleet {
                answer,
                attempts: Mutex::default(),
            },
            vault: (),
            api: (),
            ledger: (),
            slots: None::<Capped<()>>,
        };
        let key = JobKey {
            project_id: 1,
            job_id: 2,
        };
        let result = block_on(launch(
            &ports,
            &plan(market),
            &key,
            "ami-0".into(),
            "#!".into(),
            0,
        ));
        (result, ports.fleet.attempts.into_inner().unwrap())
    }

    #[test]
    fn spot_refused_for_the_account_skips_the_other_spot_attempts_and_launches_on_demand() {
        let (result, attempts) = run(
            |_, market| match market {
                Market::Spot => Err(SPOT_ROLE_MISSING),
                Market::OnDemand => Ok("i-od".into()),
            },
            Market::Spot,
        );
        let Launched {
            instance_id: instance,
            subnet,
            market,
            failed_attempts: failed,
            ..
        } = result.unwrap();
        assert_eq!(
            (instance.as_str(), subnet.as_str(), market),
            ("i-od", "subnet-a", Market::OnDemand)
        );
        // subnet-b on spot is never asked: the refusal is the account's, not the subnet's.
        assert_eq!(
            attempts,
            [
                ("subnet-a".into(), Market::Spot),
                ("subnet-a".into(), Market::OnDemand)
            ]
        );
        assert_eq!(failed.len(), 1, "{failed:?}");
        assert!(
            failed[0]
                .starts_with("subnet-a spot: AuthFailure.ServiceLinkedRoleCreationNotPermitted")
        );
        let outcome = Provisioned::Launched {
            instance_id: instance,
            runner_id: 1,
            subnet,
            market,
            failed_attempts: failed,
            warm_pool: None,
        };
        assert_eq!(launch_warnings(&outcome), [SPOT_ROLE_FIX]);
    }

    #[test]
    fn capacity_moves_through_every_subnet_and_configuration_errors_stop() {
        // No spot capacity anywhere: both subnets on spot, then on demand.
        let (result, attempts) = run(
            |subnet, market| match (subnet, market) {
                (_, Market::Spot) => Err("InsufficientInstanceCapacity"),
                ("subnet-a", _) => Err("InsufficientInstanceCapacity"),
                _ => Ok("i-b".into()),
            },
            Market::Spot,
        );
        let Launched {
            subnet,
            market,
            failed_attempts: failed,
            ..
        } = result.unwrap();
        assert_eq!(
            (subnet.as_str(), market, failed.len()),
            ("subnet-b", Market::OnDemand, 3)
        );
        assert_eq!(attempts.len(), 4);
        let outcome = Provisioned::AlreadyProvisioned {
            instance_id: "i".into(),
            runner_id: 1,
        };
        assert!(launch_warnings(&outcome).is_empty());
        // A configuration error stops at the first attempt.
        let (result, attempts) = run(|_, _| Err("InvalidAMIID.NotFound"), Market::Spot);
        assert!(matches!(result, Err(ProvisionError::LaunchRefused { .. })));
        assert_eq!(attempts.len(), 1);
        // The spot refusal on an on-demand attempt is not a spot matter: it stops too.
        let (result, _) = run(|_, _| Err(SPOT_ROLE_MISSING), Market::OnDemand);
        assert!(matches!(result, Err(ProvisionError::LaunchRefused { .. })));
    }

    /// EC2, GitLab's runners, the token parameters and our tables, in memory: enough to run
    /// provision, teardown and the reaper end to end.
    #[derive(Default)]
    struct World {
        instances: Mutex<Vec<Instance>>,
        runners: Mutex<BTreeMap<u64, bool>>,
        next_runner: Mutex<u64>,
        parameters: Mutex<BTreeMap<String, u64>>,
        jobs: Mutex<BTreeMap<(u64, u64), JobRecord>>,
        registry: Mutex<BTreeMap<u64, RunnerEntry>>,
        /// Every TerminateInstances call, by id.
        terminate_calls: Mutex<Vec<String>>,
        /// The drain switch, and each job noted as waiting with its cap.
        drained: Mutex<Option<Drain>>,
        waiting: Mutex<Vec<(JobKey, String)>>,
        /// Launches whose answer is lost: the instance runs, the caller hears `Unavailable`.
        lost_launch_answers: Mutex<u32>,
        /// Warm pool: which instances stop on shutdown, each claim, each StartInstances
        /// call, and starts to refuse (no capacity).
        stop_on_shutdown: Mutex<HashSet<String>>,
        pool_claims: Mutex<BTreeMap<String, (JobKey, u32)>>,
        start_calls: Mutex<Vec<String>>,
        refused_starts: Mutex<u32>,
    }

    impl Fleet for &World {
        async fn instances(&self, query: InstanceQuery) -> Result<Vec<Instance>, PortError> {
            let all = self.instances.lock().unwrap().clone();
            Ok(all
                .into_iter()
                .filter(|i| match query {
                    InstanceQuery::Job(key) => i.job_key() == Some(key),
                    InstanceQuery::LiveForJob(key) => i.state.is_live() && i.job_key() == Some(key),
                    InstanceQuery::Runner(id) => i.runner_id() == Some(id),
                    InstanceQuery::All => true,
                    InstanceQuery::Live => i.state.is_live(),
                    InstanceQuery::Pooled => i.state.is_live() && i.tag(pool::TAG_POOL).is_some(),
                })
                .collect())
        }
        async fn resolve_image(&self, _: &AmiRef) -> Result<String, PortError> {
            Ok("ami-00000000".into())
        }
        async fn launch(&self, request: &LaunchRequest) -> Result<String, LaunchError> {
            let mut instances = self.instances.lock().unwrap();
            let id = format!("i-{}", instances.len() + 1);
            if request.stop_on_shutdown {
                self.stop_on_shutdown.lock().unwrap().insert(id.clone());
            }
            instances.push(Instance {
                id: id.clone(),
                state: InstanceState::Running,
                launched_at_ms: 0,
                tags: request.tags.iter().cloned().collect(),
            });
            let mut lost = self.lost_launch_answers.lock().unwrap();
            if *lost > 0 {
                *lost -= 1;
                return Err(LaunchError {
                    code: "Unavailable".into(),
                    message: "no answer (dropped connection)".into(),
                });
            }
            Ok(id)
        }
        async fn tag(&self, instance_id: &str, tags: &[(String, String)]) -> Result<(), PortError> {
            let mut instances = self.instances.lock().unwrap();
            let instance = instances.iter_mut().find(|i| i.id == instance_id).unwrap();
            instance.tags.extend(tags.iter().cloned());
            Ok(())
        }
        async fn terminate(&self, instance_id: &str) -> Result<(), PortError> {
            self.terminate_calls
                .lock()
                .unwrap()
                .push(instance_id.into());
            let mut instances = self.instances.lock().unwrap();
            if let Some(i) = instances.iter_mut().find(|i| i.id == instance_id) {
                i.state = InstanceState::Terminated;
            }
            Ok(())
        }
        async fn start(&self, instance_id: &str) -> Result<(), LaunchError> {
            self.start_calls.lock().unwrap().push(instance_id.into());
            let mut refused = self.refused_starts.lock().unwrap();
            if *refused > 0 {
                *refused -= 1;
                return Err(LaunchError {
                    code: "InsufficientInstanceCapacity".into(),
                    message: "scripted".into(),
                });
            }
            let mut instances = self.instances.lock().unwrap();
            let instance = instances.iter_mut().find(|i| i.id == instance_id).unwrap();
            assert!(instance.state.is_live(), "started a terminated instance");
            instance.state = InstanceState::Running;
            Ok(())
        }
    }

    impl TokenVault for &World {
        async fn put(&self, instance_id: &str, _: &Secret) -> Result<(), PortError> {
            self.parameters
                .lock()
                .unwrap()
                .insert(instance_id.into(), 0);
            Ok(())
        }
        async fn delete(&self, instance_id: &str) -> Result<(), PortError> {
            self.parameters.lock().unwrap().remove(instance_id);
            Ok(())
        }
        async fn list(&self) -> Result<Vec<(String, u64)>, PortError> {
            Ok(self
                .parameters
                .lock()
                .unwrap()
                .clone()
                .into_iter()
                .collect())
        }
    }

    impl RunnerApi for &World {
        async fn create(&self, _: &RunnerRequest) -> Result<(u64, Secret), PortError> {
            let mut next = self.next_runner.lock().unwrap();
            *next += 1;
            self.runners.lock().unwrap().insert(100 + *next, false);
            Ok((100 + *next, Secret::new("glrt-test")))
        }
        async fn delete(&self, runner_id: u64) -> Result<(), PortError> {
            self.runners.lock().unwrap().remove(&runner_id);
            Ok(())
        }
        async fn busy(&self, runner_id: u64) -> Result<bool, PortError> {
            Ok(self.runners.lock().unwrap().get(&runner_id) == Some(&true))
        }
    }

    impl RunnerLedger for &World {
        async fn job(&self, key: JobKey) -> Result<Option<JobRecord>, PortError> {
            let jobs = self.jobs.lock().unwrap();
            Ok(jobs.get(&(key.project_id, key.job_id)).cloned())
        }
        async fn note_runner(&self, entry: &RunnerEntry) -> Result<(), PortError> {
            self.registry
                .lock()
                .unwrap()
                .insert(entry.runner_id, entry.clone());
            let mut jobs = self.jobs.lock().unwrap();
            let record = jobs.entry((entry.project_id, entry.job_id)).or_default();
            record.runner_id = Some(entry.runner_id);
            record.instance_id = Some(entry.instance_id.clone());
            Ok(())
        }
        async fn record_running(
            &self,
            key: JobKey,
            _: u64,
            _: &str,
            _: u64,
        ) -> Result<bool, PortError> {
            let mut jobs = self.jobs.lock().unwrap();
            let record = jobs.entry((key.project_id, key.job_id)).or_default();
            if record.phase.is_some_and(|p| p > JobPhase::Running) {
                return Ok(false);
            }
            record.phase = Some(JobPhase::Running);
            Ok(true)
        }
        async fn record_waiting(&self, key: JobKey, cap: &str, _: u64) -> Result<bool, PortError> {
            let jobs = self.jobs.lock().unwrap();
            let record = jobs.get(&(key.project_id, key.job_id));
            let noted = record.is_none_or(|r| r.phase.is_none_or(|p| p < JobPhase::Finished));
            if noted {
                self.waiting.lock().unwrap().push((key, cap.to_owned()));
            }
            Ok(noted)
        }
        async fn runner(&self, runner_id: u64) -> Result<Option<RunnerEntry>, PortError> {
            Ok(self.registry.lock().unwrap().get(&runner_id).cloned())
        }
        async fn runners(&self) -> Result<Vec<RunnerEntry>, PortError> {
            Ok(self.registry.lock().unwrap().values().cloned().collect())
        }
        async fn forget_runner(&self, runner_id: u64) -> Result<(), PortError> {
            self.registry.lock().unwrap().remove(&runner_id);
            Ok(())
        }
        async fn drained(&self) -> Result<Option<Drain>, PortError> {
            Ok(self.drained.lock().unwrap().clone())
        }
        async fn claim_pooled(
            &self,
            instance_id: &str,
            key: JobKey,
            attempt: u32,
            _: u64,
        ) -> Result<bool, PortError> {
            let mut claims = self.pool_claims.lock().unwrap();
            let holder = *claims.entry(instance_id.into()).or_insert((key, attempt));
            Ok(holder == (key, attempt))
        }
    }

    impl World {
        fn ports(
            &self,
            global_cap: u32,
        ) -> FleetPorts<&World, &World, &World, &World, crate::slots::MemorySlots> {
            FleetPorts {
                fleet: self,
                vault: self,
                api: self,
                ledger: self,
                slots: (global_cap > 0).then(|| Capped {
                    store: crate::slots::MemorySlots::default(),
                    caps: crate::slots::SlotCaps::from_values(global_cap, 0),
                }),
            }
        }

        /// The reconciler's claim of a new attempt, as the jobs table keeps it.
        fn claim_attempt(&self, job: &JobEvent, attempt: u32) {
            let mut jobs = self.jobs.lock().unwrap();
            jobs.entry((job.project_id, job.job_id))
                .or_default()
                .attempt = attempt;
        }

        /// GitLab hands the runner another job.
        fn runner_takes_a_job(&self, runner_id: u64) {
            self.runners.lock().unwrap().insert(runner_id, true);
        }

        fn live(&self) -> Vec<Instance> {
            let instances = self.instances.lock().unwrap();
            instances
                .iter()
                .filter(|i| i.state.is_live())
                .cloned()
                .collect()
        }

        fn terminate_outside(&self, instance_id: &str) {
            block_on((&self).terminate(instance_id)).unwrap();
        }

        /// A pooled instance's first boot ends: `shutdown` stops it (it was launched to).
        fn first_boots_end(&self) -> usize {
            let stopping = self.stop_on_shutdown.lock().unwrap();
            let mut instances = self.instances.lock().unwrap();
            let mut stopped = 0;
            for i in instances.iter_mut() {
                let waiting = pool::pool_of(i).is_some();
                if stopping.contains(&i.id) && waiting && i.state == InstanceState::Running {
                    i.state = InstanceState::Stopped;
                    stopped += 1;
                }
            }
            stopped
        }
    }

    fn settings() -> FleetSettings {
        FleetSettings {
            defaults: Ec2Defaults {
                instance_type: "t3.micro".into(),
                ami: AmiRef::Id("ami-00000000".into()),
                market: Market::OnDemand,
                subnets: vec!["subnet-a".into()],
                executor: RunnerExecutor::Docker,
                docker_image: crate::ec2::DEFAULT_DOCKER_IMAGE.into(),
                stack: "ci".into(),
                cost_tags: vec![],
                ami_parameter_prefix: default_ami_parameter_prefix("ci"),
            },
            user_data_template: include_str!("../../../templates/runner-user-data.sh").into(),
            gitlab_url: "https://gitlab.example.com".into(),
            token_parameter_prefix: "/ci/runner-tokens".into(),
            wait_timeout_seconds: 600,
            region: "us-east-1".into(),
            runner: RunnerRelease::default(),
            cache_bucket: None,
            reaper: ReaperSettings {
                max_lifetime_ms: u64::MAX,
                idle_grace_ms: u64::MAX,
            },
            orphan_grace_ms: 0,
        }
    }

    fn provision_now<S: SlotStore>(
        ports: &FleetPorts<&World, &World, &World, &World, S>,
        job: &JobEvent,
    ) -> Provisioned {
        let now = 10 * crate::slots::SLOT_IN_FLIGHT_MS;
        block_on(provision(
            ports,
            &settings(),
            job,
            &Ec2Settings::default(),
            None,
            now,
        ))
        .unwrap()
    }

    fn launched(outcome: &Provisioned) -> (String, u64) {
        match outcome {
            Provisioned::Launched {
                instance_id,
                runner_id,
                ..
            } => (instance_id.clone(), *runner_id),
            other => panic!("expected a launch, got {other:?}"),
        }
    }

    fn slot_held(
        ports: &FleetPorts<&World, &World, &World, &World, crate::slots::MemorySlots>,
    ) -> Vec<(u64, u32)> {
        let slots = ports.slots.as_ref().unwrap();
        let mut held: Vec<_> = block_on(slots.store.held())
            .unwrap()
            .into_iter()
            .map(|s| (s.job.job_id, s.attempt))
            .collect();
        held.sort_unstable();
        held
    }

    fn lambda_grant<S: SlotStore>(
        ports: &FleetPorts<&World, &World, &World, &World, S>,
        job: &JobEvent,
    ) -> (u64, String) {
        let tags = ["unit".to_owned()];
        match block_on(lambda_runner::provision_lambda_runner(
            ports,
            &settings(),
            job,
            Some(&tags),
            0,
        ))
        .unwrap()
        {
            lambda_runner::RunnerGrant::PerJob {
                runner_id,
                token_parameter,
            } => (runner_id, token_parameter),
            other => panic!("expected a per-job runner, got {other:?}"),
        }
    }

    #[test]
    fn a_lambda_runner_is_per_attempt_has_no_instance_and_is_reaped_only_once_unusable() {
        let world = World::default();
        let ports = world.ports(10);
        let job = job_event(1, 10, "unit", JobStatus::Pending);
        let (first, parameter) = lambda_grant(&ports, &job);
        assert_eq!(parameter, "/ci/runner-tokens/lambda-1-10-1");
        assert!(
            world
                .parameters
                .lock()
                .unwrap()
                .contains_key("lambda-1-10-1")
        );
        assert_eq!(
            world.registry.lock().unwrap()[&first].instance_id,
            "lambda-1-10-1"
        );
        assert!(world.live().is_empty() && slot_held(&ports).is_empty());

        // The step again for the same attempt (its token may be lost): a new runner.
        let (second, _) = lambda_grant(&ports, &job);
        assert_ne!(second, first);
        assert_eq!(
            world.runners.lock().unwrap().keys().collect::<Vec<_>>(),
            [&second]
        );
        // A new attempt leaves the older attempt's runner to its invocation.
        world.claim_attempt(&job, 2);
        let (third, third_parameter) = lambda_grant(&ports, &job);
        assert_eq!(third_parameter, "/ci/runner-tokens/lambda-1-10-2");
        assert!(world.runners.lock().unwrap().contains_key(&second));

        // The reaper leaves them while an invocation may still use them, then removes them.
        let usable = lambda_runner::usable_for().as_millis() as u64;
        let early = block_on(reaper_pass(&ports, &settings(), usable - 1)).unwrap();
        assert!(early.orphan_runners.is_empty() && early.stale_parameters.is_empty());
        let late = block_on(reaper_pass(&ports, &settings(), usable)).unwrap();
        assert_eq!(late.orphan_runners, [second, third]);
        assert_eq!(late.stale_parameters.len(), 2);
        assert!(world.runners.lock().unwrap().is_empty());
        assert!(world.parameters.lock().unwrap().is_empty());
        assert!(
            world.terminate_calls.lock().unwrap().is_empty(),
            "no instance to terminate"
        );
    }

    #[test]
    fn a_finished_lambda_job_s_teardown_removes_its_runner_without_terminating_anything() {
        let world = World::default();
        let ports = world.ports(10);
        let job = job_event(1, 10, "unit", JobStatus::Pending);
        let (runner_id, _) = lambda_grant(&ports, &job);
        let finished = JobEvent {
            runner: Some(crate::hook::RunnerRef {
                id: runner_id,
                description: None,
                tags: vec![],
            }),
            ..job_event(1, 10, "unit", JobStatus::Success)
        };
        let answer = JobAnswer::Job {
            status: JobStatus::Success,
            runner_id: Some(runner_id),
        };
        let torn = block_on(teardown(&ports, &finished, &answer)).unwrap();
        assert_eq!(torn.removed.len(), 1, "{torn:?}");
        assert!(world.runners.lock().unwrap().is_empty());
        assert!(world.registry.lock().unwrap().is_empty());
        assert!(world.parameters.lock().unwrap().is_empty());
        assert!(world.terminate_calls.lock().unwrap().is_empty());
    }

    #[test]
    fn a_new_attempt_launches_its_own_runner_while_the_taken_one_runs_another_job() {
        let world = World::default();
        let ports = world.ports(10);
        let a = job_event(1, 10, "build", JobStatus::Pending);
        let (first, r1) = launched(&provision_now(&ports, &a));
        // A retried step of attempt 1 finds its own instance and runner: nothing new.
        assert_eq!(
            provision_now(&ports, &a),
            Provisioned::AlreadyProvisioned {
                instance_id: first.clone(),
                runner_id: r1
            }
        );
        // Job B takes A's runner; the reconciler claims attempt 2 and provisions again.
        world.runner_takes_a_job(r1);
        world.claim_attempt(&a, 2);
        let (second, r2) = launched(&provision_now(&ports, &a));
        assert_ne!((&second, r2), (&first, r1));
        let live = world.live();
        assert_eq!(live.len(), 2, "{live:?}");
        assert_eq!(
            live.iter().map(Instance::attempt).collect::<Vec<_>>(),
            [1, 2]
        );
        assert_eq!(live[1].tag(TAG_ATTEMPT), Some("2"));
        // The taken runner and its instance are left alone: they run B.
        assert!(world.runners.lock().unwrap().contains_key(&r1));
        assert_eq!(world.registry.lock().unwrap()[&r2].attempt, 2);
        assert_eq!(slot_held(&ports), [(10, 1), (10, 2)]);
        assert_eq!(ports.slots.as_ref().unwrap().store.used("global"), 2);
        // A retried step of attempt 2 finds attempt 2's runner: nothing new.
        assert_eq!(
            provision_now(&ports, &a),
            Provisioned::AlreadyProvisioned {
                instance_id: second,
                runner_id: r2
            }
        );
        assert_eq!(world.live().len(), 2);
        assert_eq!(ports.slots.as_ref().unwrap().store.used("global"), 2);
    }

    #[test]
    fn a_drained_fleet_launches_nothing_and_the_job_waits_with_or_without_caps() {
        for cap in [0, 5] {
            let world = World::default();
            let ports = world.ports(cap);
            let job = job_event(1, 10, "build", JobStatus::Pending);
            *world.drained.lock().unwrap() = Some(Drain {
                since_ms: 1,
                by: None,
                reason: None,
            });
            assert_eq!(
                provision_now(&ports, &job),
                Provisioned::WaitingForSlot {
                    waiting_for: CapReached::Drained
                }
            );
            assert!(world.live().is_empty(), "cap {cap}");
            assert!(world.runners.lock().unwrap().is_empty());
            assert_eq!(
                *world.waiting.lock().unwrap(),
                [(JobKey::of(&job), "drained".to_owned())]
            );
            if let Some(slots) = &ports.slots {
                assert_eq!(slots.store.used("global"), 0, "a drained job takes no slot");
            }
            // Undrained: the same job's next provision launches.
            *world.drained.lock().unwrap() = None;
            launched(&provision_now(&ports, &job));
        }
    }

    #[test]
    fn a_second_attempt_waits_for_a_slot_and_each_removal_gives_back_its_attempts_slot() {
        let world = World::default();
        // Cap 3, one slot used by another job (C): A's first attempt takes the last one.
        let ports = world.ports(3);
        let (a, b, c) = (
            job_event(1, 10, "build", JobStatus::Pending),
            job_event(1, 11, "build", JobStatus::Pending),
            job_event(1, 12, "build", JobStatus::Pending),
        );
        launched(&provision_now(&ports, &c));
        let (_, r1) = launched(&provision_now(&ports, &a));
        let (_, rb) = launched(&provision_now(&ports, &b));
        let _ = rb;
        world.runner_takes_a_job(r1);
        world.claim_attempt(&a, 2);
        assert_eq!(
            provision_now(&ports, &a),
            Provisioned::WaitingForSlot {
                waiting_for: CapReached::Global { limit: 3 }
            }
        );
        assert_eq!(world.live().len(), 3);
        assert_eq!(slot_held(&ports), [(10, 1), (11, 1), (12, 1)]);

        // B finished on A's first runner: its teardown removes that instance and gives back
        // the slot it held, attempt 1's.
        let finished_b = JobEvent {
            runner: Some(crate::hook::RunnerRef {
                id: r1,
                description: None,
                tags: vec![],
            }),
            ..job_event(1, 11, "build", JobStatus::Success)
        };
        let answer = JobAnswer::Job {
            status: JobStatus::Success,
            runner_id: Some(r1),
        };
        let torn = block_on(teardown(&ports, &finished_b, &answer)).unwrap();
        assert_eq!(torn.removed.len(), 2, "{torn:?}");
        assert_eq!(slot_held(&ports), [(12, 1)]);

        // Attempt 2 launches in a slot of its own; A's teardown gives back attempt 2's.
        let (_, r2) = launched(&provision_now(&ports, &a));
        assert_eq!(slot_held(&ports), [(10, 2), (12, 1)]);
        let finished_a = JobEvent {
            runner: Some(crate::hook::RunnerRef {
                id: r2,
                description: None,
                tags: vec![],
            }),
            ..job_event(1, 10, "build", JobStatus::Success)
        };
        let answer = JobAnswer::Job {
            status: JobStatus::Success,
            runner_id: Some(r2),
        };
        block_on(teardown(&ports, &finished_a, &answer)).unwrap();
        assert_eq!(slot_held(&ports), [(12, 1)]);
        assert_eq!(ports.slots.as_ref().unwrap().store.used("global"), 1);
    }

    #[test]
    fn a_launch_whose_answer_was_lost_keeps_its_slot_and_its_retry_uses_the_instance() {
        let world = World::default();
        let ports = world.ports(1);
        let (a, b) = (
            job_event(1, 10, "build", JobStatus::Pending),
            job_event(1, 11, "build", JobStatus::Pending),
        );
        *world.lost_launch_answers.lock().unwrap() = 1;
        let step = block_on(provision(
            &ports,
            &settings(),
            &a,
            &Ec2Settings::default(),
            None,
            10 * crate::slots::SLOT_IN_FLIGHT_MS,
        ));
        assert!(
            matches!(step, Err(ProvisionError::LaunchUnavailable { .. })),
            "{step:?}"
        );
        assert_eq!(
            *world.lost_launch_answers.lock().unwrap(),
            0,
            "the fault happened"
        );
        assert_eq!(world.live().len(), 1, "the instance runs all the same");
        // Its slot stays taken: B waits instead of passing the cap of 1.
        assert_eq!(slot_held(&ports), [(10, 1)]);
        assert_eq!(
            provision_now(&ports, &b),
            Provisioned::WaitingForSlot {
                waiting_for: CapReached::Global { limit: 1 }
            }
        );
        assert_eq!(world.live().len(), 1);
        // The step's retry finds A's instance and gives it its runner: nothing new launched.
        let (instance, _) = launched(&provision_now(&ports, &a));
        assert_eq!(world.live().len(), 1);
        assert_eq!(world.live()[0].id, instance);
        assert_eq!(slot_held(&ports), [(10, 1)]);
    }

    #[test]
    fn the_reaper_gives_back_the_slot_of_the_attempt_whose_instance_is_gone() {
        let world = World::default();
        let ports = world.ports(5);
        let a = job_event(1, 10, "build", JobStatus::Pending);
        let (first, r1) = launched(&provision_now(&ports, &a));
        world.runner_takes_a_job(r1);
        world.claim_attempt(&a, 2);
        let (second, _) = launched(&provision_now(&ports, &a));
        // Attempt 2's instance shuts itself down: its slot leaked; attempt 1's still lives.
        world.terminate_outside(&second);
        let now = 20 * crate::slots::SLOT_IN_FLIGHT_MS;
        let report = block_on(reaper_pass(&ports, &settings(), now)).unwrap();
        assert_eq!(report.leaked_slots, ["project#1#job#10#attempt#2"]);
        assert_eq!(slot_held(&ports), [(10, 1)]);
        // The reaper kills attempt 1's instance (past its lifetime): attempt 1's slot.
        let short = FleetSettings {
            reaper: ReaperSettings {
                max_lifetime_ms: 1,
                idle_grace_ms: 1,
            },
            ..settings()
        };
        let report = block_on(reaper_pass(&ports, &short, now)).unwrap();
        assert_eq!(report.killed.len(), 1, "{report:?}");
        assert_eq!(report.killed[0].instance_id, first);
        assert!(slot_held(&ports).is_empty());
        assert_eq!(ports.slots.as_ref().unwrap().store.used("global"), 0);
    }

    fn claim(status: JobStatus, runner_id: Option<u64>) -> HookClaim {
        HookClaim { status, runner_id }
    }

    fn gitlab(status: JobStatus, runner_id: Option<u64>) -> JobAnswer {
        JobAnswer::Job { status, runner_id }
    }

    fn unconfirmed(action: TeardownAction) -> &'static str {
        match action {
            TeardownAction::Unconfirmed(why) => why.code(),
            confirmed => panic!("expected unconfirmed, got {confirmed:?}"),
        }
    }

    #[test]
    fn only_a_finished_job_on_the_named_runner_is_torn_down() {
        // GitLab agrees: the runner is removed if it is ours, left alone if not.
        let hook = claim(JobStatus::Success, Some(7));
        assert_eq!(
            decide_teardown(&hook, &gitlab(JobStatus::Success, Some(7)), true),
            TeardownAction::Confirmed {
                remove: Some(7),
                not_ours: None
            }
        );
        assert_eq!(
            decide_teardown(&hook, &gitlab(JobStatus::Failed, Some(7)), false),
            TeardownAction::Confirmed {
                remove: None,
                not_ours: Some(7)
            }
        );
        // Canceled before any runner took it: nothing ran it, the job's own idle runner goes.
        assert_eq!(
            decide_teardown(
                &claim(JobStatus::Canceled, None),
                &gitlab(JobStatus::Canceled, None),
                false
            ),
            TeardownAction::Confirmed {
                remove: None,
                not_ours: None
            }
        );
        for status in [JobStatus::Skipped, JobStatus::Canceled, JobStatus::Failed] {
            assert!(matches!(
                decide_teardown(&hook, &gitlab(status, Some(7)), true),
                TeardownAction::Confirmed {
                    remove: Some(7),
                    ..
                }
            ));
        }
    }

    #[test]
    fn a_forged_or_unconfirmable_hook_destroys_nothing() {
        let hook = claim(JobStatus::Success, Some(7));
        // The forged hook names a job that is still running, or pending.
        for status in [JobStatus::Running, JobStatus::Pending, JobStatus::Created] {
            assert_eq!(
                unconfirmed(decide_teardown(&hook, &gitlab(status, Some(7)), true)),
                "not_finished"
            );
        }
        // Swept runner ids: GitLab names another runner, or none.
        assert_eq!(
            unconfirmed(decide_teardown(
                &hook,
                &gitlab(JobStatus::Success, Some(8)),
                true
            )),
            "runner_mismatch"
        );
        assert_eq!(
            unconfirmed(decide_teardown(
                &hook,
                &gitlab(JobStatus::Success, None),
                true
            )),
            "runner_mismatch"
        );
        assert_eq!(
            unconfirmed(decide_teardown(
                &claim(JobStatus::Canceled, None),
                &gitlab(JobStatus::Canceled, Some(7)),
                true
            )),
            "runner_mismatch"
        );
        // New job ids GitLab never heard of; GitLab down; no token to ask with.
        assert_eq!(
            unconfirmed(decide_teardown(&hook, &JobAnswer::NotFound, true)),
            "job_not_found"
        );
        assert_eq!(
            unconfirmed(decide_teardown(
                &hook,
                &JobAnswer::Unavailable("502".into()),
                true
            )),
            "gitlab_unavailable"
        );
        let no_token = decide_teardown(&hook, &JobAnswer::NoToken, true);
        let TeardownAction::Unconfirmed(why) = &no_token else {
            panic!("{no_token:?}")
        };
        assert_eq!(why.code(), "no_read_api_token");
        assert!(why.to_string().contains("GitLabApiTokenParameterName"));
    }

    // Warm pool.

    fn pooled_route(size: u32) -> Ec2Settings {
        Ec2Settings {
            warm_pool: Some(size),
            ..Ec2Settings::default()
        }
    }

    fn provision_on(
        ports: &FleetPorts<&World, &World, &World, &World, crate::slots::MemorySlots>,
        job: &JobEvent,
        route: &Ec2Settings,
    ) -> Provisioned {
        let now = 10 * crate::slots::SLOT_IN_FLIGHT_MS;
        block_on(provision(ports, &settings(), job, route, None, now)).unwrap()
    }

    /// Job 1/10 on `route` launches cold and fills its pool; the pooled instance's first boot
    /// ends (stopped, ready).
    fn one_ready_in_the_pool(
        world: &World,
        ports: &FleetPorts<&World, &World, &World, &World, crate::slots::MemorySlots>,
        route: &Ec2Settings,
    ) -> Instance {
        provision_on(ports, &job_event(1, 10, "build", JobStatus::Pending), route);
        world.first_boots_end();
        world.live().into_iter().find(pool::is_ready).unwrap()
    }

    fn pool_report(outcome: &Provisioned) -> PoolReport {
        match outcome {
            Provisioned::Launched {
                warm_pool: Some(report),
                ..
            } => report.clone(),
            other => panic!("expected a launch with a warm pool, got {other:?}"),
        }
    }

    #[test]
    fn a_pooled_instance_serves_the_next_job_and_the_pool_refills_within_the_cap() {
        let world = World::default();
        let ports = world.ports(3);
        let route = pooled_route(2);
        let first = provision_on(
            &ports,
            &job_event(1, 10, "build", JobStatus::Pending),
            &route,
        );
        let report = pool_report(&first);
        assert!(!report.taken, "the pool was empty: a cold launch");
        assert_eq!(report.refilled.len(), 2, "{report:?}");
        assert_eq!(
            world.first_boots_end(),
            2,
            "both pooled instances stop after warming"
        );
        assert!(world.start_calls.lock().unwrap().is_empty());
        let before = world.instances.lock().unwrap().len();

        let job = job_event(1, 11, "build", JobStatus::Pending);
        let second = provision_on(&ports, &job, &route);
        let (instance_id, _) = launched(&second);
        let report = pool_report(&second);
        assert!(report.taken && report.refilled.is_empty(), "{report:?}");
        assert_eq!(
            *world.start_calls.lock().unwrap(),
            std::slice::from_ref(&instance_id)
        );
        let instance = world
            .live()
            .into_iter()
            .find(|i| i.id == instance_id)
            .unwrap();
        assert_eq!(instance.state, InstanceState::Running);
        assert_eq!(
            instance.job_key(),
            Some(JobKey::of(&job)),
            "tagged with its job"
        );
        assert_eq!(instance.tag(pool::TAG_POOL), Some(pool::CLAIMED));
        assert!(instance.runner_id().is_some(), "its runner was delivered");
        // The cap of 3 holds: two jobs' slots and one pooled instance; no refill past it.
        assert_eq!(
            world.instances.lock().unwrap().len(),
            before,
            "nothing launched"
        );
        assert_eq!(
            report.refill_stopped.as_deref(),
            Some("MaxRunnerInstances leaves room for 0 more pooled instances")
        );
        assert_eq!(world.live().len(), 3);
        assert_eq!(slot_held(&ports), [(10, 1), (11, 1)]);
    }

    #[test]
    fn a_pooled_instance_claimed_by_another_provision_is_left_to_it() {
        let world = World::default();
        let ports = world.ports(0);
        let route = pooled_route(1);
        let ready = one_ready_in_the_pool(&world, &ports, &route);
        // Another job's provision claimed it a moment ago (and has not tagged it yet).
        let other = JobKey {
            project_id: 2,
            job_id: 99,
        };
        assert!(block_on((&world).claim_pooled(&ready.id, other, 1, 0)).unwrap());
        let outcome = provision_on(
            &ports,
            &job_event(1, 11, "build", JobStatus::Pending),
            &route,
        );
        let (instance_id, _) = launched(&outcome);
        assert_ne!(instance_id, ready.id, "launched an instance of its own");
        assert!(
            world.start_calls.lock().unwrap().is_empty(),
            "never started"
        );
        assert!(!pool_report(&outcome).taken);
    }

    #[test]
    fn a_pooled_instance_that_cannot_start_is_terminated_and_the_job_launches_cold() {
        let world = World::default();
        let ports = world.ports(0);
        let route = pooled_route(1);
        let ready = one_ready_in_the_pool(&world, &ports, &route);
        *world.refused_starts.lock().unwrap() = 1;
        let outcome = provision_on(
            &ports,
            &job_event(1, 11, "build", JobStatus::Pending),
            &route,
        );
        assert_eq!(
            *world.refused_starts.lock().unwrap(),
            0,
            "the start was refused"
        );
        let (instance_id, _) = launched(&outcome);
        assert_ne!(instance_id, ready.id);
        let report = pool_report(&outcome);
        assert_eq!(report.not_started.len(), 1, "{report:?}");
        assert!(report.not_started[0].starts_with(&ready.id), "{report:?}");
        assert!(world.terminate_calls.lock().unwrap().contains(&ready.id));
        assert_eq!(report.refilled.len(), 1, "and the pool is topped up again");
    }

    #[test]
    fn a_retry_starts_the_pooled_instance_an_interrupted_run_claimed_and_tagged() {
        let world = World::default();
        let ports = world.ports(0);
        let route = pooled_route(1);
        let ready = one_ready_in_the_pool(&world, &ports, &route);
        // The run claimed and tagged it, then died before StartInstances.
        let job = job_event(1, 11, "build", JobStatus::Pending);
        let plan = launch_plan(&job, &route, &settings().defaults, None).unwrap();
        assert!(block_on((&world).claim_pooled(&ready.id, JobKey::of(&job), 1, 0)).unwrap());
        let mut tags = plan.tags.clone();
        tags.push((TAG_ATTEMPT.into(), "1".into()));
        tags.push((pool::TAG_POOL.into(), pool::CLAIMED.into()));
        block_on((&world).tag(&ready.id, &tags)).unwrap();

        let (instance_id, _) = launched(&provision_on(&ports, &job, &route));
        assert_eq!(instance_id, ready.id, "the claimed instance, not a new one");
        assert_eq!(
            *world.start_calls.lock().unwrap(),
            std::slice::from_ref(&ready.id)
        );
        let instance = world.live().into_iter().find(|i| i.id == ready.id).unwrap();
        assert_eq!(instance.state, InstanceState::Running);
    }

    #[test]
    fn the_reaper_keeps_stopped_pooled_instances_for_a_day_and_no_longer() {
        let world = World::default();
        let ports = world.ports(0);
        let ready = one_ready_in_the_pool(&world, &ports, &pooled_route(1));
        // Limits a running instance is far past: the pooled one is still kept.
        let strict = FleetSettings {
            reaper: ReaperSettings {
                max_lifetime_ms: 1,
                idle_grace_ms: 1,
            },
            ..settings()
        };
        let day = pool::POOL_MAX_IDLE_MS;
        let kept = block_on(reaper_pass(&ports, &strict, day - 1)).unwrap();
        assert!(
            kept.killed.iter().all(|k| k.instance_id != ready.id),
            "{kept:?}"
        );
        assert!(
            kept.marked.iter().all(|k| k.instance_id != ready.id),
            "{kept:?}"
        );
        let gone = block_on(reaper_pass(&ports, &strict, day)).unwrap();
        let reaped = gone.killed.iter().find(|k| k.instance_id == ready.id);
        assert_eq!(
            reaped.map(|k| k.why),
            Some("unused in the warm pool for a day")
        );
    }
}
