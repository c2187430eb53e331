//! The reconciler's decisions: GitLab's list of pending jobs is the truth, hooks are hints.
//!
//! Each pass (on a schedule, one at a time) the adapter lists the jobs GitLab has pending for
//! the scopes the stack serves, reads what the jobs table holds about each and which runners
//! of ours are still alive, and asks [`plan_pass`] what to do. A job that has waited longer
//! than the grace, and that no live runner of ours can take, is provisioned again under a new
//! attempt number: the lost hook, the failed provision, the runner that expired or was taken
//! by another job, the runner created without the job's tags all end here. Attempts back off
//! and stop at a limit, which is recorded.
//!
//! Runners are matched to jobs the way GitLab hands jobs out: a runner takes any pending job
//! its scope and tags allow, so a job counts as covered only if a live idle runner is left
//! for it after older jobs took theirs.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::JobStatus;
use crate::hook::{JOB_EVENT_SCHEMA, JobEvent};
use crate::jobs::{JobKey, JobPhase, Workflow};
use crate::slots::{FreeSlots, WaitingJob, jobs_to_start};

mod pass;
pub use pass::{PassReport, PendingListing, ReconcilePorts, TeardownCheck, reconcile_pass};

/// One job GitLab lists as pending (`GET /projects/:id/jobs?scope[]=pending`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PendingJob {
    pub key: JobKey,
    pub name: String,
    pub stage: Option<String>,
    pub tags: Vec<String>,
    pub pipeline_id: Option<u64>,
    pub git_ref: Option<String>,
    /// How long it has been pending, by GitLab's clock (`queued_duration`).
    pub pending_for_ms: u64,
}

impl PendingJob {
    /// The workflow input's job, as the webhook would have slimmed its pending hook. The
    /// delivery id names the attempt: a pass's start is told apart from a hook's in logs.
    pub fn to_event(&self, attempt: u32, now_ms: u64) -> JobEvent {
        JobEvent {
            schema: JOB_EVENT_SCHEMA,
            delivery_id: format!("reconciler:{}", provision_execution_name(self.key, attempt)),
            received_at_ms: now_ms,
            job_id: self.key.job_id,
            job_name: self.name.clone(),
            stage: self.stage.clone(),
            status: JobStatus::Pending,
            failure_reason: None,
            allow_failure: None,
            retries: 0,
            project_id: self.key.project_id,
            project_path: None,
            pipeline_id: self.pipeline_id,
            git_ref: self.git_ref.clone(),
            tag: None,
            sha: None,
            runner: None,
            created_at: None,
            started_at: None,
            finished_at: None,
            duration_s: None,
            queued_duration_s: Some(self.pending_for_ms as f64 / 1000.0),
        }
    }
}

/// The provision workflow's execution name for an attempt: the router's own for attempt 1
/// (so a late hook and a pass that found its job first start one execution), then `-a<N>`.
pub fn provision_execution_name(key: JobKey, attempt: u32) -> String {
    let first = key.execution_name(Workflow::Provision);
    if attempt <= 1 {
        first
    } else {
        format!("{first}-a{attempt}")
    }
}

/// What the jobs table holds about a job, as far as the reconciler cares.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobRecord {
    pub phase: Option<JobPhase>,
    /// The last provision attempt (1 = the router's, from the pending hook).
    pub attempt: u32,
    /// When the last attempt was started (by the router or a reconciler pass).
    pub attempt_started_at_ms: Option<u64>,
    /// `provision_error` recorded by the provision workflow's last attempt.
    pub provision_error: Option<String>,
    /// The runner the last attempt created, if any.
    pub runner_id: Option<u64>,
    /// Set when the reconciler stopped trying.
    pub gave_up: bool,
    /// Since when the job waits for a slot under an instance cap (its first refusal).
    pub waiting_for_slot_since_ms: Option<u64>,
    /// Attempts that were starts from the slot queue: they do not count toward the limit.
    pub slot_starts: u32,
}

/// A runner of ours that GitLab may still hand a job to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveRunner {
    pub runner_id: u64,
    /// The job it was created for.
    pub made_for: JobKey,
    /// `Some(project)` for a project runner: it takes only that project's jobs.
    pub project_scope: Option<u64>,
    pub tags: Vec<String>,
    pub run_untagged: bool,
    /// When it gives up waiting and its instance shuts down.
    pub expires_at_ms: u64,
    /// GitLab says it is running a job while the job it was made for is still pending:
    /// another job took it (a runner takes any pending job its tags allow). It covers nothing.
    pub taken: bool,
}

impl LiveRunner {
    /// Whether GitLab would hand `job` to this runner.
    pub fn can_take(&self, job: &PendingJob) -> bool {
        let scope_ok = self.project_scope.is_none_or(|p| p == job.key.project_id);
        let tags_ok = if job.tags.is_empty() {
            self.run_untagged
        } else {
            job.tags.iter().all(|t| self.tags.contains(t))
        };
        scope_ok && tags_ok
    }
}

