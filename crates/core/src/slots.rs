//! Caps on EC2 runner instances, with a queue: a job's instance needs a slot, and a job over
//! a cap waits (recorded on its item) instead of failing, until a slot frees.
//!
//! The slots table holds one **counter** item per cap ([`GLOBAL_COUNTER`], and
//! `project#<id>` from [`project_counter`]: attribute [`ATTR_USED`]) and one **slot** item per
//! provision attempt of a job that holds a slot ([`slot_item_key`]: one instance per (job,
//! attempt), see [`crate::fleet`]). Taking a slot is one transaction: put the attempt's
//! slot item if it does not exist ([`SLOT_ABSENT`]) and add 1 to each counter if it stays
//! within its cap ([`BELOW_CAP`]). Giving it back is the reverse transaction, conditioned on
//! the slot item existing ([`SLOT_PRESENT`]). So a counter always equals the number of slot
//! items it counts: a repeated take (a retried provision) takes nothing more, a repeated
//! give-back gives nothing back, and concurrent takes cannot pass a cap (DynamoDB serialises
//! transactions on the same item).
//!
//! A new attempt of a job (the reconciler's, e.g. after another job took the job's runner)
//! takes a slot of its own while the earlier attempt's instance still holds its slot (it runs
//! the other job): two instances, two slots, so the caps still count instances. Each slot is
//! given back with the attempt of the instance that held it (its `attempt` tag); slot items
//! and instances from before attempts were kept apart (no attempt) are attempt 1.
//!
//! What can still go wrong is a **leak**: a slot item whose instance is gone without its
//! give-back (the instance shut itself down and no teardown came, a function died between
//! two calls). The reaper gives those back ([`leaked_slots`]); its give-back is conditioned on
//! the slot's `taken_at_ms` as it read it, and a provision that finds its slot already held
//! refreshes that time ([`claim_slot`]), so a slot in use again is never given back under it.
//!
//! One slot is one instance, also when the same attempt's provision runs twice at once (a
//! duplicate start): the second finds the slot held by the first, which may be launching
//! right now. It takes the slot over only when the hold is older than [`SLOT_IN_FLIGHT_MS`]
//! (no provision runs that long), with a conditional refresh that only one taker can win;
//! otherwise it fails with a retryable error, and its retry finds the first one's instance.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;

use serde::{Deserialize, Serialize};

use crate::jobs::JobKey;
use crate::webhook::PortError;

/// The slots table's key.
pub const ATTR_SLOT_KEY: &str = "slot_key";
/// A counter's count of the slot items it counts.
pub const ATTR_USED: &str = "used";
/// On a slot item: when it was taken (or last found still in use), ms since the epoch.
pub const ATTR_TAKEN_AT_MS: &str = "taken_at_ms";
/// On a slot item: its job and attempt (to find its instance: the instance's tags). A slot
/// item without [`ATTR_ATTEMPT`] (taken before attempts had slots of their own) is attempt 1.
pub const ATTR_PROJECT_ID: &str = "project_id";
pub const ATTR_JOB_ID: &str = "job_id";
pub const ATTR_ATTEMPT: &str = "attempt";

/// The stack-wide counter's key.
pub const GLOBAL_COUNTER: &str = "global";

/// Puts a slot item only if the job holds none (`#key` = [`ATTR_SLOT_KEY`]).
pub const SLOT_ABSENT: &str = "attribute_not_exists(#key)";
/// Gives a slot back only if the job holds one.
pub const SLOT_PRESENT: &str = "attribute_exists(#key)";
/// The reaper's give-back: only the slot as it read it (`:seen` = its [`ATTR_TAKEN_AT_MS`]).
pub const SLOT_UNCHANGED: &str = "attribute_exists(#key) AND #taken = :seen";
/// Takes over a held slot only when its hold is older than a provision can run
/// (`:stale` = now - [`SLOT_IN_FLIGHT_MS`]).
pub const SLOT_STALE: &str = "attribute_exists(#key) AND #taken <= :stale";
/// Adds 1 to a counter only below its cap (`#used` = [`ATTR_USED`], `:cap`).
pub const BELOW_CAP: &str = "attribute_not_exists(#used) OR #used < :cap";

