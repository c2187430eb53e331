//! The jobs table's contract, owned here and nowhere else: its key, every attribute name,
//! the phase ranks and the condition expressions that keep phases moving forward and
//! attempts unique. The router, the EC2 functions, the reconciler and the state machines'
//! DynamoDB tasks all write this table; the adapters build their requests from these names,
//! and a contract test reads `statemachine/*.asl.json` to check the names and ranks the
//! definitions spell out.

use serde_json::Value;

use crate::jobs::{JobKey, JobPhase};
use crate::reconcile::JobRecord;

/// The partition key: `project#<id>#job#<id>` ([`JobKey::table_key`]).
pub const KEY: &str = "job_key";

/// Attribute names, grouped by who writes them.
pub mod attr {
    // The router (from hooks) and the EC2 provision step (Running).
    pub const PHASE: &str = "phase";
    pub const PHASE_RANK: &str = "phase_rank";
    pub const LAST_STATUS: &str = "last_status";
    pub const PROJECT_ID: &str = "project_id";
    pub const PROJECT_PATH: &str = "project_path";
    pub const JOB_ID: &str = "job_id";
    pub const JOB_NAME: &str = "job_name";
    pub const UPDATED_AT_MS: &str = "updated_at_ms";
    /// DynamoDB TTL, in seconds.
    pub const EXPIRES_AT: &str = "expires_at";
    /// The runner that ran the job, from the hook: teardown follows it.
    pub const RUNNER_ID: &str = "runner_id";
    /// The router, from the job's first running hook: when it was handled (ms since the
    /// epoch; set once, so a repeated hook is counted once), and GitLab's `queued_duration`
    /// in ms (absent when the hook had none).
    pub const PICKED_UP_AT_MS: &str = "picked_up_at_ms";
    pub const QUEUED_DURATION_MS: &str = "queued_duration_ms";
    /// The provision step, when it first had the job's runner ready (an EC2 instance launched
    /// with its runner and token, or a Lambda job's runner made): the router's
    /// `ReadyToRunning` runs from here to the job's first running hook.
    pub const RUNNER_READY_AT_MS: &str = "runner_ready_at_ms";
    // The provision workflow.
    pub const ROUTE_TYPE: &str = "route_type";
    pub const ROUTE_MATCHED: &str = "route_matched";
    pub const PROVISION_ERROR: &str = "provision_error";
    pub const PROVISION_CAUSE: &str = "provision_cause";
    /// Why the workflow provisioned nothing: the mapper's reason when GitLab does not have
    /// the job waiting for a runner (its answer `type` SKIP).
    pub const PROVISION_SKIPPED: &str = "provision_skipped";
    // The EC2 provision step.
    pub const LAUNCHED_RUNNER_ID: &str = "launched_runner_id";
    pub const INSTANCE_ID: &str = "instance_id";
    /// When the job first found no free slot (ms since the epoch; kept while it waits, removed
    /// when its runner is recorded): the reconciler starts waiting jobs oldest first by it.
    pub const WAITING_FOR_SLOT_SINCE_MS: &str = "waiting_for_slot_since_ms";
    /// The counter of the cap it waits for: `global` or `project#<id>`
    /// ([`crate::slots::CapReached::counter`]).
    pub const WAITING_FOR_SLOT_CAP: &str = "waiting_for_slot_cap";
    // The teardown workflow.
    pub const TEARDOWN_ERROR: &str = "teardown_error";
    pub const TEARDOWN_CAUSE: &str = "teardown_cause";
    // The reconciler.
    pub const ATTEMPT: &str = "attempt";
    pub const ATTEMPT_STARTED_AT_MS: &str = "attempt_started_at_ms";
    pub const RECONCILE_REASON: &str = "reconcile_reason";
    pub const GAVE_UP_AT_MS: &str = "gave_up_at_ms";
    /// Attempts that were starts from the slot queue (not counted toward the limit).
    pub const SLOT_STARTS: &str = "slot_starts";
}

/// Every attribute a job's item may hold, the key included.
pub const ALL: &[&str] = &[
    KEY,
    attr::PHASE,
    attr::PHASE_RANK,
    attr::LAST_STATUS,
    attr::PROJECT_ID,
    attr::PROJECT_PATH,
    attr::JOB_ID,
    attr::JOB_NAME,
    attr::UPDATED_AT_MS,
    attr::EXPIRES_AT,
    attr::RUNNER_ID,
    attr::PICKED_UP_AT_MS,
    attr::QUEUED_DURATION_MS,
    attr::ROUTE_TYPE,
    attr::ROUTE_MATCHED,
    attr::PROVISION_ERROR,
    attr::PROVISION_CAUSE,
    attr::PROVISION_SKIPPED,
    attr::LAUNCHED_RUNNER_ID,
    attr::INSTANCE_ID,
    attr::WAITING_FOR_SLOT_SINCE_MS,
    attr::WAITING_FOR_SLOT_CAP,
    attr::TEARDOWN_ERROR,
    attr::TEARDOWN_CAUSE,
    attr::ATTEMPT,
    attr::ATTEMPT_STARTED_AT_MS,
    attr::RECONCILE_REASON,
    attr::GAVE_UP_AT_MS,
    attr::SLOT_STARTS,
];