/// A registered runner of ours as a pass can know it: made for `made_for`, waiting for a job
/// until `waits_ms` after it was created. It was created with its job's tags, which GitLab's
/// listing gives while that job is pending; otherwise none are known and it is taken to
/// cover no other job (a pass then provisions rather than leave a job waiting on a guess).
pub fn runner_as_seen(
    runner_id: u64,
    made_for: JobKey,
    created_at_ms: u64,
    waits_ms: u64,
    project_scoped: bool,
    pending: &[PendingJob],
) -> LiveRunner {
    let own_job = pending.iter().find(|j| j.key == made_for);
    LiveRunner {
        runner_id,
        made_for,
        project_scope: project_scoped.then_some(made_for.project_id),
        tags: own_job.map(|j| j.tags.clone()).unwrap_or_default(),
        run_untagged: own_job.is_some_and(|j| j.tags.is_empty()),
        expires_at_ms: created_at_ms.saturating_add(waits_ms),
        taken: false,
    }
}

/// Why a pending job gets another attempt; recorded on the job's item and counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// We never acted on it: its pending hook was lost (or never authentic).
    LostHook,
    /// The last attempt failed (capacity, GitLab, configuration) and recorded why.
    ProvisionFailed,
    /// The last attempt's runner is gone (it waited and shut down, or another job took it).
    RunnerGone,
    /// The last attempt created a runner without the job's tags, which GitLab never hands
    /// a tagged job to.
    RunnerCannotTakeIt,
    /// An attempt was started long ago and left neither a runner nor an error.
    AttemptStalled,
    /// We hold it as finished, but GitLab lists it pending (a forged or reordered finish).
    MarkedFinished,
    /// It waited for a slot under an instance cap, and one is free now (oldest first).
    WaitingForSlot,
    /// Not a provision: GitLab reports finished a job we hold as not cleaned up (its finished
    /// hook was lost, or a forged one took its teardown), so its teardown is started.
    FinishedHookLost,
    /// Its runner is alive but running another job (GitLab's runner status says busy while
    /// this job is still pending): the runner was taken, this job has none.
    RunnerTaken,
    /// Not the reconciler's: an operator started the attempt (`runner-ops retry`), the same
    /// way (the same claim, the same execution names). It counts toward the attempt limit,
    /// and a job given up on is no longer (its next failure is given up on again).
    OperatorRetry,
}

impl Reason {
    pub const ALL: [Reason; 10] = [
        Self::LostHook,
        Self::ProvisionFailed,
        Self::RunnerGone,
        Self::RunnerCannotTakeIt,
        Self::AttemptStalled,
        Self::MarkedFinished,
        Self::WaitingForSlot,
        Self::FinishedHookLost,
        Self::RunnerTaken,
        Self::OperatorRetry,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::LostHook => "lost_hook",
            Self::ProvisionFailed => "provision_failed",
            Self::RunnerGone => "runner_gone",
            Self::RunnerCannotTakeIt => "runner_cannot_take_it",
            Self::AttemptStalled => "attempt_stalled",
            Self::MarkedFinished => "marked_finished",
            Self::WaitingForSlot => "waiting_for_slot",
            Self::FinishedHookLost => "finished_hook_lost",
            Self::RunnerTaken => "runner_taken",
            Self::OperatorRetry => "operator_retry",
        }
    }
}

