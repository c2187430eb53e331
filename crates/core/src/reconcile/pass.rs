//! One reconciler pass, carried out through ports: list, read, decide ([`plan_pass`]), act.
//! Every action is safe to repeat and to race with the hook path: an attempt is claimed with
//! a conditional write on the job's item (only one pass, and only once, starts attempt N),
//! and started under a deterministic execution name that carries the attempt number.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;

use super::{Decision, JobRecord, LiveRunner, PendingJob, Reason, ReconcileSettings, plan_pass};
use crate::jobs::{JobKey, Started};
use crate::slots::FreeSlots;
use crate::webhook::PortError;

/// GitLab's pending jobs over every scope the stack serves.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PendingListing {
    pub jobs: Vec<PendingJob>,
    /// False when the request budget ran out before every scope was listed.
    pub complete: bool,
}

/// What a pass needs from GitLab, the jobs and runners tables and Step Functions.
pub trait ReconcilePorts {
    fn pending_jobs(&self) -> impl Future<Output = Result<PendingListing, PortError>> + Send;
    fn records(
        &self,
        keys: &[JobKey],
    ) -> impl Future<Output = Result<HashMap<JobKey, JobRecord>, PortError>> + Send;
    /// Our runners that GitLab may still hand a job to, seen with the tags of `listed` (a
    /// runner was created with its own job's tags; see [`super::runner_as_seen`]).
    fn live_runners(
        &self,
        listed: &[PendingJob],
    ) -> impl Future<Output = Result<Vec<LiveRunner>, PortError>> + Send;
    /// Free slots under the instance caps, for `projects` (no caps: unlimited).
    fn free_slots(
        &self,
        projects: &[u64],
    ) -> impl Future<Output = Result<FreeSlots, PortError>> + Send;
    /// Records attempt `attempt` on the job's item if no pass or hook got there first
    /// (`false`: someone did; do nothing).
    fn claim_attempt(
        &self,
        key: JobKey,
        attempt: u32,
        reason: Reason,
        now_ms: u64,
    ) -> impl Future<Output = Result<bool, PortError>> + Send;
    fn start_provision(
        &self,
        job: &PendingJob,
        attempt: u32,
        now_ms: u64,
    ) -> impl Future<Output = Result<Started, PortError>> + Send;
    fn record_gave_up(
        &self,
        key: JobKey,
        attempts: u32,
        reason: Reason,
        now_ms: u64,
    ) -> impl Future<Output = Result<(), PortError>> + Send;
}

/// What a pass saw and did: logged and turned into metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PassReport {
    pub pending: usize,
    pub listing_complete: bool,
    pub oldest_pending_ms: u64,
    pub covered: usize,
    pub too_young: usize,
    pub backing_off: usize,
    /// Jobs waiting for a slot under an instance cap, not started this pass.
    pub waiting_for_slot: usize,
    /// Attempts started, by reason.
    pub reconciled: BTreeMap<Reason, u32>,
    pub gave_up: Vec<(JobKey, u32, Reason)>,
    /// Attempts another pass or the hook path claimed first.
    pub lost_claims: usize,
    pub errors: Vec<String>,
}

impl PassReport {
    pub fn reconciled_total(&self) -> u32 {
        self.reconciled.values().sum()
    }
}

/// Lists, reads, decides and acts. A failure to list or read ends the pass (the next one
/// retries); a failure on one job is reported and the others go on.
pub async fn reconcile_pass<P: ReconcilePorts>(
    ports: &P,
    settings: &ReconcileSettings,
    now_ms: u64,
) -> Result<PassReport, PortError> {
    let listing = ports.pending_jobs().await?;
    let keys: Vec<JobKey> = listing.jobs.iter().map(|j| j.key).collect();
    let records = ports.records(&keys).await?;
    let runners = ports.live_runners(&listing.jobs).await?;
    let mut projects: Vec<u64> = listing.jobs.iter().map(|j| j.key.project_id).collect();
    projects.sort_unstable();
    projects.dedup();
    let free = ports.free_slots(&projects).await?;
    let mut report = PassReport {
        pending: listing.jobs.len(),
        listing_complete: listing.complete,
        oldest_pending_ms: listing
            .jobs
            .iter()
            .map(|j| j.pending_for_ms)
            .max()
            .unwrap_or(0),
        ..PassReport::default()
    };
    let by_key: HashMap<JobKey, &PendingJob> = listing.jobs.iter().map(|j| (j.key, j)).collect();
    for (key, decision) in plan_pass(&listing.jobs, &records, &runners, &free, settings, now_ms) {
        act(ports, by_key[&key], decision, now_ms, &mut report).await;
    }
    Ok(report)
}

