//! Warm pool: per route, up to `warm_pool` stopped instances, booted once from the route's
//! AMI and user-data, that a provision starts (`StartInstances`, seconds) instead of launching
//! one (`RunInstances` and a first boot, a minute or more).
//!
//! - **Which pool.** Instances are interchangeable when they were launched alike: the
//!   [`PoolKey`] hashes the instance type, the resolved image id, the subnets and the pooled
//!   user-data (executor, default image, privileged, runner version, cache). A changed route
//!   or a new AMI is a new pool; the old one's instances expire ([`POOL_MAX_IDLE_MS`]).
//! - **Warming.** A pooled instance is launched on demand (a stopped spot instance would need
//!   a persistent request) with no job, tagged [`TAG_POOL`] = its key, with shutdown behaviour
//!   `stop`: its first boot installs and verifies what the user-data needs and stops it. It
//!   holds no runner and no token while it waits: the runner is created after a job claims it.
//! - **Taking.** A provision that holds its job's slot lists the pool, claims a stopped
//!   instance in the jobs table ([`crate::fleet::RunnerLedger::claim_pooled`]: one conditional
//!   write, so two provisions never share one), tags it with the job (and [`TAG_POOL`] =
//!   [`CLAIMED`]) and starts it; from there it is the job's instance like a launched one: the
//!   runner, its token, teardown and the reaper treat it the same, and it serves one job only
//!   (its teardown terminates it). If it cannot be started, it is terminated and the provision
//!   launches as it would without a pool.
//! - **Refilling.** After each provision on the route, the pool is topped up to its size.
//!   Concurrent provisions may each top it up, so it can exceed its size by the number that ran
//!   at once; the surplus serves the next jobs. A route's pool fills on its first job.
//! - **Caps.** A pooled instance runs only for a job that holds its own slot, so the caps count
//!   every running instance as before. Stopped pooled instances count against
//!   `MaxRunnerInstances` when the pool is refilled: it refills only while running and pooled
//!   instances together stay below the cap (a check before the launches, not a transaction:
//!   concurrent refills may pass it by the instances they launch at once; those only wait,
//!   stopped, and start only in a job's slot).
//! - **Idle cost.** Stopped, an instance costs its EBS volume only (docs/ec2-runners.md).
//!   The reaper terminates a pooled instance that has waited [`POOL_MAX_IDLE_MS`], and one that
//!   never stopped after its first boot like any instance that never picked a job.

use std::fmt;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::ec2::{LaunchPlan, TAG_ATTEMPT, TAG_JOB_ID, TAG_PROJECT_ID};
use crate::fleet::{
    Fleet, FleetPorts, Instance, InstanceQuery, InstanceState, LaunchRequest, RunnerLedger,
};
use crate::jobs::JobKey;
use crate::mapping::Market;
use crate::slots::SlotStore;
use crate::webhook::PortError;

/// On a pooled instance: its [`PoolKey`]; [`CLAIMED`] once a provision took it for a job.
pub const TAG_POOL: &str = "ephemeral-runners:pool";
/// [`TAG_POOL`]'s value on an instance taken for a job: no longer listed as ready.
pub const CLAIMED: &str = "claimed";
/// A pooled instance unused this long is terminated (its AMI may be stale, and a route that
/// no longer runs jobs should not pay for volumes): a route's first job after a quiet day
/// launches cold and refills the pool.
pub const POOL_MAX_IDLE_MS: u64 = 24 * 3_600_000;

/// Which instances are interchangeable: a hash of everything a launch is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PoolKey([u8; 8]);

impl PoolKey {
    pub fn of(plan: &LaunchPlan, image_id: &str, pooled_user_data: &str) -> Self {
        let mut hash = Sha256::new();
        for part in [plan.instance_type.as_str(), image_id, pooled_user_data] {
            hash.update(part.len().to_le_bytes());
            hash.update(part);
        }
        for subnet in subnets(plan) {
            hash.update(subnet.len().to_le_bytes());
            hash.update(subnet);
        }
        let digest = hash.finalize();
        let mut key = [0; 8];
        key.copy_from_slice(&digest[..8]);
        Self(key)
    }
}

impl fmt::Display for PoolKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// The plan's subnets, each once, in order (a spot plan lists each twice).
fn subnets(plan: &LaunchPlan) -> Vec<&str> {
    let mut out: Vec<&str> = Vec::new();
    for (subnet, _) in &plan.attempts {
        if !out.contains(&subnet.as_str()) {
            out.push(subnet);
        }
    }
    out
}

/// The pool an instance waits in: its [`TAG_POOL`] value while unclaimed and launched for
/// no job (`None` for every other instance).
pub fn pool_of(instance: &Instance) -> Option<&str> {
    instance
        .tag(TAG_POOL)
        .filter(|v| *v != CLAIMED)
        .filter(|_| instance.job_key().is_none())
}

/// Waiting stopped in the pool: ready to be started for a job.
pub fn is_ready(instance: &Instance) -> bool {
    instance.state == InstanceState::Stopped && pool_of(instance).is_some()
}

/// What the provision did with the route's warm pool (in its output).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PoolReport {
    pub pool: String,
    /// The job's instance came from the pool.
    pub taken: bool,
    /// Pooled instances that could not be started (terminated instead): `<id>: <error>`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_started: Vec<String>,
    /// Instances launched to refill the pool.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub refilled: Vec<String>,
    /// Why the pool was not (fully) refilled, when something stopped it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refill_stopped: Option<String>,
}