/// Longer than a provision step can run (the template's `Ec2ProvisionFunction` timeout,
/// 120 s, plus a margin): a slot held for less may belong to a provision that is launching.
pub const SLOT_IN_FLIGHT_MS: u64 = 150_000;

/// A project's counter key.
pub fn project_counter(project_id: u64) -> String {
    format!("project#{project_id}")
}

/// An attempt's slot item key: `slot#` and [`slot_name`]. Attempt 1 keeps the key a job's
/// one slot had before attempts had slots of their own, so that a slot taken then is found,
/// refreshed and given back as attempt 1's.
pub fn slot_item_key(key: JobKey, attempt: u32) -> String {
    format!("slot#{}", slot_name(key, attempt))
}

/// An attempt's slot, named for logs and the reaper's report: the job's table key
/// (`project#<id>#job#<id>`), followed by `#attempt#<n>` after the first attempt.
pub fn slot_name(key: JobKey, attempt: u32) -> String {
    if attempt <= 1 {
        key.table_key()
    } else {
        format!("{}#attempt#{attempt}", key.table_key())
    }
}

/// The caps (stack parameters `MaxRunnerInstances`, `MaxRunnerInstancesPerProject`); `None`
/// is no cap. The project counter is kept up to date even without a per-project cap, so that
/// setting one later starts from the right count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SlotCaps {
    pub global: Option<u32>,
    pub per_project: Option<u32>,
}

impl SlotCaps {
    /// From the parameters' values, where 0 means no cap.
    pub fn from_values(global: u32, per_project: u32) -> Self {
        Self {
            global: (global > 0).then_some(global),
            per_project: (per_project > 0).then_some(per_project),
        }
    }

    pub fn is_capped(&self) -> bool {
        self.global.is_some() || self.per_project.is_some()
    }
}

/// The cap that refused a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cap", rename_all = "snake_case")]
pub enum CapReached {
    Global {
        limit: u32,
    },
    Project {
        project_id: u64,
        limit: u32,
    },
    /// The fleet is drained ([`crate::drain`]): a cap of zero for every job, caps or not.
    Drained,
}

impl CapReached {
    /// The counter's key, as recorded on a waiting job's item.
    pub fn counter(&self) -> String {
        match self {
            Self::Global { .. } => GLOBAL_COUNTER.to_owned(),
            Self::Project { project_id, .. } => project_counter(*project_id),
            Self::Drained => crate::drain::DRAINED.to_owned(),
        }
    }
}

impl std::fmt::Display for CapReached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Global { limit } => write!(
                f,
                "the stack's {limit} runner instances are in use (MaxRunnerInstances)"
            ),
            Self::Project { project_id, limit } => write!(
                f,
                "project {project_id}'s {limit} runner instances are in use (MaxRunnerInstancesPerProject)"
            ),
            Self::Drained => f.write_str(
                "the fleet is drained (runner-ops drain): no runner starts until runner-ops undrain",
            ),
        }
    }
}

/// What one take transaction did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotTake {
    Taken,
    /// The attempt already holds a slot (its slot item exists): nothing was counted.
    AlreadyHeld,
    Full(CapReached),
}

/// What a refresh of a held slot found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotRefresh {
    /// The hold was older than the in-flight window: it is now this caller's, from now on.
    TakenOver,
    /// Held more recently: another provision of the attempt may be launching.
    InFlight { taken_at_ms: u64 },
    /// Given back meanwhile.
    Gone,
}

/// A slot item, as the reaper reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldSlot {
    pub job: JobKey,
    /// 1 for a slot item without [`ATTR_ATTEMPT`].
    pub attempt: u32,
    pub taken_at_ms: u64,
}

/// The counters' values (absent counter: 0).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlotUsage {
    pub global: u32,
    pub per_project: BTreeMap<u64, u32>,
}

