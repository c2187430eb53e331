//! One reconciler pass, carried out through ports: list, read, decide ([`plan_pass`]), act.
//! Every action is safe to repeat and to race with the hook path: an attempt is claimed with
//! a conditional write on the job's item (only one pass, and only once, starts attempt N),
//! and started under a deterministic execution name that carries the attempt number.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;

use super::{
    Decision, GitLabJobState, JobRecord, LiveRunner, PendingJob, Reason, ReconcileSettings,
    RegisteredRunner, finished_hook_lost, lost_finish_candidates, plan_pass,
};
use crate::drain::Drain;
use crate::jobs::{JobKey, JobPhase, Started};
use crate::slots::FreeSlots;
use crate::webhook::PortError;

/// GitLab's pending jobs over every scope the stack serves.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PendingListing {
    pub jobs: Vec<PendingJob>,
    /// False when the request budget ran out before every scope was listed.
    pub complete: bool,
    /// What the pass's GitLab request budget has left after the listing: the pass asks
    /// GitLab about at most this many jobs whose finished hook may be lost.
    pub requests_left: u32,
}

/// What a pass needs from GitLab, the jobs and runners tables and Step Functions.
pub trait ReconcilePorts {
    fn pending_jobs(&self) -> impl Future<Output = Result<PendingListing, PortError>> + Send;
    fn records(
        &self,
        keys: &[JobKey],
    ) -> impl Future<Output = Result<HashMap<JobKey, JobRecord>, PortError>> + Send;
    /// The `registered` runners as GitLab may still hand them a job, seen with the tags of
    /// `listed` (a runner was created with its own job's tags; see
    /// [`super::runner_as_seen`]) and the runners' life as this stack configures it.
    fn live_runners(
        &self,
        listed: &[PendingJob],
        registered: &[RegisteredRunner],
    ) -> Vec<LiveRunner>;
    /// The drain switch ([`crate::drain`]): while it is set no waiting job is started (the
    /// pass counts no free slot), caps or not.
    fn drained(&self) -> impl Future<Output = Result<Option<Drain>, PortError>> + Send;
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
    /// Every runner of ours the registry holds (a teardown removes its entry).
    fn registered_runners(
        &self,
    ) -> impl Future<Output = Result<Vec<RegisteredRunner>, PortError>> + Send;
    /// What GitLab says about one job (one request of the pass's budget); `None` on 404.
    fn gitlab_job(
        &self,
        key: JobKey,
    ) -> impl Future<Output = Result<Option<GitLabJobState>, PortError>> + Send;
    /// Starts the teardown workflow for a job GitLab reports finished, under
    /// [`super::teardown_execution_name`], with GitLab's status and runner as its input.
    fn start_teardown(
        &self,
        job: &GitLabJobState,
        now_ms: u64,
    ) -> impl Future<Output = Result<Started, PortError>> + Send;
    /// Whether GitLab says the runner is running a job (one request of the pass's budget);
    /// `None` when this stack cannot ask (no runner-management token).
    fn runner_busy(
        &self,
        runner_id: u64,
    ) -> impl Future<Output = Result<Option<bool>, PortError>> + Send;
    /// Notes on the job's item why the pass started its teardown.
    fn record_teardown(
        &self,
        key: JobKey,
        reason: Reason,
        now_ms: u64,
    ) -> impl Future<Output = Result<(), PortError>> + Send;
}