/// Moves a job's phase forward only: written with `:rank` = the target's rank.
pub const ADVANCE_CONDITION: &str = "attribute_not_exists(phase_rank) OR phase_rank < :rank";

/// Records a job's first running hook only: a repeated one (EventBridge delivers at least
/// once, Lambda retries) finds `picked_up_at_ms` set and records and emits nothing.
pub const PICKUP_CONDITION: &str = "attribute_not_exists(picked_up_at_ms)";

/// Records a job as waiting for a slot only while it has not finished (`:finished` is that
/// rank): a late provision never marks a finished job as waiting.
pub const WAITING_CONDITION: &str = "attribute_not_exists(phase_rank) OR phase_rank < :finished";

/// Claims attempt `:attempt` once. An item without `attempt` had the router's start as
/// attempt 1 if its phase reached provisioning (`:provisioning` is that rank), else none;
/// with `attempt`, only a higher one may be claimed. `:one` is 1.
pub const CLAIM_ATTEMPT_CONDITION: &str = "(attribute_not_exists(attempt) AND (attribute_not_exists(phase_rank) OR phase_rank < :provisioning OR :attempt > :one)) OR attempt < :attempt";

/// What the reconciler reads of an item (given as JSON, the way `ephemeral_aws::item_to_json`
/// turns a DynamoDB item into one: numbers as numbers or numeric strings).
pub fn record_of(item: &Value) -> JobRecord {
    let number = |name: &str| -> Option<u64> {
        match item.get(name)? {
            Value::Number(n) => n.as_u64(),
            Value::String(s) => s.parse().ok(),
            _ => None,
        }
    };
    let text = |name: &str| item.get(name).and_then(Value::as_str).map(str::to_owned);
    let phase = number(attr::PHASE_RANK)
        .and_then(|r| u8::try_from(r).ok())
        .and_then(JobPhase::from_rank);
    JobRecord {
        phase,
        // An item the router wrote before any pass acted: its start was attempt 1.
        attempt: number(attr::ATTEMPT)
            .and_then(|a| u32::try_from(a).ok())
            .unwrap_or(u32::from(
                phase.is_some_and(|p| p >= JobPhase::Provisioning),
            )),
        attempt_started_at_ms: number(attr::ATTEMPT_STARTED_AT_MS).or(number(attr::UPDATED_AT_MS)),
        provision_error: text(attr::PROVISION_ERROR),
        runner_id: number(attr::LAUNCHED_RUNNER_ID),
        gave_up: item.get(attr::GAVE_UP_AT_MS).is_some(),
        waiting_for_slot_since_ms: number(attr::WAITING_FOR_SLOT_SINCE_MS),
        slot_starts: number(attr::SLOT_STARTS)
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(0),
    }
}

/// The drain switch's control item ([`crate::drain`]): its key in the jobs table. Not a job's
/// key ([`key_of`] answers `None`), so every reader of job items passes it by; it has no
/// [`attr::EXPIRES_AT`], so it stays until `undrain` deletes it.
pub const DRAIN_KEY: &str = "control#drain";

/// The control item's attributes (besides [`KEY`]).
pub mod drain_attr {
    /// When the fleet was drained, ms since the epoch.
    pub const SINCE_MS: &str = "drained_at_ms";
    /// Who drained it (the operator's name, as `runner-ops drain --by` says).
    pub const BY: &str = "drained_by";
    pub const REASON: &str = "drain_reason";
}

/// A warm pool instance's claim ([`crate::pool`]): the item `pool#<instance id>`, which a
/// provision puts before it starts the instance for its job. Not a job's key ([`key_of`]
/// answers `None`); it expires ([`attr::EXPIRES_AT`]) after [`POOL_CLAIM_TTL_SECONDS`].
pub fn pool_claim_key(instance_id: &str) -> String {
    format!("pool#{instance_id}")
}

/// On a claim item: which job's attempt holds it ([`pool_claimant`]).
pub const CLAIMED_BY: &str = "claimed_by";

/// The claimant's text: the job's key and its attempt.
pub fn pool_claimant(key: JobKey, attempt: u32) -> String {
    format!("{}#attempt#{attempt}", key.table_key())
}