/// The slots table.
pub trait SlotStore {
    /// One transaction: the attempt's slot item and +1 on each counter, all or nothing.
    fn take(
        &self,
        job: JobKey,
        attempt: u32,
        caps: &SlotCaps,
        now_ms: u64,
    ) -> impl Future<Output = Result<SlotTake, PortError>> + Send;
    /// Sets the slot item's `taken_at_ms` to `now_ms` if it exists and was taken at or before
    /// `stale_ms` ([`SLOT_STALE`]), in one conditional write.
    fn refresh(
        &self,
        job: JobKey,
        attempt: u32,
        now_ms: u64,
        stale_ms: u64,
    ) -> impl Future<Output = Result<SlotRefresh, PortError>> + Send;
    /// One transaction: delete the slot item and -1 on each counter, only if the item exists
    /// (and, with `seen`, still has that `taken_at_ms`). `true` if a slot was given back.
    fn give_back(
        &self,
        job: JobKey,
        attempt: u32,
        seen: Option<u64>,
    ) -> impl Future<Output = Result<bool, PortError>> + Send;
    /// Every slot item.
    fn held(&self) -> impl Future<Output = Result<Vec<HeldSlot>, PortError>> + Send;
    /// The global counter and the counters of `projects`.
    fn usage(&self, projects: &[u64]) -> impl Future<Output = Result<SlotUsage, PortError>> + Send;
}

/// The slots table with the caps it enforces; `FleetPorts::slots` is `None` without caps.
#[derive(Debug, Clone)]
pub struct Capped<S> {
    pub store: S,
    pub caps: SlotCaps,
}

/// What [`claim_slot`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotClaim {
    /// The attempt holds a slot: it may launch. `fresh` when this call took it, not over.
    Granted {
        fresh: bool,
    },
    Full(CapReached),
    /// Another provision of the same attempt took its slot less than [`SLOT_IN_FLIGHT_MS`]
    /// ago and may be launching: launching too would put two instances in one slot.
    InFlight {
        taken_at_ms: u64,
    },
}

/// Takes the attempt's slot, or takes over a hold older than [`SLOT_IN_FLIGHT_MS`] (an
/// earlier run of the attempt's step whose instance is gone) and marks it in use now, so that
/// the reaper does not give it back under a launch. A slot given back between the two calls
/// is taken again. Another attempt's slot is never this one: a new attempt counts anew.
pub async fn claim_slot<S: SlotStore>(
    slots: &Capped<S>,
    job: JobKey,
    attempt: u32,
    now_ms: u64,
) -> Result<SlotClaim, PortError> {
    let stale_ms = now_ms.saturating_sub(SLOT_IN_FLIGHT_MS);
    for _ in 0..2 {
        match slots.store.take(job, attempt, &slots.caps, now_ms).await? {
            SlotTake::Taken => return Ok(SlotClaim::Granted { fresh: true }),
            SlotTake::Full(cap) => return Ok(SlotClaim::Full(cap)),
            SlotTake::AlreadyHeld => {
                match slots.store.refresh(job, attempt, now_ms, stale_ms).await? {
                    SlotRefresh::TakenOver => return Ok(SlotClaim::Granted { fresh: false }),
                    SlotRefresh::InFlight { taken_at_ms } => {
                        return Ok(SlotClaim::InFlight { taken_at_ms });
                    }
                    SlotRefresh::Gone => {}
                }
            }
        }
    }
    Err(PortError(format!(
        "the slot of job {} (attempt {attempt}) was given back twice while it was being taken; the step may be retried",
        job.job_id
    )))
}

/// The slots to give back: held longer than `grace_ms` (longer than a provision can run) by a
/// (job, attempt) that has no live instance (`live`: the live instances' job and `attempt`
/// tags; a live instance of another attempt of the job does not keep this slot). `live` must
/// be listed **before** the slots are read: a launch after the listing refreshed its slot,
/// which the conditioned give-back then spares.
pub fn leaked_slots(
    held: &[HeldSlot],
    live: &HashSet<(JobKey, u32)>,
    now_ms: u64,
    grace_ms: u64,
) -> Vec<HeldSlot> {
    held.iter()
        .filter(|s| !live.contains(&(s.job, s.attempt)))
        .filter(|s| now_ms.saturating_sub(s.taken_at_ms) >= grace_ms)
        .copied()
        .collect()
}

/// Free slots, as the reconciler needs them: `None` is no cap.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FreeSlots {
    pub global: Option<u32>,
    /// Per project asked for; absent from the map: no per-project cap.
    pub per_project: BTreeMap<u64, u32>,
}