/// What the pass did about one job whose finished hook may have been lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TeardownCheck {
    /// GitLab reports it finished: its teardown was started (or already had been).
    Started {
        job: GitLabJobState,
        started: Started,
    },
    /// GitLab reports it not finished (or does not know it): nothing to do.
    StillLive,
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
    /// EC2 runners of ours the registry holds (created, not torn down yet).
    pub registered_runners: usize,
    /// The fleet was drained: no waiting job was started.
    pub drained: Option<Drain>,
    /// Attempts started, by reason.
    pub reconciled: BTreeMap<Reason, u32>,
    pub gave_up: Vec<(JobKey, u32, Reason)>,
    /// Attempts another pass or the hook path claimed first.
    pub lost_claims: usize,
    /// Jobs asked about because their finished hook may be lost, and what came of it.
    pub teardown_checks: Vec<(JobKey, TeardownCheck)>,
    /// Candidates left for the next pass: the request budget was spent.
    pub teardown_checks_deferred: usize,
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
    let mut listing = ports.pending_jobs().await?;
    let keys: Vec<JobKey> = listing.jobs.iter().map(|j| j.key).collect();
    let records = ports.records(&keys).await?;
    // Read once: the live runners and the lost-finish candidates both come from it.
    let registered = ports.registered_runners().await?;
    let mut runners = ports.live_runners(&listing.jobs, &registered);
    let mut errors = Vec::new();
    mark_taken_runners(
        ports,
        &mut runners,
        &mut listing,
        settings,
        now_ms,
        &mut errors,
    )
    .await;
    let mut projects: Vec<u64> = listing.jobs.iter().map(|j| j.key.project_id).collect();
    projects.sort_unstable();
    projects.dedup();
    let drained = ports.drained().await?;
    let free = match drained {
        Some(_) => FreeSlots::none(),
        None => ports.free_slots(&projects).await?,
    };
    let mut report = PassReport {
        pending: listing.jobs.len(),
        listing_complete: listing.complete,
        oldest_pending_ms: listing
            .jobs
            .iter()
            .map(|j| j.pending_for_ms)
            .max()
            .unwrap_or(0),
        registered_runners: registered.len(),
        drained,
        errors,
        ..PassReport::default()
    };
    let by_key: HashMap<JobKey, &PendingJob> = listing.jobs.iter().map(|j| (j.key, j)).collect();
    for (key, decision) in plan_pass(&listing.jobs, &records, &runners, &free, settings, now_ms) {
        act(ports, by_key[&key], decision, now_ms, &mut report).await;
    }
    tear_down_lost_finishes(ports, &listing, &registered, settings, now_ms, &mut report).await;
    Ok(report)
}

/// Runners whose own job is still pending past the grace, and that GitLab says are running a
/// job, were taken by another job: marked, so they cover nothing (within the request budget;
/// a runner not asked about keeps covering its job until the next pass).
async fn mark_taken_runners<P: ReconcilePorts>(
    ports: &P,
    runners: &mut [LiveRunner],
    listing: &mut PendingListing,
    settings: &ReconcileSettings,
    now_ms: u64,
    errors: &mut Vec<String>,
) {
    let waiting: HashMap<JobKey, u64> = listing
        .jobs
        .iter()
        .map(|j| (j.key, j.pending_for_ms))
        .collect();
    for runner in runners.iter_mut() {
        let own_job_waits = waiting
            .get(&runner.made_for)
            .is_some_and(|pending_for| *pending_for >= settings.grace_ms);
        if !own_job_waits || runner.expires_at_ms <= now_ms || listing.requests_left == 0 {
            continue;
        }
        listing.requests_left -= 1;
        match ports.runner_busy(runner.runner_id).await {
            Ok(Some(busy)) => runner.taken = busy,
            Ok(None) => return,
            Err(e) => errors.push(format!(
                "asking GitLab whether runner {} took another job: {e}",
                runner.runner_id
            )),
        }
    }
}

/// The finished hooks that never arrived (or whose teardown a forged hook took): for each
/// job a registered runner of ours was made for, not pending, not cleaned, GitLab is asked
/// (within what the request budget has left) and a job it reports finished gets its teardown,
/// built from GitLab's answer. A failure here is reported; the provisions above stand.
async fn tear_down_lost_finishes<P: ReconcilePorts>(
    ports: &P,
    listing: &PendingListing,
    runners: &[RegisteredRunner],
    settings: &ReconcileSettings,
    now_ms: u64,
    report: &mut PassReport,
) {
    let candidates = lost_finish_candidates(runners, &listing.jobs, settings.grace_ms, now_ms);
    if candidates.is_empty() {
        return;
    }
    let records = match ports.records(&candidates).await {
        Ok(records) => records,
        Err(e) => {
            report
                .errors
                .push(format!("reading the jobs of our runners: {e}"));
            return;
        }
    };
    let live: Vec<JobKey> = candidates
        .into_iter()
        .filter(|k| {
            records.get(k).is_some_and(|r| {
                matches!(
                    r.phase,
                    Some(JobPhase::Provisioning | JobPhase::Running | JobPhase::Finished)
                )
            })
        })
        .collect();
    let budget = listing.requests_left as usize;
    report.teardown_checks_deferred = live.len().saturating_sub(budget);
    for key in live.into_iter().take(budget) {
        let phase = records.get(&key).and_then(|r| r.phase);
        check_lost_finish(ports, key, phase, now_ms, report).await;
    }
}

