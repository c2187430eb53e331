//! The reconciler function: every minute (one pass at a time), GitLab's list of pending jobs
//! is held against the jobs table and our live runners, and every job left waiting with no
//! runner that can take it is provisioned again (`ephemeral_core::reconcile` decides).

pub mod aws;
pub mod config;
pub mod function;
pub mod gitlab;

use std::collections::HashMap;

use ephemeral_core::fleet::RunnerLedger;
use ephemeral_core::jobs::{JobKey, Started};
use ephemeral_core::metrics::{alarmed, charted, emf_count};
use ephemeral_core::reconcile::{
    GitLabJobState, JobRecord, LiveRunner, PassReport, PendingJob, PendingListing, Reason,
    ReconcilePorts, ReconcileSettings, RegisteredRunner, TeardownCheck, reconcile_pass,
    runner_as_seen,
};
use ephemeral_core::slots::{Capped, FreeSlots, count_free_slots};
use ephemeral_core::webhook::PortError;
use ephemeral_gitlab::RequestBudget;

pub use config::{ConfigError, ReconcilerConfig, Scopes};

/// The reconciler's lease in the leases table (the reaper has its own).
pub use ephemeral_core::lease::RECONCILER_LEASE as LEASE_NAME;

/// How long a runner of ours waits for a job after it is created (boot, then the runner's
/// own wait): past it, it has shut down.
#[derive(Debug, Clone, Copy)]
pub struct RunnerLife {
    pub waits_ms: u64,
    pub project_scoped: bool,
}

pub struct Reconciler<L> {
    pub gitlab: gitlab::GitLabPending,
    pub jobs: aws::JobsTable,
    pub runners: L,
    pub workflow: aws::ProvisionWorkflow,
    /// Started for jobs GitLab reports finished whose finished hook was lost.
    pub teardown: aws::TeardownWorkflow,
    pub scopes: Scopes,
    pub request_budget: u32,
    pub runner_life: RunnerLife,
    /// The instance caps' slots table; `None` without caps (every start allowed).
    pub slots: Option<Capped<fleet::slots::DynamoSlots>>,
    /// GitLab's runner status, with the runner-management token: `None` when the stack has
    /// none (no EC2 runners), and then a taken runner is found only once it is gone.
    pub runner_status: Option<gitlab::RunnerStatus>,
}

impl<L: RunnerLedger + Sync> Reconciler<L> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        gitlab: gitlab::GitLabPending,
        jobs: aws::JobsTable,
        runners: L,
        workflow: aws::ProvisionWorkflow,
        teardown: aws::TeardownWorkflow,
        scopes: Scopes,
        request_budget: u32,
        runner_life: RunnerLife,
        slots: Option<Capped<fleet::slots::DynamoSlots>>,
    ) -> Self {
        Self {
            gitlab,
            jobs,
            runners,
            workflow,
            teardown,
            scopes,
            request_budget,
            runner_life,
            slots,
            runner_status: None,
        }
    }

    /// Asks GitLab, with the runner-management token, whether runners are busy.
    pub fn with_runner_status(mut self, status: gitlab::RunnerStatus) -> Self {
        self.runner_status = Some(status);
        self
    }

    /// One pass, logged with one line per action taken and one summary line, and its metrics.
    pub async fn run(
        &self,
        settings: &ReconcileSettings,
        now_ms: u64,
    ) -> Result<PassReport, PortError> {
        let report = reconcile_pass(self, settings, now_ms).await?;
        print_metrics(&report, now_ms);
        log_actions(&report);
        Ok(report)
    }
}

/// The pass's metrics, as CloudWatch Embedded Metric Format lines.
fn print_metrics(report: &PassReport, now_ms: u64) {
    for (reason, count) in &report.reconciled {
        println!(
            "{}",
            emf_count(
                "reconciler",
                &format!("Reconciled_{}", reason.as_str()),
                u64::from(*count),
                now_ms
            )
        );
    }
    println!(
        "{}",
        charted::JOBS_RECONCILED.count(u64::from(report.reconciled_total()), now_ms)
    );
    println!(
        "{}",
        alarmed::ATTEMPTS_GIVEN_UP.count(report.gave_up.len() as u64, now_ms)
    );
    println!(
        "{}",
        alarmed::JOBS_WAITING_FOR_SLOT.count(report.waiting_for_slot as u64, now_ms)
    );
    println!(
        "{}",
        charted::RUNNERS_REGISTERED.count(report.registered_runners as u64, now_ms)
    );
    println!(
        "{}",
        alarmed::OLDEST_PENDING_AGE.value(report.oldest_pending_ms, "Milliseconds", now_ms)
    );
    println!(
        "{}",
        emf_count(
            "reconciler",
            "TeardownChecksDeferred",
            report.teardown_checks_deferred as u64,
            now_ms
        )
    );
}