impl FreeSlots {
    /// No slot anywhere: what the reconciler counts while the fleet is drained, so that it
    /// starts no waiting job, with caps or without.
    pub fn none() -> Self {
        Self {
            global: Some(0),
            per_project: BTreeMap::new(),
        }
    }
}

/// Free slots from the caps and the counters.
pub fn free_slots(caps: &SlotCaps, usage: &SlotUsage) -> FreeSlots {
    FreeSlots {
        global: caps.global.map(|cap| cap.saturating_sub(usage.global)),
        per_project: match caps.per_project {
            None => BTreeMap::new(),
            Some(cap) => usage
                .per_project
                .iter()
                .map(|(project, used)| (*project, cap.saturating_sub(*used)))
                .collect(),
        },
    }
}

/// Reads the counters for `projects` and turns them into free slots (the reconciler's port
/// call: one read of the global counter and one per project).
pub async fn count_free_slots<S: SlotStore>(
    slots: &Capped<S>,
    projects: &[u64],
) -> Result<FreeSlots, PortError> {
    let mut usage = slots.store.usage(projects).await?;
    for project in projects {
        usage.per_project.entry(*project).or_insert(0);
    }
    Ok(free_slots(&slots.caps, &usage))
}

/// A job that waits for a slot (its item's `waiting_for_slot_since_ms`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaitingJob {
    pub job: JobKey,
    pub waiting_since_ms: u64,
}

/// Which waiting jobs to start now: oldest first, as many as the free slots allow, globally
/// and per project (a project at its cap is skipped, younger jobs of other projects go on).
/// Ties go to the lower job id, so that two passes decide the same.
pub fn jobs_to_start(waiting: &[WaitingJob], free: &FreeSlots) -> Vec<JobKey> {
    let mut queue = waiting.to_vec();
    queue.sort_by_key(|w| (w.waiting_since_ms, w.job.job_id, w.job.project_id));
    let mut global = free.global;
    let mut per_project = free.per_project.clone();
    let mut start = Vec::new();
    for w in queue {
        if global == Some(0) {
            break;
        }
        if let Some(left) = per_project.get_mut(&w.job.project_id) {
            if *left == 0 {
                continue;
            }
            *left -= 1;
        }
        if let Some(left) = global.as_mut() {
            *left -= 1;
        }
        start.push(w.job);
    }
    start
}

/// The slots table in memory, with the same all-or-nothing transactions: for the core's tests
/// and the reconciler's.
#[derive(Debug, Default)]
pub struct MemorySlots {
    state: std::sync::Mutex<MemoryState>,
}

#[derive(Debug, Default)]
struct MemoryState {
    counters: BTreeMap<String, u32>,
    items: std::collections::HashMap<(JobKey, u32), u64>,
}

impl MemorySlots {
    /// A counter's value (0 when absent).
    pub fn used(&self, counter: &str) -> u32 {
        let state = self.state.lock().unwrap();
        state.counters.get(counter).copied().unwrap_or(0)
    }

    pub fn slot_items(&self) -> usize {
        self.state.lock().unwrap().items.len()
    }
}

impl SlotStore for MemorySlots {
    async fn take(
        &self,
        job: JobKey,
        attempt: u32,
        caps: &SlotCaps,
        now_ms: u64,
    ) -> Result<SlotTake, PortError> {
        let mut state = self.state.lock().unwrap();
        if state.items.contains_key(&(job, attempt)) {
            return Ok(SlotTake::AlreadyHeld);
        }
        let project = project_counter(job.project_id);
        let used = |key: &str| state.counters.get(key).copied().unwrap_or(0);
        if let Some(limit) = caps.global.filter(|cap| used(GLOBAL_COUNTER) >= *cap) {
            return Ok(SlotTake::Full(CapReached::Global { limit }));
        }
        if let Some(limit) = caps.per_project.filter(|cap| used(&project) >= *cap) {
            return Ok(SlotTake::Full(CapReached::Project {
                project_id: job.project_id,
                limit,
            }));
        }
        state.items.insert((job, attempt), now_ms);
        *state.counters.entry(GLOBAL_COUNTER.to_owned()).or_default() += 1;
        *state.counters.entry(project).or_default() += 1;
        Ok(SlotTake::Taken)
    }