async fn act<P: ReconcilePorts>(
    ports: &P,
    job: &PendingJob,
    decision: Decision,
    now_ms: u64,
    report: &mut PassReport,
) {
    let failed = |what: &str, e: PortError| {
        format!(
            "project {} job {}: {what}: {e}",
            job.key.project_id, job.key.job_id
        )
    };
    match decision {
        Decision::Covered { .. } => report.covered += 1,
        Decision::TooYoung => report.too_young += 1,
        Decision::BackingOff { .. } => report.backing_off += 1,
        Decision::GivenUp => {}
        Decision::WaitingForSlot { .. } => report.waiting_for_slot += 1,
        Decision::GiveUp { attempts, reason } => {
            match ports
                .record_gave_up(job.key, attempts, reason, now_ms)
                .await
            {
                Ok(()) => report.gave_up.push((job.key, attempts, reason)),
                Err(e) => report
                    .errors
                    .push(failed("recording that it was given up", e)),
            }
        }
        Decision::Provision { attempt, reason } => {
            match ports.claim_attempt(job.key, attempt, reason, now_ms).await {
                Ok(false) => report.lost_claims += 1,
                Err(e) => report.errors.push(failed("claiming the attempt", e)),
                // Claimed: start it. If the start fails, the claim stays and the attempt
                // counts as stalled after its timeout: the next attempt covers it.
                Ok(true) => match ports.start_provision(job, attempt, now_ms).await {
                    Ok(_) => *report.reconciled.entry(reason).or_default() += 1,
                    Err(e) => report
                        .errors
                        .push(failed("starting the provision workflow", e)),
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::jobs::JobPhase;

    const MIN: u64 = 60_000;

    /// The ports as one in-memory world: a claim is a compare-and-set on the attempt.
    #[derive(Default)]
    struct World {
        pending: Vec<PendingJob>,
        records: Mutex<HashMap<JobKey, JobRecord>>,
        runners: Vec<LiveRunner>,
        started: Mutex<Vec<(JobKey, u32)>>,
        fail_start_for: Option<u64>,
    }

    impl ReconcilePorts for World {
        async fn pending_jobs(&self) -> Result<PendingListing, PortError> {
            Ok(PendingListing {
                jobs: self.pending.clone(),
                complete: true,
            })
        }
        async fn records(&self, keys: &[JobKey]) -> Result<HashMap<JobKey, JobRecord>, PortError> {
            let snapshot = self.records.lock().unwrap().clone();
            // Both passes read before either claims: the race the conditional write settles.
            tokio::task::yield_now().await;
            let records = snapshot;
            Ok(keys
                .iter()
                .filter_map(|k| records.get(k).map(|r| (*k, r.clone())))
                .collect())
        }
        async fn live_runners(&self, _: &[PendingJob]) -> Result<Vec<LiveRunner>, PortError> {
            Ok(self.runners.clone())
        }
        async fn free_slots(&self, _: &[u64]) -> Result<FreeSlots, PortError> {
            Ok(FreeSlots::default())
        }
        async fn claim_attempt(
            &self,
            key: JobKey,
            attempt: u32,
            _: Reason,
            now_ms: u64,
        ) -> Result<bool, PortError> {
            let mut records = self.records.lock().unwrap();
            let record = records.entry(key).or_default();
            if record.attempt >= attempt {
                return Ok(false);
            }
            record.attempt = attempt;
            record.attempt_started_at_ms = Some(now_ms);
            record.provision_error = None;
            record.phase = Some(
                record
                    .phase
                    .unwrap_or(JobPhase::Provisioning)
                    .max(JobPhase::Provisioning),
            );
            Ok(true)
        }
        async fn start_provision(
            &self,
            job: &PendingJob,
            attempt: u32,
            _: u64,
        ) -> Result<Started, PortError> {
            if self.fail_start_for == Some(job.key.job_id) {
                return Err(PortError("Step Functions unavailable".into()));
            }
            self.started.lock().unwrap().push((job.key, attempt));
            Ok(Started::New)
        }
        async fn record_gave_up(
            &self,
            key: JobKey,
            _: u32,
            _: Reason,
            _: u64,
        ) -> Result<(), PortError> {
            self.records.lock().unwrap().entry(key).or_default().gave_up = true;
            Ok(())
        }
    }

    fn job(job_id: u64, pending_for_ms: u64) -> PendingJob {
        PendingJob {
            key: JobKey {
                project_id: 7,
                job_id,
            },
            name: format!("job-{job_id}"),
            tags: vec![],
            pending_for_ms,
            ..PendingJob::default()
        }
    }

    #[tokio::test]
    async fn two_passes_at_once_start_each_attempt_once() {
        let world = World {
            pending: vec![job(1, 5 * MIN), job(2, 5 * MIN), job(3, 10_000)],
            ..World::default()
        };
        let settings = ReconcileSettings::default();
        let (a, b) = tokio::join!(
            reconcile_pass(&world, &settings, 100 * MIN),
            reconcile_pass(&world, &settings, 100 * MIN)
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(a.reconciled_total() + b.reconciled_total(), 2);
        assert_eq!(
            a.lost_claims + b.lost_claims,
            2,
            "the slower pass lost both claims"
        );
        assert_eq!(a.too_young, 1);
        let mut started = world.started.lock().unwrap().clone();
        started.sort_by_key(|(k, _)| k.job_id);
        assert_eq!(
            started
                .iter()
                .map(|(k, n)| (k.job_id, *n))
                .collect::<Vec<_>>(),
            [(1, 1), (2, 1)]
        );
        assert_eq!(
            a.reconciled.get(&Reason::LostHook).copied().unwrap_or(0)
                + b.reconciled.get(&Reason::LostHook).copied().unwrap_or(0),
            2
        );
        assert_eq!(a.oldest_pending_ms, 5 * MIN);
    }

    #[tokio::test]
    async fn a_failed_start_is_reported_and_the_others_go_on() {
        let world = World {
            pending: vec![job(1, 5 * MIN), job(2, 6 * MIN)],
            fail_start_for: Some(2),
            ..World::default()
        };
        let report = reconcile_pass(&world, &ReconcileSettings::default(), 100 * MIN)
            .await
            .unwrap();
        assert_eq!(report.reconciled_total(), 1);
        assert_eq!(report.errors.len(), 1);
        assert!(report.errors[0].contains("job 2"), "{:?}", report.errors);
    }

    #[tokio::test]
    async fn the_attempt_limit_is_recorded_once() {
        let key = job(1, 30 * MIN).key;
        let world = World {
            pending: vec![job(1, 30 * MIN)],
            records: Mutex::new(HashMap::from([(
                key,
                JobRecord {
                    phase: Some(JobPhase::Provisioning),
                    attempt: 5,
                    attempt_started_at_ms: Some(0),
                    provision_error: Some("NoCapacity".into()),
                    ..JobRecord::default()
                },
            )])),
            ..World::default()
        };
        let settings = ReconcileSettings::default();
        let first = reconcile_pass(&world, &settings, 100 * MIN).await.unwrap();
        assert_eq!(first.gave_up, [(key, 5, Reason::ProvisionFailed)]);
        let second = reconcile_pass(&world, &settings, 101 * MIN).await.unwrap();
        assert!(second.gave_up.is_empty());
        assert_eq!(second.reconciled_total(), 0);
        assert!(world.started.lock().unwrap().is_empty());
    }
}
