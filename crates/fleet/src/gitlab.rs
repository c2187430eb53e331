//! GitLab's runner API behind the core's [`RunnerApi`] port.

use ephemeral_core::fleet::{
    JobAnswer, RunnerApi, RunnerRequest, lost_duplicates, marked_description,
};
use ephemeral_core::secrets::Secret;
use ephemeral_core::webhook::PortError;
use ephemeral_gitlab::{
    GitLabClient, GitLabError, NewRunner, Registration, RequestBudget, RunnerScope,
};

use crate::config::ScopeSetting;

#[derive(Debug, Clone)]
pub struct GitLabRunners {
    pub client: GitLabClient,
    /// Token with `create_runner` and `manage_runner` (or `api`): creates, deletes and asks.
    pub api_token: Secret,
    /// How runners are created: the API token, or a legacy registration token.
    pub registration: Registration,
    pub scope: ScopeSetting,
    pub maximum_timeout_seconds: Option<u64>,
}

fn port(e: GitLabError) -> PortError {
    PortError(e.to_string())
}

/// Unique enough per creation: a lost answer's runner carries the same mark as its retry's.
fn creation_mark() -> String {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    format!("{:012x}", hasher.finish() >> 16)
}

impl GitLabRunners {
    /// A creation that took more than one POST may have created a runner whose answer was
    /// lost: it carries this creation's marked description, and is deleted. Best effort: a
    /// listing GitLab refuses is logged (that runner then stays, unused, with a token nobody
    /// holds).
    async fn remove_lost_duplicates(&self, scope: RunnerScope, marked: &str, kept: u64) {
        let runner_type = match scope {
            RunnerScope::Instance => "instance_type",
            RunnerScope::Group(_) => "group_type",
            RunnerScope::Project(_) => "project_type",
        };
        let listed = match self
            .client
            .owned_runners(&self.api_token, runner_type, &RequestBudget::new(20))
            .await
        {
            Ok(listed) => listed.items,
            Err(e) => {
                tracing::warn!(error = %e, "a retried runner creation may have left a runner behind; listing the runners to find it failed");
                return;
            }
        };
        for duplicate in lost_duplicates(&listed, marked, kept) {
            match self.client.delete_runner(&self.api_token, duplicate).await {
                Ok(_) => tracing::warn!(
                    runner_id = duplicate,
                    kept,
                    "removed a runner a retried creation left behind (its answer was lost)"
                ),
                Err(e) => {
                    tracing::warn!(runner_id = duplicate, error = %e, "could not remove a runner a retried creation left behind")
                }
            }
        }
    }
}

impl RunnerApi for GitLabRunners {
    async fn create(&self, request: &RunnerRequest) -> Result<(u64, Secret), PortError> {
        let description = marked_description(&request.description, &creation_mark());
        let scope = self.scope.for_project(request.project_id);
        let created = self
            .client
            .create_runner(
                &self.registration,
                &NewRunner {
                    description: description.clone(),
                    tags: request.tags.clone(),
                    // Unknown tags: the runner must be able to take the (untagged) job.
                    run_untagged: request.tags.is_empty(),
                    scope,
                    maximum_timeout_seconds: self.maximum_timeout_seconds,
                },
            )
            .await
            .map_err(port)?;
        if created.attempts > 1 {
            self.remove_lost_duplicates(scope, &description, created.id)
                .await;
        }
        Ok((created.id, created.token))
    }

    async fn delete(&self, runner_id: u64) -> Result<(), PortError> {
        self.client
            .delete_runner(&self.api_token, runner_id)
            .await
            .map(|_| ())
            .map_err(port)
    }

    async fn busy(&self, runner_id: u64) -> Result<bool, PortError> {
        self.client
            .runner_busy(&self.api_token, runner_id)
            .await
            .map_err(port)
    }
}

/// GitLab's job API with the `read_api` token: what the teardown step confirms a finished
/// hook with (`GET /projects/:id/jobs/:job_id`, after the client's retries).
#[derive(Debug, Clone)]
pub struct GitLabJobs {
    pub client: GitLabClient,
    pub read_token: Secret,
}

impl GitLabJobs {
    pub async fn answer(&self, project_id: u64, job_id: u64) -> JobAnswer {
        match self.client.job(&self.read_token, project_id, job_id).await {
            Ok(job) => JobAnswer::Job {
                status: job.status,
                runner_id: job.runner.map(|r| r.id),
            },
            Err(GitLabError::Status { status: 404, .. }) => JobAnswer::NotFound,
            Err(e) => JobAnswer::Unavailable(e.to_string()),
        }
    }
}