    async fn refresh(
        &self,
        job: JobKey,
        attempt: u32,
        now_ms: u64,
        stale_ms: u64,
    ) -> Result<SlotRefresh, PortError> {
        let mut state = self.state.lock().unwrap();
        Ok(match state.items.get_mut(&(job, attempt)) {
            None => SlotRefresh::Gone,
            Some(taken) if *taken <= stale_ms => {
                *taken = now_ms;
                SlotRefresh::TakenOver
            }
            Some(taken) => SlotRefresh::InFlight {
                taken_at_ms: *taken,
            },
        })
    }

    async fn give_back(
        &self,
        job: JobKey,
        attempt: u32,
        seen: Option<u64>,
    ) -> Result<bool, PortError> {
        let mut state = self.state.lock().unwrap();
        match state.items.get(&(job, attempt)) {
            Some(taken) if seen.is_none_or(|s| s == *taken) => {}
            _ => return Ok(false),
        }
        state.items.remove(&(job, attempt));
        for counter in [GLOBAL_COUNTER.to_owned(), project_counter(job.project_id)] {
            let used = state.counters.entry(counter).or_default();
            *used = used.saturating_sub(1);
        }
        Ok(true)
    }

    async fn held(&self) -> Result<Vec<HeldSlot>, PortError> {
        let state = self.state.lock().unwrap();
        Ok(state
            .items
            .iter()
            .map(|((job, attempt), taken_at_ms)| HeldSlot {
                job: *job,
                attempt: *attempt,
                taken_at_ms: *taken_at_ms,
            })
            .collect())
    }