/// What one pass does about one pending job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Pending for less than the grace: the hook path may still be at work.
    TooYoung,
    /// A live runner of ours is left for it (`runner_id`).
    Covered { runner_id: u64 },
    /// Start attempt `attempt`, for `reason`.
    Provision { attempt: u32, reason: Reason },
    /// The next attempt is allowed from `not_before_ms` (backoff).
    BackingOff { reason: Reason, not_before_ms: u64 },
    /// The attempt limit is reached: record it once, then leave the job to GitLab.
    GiveUp { attempts: u32, reason: Reason },
    /// Already given up on.
    GivenUp,
    /// Waits for a slot under an instance cap, and none is free for it this pass.
    WaitingForSlot { since_ms: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReconcileSettings {
    /// How long a job may be pending before the reconciler acts (the hook path's time).
    pub grace_ms: u64,
    /// Attempts in all, the router's included.
    pub max_attempts: u32,
    /// Wait before attempt 2; doubled for each later one, up to `backoff_max_ms`.
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
    /// An attempt with neither a runner nor an error after this long has stalled.
    pub attempt_timeout_ms: u64,
}

impl Default for ReconcileSettings {
    fn default() -> Self {
        Self {
            grace_ms: 60_000,
            max_attempts: 5,
            backoff_base_ms: 60_000,
            backoff_max_ms: 15 * 60_000,
            attempt_timeout_ms: 10 * 60_000,
        }
    }
}

impl ReconcileSettings {
    /// How long after attempt `attempt` started the next one may start.
    pub fn backoff_after(&self, attempt: u32) -> u64 {
        let doublings = attempt.saturating_sub(1).min(20);
        self.backoff_base_ms
            .saturating_mul(1 << doublings)
            .min(self.backoff_max_ms)
    }
}

/// Decisions for every pending job of one pass, oldest first. Jobs waiting for a slot are
/// started as far as `free` allows, oldest waiting first.
pub fn plan_pass(
    pending: &[PendingJob],
    records: &HashMap<JobKey, JobRecord>,
    runners: &[LiveRunner],
    free: &FreeSlots,
    settings: &ReconcileSettings,
    now_ms: u64,
) -> Vec<(JobKey, Decision)> {
    let live: Vec<&LiveRunner> = runners
        .iter()
        .filter(|r| r.expires_at_ms > now_ms && !r.taken)
        .collect();
    let taken: HashSet<u64> = runners
        .iter()
        .filter(|r| r.taken)
        .map(|r| r.runner_id)
        .collect();
    let coverage = assign_runners(pending, &live);
    let mut jobs: Vec<&PendingJob> = pending.iter().collect();
    jobs.sort_by_key(|j| std::cmp::Reverse(j.pending_for_ms));
    let mut decisions: Vec<(JobKey, Decision)> = jobs
        .into_iter()
        .map(|job| {
            let decision = match coverage.get(&job.key) {
                Some(&runner_id) => Decision::Covered { runner_id },
                None => {
                    decide_uncovered(job, records.get(&job.key), &live, &taken, settings, now_ms)
                }
            };
            (job.key, decision)
        })
        .collect();
    start_waiting(&mut decisions, records, free);
    decisions
}

/// Turns the oldest waiting jobs into starts, as many as the free slots allow.
fn start_waiting(
    decisions: &mut [(JobKey, Decision)],
    records: &HashMap<JobKey, JobRecord>,
    free: &FreeSlots,
) {
    let waiting: Vec<WaitingJob> = decisions
        .iter()
        .filter_map(|(job, d)| match d {
            Decision::WaitingForSlot { since_ms } => Some(WaitingJob {
                job: *job,
                waiting_since_ms: *since_ms,
            }),
            _ => None,
        })
        .collect();
    for job in jobs_to_start(&waiting, free) {
        let attempt = records.get(&job).map_or(0, |r| r.attempt) + 1;
        if let Some((_, decision)) = decisions.iter_mut().find(|(k, _)| *k == job) {
            *decision = Decision::Provision {
                attempt,
                reason: Reason::WaitingForSlot,
            };
        }
    }
}

/// Which live runner is left for which pending job: first each job keeps the runner made
/// for it (if that runner can take it), then the oldest jobs take the remaining runners.
fn assign_runners(pending: &[PendingJob], live: &[&LiveRunner]) -> HashMap<JobKey, u64> {
    let mut taken: HashSet<u64> = HashSet::new();
    let mut coverage = HashMap::new();
    for job in pending {
        if let Some(own) = live
            .iter()
            .find(|r| r.made_for == job.key && r.can_take(job))
        {
            taken.insert(own.runner_id);
            coverage.insert(job.key, own.runner_id);
        }
    }
    let mut oldest_first: Vec<&PendingJob> = pending
        .iter()
        .filter(|j| !coverage.contains_key(&j.key))
        .collect();
    oldest_first.sort_by_key(|j| std::cmp::Reverse(j.pending_for_ms));
    for job in oldest_first {
        if let Some(other) = live
            .iter()
            .find(|r| !taken.contains(&r.runner_id) && r.can_take(job))
        {
            taken.insert(other.runner_id);
            coverage.insert(job.key, other.runner_id);
        }
    }
    coverage
}

fn decide_uncovered(
    job: &PendingJob,
    record: Option<&JobRecord>,
    live: &[&LiveRunner],
    taken: &HashSet<u64>,
    settings: &ReconcileSettings,
    now_ms: u64,
) -> Decision {
    if job.pending_for_ms < settings.grace_ms {
        return Decision::TooYoung;
    }
    let Some(record) = record else {
        return Decision::Provision {
            attempt: 1,
            reason: Reason::LostHook,
        };
    };
    if record.gave_up {
        return Decision::GivenUp;
    }
    if let Some(since_ms) = record.waiting_for_slot_since_ms {
        // Started from the queue moments ago: that start may still take the slot.
        let restarted = record.attempt_started_at_ms.unwrap_or(0);
        if restarted > since_ms && now_ms.saturating_sub(restarted) < settings.grace_ms {
            return Decision::TooYoung;
        }
        return Decision::WaitingForSlot { since_ms };
    }
    let reason = match why_uncovered(job, record, live, taken, settings, now_ms) {
        Some(reason) => reason,
        // The attempt in flight is young: let it finish.
        None => return Decision::TooYoung,
    };
    if record.attempt.saturating_sub(record.slot_starts) >= settings.max_attempts {
        return Decision::GiveUp {
            attempts: record.attempt,
            reason,
        };
    }
    let not_before_ms = record.attempt_started_at_ms.map_or(0, |at| {
        at.saturating_add(settings.backoff_after(record.attempt))
    });
    if reason != Reason::LostHook && now_ms < not_before_ms {
        return Decision::BackingOff {
            reason,
            not_before_ms,
        };
    }
    Decision::Provision {
        attempt: record.attempt + 1,
        reason,
    }
}

/// Why a job with an item has no runner left; `None` while its attempt may still deliver.
fn why_uncovered(
    job: &PendingJob,
    record: &JobRecord,
    live: &[&LiveRunner],
    taken: &HashSet<u64>,
    settings: &ReconcileSettings,
    now_ms: u64,
) -> Option<Reason> {
    match record.phase {
        None | Some(JobPhase::Seen) => return Some(Reason::LostHook),
        Some(JobPhase::Finished | JobPhase::Cleaned) => return Some(Reason::MarkedFinished),
        Some(JobPhase::Provisioning | JobPhase::Running) => {}
    }
    if record.provision_error.is_some() {
        return Some(Reason::ProvisionFailed);
    }
    if let Some(runner_id) = record.runner_id {
        if taken.contains(&runner_id) {
            return Some(Reason::RunnerTaken);
        }
        return Some(match live.iter().find(|r| r.runner_id == runner_id) {
            Some(runner) if !runner.can_take(job) => Reason::RunnerCannotTakeIt,
            // Alive and able, but left to an older job: it is as good as gone for this one.
            _ => Reason::RunnerGone,
        });
    }
    let started = record.attempt_started_at_ms.unwrap_or(0);
    (now_ms.saturating_sub(started) >= settings.attempt_timeout_ms)
        .then_some(Reason::AttemptStalled)
}

/// Whether a job we hold as not cleaned up must be torn down: GitLab reports it finished, so
/// its finished hook was lost, or its teardown could not confirm it (a forged finish came
/// first and took the teardown's execution name, so the real hook's start joined that one).
/// Only GitLab's word counts here.
pub fn finished_hook_lost(phase: Option<JobPhase>, gitlab_status: &JobStatus) -> bool {
    matches!(
        phase,
        Some(JobPhase::Provisioning | JobPhase::Running | JobPhase::Finished)
    ) && gitlab_status.is_finished()
}

/// A runner of ours as the registry holds it: which job it was created for, and when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisteredRunner {
    pub runner_id: u64,
    pub made_for: JobKey,
    pub created_at_ms: u64,
}