/// Asks GitLab about one job of our runners; starts its teardown when GitLab reports it
/// finished and its finished hook never arrived.
async fn check_lost_finish<P: ReconcilePorts>(
    ports: &P,
    key: JobKey,
    phase: Option<JobPhase>,
    now_ms: u64,
    report: &mut PassReport,
) {
    let failed = |what: &str, e: PortError| {
        format!("project {} job {}: {what}: {e}", key.project_id, key.job_id)
    };
    let job = match ports.gitlab_job(key).await {
        Ok(Some(job)) => job,
        Ok(None) => {
            report.teardown_checks.push((key, TeardownCheck::StillLive));
            return;
        }
        Err(e) => {
            report
                .errors
                .push(failed("asking GitLab whether it finished", e));
            return;
        }
    };
    if !finished_hook_lost(phase, &job.status) {
        report.teardown_checks.push((key, TeardownCheck::StillLive));
        return;
    }
    match ports.start_teardown(&job, now_ms).await {
        Ok(started) => {
            if started == Started::New {
                *report
                    .reconciled
                    .entry(Reason::FinishedHookLost)
                    .or_default() += 1;
                if let Err(e) = ports
                    .record_teardown(key, Reason::FinishedHookLost, now_ms)
                    .await
                {
                    report
                        .errors
                        .push(failed("recording the teardown's reason", e));
                }
            }
            report
                .teardown_checks
                .push((key, TeardownCheck::Started { job, started }));
        }
        Err(e) => report
            .errors
            .push(failed("starting the teardown workflow", e)),
    }
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
        registered: Vec<RegisteredRunner>,
        gitlab: HashMap<JobKey, GitLabJobState>,
        requests_left: u32,
        asked: Mutex<Vec<JobKey>>,
        teardowns: Mutex<Vec<String>>,
        /// Runners GitLab reports running a job; `None`: the stack cannot ask.
        busy: Option<Vec<u64>>,
        busy_asked: Mutex<Vec<u64>>,
        drained: Mutex<Option<Drain>>,
    }

    impl ReconcilePorts for World {
        async fn pending_jobs(&self) -> Result<PendingListing, PortError> {
            Ok(PendingListing {
                jobs: self.pending.clone(),
                complete: true,
                requests_left: self.requests_left,
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
        fn live_runners(&self, _: &[PendingJob], _: &[RegisteredRunner]) -> Vec<LiveRunner> {
            self.runners.clone()
        }
        async fn drained(&self) -> Result<Option<Drain>, PortError> {
            Ok(self.drained.lock().unwrap().clone())
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
        async fn registered_runners(&self) -> Result<Vec<RegisteredRunner>, PortError> {
            Ok(self.registered.clone())
        }
        async fn gitlab_job(&self, key: JobKey) -> Result<Option<GitLabJobState>, PortError> {
            self.asked.lock().unwrap().push(key);
            Ok(self.gitlab.get(&key).cloned())
        }
        async fn start_teardown(&self, job: &GitLabJobState, _: u64) -> Result<Started, PortError> {
            let name = super::super::teardown_execution_name(job);
            let mut started = self.teardowns.lock().unwrap();
            if started.contains(&name) {
                return Ok(Started::AlreadyExists);
            }
            started.push(name);
            Ok(Started::New)
        }
        async fn record_teardown(&self, _: JobKey, _: Reason, _: u64) -> Result<(), PortError> {
            Ok(())
        }
        async fn runner_busy(&self, runner_id: u64) -> Result<Option<bool>, PortError> {
            self.busy_asked.lock().unwrap().push(runner_id);
            Ok(self.busy.as_ref().map(|b| b.contains(&runner_id)))
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
    async fn a_runner_gitlab_reports_busy_while_its_job_waits_was_taken() {
        // Runner 11 (alive, made for job 1) and runner 12 (made for job 2); GitLab says 11 is
        // running a job while job 1 is still pending. Job 3 is too young to ask about.
        let live = |runner_id, made_for: u64| LiveRunner {
            runner_id,
            made_for: job(made_for, 0).key,
            project_scope: Some(7),
            tags: vec![],
            run_untagged: true,
            expires_at_ms: 200 * MIN,
            taken: false,
        };
        let record = |runner_id| JobRecord {
            phase: Some(JobPhase::Provisioning),
            attempt: 1,
            attempt_started_at_ms: Some(97 * MIN),
            runner_id: Some(runner_id),
            ..JobRecord::default()
        };
        let world = |busy: Option<Vec<u64>>| World {
            pending: vec![job(1, 3 * MIN), job(2, 3 * MIN), job(3, 10_000)],
            records: Mutex::new(HashMap::from([
                (job(1, 0).key, record(11)),
                (job(2, 0).key, record(12)),
            ])),
            runners: vec![live(11, 1), live(12, 2), live(13, 3)],
            requests_left: 10,
            busy,
            ..World::default()
        };
        let settings = ReconcileSettings::default();
        let asked = world(Some(vec![11]));
        let report = reconcile_pass(&asked, &settings, 100 * MIN).await.unwrap();
        assert_eq!(report.reconciled.get(&Reason::RunnerTaken), Some(&1));
        assert_eq!(report.covered, 2, "jobs 2 and 3 keep their idle runners");
        assert_eq!(*asked.started.lock().unwrap(), [(job(1, 0).key, 2)]);
        assert_eq!(*asked.busy_asked.lock().unwrap(), [11, 12]);
        // A stack that cannot ask leaves the runner covering its job, as before.
        let blind = world(None);
        let report = reconcile_pass(&blind, &settings, 100 * MIN).await.unwrap();
        assert_eq!(report.reconciled_total(), 0);
        assert_eq!(*blind.busy_asked.lock().unwrap(), [11]);
    }

    #[tokio::test]
    async fn a_drained_pass_starts_no_waiting_job_and_the_next_pass_after_undrain_does() {
        // No caps: without the switch, every waiting job is started at once, oldest first.
        let record = |since_ms| JobRecord {
            phase: Some(JobPhase::Provisioning),
            attempt: 1,
            attempt_started_at_ms: Some(since_ms),
            waiting_for_slot_since_ms: Some(since_ms),
            ..JobRecord::default()
        };
        let world = World {
            pending: vec![job(1, 10 * MIN), job(2, 20 * MIN)],
            records: Mutex::new(HashMap::from([
                (job(1, 0).key, record(90 * MIN)),
                (job(2, 0).key, record(80 * MIN)),
            ])),
            drained: Mutex::new(Some(Drain {
                since_ms: 85 * MIN,
                by: Some("ops".into()),
                reason: None,
            })),
            ..World::default()
        };
        let settings = ReconcileSettings::default();
        let drained = reconcile_pass(&world, &settings, 100 * MIN).await.unwrap();
        assert_eq!(drained.waiting_for_slot, 2);
        assert_eq!(drained.reconciled_total(), 0);
        assert!(drained.drained.is_some());
        assert!(world.started.lock().unwrap().is_empty());

        *world.drained.lock().unwrap() = None;
        let undrained = reconcile_pass(&world, &settings, 101 * MIN).await.unwrap();
        assert_eq!(undrained.reconciled.get(&Reason::WaitingForSlot), Some(&2));
        assert_eq!(
            *world.started.lock().unwrap(),
            [(job(2, 0).key, 2), (job(1, 0).key, 2)],
            "oldest waiting first"
        );
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

    #[tokio::test]
    async fn a_lost_finished_hook_gets_its_teardown_from_gitlab_answer_within_the_budget() {
        use crate::JobStatus;
        let now = 100 * MIN;
        let k = |job_id| JobKey {
            project_id: 7,
            job_id,
        };
        let record = |phase| JobRecord {
            phase: Some(phase),
            attempt: 1,
            ..JobRecord::default()
        };
        let state = |job_id, status, runner_id| GitLabJobState {
            key: k(job_id),
            name: format!("job-{job_id}"),
            status,
            runner_id,
            pipeline_id: Some(1),
        };
        let world = World {
            records: Mutex::new(HashMap::from([
                (k(1), record(JobPhase::Running)),
                (k(2), record(JobPhase::Running)),
                (k(3), record(JobPhase::Cleaned)),
                (k(4), record(JobPhase::Finished)),
                (k(5), record(JobPhase::Running)),
            ])),
            registered: (1..=5)
                .map(|j| RegisteredRunner {
                    runner_id: 10 + j,
                    made_for: k(j),
                    created_at_ms: now - (10 - j) * MIN,
                })
                .collect(),
            gitlab: HashMap::from([
                (k(1), state(1, JobStatus::Success, Some(11))),
                (k(2), state(2, JobStatus::Running, Some(12))),
                (k(4), state(4, JobStatus::Failed, Some(14))),
                (k(5), state(5, JobStatus::Canceled, None)),
            ]),
            requests_left: 3,
            ..World::default()
        };
        let settings = ReconcileSettings::default();
        let report = reconcile_pass(&world, &settings, now).await.unwrap();
        // Job 3 is cleaned: never asked. Jobs 1, 2, 4 fit the budget; job 5 waits.
        assert_eq!(*world.asked.lock().unwrap(), [k(1), k(2), k(4)]);
        assert_eq!(report.teardown_checks_deferred, 1);
        // The pass counts what the registry holds (the RunnersRegistered gauge).
        assert_eq!(report.registered_runners, 5);
        assert_eq!(
            *world.teardowns.lock().unwrap(),
            ["p7-j1-teardown-success-r11", "p7-j4-teardown-failed-r14"]
        );
        assert_eq!(report.reconciled.get(&Reason::FinishedHookLost), Some(&2));
        // The next pass starts nothing new (the same names) and counts nothing.
        let again = reconcile_pass(&world, &settings, now + MIN).await.unwrap();
        assert_eq!(again.reconciled.get(&Reason::FinishedHookLost), None);
    }
}