    async fn usage(&self, projects: &[u64]) -> Result<SlotUsage, PortError> {
        let state = self.state.lock().unwrap();
        let used = |key: &str| state.counters.get(key).copied().unwrap_or(0);
        Ok(SlotUsage {
            global: used(GLOBAL_COUNTER),
            per_project: projects
                .iter()
                .map(|p| (*p, used(&project_counter(*p))))
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::block_on;

    fn job(project_id: u64, job_id: u64) -> JobKey {
        JobKey { project_id, job_id }
    }

    fn capped(global: u32, per_project: u32) -> Capped<MemorySlots> {
        Capped {
            store: MemorySlots::default(),
            caps: SlotCaps::from_values(global, per_project),
        }
    }

    #[test]
    fn a_repeated_claim_takes_no_second_slot_and_a_repeated_give_back_gives_nothing() {
        let slots = capped(2, 0);
        let later = 100 + SLOT_IN_FLIGHT_MS;
        block_on(async {
            let first = claim_slot(&slots, job(1, 10), 1, 100).await.unwrap();
            // A duplicate while the first may still be launching: refused, nothing counted.
            let twin = claim_slot(&slots, job(1, 10), 1, 200).await.unwrap();
            // A later attempt (the first one's instance is gone): takes the hold over.
            let again = claim_slot(&slots, job(1, 10), 1, later).await.unwrap();
            assert_eq!(first, SlotClaim::Granted { fresh: true });
            assert_eq!(twin, SlotClaim::InFlight { taken_at_ms: 100 });
            assert_eq!(again, SlotClaim::Granted { fresh: false });
            assert_eq!(slots.store.used(GLOBAL_COUNTER), 1);
            // The takeover marked the slot in use now, and a second one at once is refused.
            assert_eq!(slots.store.held().await.unwrap()[0].taken_at_ms, later);
            let twin = claim_slot(&slots, job(1, 10), 1, later + 1).await.unwrap();
            assert_eq!(twin, SlotClaim::InFlight { taken_at_ms: later });
            assert!(slots.store.give_back(job(1, 10), 1, None).await.unwrap());
            assert!(!slots.store.give_back(job(1, 10), 1, None).await.unwrap());
            assert_eq!(slots.store.used(GLOBAL_COUNTER), 0);
            assert_eq!(slots.store.used("project#1"), 0);
        });
    }

    #[test]
    fn each_attempt_of_a_job_takes_its_own_slot_within_the_cap() {
        // Cap 2, one used by another job: the job's first attempt takes the last slot, its
        // second attempt (the first one's instance runs another job) waits.
        let slots = capped(2, 0);
        let now = 10 * SLOT_IN_FLIGHT_MS;
        block_on(async {
            claim_slot(&slots, job(2, 20), 1, 0).await.unwrap();
            let first = claim_slot(&slots, job(1, 10), 1, now).await.unwrap();
            assert_eq!(first, SlotClaim::Granted { fresh: true });
            let second = claim_slot(&slots, job(1, 10), 2, now).await.unwrap();
            assert_eq!(second, SlotClaim::Full(CapReached::Global { limit: 2 }));
            assert_eq!(slots.store.used(GLOBAL_COUNTER), 2);
            // A slot frees (the other job's instance is removed): attempt 2 takes one of its
            // own, fresh, not attempt 1's (which stays held by attempt 1's instance).
            assert!(slots.store.give_back(job(2, 20), 1, None).await.unwrap());
            let second = claim_slot(&slots, job(1, 10), 2, now).await.unwrap();
            assert_eq!(second, SlotClaim::Granted { fresh: true });
            assert_eq!(slots.store.used(GLOBAL_COUNTER), 2);
            assert_eq!(slots.store.used("project#1"), 2);
            assert_eq!(slots.store.slot_items(), 2);
            // A retry of attempt 2's step while it may be launching: no third slot.
            let twin = claim_slot(&slots, job(1, 10), 2, now + 1).await.unwrap();
            assert_eq!(twin, SlotClaim::InFlight { taken_at_ms: now });
            // Each give-back frees the slot of its own attempt only.
            assert!(slots.store.give_back(job(1, 10), 1, None).await.unwrap());
            assert!(!slots.store.give_back(job(1, 10), 1, None).await.unwrap());
            assert_eq!(slots.store.used(GLOBAL_COUNTER), 1);
            let held = slots.store.held().await.unwrap();
            assert_eq!((held.len(), held[0].attempt), (1, 2));
            assert!(slots.store.give_back(job(1, 10), 2, None).await.unwrap());
            assert_eq!(slots.store.used(GLOBAL_COUNTER), 0);
            assert_eq!(slots.store.used("project#1"), 0);
        });
        // Attempt 1 keeps the key of a job's one slot from before attempts had their own.
        assert_eq!(slot_item_key(job(1, 10), 1), "slot#project#1#job#10");
        assert_eq!(
            slot_item_key(job(1, 10), 3),
            "slot#project#1#job#10#attempt#3"
        );
    }

    #[test]
    fn a_slot_whose_attempt_has_no_live_instance_leaks_even_if_another_attempt_lives() {
        let held = [
            HeldSlot {
                job: job(1, 1),
                attempt: 1,
                taken_at_ms: 0,
            },
            HeldSlot {
                job: job(1, 1),
                attempt: 2,
                taken_at_ms: 0,
            },
        ];
        // Attempt 1's instance lives (it runs another job); attempt 2's is gone.
        let live: HashSet<(JobKey, u32)> = [(job(1, 1), 1)].into();
        assert_eq!(leaked_slots(&held, &live, 1_000, 600), [held[1]]);
        let live: HashSet<(JobKey, u32)> = [(job(1, 1), 2)].into();
        assert_eq!(leaked_slots(&held, &live, 1_000, 600), [held[0]]);
    }

    #[test]
    fn concurrent_claims_never_pass_the_cap_nor_grant_one_slot_twice() {
        // 12 threads, 3 claims each (a job claimed three times), global cap 5.
        let slots = std::sync::Arc::new(capped(5, 0));
        let granted = std::sync::atomic::AtomicU32::new(0);
        std::thread::scope(|scope| {
            for n in 0..12u64 {
                let (slots, granted) = (slots.clone(), &granted);
                scope.spawn(move || {
                    for _ in 0..3 {
                        let now = 10 * SLOT_IN_FLIGHT_MS + n;
                        let claim = block_on(claim_slot(&slots, job(1, n), 1, now)).unwrap();
                        if matches!(claim, SlotClaim::Granted { .. }) {
                            granted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                    }
                });
            }
        });
        assert_eq!(granted.into_inner(), 5);
        assert_eq!(slots.store.used(GLOBAL_COUNTER), 5);
        assert_eq!(slots.store.slot_items(), 5);
    }

    #[test]
    fn the_project_cap_refuses_its_project_only_and_names_the_parameter() {
        let slots = capped(10, 2);
        block_on(async {
            for n in 0..2 {
                claim_slot(&slots, job(7, n), 1, 0).await.unwrap();
            }
            let full = claim_slot(&slots, job(7, 9), 1, 0).await.unwrap();
            let cap = CapReached::Project {
                project_id: 7,
                limit: 2,
            };
            assert_eq!(full, SlotClaim::Full(cap));
            assert_eq!(cap.counter(), "project#7");
            assert!(cap.to_string().contains("MaxRunnerInstancesPerProject"));
            let other = claim_slot(&slots, job(8, 1), 1, 0).await.unwrap();
            assert_eq!(other, SlotClaim::Granted { fresh: true });
            assert_eq!(slots.store.used(GLOBAL_COUNTER), 3);
        });
        let global = capped(1, 0);
        block_on(async {
            claim_slot(&global, job(1, 1), 1, 0).await.unwrap();
            let full = claim_slot(&global, job(2, 2), 1, 0).await.unwrap();
            assert_eq!(full, SlotClaim::Full(CapReached::Global { limit: 1 }));
        });
    }

    #[test]
    fn the_reaper_gives_back_old_slots_of_jobs_without_an_instance_only() {
        let held = [
            HeldSlot {
                job: job(1, 1),
                attempt: 1,
                taken_at_ms: 0,
            },
            HeldSlot {
                job: job(1, 2),
                attempt: 1,
                taken_at_ms: 0,
            },
            HeldSlot {
                job: job(1, 3),
                attempt: 1,
                taken_at_ms: 900,
            },
        ];
        let live: HashSet<(JobKey, u32)> = [(job(1, 2), 1)].into();
        let leaked = leaked_slots(&held, &live, 1_000, 600);
        assert_eq!(
            leaked,
            [held[0]],
            "1 has no instance; 2 has one; 3 is young"
        );

        // A slot taken over after the reaper read it is spared by the conditioned give-back.
        let slots = capped(5, 0);
        let later = SLOT_IN_FLIGHT_MS;
        block_on(async {
            claim_slot(&slots, job(1, 1), 1, 0).await.unwrap();
            claim_slot(&slots, job(1, 1), 1, later).await.unwrap();
            assert!(!slots.store.give_back(job(1, 1), 1, Some(0)).await.unwrap());
            assert!(
                slots
                    .store
                    .give_back(job(1, 1), 1, Some(later))
                    .await
                    .unwrap()
            );
        });
    }

    #[test]
    fn waiting_jobs_start_oldest_first_within_the_free_slots() {
        let slots = capped(4, 2);
        block_on(async {
            claim_slot(&slots, job(7, 1), 1, 0).await.unwrap();
            claim_slot(&slots, job(7, 2), 1, 0).await.unwrap();
        });
        let free = block_on(count_free_slots(&slots, &[7, 8])).unwrap();
        assert_eq!(free.global, Some(2));
        assert_eq!(free.per_project, BTreeMap::from([(7, 0), (8, 2)]));
        let waiting = [
            WaitingJob {
                job: job(8, 30),
                waiting_since_ms: 30,
            },
            WaitingJob {
                job: job(7, 3),
                waiting_since_ms: 5,
            },
            WaitingJob {
                job: job(8, 20),
                waiting_since_ms: 20,
            },
            WaitingJob {
                job: job(8, 40),
                waiting_since_ms: 40,
            },
        ];
        // Project 7 is at its cap: its older job waits; 8's two oldest take the 2 free slots.
        assert_eq!(jobs_to_start(&waiting, &free), [job(8, 20), job(8, 30)]);
        // Without caps every waiting job starts, oldest first.
        let all = jobs_to_start(&waiting, &FreeSlots::default());
        assert_eq!(all, [job(7, 3), job(8, 20), job(8, 30), job(8, 40)]);
        assert!(jobs_to_start(&waiting, &FreeSlots::none()).is_empty());
        // Drained: a cap of its own, recorded and explained as such.
        assert_eq!(CapReached::Drained.counter(), "drained");
        assert!(CapReached::Drained.to_string().contains("undrain"));
        assert_eq!(
            serde_json::to_value(CapReached::Drained).unwrap(),
            serde_json::json!({"cap": "drained"})
        );
    }
}
