//! The three functions' handlers: typed input from Step Functions (or the schedule), one
//! JSON log line and one EMF metric line per invocation, an output that holds no secret.

use aws_config::SdkConfig;
use ephemeral_core::fleet::{
    FleetPorts, FleetSettings, ProvisionError, Provisioned, ReapReport, TeardownError, TornDown,
    provision, reaper_pass, teardown,
};
use ephemeral_core::hook::JobEvent;
use ephemeral_core::mapping::{Executor, MapperOutput};
use ephemeral_core::metrics::{emf_count, emf_value};
use ephemeral_core::webhook::PortError;
use ephemeral_gitlab::{GitLabClient, Registration, RetryPolicy};
use serde::Deserialize;

use crate::aws::{DynamoRunnerLedger, Ec2Fleet, SsmTokenVault};
use crate::config::FleetConfig;
use crate::gitlab::GitLabRunners;

/// The provision workflow's state when it reaches the EC2 branch: the router's input plus the
/// mapper's answer at `mapped.decision`.
#[derive(Debug, Clone, Deserialize)]
pub struct ProvisionInput {
    pub job_key: String,
    pub job: JobEvent,
    pub mapped: Mapped,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Mapped {
    pub decision: MapperOutput,
}

/// The teardown workflow's input (from the router).
#[derive(Debug, Clone, Deserialize)]
pub struct TeardownInput {
    pub job_key: String,
    pub job: JobEvent,
}

pub type Ports = FleetPorts<Ec2Fleet, SsmTokenVault, GitLabRunners, DynamoRunnerLedger>;

/// Clients and settings, built once per cold start.
pub struct Functions {
    pub ports: Ports,
    pub settings: FleetSettings,
}

#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    #[error("{0}")]
    Provision(#[from] ProvisionError),
    #[error("{0}")]
    Teardown(#[from] TeardownError),
    #[error("{0}")]
    Port(#[from] PortError),
    #[error(
        "the mapper routed job {job_id} to {kind}, not EC2: the provision workflow's ChooseExecutor should not have called this step"
    )]
    NotAnEc2Route { job_id: u64, kind: &'static str },
}

impl Functions {
    /// Builds the clients and reads the GitLab token(s) from SSM.
    pub async fn new(config: &FleetConfig, sdk: &SdkConfig) -> Result<Self, PortError> {
        Self::with_retry(config, sdk, RetryPolicy::default()).await
    }

    pub async fn with_retry(
        config: &FleetConfig,
        sdk: &SdkConfig,
        retry: RetryPolicy,
    ) -> Result<Self, PortError> {
        let ssm = aws_sdk_ssm::Client::new(sdk);
        let api_token =
            ephemeral_aws::read_secret(&ssm, &config.gitlab_api_token_parameter).await?;
        let registration = match &config.registration_token_parameter {
            Some(name) => {
                Registration::RegistrationToken(ephemeral_aws::read_secret(&ssm, name).await?)
            }
            None => Registration::CreateRunnerToken(api_token.clone()),
        };
        Ok(Self {
            ports: FleetPorts {
                fleet: Ec2Fleet {
                    ec2: aws_sdk_ec2::Client::new(sdk),
                    ssm: ssm.clone(),
                    stack: config.settings.defaults.stack.clone(),
                    security_group_ids: config.security_group_ids.clone(),
                    instance_profile_arn: config.instance_profile_arn.clone(),
                },
                vault: SsmTokenVault {
                    ssm,
                    prefix: config.settings.token_parameter_prefix.clone(),
                    instance_arn_prefix: config.instance_arn_prefix.clone(),
                },
                api: GitLabRunners {
                    client: GitLabClient::new(&config.settings.gitlab_url, retry),
                    api_token,
                    registration,
                    scope: config.runner_scope.clone(),
                    maximum_timeout_seconds: config.max_job_timeout_seconds,
                },
                ledger: DynamoRunnerLedger {
                    client: aws_sdk_dynamodb::Client::new(sdk),
                    jobs_table: config.jobs_table_name.clone(),
                    runners_table: config.runners_table_name.clone(),
                },
            },
            settings: config.settings.clone(),
        })
    }

    pub async fn provision(
        &self,
        input: &ProvisionInput,
        now_ms: u64,
    ) -> Result<Provisioned, HandlerError> {
        let job = &input.job;
        let route = match &input.mapped.decision.decision.executor {
            Executor::Ec2(settings) => settings,
            other => {
                return Err(HandlerError::NotAnEc2Route {
                    job_id: job.job_id,
                    kind: other.kind(),
                });
            }
        };
        let result = provision(
            &self.ports,
            &self.settings,
            job,
            route,
            input.mapped.decision.tags.as_deref(),
            now_ms,
        )
        .await;
        // Measured after the step: the hook's receipt to the instance launched and its runner
        // created (`now_ms` is when the step started).
        let latency_ms = crate::now_ms().saturating_sub(job.received_at_ms);
        match &result {
            Ok(outcome) => {
                tracing::info!(
                    project_id = job.project_id,
                    pipeline_id = job.pipeline_id,
                    job_id = job.job_id,
                    delivery_id = %job.delivery_id,
                    outcome = %serde_json::to_string(outcome).unwrap_or_default(),
                    hook_to_launch_ms = latency_ms,
                    "provisioned"
                );
                if let Provisioned::Launched {
                    failed_attempts, ..
                } = outcome
                {
                    println!(
                        "{}",
                        emf_count("ec2-provision", "RunnersLaunched", 1, now_ms)
                    );
                    // From the webhook's receipt of the hook to the instance launched.
                    println!(
                        "{}",
                        emf_value(
                            "ec2-provision",
                            "HookToLaunch",
                            latency_ms,
                            "Milliseconds",
                            now_ms
                        )
                    );
                    println!(
                        "{}",
                        emf_count(
                            "ec2-provision",
                            "LaunchAttemptsFailed",
                            failed_attempts.len() as u64,
                            now_ms
                        )
                    );
                }
            }
            Err(e) => {
                tracing::error!(
                    project_id = job.project_id,
                    pipeline_id = job.pipeline_id,
                    job_id = job.job_id,
                    delivery_id = %job.delivery_id,
                    error = %e,
                    "provisioning failed"
                );
                println!(
                    "{}",
                    emf_count("ec2-provision", "LaunchFailures", 1, now_ms)
                );
            }
        }
        Ok(result?)
    }

    pub async fn teardown(&self, input: &TeardownInput) -> Result<TornDown, HandlerError> {
        let job = &input.job;
        let result = teardown(&self.ports, job).await;
        match &result {
            Ok(done) => tracing::info!(
                project_id = job.project_id,
                pipeline_id = job.pipeline_id,
                job_id = job.job_id,
                delivery_id = %job.delivery_id,
                status = job.status.as_str(),
                outcome = %serde_json::to_string(done).unwrap_or_default(),
                "torn down"
            ),
            Err(e) => tracing::error!(
                project_id = job.project_id,
                pipeline_id = job.pipeline_id,
                job_id = job.job_id,
                delivery_id = %job.delivery_id,
                error = %e,
                "teardown failed"
            ),
        }
        Ok(result?)
    }

    pub async fn reap(&self, now_ms: u64) -> Result<ReapReport, HandlerError> {
        let report = reaper_pass(&self.ports, &self.settings, now_ms).await?;
        for killed in &report.killed {
            tracing::warn!(instance_id = %killed.instance_id, runner_id = killed.runner_id, why = killed.why, "reaped");
        }
        for error in &report.errors {
            tracing::error!(error = %error, "reaper: will retry on the next pass");
        }
        tracing::info!(
            instances = report.instances_seen,
            killed = report.killed.len(),
            marked = report.marked.len(),
            stale_parameters = report.stale_parameters.len(),
            orphan_runners = report.orphan_runners.len(),
            errors = report.errors.len(),
            "reaper pass"
        );
        println!(
            "{}",
            emf_count(
                "reaper",
                "InstancesReaped",
                report.killed.len() as u64,
                now_ms
            )
        );
        Ok(report)
    }
}

impl HandlerError {
    /// The `errorType` Step Functions sees: stable names a `Catch` or `Retry` can match.
    pub fn error_type(&self) -> &'static str {
        match self {
            Self::Provision(ProvisionError::NoCapacity { .. }) => "NoCapacity",
            Self::Provision(ProvisionError::LaunchUnavailable { .. }) => "Ec2Unavailable",
            Self::Provision(ProvisionError::RunnerNotCreated { .. }) => "GitLabRunnerNotCreated",
            Self::Provision(ProvisionError::Plan(_) | ProvisionError::UserData(_)) => {
                "Ec2Misconfigured"
            }
            Self::Provision(ProvisionError::LaunchRefused { .. }) => "LaunchRefused",
            Self::Provision(ProvisionError::Step { .. }) => "ProvisionStepFailed",
            Self::Teardown(_) => "TeardownStepFailed",
            Self::Port(_) => "DependencyFailed",
            Self::NotAnEc2Route { .. } => "NotAnEc2Route",
        }
    }
}

impl From<HandlerError> for lambda_runtime::Diagnostic {
    fn from(e: HandlerError) -> Self {
        Self {
            error_type: e.error_type().to_owned(),
            error_message: e.to_string(),
        }
    }
}