/// Claims an instance nobody holds, or again for the attempt that holds it (a retried step):
/// `#key` = [`KEY`], `#by` = [`CLAIMED_BY`], `:me` = [`pool_claimant`].
pub const POOL_CLAIM_CONDITION: &str = "attribute_not_exists(#key) OR #by = :me";

/// Longer than any instance lives (the maximum lifetime, and a day in the pool before it).
pub const POOL_CLAIM_TTL_SECONDS: u64 = 3 * 24 * 3600;

/// The drain switch, read from the control item (given as JSON like [`record_of`]'s input);
/// `None` for no item. An item without a readable time still drains (since 0): a switch
/// someone wrote by hand must not be ignored.
pub fn drain_of(item: Option<&Value>) -> Option<crate::drain::Drain> {
    let item = item?.as_object()?;
    let since_ms = match item.get(drain_attr::SINCE_MS) {
        Some(Value::Number(n)) => n.as_u64(),
        Some(Value::String(s)) => s.parse().ok(),
        _ => None,
    }
    .unwrap_or(0);
    let text = |name: &str| item.get(name).and_then(Value::as_str).map(str::to_owned);
    Some(crate::drain::Drain {
        since_ms,
        by: text(drain_attr::BY),
        reason: text(drain_attr::REASON),
    })
}

/// The key of an item, parsed back (`project#<id>#job#<id>`).
pub fn key_of(table_key: &str) -> Option<JobKey> {
    let rest = table_key.strip_prefix("project#")?;
    let (project, job) = rest.split_once("#job#")?;
    Some(JobKey {
        project_id: project.parse().ok()?,
        job_id: job.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn keys_round_trip() {
        let key = JobKey {
            project_id: 7,
            job_id: 1001,
        };
        assert_eq!(key_of(&key.table_key()), Some(key));
        assert_eq!(key_of("project#x#job#1"), None);
        assert_eq!(key_of("job#1"), None);
    }

    #[test]
    fn a_router_item_reads_as_attempt_one_started_when_it_was_written() {
        let record = record_of(&json!({
            "job_key": "project#7#job#1", "phase": "provisioning", "phase_rank": 2,
            "updated_at_ms": 1000, "provision_error": "NoCapacity"
        }));
        assert_eq!(record.phase, Some(JobPhase::Provisioning));
        assert_eq!(record.attempt, 1);
        assert_eq!(record.attempt_started_at_ms, Some(1000));
        assert_eq!(record.provision_error.as_deref(), Some("NoCapacity"));
        assert!(!record.gave_up);
    }

    #[test]
    fn a_seen_item_has_had_no_attempt_and_reconciler_fields_win() {
        let seen = record_of(&json!({"phase_rank": "1", "updated_at_ms": "5"}));
        assert_eq!((seen.phase, seen.attempt), (Some(JobPhase::Seen), 0));
        let retried = record_of(&json!({
            "phase_rank": 3, "attempt": 3, "attempt_started_at_ms": 9000, "updated_at_ms": 1,
            "launched_runner_id": 44, "gave_up_at_ms": 10,
            "waiting_for_slot_since_ms": 700, "slot_starts": 2
        }));
        assert_eq!(retried.waiting_for_slot_since_ms, Some(700));
        assert_eq!(retried.slot_starts, 2);
        assert_eq!(retried.attempt, 3);
        assert_eq!(retried.attempt_started_at_ms, Some(9000));
        assert_eq!(retried.runner_id, Some(44));
        assert!(retried.gave_up);
    }

    #[test]
    fn the_drain_switch_is_no_job_and_reads_with_or_without_its_details() {
        assert_eq!(key_of(DRAIN_KEY), None);
        assert_eq!(drain_of(None), None);
        let drain = drain_of(Some(&json!({
            "job_key": DRAIN_KEY, "drained_at_ms": 1000, "drained_by": "ops", "drain_reason": "AMI"
        })))
        .unwrap();
        assert_eq!(
            (drain.since_ms, drain.by.as_deref(), drain.reason.as_deref()),
            (1000, Some("ops"), Some("AMI"))
        );
        // Written by hand, without a time: still drained.
        assert_eq!(
            drain_of(Some(&json!({"job_key": DRAIN_KEY})))
                .unwrap()
                .since_ms,
            0
        );
    }

    #[test]
    fn the_conditions_name_the_owned_attributes() {
        assert!(ADVANCE_CONDITION.contains(attr::PHASE_RANK));
        assert!(PICKUP_CONDITION.contains(attr::PICKED_UP_AT_MS));
        assert!(CLAIM_ATTEMPT_CONDITION.contains(attr::ATTEMPT));
        assert!(CLAIM_ATTEMPT_CONDITION.contains(attr::PHASE_RANK));
    }
}
