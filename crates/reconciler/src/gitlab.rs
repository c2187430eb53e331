//! GitLab's pending jobs over the stack's scopes, within the pass's request budget.

use std::collections::BTreeSet;

use ephemeral_core::jobs::JobKey;
use ephemeral_core::reconcile::{GitLabJobState, PendingJob, PendingListing};
use ephemeral_core::webhook::PortError;
use ephemeral_gitlab::{GitLabClient, GitLabError, GitLabJob, RequestBudget, Secret};

use crate::config::Scopes;

pub struct GitLabPending {
    pub client: GitLabClient,
    pub token: Secret,
}

impl GitLabPending {
    /// The projects to list: the configured ones, the groups' projects, and (when nothing is
    /// configured) `seen`, the projects the jobs table holds.
    pub async fn projects(
        &self,
        scopes: &Scopes,
        seen: BTreeSet<u64>,
        budget: &RequestBudget,
    ) -> Result<(BTreeSet<u64>, bool), PortError> {
        if scopes.is_empty() {
            return Ok((seen, true));
        }
        let mut projects: BTreeSet<u64> = scopes.project_ids.iter().copied().collect();
        let mut complete = true;
        for group in &scopes.group_ids {
            let listing = self
                .client
                .group_project_ids(&self.token, *group, budget)
                .await
                .map_err(|e| PortError(format!("listing group {group}'s projects: {e}")))?;
            complete &= listing.complete;
            projects.extend(listing.items);
        }
        Ok((projects, complete))
    }

    /// Every pending job of `projects`, as far as the budget goes (a project GitLab refuses,
    /// e.g. deleted or not readable with the token, is reported and skipped).
    pub async fn pending(
        &self,
        projects: &BTreeSet<u64>,
        budget: &RequestBudget,
        problems: &mut Vec<String>,
    ) -> PendingListing {
        let mut listing = PendingListing {
            jobs: Vec::new(),
            complete: true,
            requests_left: 0,
        };
        for project in projects {
            match self
                .client
                .pending_jobs(&self.token, *project, budget)
                .await
            {
                Ok(page) => {
                    listing.complete &= page.complete;
                    listing
                        .jobs
                        .extend(page.items.iter().map(|job| pending_job(*project, job)));
                }
                Err(e) if e.is_transient() => {
                    listing.complete = false;
                    problems.push(format!("project {project}: {e}"));
                }
                Err(e) => problems.push(format!("project {project}: {e}")),
            }
        }
        listing.requests_left = budget.remaining();
        listing
    }

    /// One job, as GitLab has it; `None` when GitLab does not know it (404). One request of
    /// the pass's budget: the pass asks at most [`PendingListing::requests_left`] of these.
    pub async fn job(&self, key: JobKey) -> Result<Option<GitLabJobState>, PortError> {
        match self
            .client
            .job(&self.token, key.project_id, key.job_id)
            .await
        {
            Ok(job) => Ok(Some(GitLabJobState {
                key,
                name: job.name,
                status: job.status,
                runner_id: job.runner.map(|r| r.id),
                pipeline_id: job.pipeline.map(|p| p.id),
            })),
            Err(GitLabError::Status { status: 404, .. }) => Ok(None),
            Err(e) => Err(PortError(e.to_string())),
        }
    }
}

fn pending_job(project_id: u64, job: &GitLabJob) -> PendingJob {
    PendingJob {
        key: JobKey {
            project_id,
            job_id: job.id,
        },
        name: job.name.clone(),
        stage: job.stage.clone(),
        tags: job.tag_list.clone(),
        pipeline_id: job.pipeline.as_ref().map(|p| p.id),
        git_ref: job.git_ref.clone(),
        // GitLab's own measure of the wait; a job without one counts as just queued.
        pending_for_ms: job
            .queued_duration
            .filter(|s| s.is_finite() && *s > 0.0)
            .map_or(0, |s| (s * 1000.0) as u64),
    }
}

/// GitLab's word on whether a runner of ours is running a job (`GET /runners/:id/jobs?status=
/// running`), with the runner-management token: the read_api token cannot see runners.
pub struct RunnerStatus {
    pub client: GitLabClient,
    pub token: Secret,
}

impl RunnerStatus {
    pub async fn busy(&self, runner_id: u64) -> Result<bool, PortError> {
        self.client
            .runner_busy(&self.token, runner_id)
            .await
            .map_err(|e| PortError(format!("runner {runner_id}'s jobs: {e}")))
    }
}