/// The jobs worth asking GitLab about, oldest runner first: the job each registered runner
/// was made for, when the runner is older than the grace (a teardown on the hook path has
/// had its time), the job is not in GitLab's pending list, and its item is not cleaned. A
/// runner is removed from the registry by its teardown, so this list stays short.
pub fn lost_finish_candidates(
    runners: &[RegisteredRunner],
    pending: &[PendingJob],
    grace_ms: u64,
    now_ms: u64,
) -> Vec<JobKey> {
    let listed: HashSet<JobKey> = pending.iter().map(|j| j.key).collect();
    let mut old: Vec<&RegisteredRunner> = runners
        .iter()
        .filter(|r| now_ms.saturating_sub(r.created_at_ms) >= grace_ms)
        .filter(|r| !listed.contains(&r.made_for))
        .collect();
    old.sort_by_key(|r| (r.created_at_ms, r.runner_id));
    let mut seen = HashSet::new();
    old.into_iter()
        .map(|r| r.made_for)
        .filter(|k| seen.insert(*k))
        .collect()
}

/// A job as GitLab reports it when the reconciler asks (`GET /projects/:id/jobs/:job_id`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitLabJobState {
    pub key: JobKey,
    pub name: String,
    pub status: JobStatus,
    pub runner_id: Option<u64>,
    pub pipeline_id: Option<u64>,
}