/// One line per job given up or torn down late, per error, the drain, and the pass summary.
fn log_actions(report: &PassReport) {
    for (key, attempts, reason) in &report.gave_up {
        tracing::error!(
            project_id = key.project_id,
            job_id = key.job_id,
            attempts,
            reason = reason.as_str(),
            "gave up provisioning the job: GitLab still lists it pending; see provision_error on its item"
        );
    }
    for (key, check) in &report.teardown_checks {
        if let TeardownCheck::Started { job, started } = check {
            tracing::warn!(
                project_id = key.project_id,
                pipeline_id = job.pipeline_id,
                job_id = key.job_id,
                gitlab_status = job.status.as_str(),
                gitlab_runner_id = job.runner_id,
                started = ?started,
                reason = Reason::FinishedHookLost.as_str(),
                "reconciler: GitLab reports the job finished but it was not torn down (its finished hook was lost or not confirmed); teardown started"
            );
        }
    }
    for error in &report.errors {
        tracing::error!(error = %error, "reconciler: will retry on the next pass");
    }
    if let Some(drain) = &report.drained {
        tracing::warn!(
            drained_at_ms = drain.since_ms,
            drained_by = drain.by.as_deref(),
            reason = drain.reason.as_deref(),
            waiting = report.waiting_for_slot,
            "reconciler: the fleet is drained, no waiting job is started (runner-ops undrain ends it)"
        );
    }
    tracing::info!(
        pending = report.pending,
        complete = report.listing_complete,
        covered = report.covered,
        too_young = report.too_young,
        backing_off = report.backing_off,
        waiting_for_slot = report.waiting_for_slot,
        drained = report.drained.is_some(),
        registered_runners = report.registered_runners,
        reconciled = report.reconciled_total(),
        gave_up = report.gave_up.len(),
        lost_claims = report.lost_claims,
        teardown_checks = report.teardown_checks.len(),
        teardown_checks_deferred = report.teardown_checks_deferred,
        oldest_pending_ms = report.oldest_pending_ms,
        errors = report.errors.len(),
        "reconciler pass"
    );
}

impl<L: RunnerLedger + Sync> ReconcilePorts for Reconciler<L> {
    async fn pending_jobs(&self) -> Result<PendingListing, PortError> {
        let budget = RequestBudget::new(self.request_budget);
        let seen = if self.scopes.is_empty() {
            self.jobs.seen_projects().await?
        } else {
            Default::default()
        };
        let (projects, projects_complete) =
            self.gitlab.projects(&self.scopes, seen, &budget).await?;
        let mut problems = Vec::new();
        let mut listing = self.gitlab.pending(&projects, &budget, &mut problems).await;
        listing.complete &= projects_complete;
        for problem in &problems {
            tracing::warn!(problem = %problem, "reconciler: could not list a project's pending jobs");
        }
        if !listing.complete {
            tracing::warn!(
                budget = self.request_budget,
                "reconciler: the GitLab request budget ran out before every project was listed; the rest waits for the next pass (raise ReconcileRequestBudget)"
            );
        }
        Ok(listing)
    }

    async fn records(&self, keys: &[JobKey]) -> Result<HashMap<JobKey, JobRecord>, PortError> {
        self.jobs.records(keys).await
    }

    fn live_runners(
        &self,
        listed: &[PendingJob],
        registered: &[RegisteredRunner],
    ) -> Vec<LiveRunner> {
        let life = self.runner_life;
        registered
            .iter()
            .map(|r| {
                runner_as_seen(
                    r.runner_id,
                    r.made_for,
                    r.created_at_ms,
                    life.waits_ms,
                    life.project_scoped,
                    listed,
                )
            })
            .collect()
    }

    async fn drained(&self) -> Result<Option<ephemeral_core::drain::Drain>, PortError> {
        ephemeral_aws::read_drain(&self.jobs.client, &self.jobs.table).await
    }

    async fn free_slots(&self, projects: &[u64]) -> Result<FreeSlots, PortError> {
        match &self.slots {
            Some(slots) => count_free_slots(slots, projects).await,
            None => Ok(FreeSlots::default()),
        }
    }

    async fn claim_attempt(
        &self,
        key: JobKey,
        attempt: u32,
        reason: Reason,
        now_ms: u64,
    ) -> Result<bool, PortError> {
        self.jobs.claim_attempt(key, attempt, reason, now_ms).await
    }

    async fn start_provision(
        &self,
        job: &PendingJob,
        attempt: u32,
        now_ms: u64,
    ) -> Result<Started, PortError> {
        let started = self.workflow.start(job, attempt, now_ms).await?;
        tracing::info!(project_id = job.key.project_id, pipeline_id = job.pipeline_id, job_id = job.key.job_id,
            attempt, pending_for_ms = job.pending_for_ms, started = ?started, "reconciler: provisioning again");
        Ok(started)
    }

    async fn record_gave_up(
        &self,
        key: JobKey,
        _attempts: u32,
        reason: Reason,
        now_ms: u64,
    ) -> Result<(), PortError> {
        self.jobs.record_gave_up(key, reason, now_ms).await
    }

    async fn registered_runners(&self) -> Result<Vec<RegisteredRunner>, PortError> {
        Ok(self
            .runners
            .runners()
            .await?
            .into_iter()
            .map(|entry| RegisteredRunner {
                runner_id: entry.runner_id,
                made_for: JobKey {
                    project_id: entry.project_id,
                    job_id: entry.job_id,
                },
                created_at_ms: entry.created_at_ms,
            })
            .collect())
    }

    async fn gitlab_job(&self, key: JobKey) -> Result<Option<GitLabJobState>, PortError> {
        self.gitlab.job(key).await
    }

    async fn start_teardown(
        &self,
        job: &GitLabJobState,
        now_ms: u64,
    ) -> Result<Started, PortError> {
        self.teardown.start(job, now_ms).await
    }

    async fn record_teardown(
        &self,
        key: JobKey,
        reason: Reason,
        now_ms: u64,
    ) -> Result<(), PortError> {
        self.jobs.record_teardown(key, reason, now_ms).await
    }

    async fn runner_busy(&self, runner_id: u64) -> Result<Option<bool>, PortError> {
        match &self.runner_status {
            Some(status) => status.busy(runner_id).await.map(Some),
            None => Ok(None),
        }
    }
}