/// Takes a ready instance of `pool` for the job's attempt: claims it, tags it with the job,
/// starts it. `None` when no ready instance could be claimed and started (the ones that could
/// not be started are terminated and noted in `report`).
pub(crate) async fn take<F: Fleet, V, A, L: RunnerLedger, S>(
    ports: &FleetPorts<F, V, A, L, S>,
    plan: &LaunchPlan,
    key: JobKey,
    attempt: u32,
    pool: PoolKey,
    now_ms: u64,
    report: &mut PoolReport,
) -> Result<Option<String>, PortError> {
    let pool = pool.to_string();
    let listed = ports.fleet.instances(InstanceQuery::Pooled).await?;
    let ready = listed
        .iter()
        .filter(|i| is_ready(i) && pool_of(i) == Some(pool.as_str()));
    for instance in ready {
        if !ports
            .ledger
            .claim_pooled(&instance.id, key, attempt, now_ms)
            .await?
        {
            continue; // another provision's
        }
        let mut tags = plan.tags.clone();
        tags.push((TAG_POOL.to_owned(), CLAIMED.to_owned()));
        ports.fleet.tag(&instance.id, &tags).await?;
        match ports.fleet.start(&instance.id).await {
            Ok(()) => {
                report.taken = true;
                return Ok(Some(instance.id.clone()));
            }
            Err(error) => {
                // Claimed and tagged with the job: it must not stay behind, stopped.
                let _ = ports.fleet.terminate(&instance.id).await;
                report.not_started.push(format!("{}: {error}", instance.id));
            }
        }
    }
    Ok(None)
}

/// Tops `pool` up to the plan's `warm_pool` instances (ready or still warming, `taken` not
/// counted: it was listed before it was claimed), within the global cap: see the module
/// documentation. Launch failures stop the refill and are noted, never failing the job's
/// provision, which has its runner by now.
pub(crate) async fn refill<F: Fleet, V, A, L, S: SlotStore>(
    ports: &FleetPorts<F, V, A, L, S>,
    plan: &LaunchPlan,
    (pool, image_id, pooled_user_data): (PoolKey, &str, &str),
    now_ms: u64,
    report: &mut PoolReport,
) {
    let pool_text = pool.to_string();
    let listed = match ports.fleet.instances(InstanceQuery::Pooled).await {
        Ok(listed) => listed,
        Err(e) => {
            report.refill_stopped = Some(format!("listing the pool: {e}"));
            return;
        }
    };
    let waiting: Vec<&Instance> = listed.iter().filter(|i| pool_of(i).is_some()).collect();
    let in_pool = waiting
        .iter()
        .filter(|i| pool_of(i) == Some(pool_text.as_str()))
        .count();
    let mut wanted = (plan.warm_pool as usize).saturating_sub(in_pool);
    if let Some(room) = room_under_cap(ports, waiting.len()).await {
        match room {
            Ok(room) if room < wanted => {
                report.refill_stopped = Some(format!(
                    "MaxRunnerInstances leaves room for {room} more pooled instances"
                ));
                wanted = room;
            }
            Ok(_) => {}
            Err(e) => {
                report.refill_stopped = Some(format!("reading the slot counters: {e}"));
                return;
            }
        }
    }
    let mut request = LaunchRequest {
        instance_type: plan.instance_type.clone(),
        image_id: image_id.to_owned(),
        subnet: String::new(),
        market: Market::OnDemand,
        tags: stack_tags(plan),
        user_data: pooled_user_data.to_owned(),
        client_token: String::new(),
        stop_on_shutdown: true,
    };
    request.tags.push((TAG_POOL.to_owned(), pool_text.clone()));
    request.tags.push((
        "Name".to_owned(),
        format!("ephemeral-runner pool {pool_text}"),
    ));
    for n in 0..wanted {
        // Unique per instance: EC2 answers a repeated token with the instance it launched.
        request.client_token = format!("pool-{pool_text}-{now_ms}-{n}");
        match launch_pooled(ports, plan, &mut request).await {
            Ok(id) => report.refilled.push(id),
            Err(why) => {
                report.refill_stopped = Some(why);
                return;
            }
        }
    }
}

/// How many more pooled instances the global cap leaves room for, with `pooled` waiting now
/// (`None`: no global cap).
async fn room_under_cap<F, V, A, L, S: SlotStore>(
    ports: &FleetPorts<F, V, A, L, S>,
    pooled: usize,
) -> Option<Result<usize, PortError>> {
    let slots = ports.slots.as_ref()?;
    let cap = slots.caps.global? as usize;
    Some(
        slots
            .store
            .usage(&[])
            .await
            .map(|usage| cap.saturating_sub(usage.global as usize + pooled)),
    )
}

/// One pooled instance, in the first of the plan's subnets with capacity.
async fn launch_pooled<F: Fleet, V, A, L, S>(
    ports: &FleetPorts<F, V, A, L, S>,
    plan: &LaunchPlan,
    request: &mut LaunchRequest,
) -> Result<String, String> {
    let mut tried = Vec::new();
    for subnet in subnets(plan) {
        request.subnet = subnet.to_owned();
        match ports.fleet.launch(request).await {
            Ok(id) => return Ok(id),
            Err(e) => tried.push(format!("{subnet}: {e}")),
        }
    }
    Err(format!("no pooled instance launched: {}", tried.join("; ")))
}

/// The plan's tags that are the stack's, not the job's: what a pooled instance carries.
pub fn stack_tags(plan: &LaunchPlan) -> Vec<(String, String)> {
    plan.tags
        .iter()
        .filter(|(k, _)| ![TAG_JOB_ID, TAG_PROJECT_ID, TAG_ATTEMPT, "Name"].contains(&k.as_str()))
        .cloned()
        .collect()
}