impl GitLabJobState {
    /// The teardown workflow's job, built from GitLab's answer only (no hook's claim in it).
    pub fn to_event(&self, now_ms: u64) -> JobEvent {
        JobEvent {
            schema: JOB_EVENT_SCHEMA,
            delivery_id: format!("reconciler:{}", teardown_execution_name(self)),
            received_at_ms: now_ms,
            job_id: self.key.job_id,
            job_name: self.name.clone(),
            stage: None,
            status: self.status.clone(),
            failure_reason: None,
            allow_failure: None,
            retries: 0,
            project_id: self.key.project_id,
            project_path: None,
            pipeline_id: self.pipeline_id,
            git_ref: None,
            tag: None,
            sha: None,
            runner: self.runner_id.map(|id| crate::hook::RunnerRef {
                id,
                description: None,
                tags: vec![],
            }),
            created_at: None,
            started_at: None,
            finished_at: None,
            duration_s: None,
            queued_duration_s: None,
        }
    }
}

/// Whether a teardown execution's name is one of the job's: the router's own
/// ([`JobKey::execution_name`]) or one a reconciler pass gave it ([`teardown_execution_name`]).
pub fn is_teardown_execution_of(key: JobKey, name: &str) -> bool {
    let base = key.execution_name(Workflow::Teardown);
    let short = format!("p{}-j{}-td-", key.project_id, key.job_id);
    name == base
        || name
            .strip_prefix(&base)
            .is_some_and(|rest| rest.starts_with('-'))
        || name.starts_with(&short)
}

