//! GitLab's runner API behind the core's [`RunnerApi`] port.

use ephemeral_core::fleet::{JobAnswer, RunnerApi, RunnerRequest};
use ephemeral_core::secrets::Secret;
use ephemeral_core::webhook::PortError;
use ephemeral_gitlab::{GitLabClient, GitLabError, NewRunner, Registration};

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

impl RunnerApi for GitLabRunners {
    async fn create(&self, request: &RunnerRequest) -> Result<(u64, Secret), PortError> {
        let created = self
            .client
            .create_runner(
                &self.registration,
                &NewRunner {
                    description: request.description.clone(),
                    tags: request.tags.clone(),
                    // Unknown tags: the runner must be able to take the (untagged) job.
                    run_untagged: request.tags.is_empty(),
                    scope: self.scope.for_project(request.project_id),
                    maximum_timeout_seconds: self.maximum_timeout_seconds,
                },
            )
            .await
            .map_err(port)?;
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