/// The teardown workflow's execution name for a lost finished hook, from GitLab's answer:
/// deterministic (two passes start one execution), and never the router's own name (which a
/// forged hook may have taken first).
pub fn teardown_execution_name(job: &GitLabJobState) -> String {
    let runner = job
        .runner_id
        .map_or_else(|| "none".to_owned(), |id| id.to_string());
    let base = job.key.execution_name(Workflow::Teardown);
    let name = format!("{base}-{}-r{runner}", job.status.as_str());
    if name.len() <= 80 {
        name
    } else {
        // Only for ids near u64::MAX: still deterministic, within Step Functions' 80.
        format!(
            "p{}-j{}-td-{}-r{runner}",
            job.key.project_id,
            job.key.job_id,
            job.status.as_str().chars().next().unwrap_or('x')
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: u64 = 60_000;

    fn key(job_id: u64) -> JobKey {
        JobKey {
            project_id: 7,
            job_id,
        }
    }

    fn pending(job_id: u64, tags: &[&str], pending_for_ms: u64) -> PendingJob {
        PendingJob {
            key: key(job_id),
            name: format!("job-{job_id}"),
            tags: tags.iter().map(|t| (*t).to_owned()).collect(),
            pending_for_ms,
            ..PendingJob::default()
        }
    }

    fn runner(runner_id: u64, made_for: u64, tags: &[&str], expires_at_ms: u64) -> LiveRunner {
        LiveRunner {
            runner_id,
            made_for: key(made_for),
            project_scope: Some(7),
            tags: tags.iter().map(|t| (*t).to_owned()).collect(),
            run_untagged: tags.is_empty(),
            expires_at_ms,
            taken: false,
        }
    }

    fn provisioning(attempt: u32, started_at_ms: u64) -> JobRecord {
        JobRecord {
            phase: Some(JobPhase::Provisioning),
            attempt,
            attempt_started_at_ms: Some(started_at_ms),
            ..JobRecord::default()
        }
    }

    fn plan(
        jobs: &[PendingJob],
        records: &[(u64, JobRecord)],
        runners: &[LiveRunner],
        now_ms: u64,
    ) -> Vec<(u64, Decision)> {
        let records = records
            .iter()
            .map(|(id, r)| (key(*id), r.clone()))
            .collect();
        plan_pass(
            jobs,
            &records,
            runners,
            &FreeSlots::default(),
            &ReconcileSettings::default(),
            now_ms,
        )
        .into_iter()
        .map(|(k, d)| (k.job_id, d))
        .collect()
    }

    #[test]
    fn a_lost_hook_is_provisioned_after_the_grace_only() {
        let now = 100 * MIN;
        let young = plan(&[pending(1, &[], 59_000)], &[], &[], now);
        assert_eq!(young, [(1, Decision::TooYoung)]);
        let old = plan(&[pending(1, &[], 61_000)], &[], &[], now);
        assert_eq!(
            old,
            [(
                1,
                Decision::Provision {
                    attempt: 1,
                    reason: Reason::LostHook
                }
            )]
        );
    }

    #[test]
    fn a_job_keeps_its_own_live_runner() {
        let now = 100 * MIN;
        let d = plan(
            &[pending(1, &["docker"], 5 * MIN)],
            &[(
                1,
                JobRecord {
                    runner_id: Some(11),
                    ..provisioning(1, now - 5 * MIN)
                },
            )],
            &[runner(11, 1, &["docker"], now + MIN)],
            now,
        );
        assert_eq!(d, [(1, Decision::Covered { runner_id: 11 })]);
    }

    #[test]
    fn an_expired_runner_does_not_cover_and_the_job_gets_attempt_two() {
        let now = 100 * MIN;
        let d = plan(
            &[pending(1, &[], 20 * MIN)],
            &[(
                1,
                JobRecord {
                    runner_id: Some(11),
                    ..provisioning(1, now - 20 * MIN)
                },
            )],
            &[runner(11, 1, &[], now - 1)],
            now,
        );
        assert_eq!(
            d,
            [(
                1,
                Decision::Provision {
                    attempt: 2,
                    reason: Reason::RunnerGone
                }
            )]
        );
    }

    #[test]
    fn a_runner_taken_by_another_job_leaves_the_younger_job_uncovered() {
        // GitLab gave job 2's runner 12 to another job, which ran and took it away. One live
        // runner left for two pending jobs with the same tags: the job it was made for keeps
        // it, and the other (older, and starved) is provisioned again.
        let now = 100 * MIN;
        let d = plan(
            &[pending(1, &["t"], 3 * MIN), pending(2, &["t"], 10 * MIN)],
            &[
                (
                    1,
                    JobRecord {
                        runner_id: Some(11),
                        ..provisioning(1, now - 3 * MIN)
                    },
                ),
                (
                    2,
                    JobRecord {
                        runner_id: Some(12),
                        ..provisioning(1, now - 10 * MIN)
                    },
                ),
            ],
            &[runner(11, 1, &["t"], now + 5 * MIN)],
            now,
        );
        assert_eq!(
            d,
            [
                (
                    2,
                    Decision::Provision {
                        attempt: 2,
                        reason: Reason::RunnerGone
                    }
                ),
                (1, Decision::Covered { runner_id: 11 }),
            ]
        );
    }

    #[test]
    fn a_live_runner_busy_with_another_job_covers_nothing_and_its_job_is_provisioned() {
        // Runner 11 was made for job 1 and is alive, but GitLab says it is running a job while
        // job 1 is still pending: another job took it. Without that word job 1 would wait
        // for runner 11 until its instance expires.
        let now = 100 * MIN;
        let records = [(
            1,
            JobRecord {
                runner_id: Some(11),
                ..provisioning(1, now - 3 * MIN)
            },
        )];
        let alive = runner(11, 1, &["t"], now + 5 * MIN);
        let jobs = [pending(1, &["t"], 3 * MIN)];
        assert_eq!(
            plan(&jobs, &records, std::slice::from_ref(&alive), now),
            [(1, Decision::Covered { runner_id: 11 })]
        );
        let taken = LiveRunner {
            taken: true,
            ..alive
        };
        assert_eq!(
            plan(&jobs, &records, &[taken], now),
            [(
                1,
                Decision::Provision {
                    attempt: 2,
                    reason: Reason::RunnerTaken
                }
            )]
        );
    }

    #[test]
    fn an_idle_runner_made_for_a_finished_job_covers_the_oldest_matching_job() {
        let now = 100 * MIN;
        let d = plan(
            &[pending(2, &["t"], 4 * MIN), pending(3, &["t"], 9 * MIN)],
            &[],
            &[runner(11, 1, &["t"], now + 5 * MIN)],
            now,
        );
        assert_eq!(
            d,
            [
                (3, Decision::Covered { runner_id: 11 }),
                (
                    2,
                    Decision::Provision {
                        attempt: 1,
                        reason: Reason::LostHook
                    }
                ),
            ]
        );
    }

    #[test]
    fn an_untagged_runner_never_covers_a_tagged_job() {
        let now = 100 * MIN;
        let d = plan(
            &[pending(1, &["docker"], 5 * MIN)],
            &[(
                1,
                JobRecord {
                    runner_id: Some(11),
                    ..provisioning(1, now - 5 * MIN)
                },
            )],
            &[runner(11, 1, &[], now + 5 * MIN)],
            now,
        );
        assert_eq!(
            d,
            [(
                1,
                Decision::Provision {
                    attempt: 2,
                    reason: Reason::RunnerCannotTakeIt
                }
            )]
        );
    }

    #[test]
    fn failed_provisions_back_off_doubling_then_give_up() {
        let settings = ReconcileSettings::default();
        let failed = |attempt, started| JobRecord {
            provision_error: Some("NoCapacity".into()),
            ..provisioning(attempt, started)
        };
        let start = 100 * MIN;
        let job = [pending(1, &[], 30 * MIN)];
        // Attempt 1 failed at `start`: attempt 2 waits one base backoff.
        assert_eq!(
            plan(&job, &[(1, failed(1, start))], &[], start + MIN - 1),
            [(
                1,
                Decision::BackingOff {
                    reason: Reason::ProvisionFailed,
                    not_before_ms: start + MIN
                }
            )]
        );
        assert_eq!(
            plan(&job, &[(1, failed(1, start))], &[], start + MIN),
            [(
                1,
                Decision::Provision {
                    attempt: 2,
                    reason: Reason::ProvisionFailed
                }
            )]
        );
        // After attempt 3 the wait has doubled twice; the cap holds.
        assert_eq!(settings.backoff_after(3), 4 * MIN);
        assert_eq!(settings.backoff_after(30), settings.backoff_max_ms);
        assert_eq!(
            plan(&job, &[(1, failed(5, start))], &[], start + 60 * MIN),
            [(
                1,
                Decision::GiveUp {
                    attempts: 5,
                    reason: Reason::ProvisionFailed
                }
            )]
        );
        let given_up = JobRecord {
            gave_up: true,
            ..failed(5, start)
        };
        assert_eq!(
            plan(&job, &[(1, given_up)], &[], start),
            [(1, Decision::GivenUp)]
        );
    }

    #[test]
    fn an_attempt_in_flight_is_left_alone_until_it_stalls() {
        let now = 100 * MIN;
        let job = [pending(1, &[], 20 * MIN)];
        assert_eq!(
            plan(&job, &[(1, provisioning(1, now - 2 * MIN))], &[], now),
            [(1, Decision::TooYoung)]
        );
        assert_eq!(
            plan(&job, &[(1, provisioning(1, now - 10 * MIN))], &[], now),
            [(
                1,
                Decision::Provision {
                    attempt: 2,
                    reason: Reason::AttemptStalled
                }
            )]
        );
    }

    #[test]
    fn a_job_marked_finished_but_pending_in_gitlab_is_provisioned_again() {
        let now = 100 * MIN;
        let record = JobRecord {
            phase: Some(JobPhase::Finished),
            attempt: 1,
            attempt_started_at_ms: Some(now - 10 * MIN),
            ..JobRecord::default()
        };
        assert_eq!(
            plan(&[pending(1, &[], 10 * MIN)], &[(1, record)], &[], now),
            [(
                1,
                Decision::Provision {
                    attempt: 2,
                    reason: Reason::MarkedFinished
                }
            )]
        );
    }

    #[test]
    fn only_gitlab_finished_jobs_we_hold_live_need_a_teardown() {
        use crate::JobStatus;
        assert!(finished_hook_lost(
            Some(JobPhase::Running),
            &JobStatus::Success
        ));
        assert!(finished_hook_lost(
            Some(JobPhase::Provisioning),
            &JobStatus::Canceled
        ));
        assert!(!finished_hook_lost(
            Some(JobPhase::Running),
            &JobStatus::Running
        ));
        assert!(!finished_hook_lost(
            Some(JobPhase::Cleaned),
            &JobStatus::Failed
        ));
        assert!(!finished_hook_lost(None, &JobStatus::Failed));
        // A forged finish came first: the item is finished, never cleaned.
        assert!(finished_hook_lost(
            Some(JobPhase::Finished),
            &JobStatus::Success
        ));
    }

    #[test]
    fn lost_finishes_are_looked_for_among_old_runners_whose_job_is_not_pending() {
        let now = 100 * MIN;
        let made = |runner_id, job_id, created_at_ms| RegisteredRunner {
            runner_id,
            made_for: key(job_id),
            created_at_ms,
        };
        let runners = [
            made(11, 1, now - 30 * MIN),
            // Too young: its hook path may still be at work.
            made(12, 2, now - 10_000),
            // Its job is pending: nothing finished there.
            made(13, 3, now - 40 * MIN),
            made(14, 4, now - 50 * MIN),
            // A second runner for job 1 (a later attempt): asked once.
            made(15, 1, now - 5 * MIN),
        ];
        let listed = [pending(3, &[], 40 * MIN)];
        assert_eq!(
            lost_finish_candidates(&runners, &listed, MIN, now),
            [key(4), key(1)]
        );
    }

    #[test]
    fn a_lost_finish_teardown_is_named_after_gitlab_answer() {
        let job = GitLabJobState {
            key: key(3),
            name: "build".into(),
            status: JobStatus::Success,
            runner_id: Some(44),
            pipeline_id: Some(9),
        };
        assert_eq!(teardown_execution_name(&job), "p7-j3-teardown-success-r44");
        let event = job.to_event(5);
        assert_eq!(event.status, JobStatus::Success);
        assert_eq!(event.runner.as_ref().map(|r| r.id), Some(44));
        assert_eq!(event.delivery_id, "reconciler:p7-j3-teardown-success-r44");
        let none = GitLabJobState {
            runner_id: None,
            status: JobStatus::Canceled,
            ..job.clone()
        };
        assert_eq!(
            teardown_execution_name(&none),
            "p7-j3-teardown-canceled-rnone"
        );
        let big = GitLabJobState {
            key: JobKey {
                project_id: u64::MAX,
                job_id: u64::MAX,
            },
            runner_id: Some(u64::MAX),
            status: JobStatus::Canceled,
            ..job.clone()
        };
        assert!(teardown_execution_name(&big).len() <= 80);
        // `runner-ops job` finds each of them, and no other job's.
        for (job, name) in [
            (&job, teardown_execution_name(&job)),
            (&none, teardown_execution_name(&none)),
            (&big, teardown_execution_name(&big)),
            (&job, job.key.execution_name(Workflow::Teardown)),
        ] {
            assert!(is_teardown_execution_of(job.key, &name), "{name}");
        }
        assert!(!is_teardown_execution_of(key(3), "p7-j31-teardown"));
        assert!(!is_teardown_execution_of(key(3), "p7-j3-teardownx"));
        assert!(!is_teardown_execution_of(key(3), "p7-j3-provision"));
    }

    #[test]
    fn attempt_execution_names_are_distinct_and_valid() {
        let big = JobKey {
            project_id: u64::MAX,
            job_id: u64::MAX,
        };
        assert_eq!(provision_execution_name(key(3), 1), "p7-j3-provision");
        assert_eq!(provision_execution_name(key(3), 2), "p7-j3-provision-a2");
        let name = provision_execution_name(big, u32::MAX);
        assert!(name.len() <= 80, "{name}");
        let event = pending(3, &["t"], 90_000).to_event(2, 1_000);
        assert_eq!(event.delivery_id, "reconciler:p7-j3-provision-a2");
        assert_eq!(event.status, JobStatus::Pending);
        assert!(event.runner.is_none());
    }

    #[test]
    fn a_runner_is_seen_with_its_pending_job_tags_or_covers_nothing_else() {
        let listed = [pending(1, &["docker"], MIN)];
        let own = runner_as_seen(11, key(1), 1_000, 900_000, true, &listed);
        assert_eq!(own.tags, ["docker"]);
        assert!(!own.run_untagged);
        assert_eq!(own.expires_at_ms, 901_000);
        assert!(own.can_take(&listed[0]));
        let orphan = runner_as_seen(12, key(9), 1_000, 900_000, true, &listed);
        assert!(!orphan.can_take(&pending(2, &[], MIN)));
        assert!(!orphan.can_take(&pending(2, &["docker"], MIN)));
    }

    #[test]
    fn waiting_jobs_start_oldest_first_as_slots_free_and_do_not_use_up_attempts() {
        let now = 100 * MIN;
        let waiting = |since, attempt, slot_starts| JobRecord {
            waiting_for_slot_since_ms: Some(since),
            slot_starts,
            ..provisioning(attempt, since)
        };
        let jobs = [
            pending(1, &[], 9 * MIN),
            pending(2, &[], 8 * MIN),
            pending(3, &[], 7 * MIN),
        ];
        let records: HashMap<JobKey, JobRecord> = [
            (key(1), waiting(now - 5 * MIN, 1, 0)),
            // Started from the queue four times already: still not given up on.
            (key(2), waiting(now - 6 * MIN, 5, 4)),
            (key(3), waiting(now - 2 * MIN, 1, 0)),
        ]
        .into();
        let free = FreeSlots {
            global: Some(2),
            ..FreeSlots::default()
        };
        let d = plan_pass(
            &jobs,
            &records,
            &[],
            &free,
            &ReconcileSettings::default(),
            now,
        );
        assert_eq!(
            d,
            [
                (
                    key(1),
                    Decision::Provision {
                        attempt: 2,
                        reason: Reason::WaitingForSlot
                    }
                ),
                (
                    key(2),
                    Decision::Provision {
                        attempt: 6,
                        reason: Reason::WaitingForSlot
                    }
                ),
                (
                    key(3),
                    Decision::WaitingForSlot {
                        since_ms: now - 2 * MIN
                    }
                ),
            ]
        );
        let none_free = FreeSlots {
            global: Some(0),
            ..FreeSlots::default()
        };
        let d = plan_pass(
            &jobs,
            &records,
            &[],
            &none_free,
            &ReconcileSettings::default(),
            now,
        );
        assert!(
            d.iter()
                .all(|(_, d)| matches!(d, Decision::WaitingForSlot { .. })),
            "{d:?}"
        );
        // A start from the queue a moment ago is left to take its slot.
        let just_started = JobRecord {
            attempt_started_at_ms: Some(now - 10_000),
            ..waiting(now - 5 * MIN, 2, 1)
        };
        let d = plan_pass(
            &jobs[..1],
            &[(key(1), just_started)].into(),
            &[],
            &free,
            &ReconcileSettings::default(),
            now,
        );
        assert_eq!(d, [(key(1), Decision::TooYoung)]);
    }

    #[test]
    fn reasons_have_stable_names() {
        for reason in Reason::ALL {
            let json = serde_json::to_string(&reason).unwrap();
            assert_eq!(json, format!("\"{}\"", reason.as_str()));
        }
    }
}
