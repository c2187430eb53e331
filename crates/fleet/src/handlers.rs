//! The three functions' handlers: typed input from Step Functions (or the schedule), one
//! JSON log line and one EMF metric line per invocation, an output that holds no secret.

use aws_config::SdkConfig;
use ephemeral_core::fleet::{
    FleetPorts, FleetSettings, JobAnswer, ProvisionError, Provisioned, ReapReport, TeardownError,
    TornDown, launch_warnings, provision, reaper_pass, teardown,
};
use ephemeral_core::hook::JobEvent;
use ephemeral_core::jobs::JobKey;
use ephemeral_core::lambda_runner::{
    RunnerGrant, ShellRunnerMode, provision_lambda_runner, shared_token_grant,
};
use ephemeral_core::lease::{Lease, LeaseRun, REAPER_LEASE, with_lease};
use ephemeral_core::mapping::{Executor, ExecutorKind, MapperOutput};
use ephemeral_core::metrics::{emf_count, emf_value};
use ephemeral_core::slots::Capped;
use ephemeral_core::task_error::TaskError;
use ephemeral_core::webhook::PortError;
use ephemeral_gitlab::{GitLabClient, Registration, RetryPolicy};
use serde::{Deserialize, Serialize};

use crate::aws::{DynamoRunnerLedger, Ec2Fleet, SsmTokenVault};
use crate::config::{ConfigError, FleetConfig, FleetSetup, NOT_CONFIGURED};
use crate::gitlab::{GitLabJobs, GitLabRunners};
use crate::lease::DynamoLeases;
use crate::slots::DynamoSlots;

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

pub type Ports =
    FleetPorts<Ec2Fleet, SsmTokenVault, GitLabRunners, DynamoRunnerLedger, DynamoSlots>;

/// Clients and settings, built once per cold start.
pub struct Functions {
    /// `None`: EC2 runners are not configured (a Lambda-only stack).
    ec2: Option<Ec2Functions>,
    /// How LAMBDA jobs get their runner token (`SHELL_RUNNER_MODE`).
    shell_mode: ShellRunnerMode,
    /// The jobs table where there are no EC2 ports (a Lambda-only stack): the shared-token
    /// grant reads the drain switch there ([`Functions::with_jobs_ledger`]).
    jobs: Option<DynamoRunnerLedger>,
}

/// The jobs table as the template names it for the provision function (`JOBS_TABLE_NAME`,
/// `RUNNERS_TABLE_NAME`, set in every stack), for [`Functions::with_jobs_ledger`].
pub fn jobs_ledger_from_env(sdk: &SdkConfig) -> Option<DynamoRunnerLedger> {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    Some(DynamoRunnerLedger {
        client: aws_sdk_dynamodb::Client::new(sdk),
        jobs_table: var("JOBS_TABLE_NAME")?,
        runners_table: var("RUNNERS_TABLE_NAME")?,
    })
}

/// What the provision function answers: an EC2 runner, or the runner a LAMBDA job's shell
/// runner invocation takes (`ProvisionLambdaRunner`). Each carries its own `outcome` tag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum ProvisionOutput {
    Ec2(Provisioned),
    Lambda(RunnerGrant),
}

/// The functions of a stack with EC2 runners.
pub struct Ec2Functions {
    pub ports: Ports,
    pub settings: FleetSettings,
    /// The reaper's lease table (the other functions do not get it).
    pub leases: Option<DynamoLeases>,
    /// GitLab's job API with the `read_api` token, for the teardown step (only it gets the
    /// token). `None`: no finished hook can be confirmed, so teardown destroys nothing.
    pub jobs: Option<GitLabJobs>,
}

/// The invocation, as the reaper's lease needs it: who holds it and until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    pub request_id: String,
    /// Ms since the epoch; Lambda stops the invocation then.
    pub deadline_ms: u64,
}

impl Invocation {
    pub fn of(context: &lambda_runtime::Context) -> Self {
        Self {
            request_id: context.request_id.clone(),
            deadline_ms: context.deadline,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    #[error("{0}")]
    Provision(#[from] ProvisionError),
    #[error("{0}")]
    Teardown(#[from] TeardownError),
    #[error("{0}")]
    Port(#[from] PortError),
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error(
        "the mapper routed job {job_id} to {kind}, not EC2: the provision workflow's ChooseExecutor should not have called this step"
    )]
    NotAnEc2Route { job_id: u64, kind: ExecutorKind },
    #[error("job {job_id} was routed to EC2 ({matched}), but {NOT_CONFIGURED}")]
    Ec2NotConfigured { job_id: u64, matched: String },
    #[error(
        "job {job_id} was routed to LAMBDA and ShellRunnerMode is per-job (a GitLab runner and token for each job), but this stack cannot create runners: set RunnerApiTokenParameterName (an SSM SecureString with a GitLab token with the create_runner and manage_runner scopes) and GitLabUrl; or set ShellRunnerMode=shared-token with ShellRunnerTokenParameterName, which lets any job take the shared token (unsafe for untrusted projects)"
    )]
    LambdaRunnerNotConfigured { job_id: u64 },
}

impl Functions {
    /// Builds the clients and reads the GitLab token(s) from SSM.
    pub async fn new(config: &FleetConfig, sdk: &SdkConfig) -> Result<Self, PortError> {
        Self::with_retry(config, sdk, RetryPolicy::default()).await
    }

    /// As the environment says: with EC2 runners (clients built, tokens read), or without
    /// (nothing read, nothing built).
    pub async fn start(setup: &FleetSetup, sdk: &SdkConfig) -> Result<Self, PortError> {
        match setup {
            FleetSetup::Ec2(config) => Self::new(config, sdk).await,
            FleetSetup::NotConfigured => Ok(Self::not_configured()),
        }
    }

    /// A stack without EC2 runners: no client, no SSM read.
    pub fn not_configured() -> Self {
        Self {
            ec2: None,
            shell_mode: ShellRunnerMode::default(),
            jobs: None,
        }
    }

    /// The jobs table a stack without EC2 runners reads the drain switch from (a stack with
    /// them reads it through its EC2 ports).
    pub fn with_jobs_ledger(mut self, ledger: DynamoRunnerLedger) -> Self {
        self.jobs = Some(ledger);
        self
    }

    /// How LAMBDA jobs get their runner token (default: a runner per job).
    pub fn with_shell_mode(mut self, mode: ShellRunnerMode) -> Self {
        self.shell_mode = mode;
        self
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
        let jobs = match &config.gitlab_read_token_parameter {
            Some(name) => Some(GitLabJobs {
                client: GitLabClient::new(&config.settings.gitlab_url, retry),
                read_token: ephemeral_aws::read_secret(&ssm, name).await?,
            }),
            None => None,
        };
        let dynamo = aws_sdk_dynamodb::Client::new(sdk);
        let ports = FleetPorts {
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
                client: dynamo.clone(),
                jobs_table: config.jobs_table_name.clone(),
                runners_table: config.runners_table_name.clone(),
            },
            slots: config.slots.as_ref().map(|slots| Capped {
                store: DynamoSlots {
                    client: dynamo.clone(),
                    table: slots.table.clone(),
                },
                caps: slots.caps,
            }),
        };
        let leases = config.leases_table_name.clone().map(|table| DynamoLeases {
            client: dynamo,
            table,
        });
        Ok(Self {
            ec2: Some(Ec2Functions {
                ports,
                settings: config.settings.clone(),
                leases,
                jobs,
            }),
            shell_mode: ShellRunnerMode::default(),
            jobs: None,
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
        let result = match &self.ec2 {
            Some(ec2) => provision(
                &ec2.ports,
                &ec2.settings,
                job,
                route,
                input.mapped.decision.tags.as_deref(),
                now_ms,
            )
            .await
            .map_err(HandlerError::from),
            // Not retried by the workflow: recorded on the job's item, like LaunchRefused.
            None => Err(HandlerError::Ec2NotConfigured {
                job_id: job.job_id,
                matched: input.mapped.decision.decision.matched.clone(),
            }),
        };
        log_provisioned(job, &result, now_ms);
        result
    }

    /// The provision function's step, whichever branch of the workflow calls it: EC2
    /// (`ProvisionEc2Runner`) or the runner of a LAMBDA job (`ProvisionLambdaRunner`).
    pub async fn provision_step(
        &self,
        input: &ProvisionInput,
        now_ms: u64,
    ) -> Result<ProvisionOutput, HandlerError> {
        match &input.mapped.decision.decision.executor {
            Executor::Lambda { .. } => self
                .provision_lambda_runner(input, now_ms)
                .await
                .map(ProvisionOutput::Lambda),
            _ => self
                .provision(input, now_ms)
                .await
                .map(ProvisionOutput::Ec2),
        }
    }

    /// The runner a LAMBDA job's shell-runner invocation takes: one made for the job (its
    /// token in a per-job parameter), or the stack's shared token when the stack asks for it.
    pub async fn provision_lambda_runner(
        &self,
        input: &ProvisionInput,
        now_ms: u64,
    ) -> Result<RunnerGrant, HandlerError> {
        let job = &input.job;
        let result = match (self.shell_mode, &self.ec2) {
            (ShellRunnerMode::SharedToken, ec2) => {
                let ledger = ec2.as_ref().map(|e| &e.ports.ledger).or(self.jobs.as_ref());
                shared_token_grant(ledger, JobKey::of(job), now_ms)
                    .await
                    .map_err(HandlerError::from)
            }
            (ShellRunnerMode::PerJob, None) => {
                Err(HandlerError::LambdaRunnerNotConfigured { job_id: job.job_id })
            }
            (ShellRunnerMode::PerJob, Some(ec2)) => provision_lambda_runner(
                &ec2.ports,
                &ec2.settings,
                job,
                input.mapped.decision.tags.as_deref(),
                now_ms,
            )
            .await
            .map_err(HandlerError::from),
        };
        match &result {
            Ok(grant) => tracing::info!(
                project_id = job.project_id,
                pipeline_id = job.pipeline_id,
                job_id = job.job_id,
                delivery_id = %job.delivery_id,
                outcome = %serde_json::to_string(grant).unwrap_or_default(),
                "lambda runner provisioned"
            ),
            Err(e) => tracing::error!(
                project_id = job.project_id,
                pipeline_id = job.pipeline_id,
                job_id = job.job_id,
                delivery_id = %job.delivery_id,
                error_type = %e.error_type(),
                error = %e,
                "lambda runner provisioning failed"
            ),
        }
        result
    }

    pub async fn teardown(&self, input: &TeardownInput) -> Result<TornDown, HandlerError> {
        let job = &input.job;
        // The teardown workflow calls this step for every job a runner ran, whatever its
        // route: in a stack with EC2 runners, one of ours can take a job routed elsewhere (a
        // runner takes any pending job its tags match), so the route cannot tell. Without
        // EC2 runners no runner is ours, and there is nothing to look up.
        let Some(ec2) = &self.ec2 else {
            let done = TornDown {
                skipped: Some(
                    "EC2 runners are not configured in this stack: no runner of ours can have run the job".into(),
                ),
                ..TornDown::default()
            };
            tracing::info!(
                project_id = job.project_id,
                pipeline_id = job.pipeline_id,
                job_id = job.job_id,
                delivery_id = %job.delivery_id,
                status = job.status.as_str(),
                outcome = %serde_json::to_string(&done).unwrap_or_default(),
                "torn down"
            );
            return Ok(done);
        };
        // The hook is a claim: GitLab's word about the job decides (core::fleet::decide_teardown).
        let answer = match &ec2.jobs {
            Some(jobs) => jobs.answer(job.project_id, job.job_id).await,
            None => JobAnswer::NoToken,
        };
        let result = teardown(&ec2.ports, job, &answer).await;
        let now = crate::now_ms();
        match &result {
            Ok(TornDown {
                unconfirmed: Some(why),
                ..
            }) => {
                tracing::warn!(
                    project_id = job.project_id,
                    pipeline_id = job.pipeline_id,
                    job_id = job.job_id,
                    delivery_id = %job.delivery_id,
                    status = job.status.as_str(),
                    hook_runner_id = job.runner.as_ref().map(|r| r.id),
                    reason = why.code(),
                    detail = %why,
                    "unconfirmed: GitLab did not confirm the finished hook; nothing was removed"
                );
                println!(
                    "{}",
                    ephemeral_core::metrics::alarmed::TEARDOWNS_UNCONFIRMED.count(1, now)
                );
            }
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

    /// One reaper pass, only while holding the reaper's lease: a pass that finds it held by
    /// another (still running) pass does nothing and succeeds.
    pub async fn reap(
        &self,
        now_ms: u64,
        invocation: &Invocation,
    ) -> Result<ReapReport, HandlerError> {
        let Some(ec2) = &self.ec2 else {
            let report = ReapReport::skipped(
                "EC2 runners are not configured in this stack: nothing to reap".into(),
            );
            log_reaped(&report, now_ms);
            return Ok(report);
        };
        let leases = ec2.leases.as_ref().ok_or_else(|| {
            ConfigError("LEASES_TABLE_NAME is not set: the reaper runs only under its lease".into())
        })?;
        let lease = Lease::until_deadline(
            REAPER_LEASE,
            &invocation.request_id,
            now_ms,
            invocation.deadline_ms,
        );
        let pass = || reaper_pass(&ec2.ports, &ec2.settings, now_ms);
        let report = match with_lease(leases, &lease, now_ms, pass).await? {
            LeaseRun::Held(held) => ReapReport::skipped(format!(
                "another reaper pass holds the lease (request {}, until {} ms since the epoch)",
                held.holder, held.expires_at_ms
            )),
            LeaseRun::Ran { output, released } => {
                let mut report = output?;
                if let Err(e) = released {
                    report.errors.push(format!(
                        "releasing the reaper lease: {e}; the next pass waits until it expires"
                    ));
                }
                report
            }
        };
        log_reaped(&report, now_ms);
        Ok(report)
    }
}

/// One log line (and the metrics) per provisioning, with the fix for a fallback if any.
fn log_provisioned(job: &JobEvent, result: &Result<Provisioned, HandlerError>, now_ms: u64) {
    // Measured after the step: the hook's receipt to the instance launched and its runner
    // created (`now_ms` is when the step started).
    let latency_ms = crate::now_ms().saturating_sub(job.received_at_ms);
    let outcome = match result {
        Ok(outcome) => outcome,
        Err(e) => {
            tracing::error!(
                project_id = job.project_id,
                pipeline_id = job.pipeline_id,
                job_id = job.job_id,
                delivery_id = %job.delivery_id,
                error_type = %e.error_type(),
                error = %e,
                "provisioning failed"
            );
            println!(
                "{}",
                ephemeral_core::metrics::alarmed::LAUNCH_FAILURES.count(1, now_ms)
            );
            return;
        }
    };
    for warning in launch_warnings(outcome) {
        tracing::warn!(
            project_id = job.project_id,
            job_id = job.job_id,
            delivery_id = %job.delivery_id,
            "{warning}"
        );
    }
    tracing::info!(
        project_id = job.project_id,
        pipeline_id = job.pipeline_id,
        job_id = job.job_id,
        delivery_id = %job.delivery_id,
        outcome = %serde_json::to_string(outcome).unwrap_or_default(),
        hook_to_launch_ms = latency_ms,
        "provisioned"
    );
    if let Provisioned::WaitingForSlot { waiting_for } = outcome {
        tracing::warn!(
            project_id = job.project_id,
            pipeline_id = job.pipeline_id,
            job_id = job.job_id,
            delivery_id = %job.delivery_id,
            waiting_for = %waiting_for,
            "job waits for a runner instance slot (waiting_for: a full cap, or the fleet is drained); the reconciler starts it when one frees (raise the cap to start more at once; runner-ops undrain ends a drain)"
        );
        println!(
            "{}",
            emf_count("ec2-provision", "JobsWaitingForSlot", 1, now_ms)
        );
    }
    print_launch_metrics(outcome, latency_ms, now_ms);
}

/// A launch's metrics: one runner launched, the hook-to-launch latency, its failed attempts.
fn print_launch_metrics(outcome: &Provisioned, latency_ms: u64, now_ms: u64) {
    if let Provisioned::Launched {
        failed_attempts, ..
    } = outcome
    {
        println!(
            "{}",
            ephemeral_core::metrics::charted::RUNNERS_LAUNCHED.count(1, now_ms)
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

fn log_reaped(report: &ReapReport, now_ms: u64) {
    if let Some(why) = &report.skipped {
        tracing::info!(skipped = %why, "reaper pass");
        return;
    }
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
        leaked_slots = report.leaked_slots.len(),
        errors = report.errors.len(),
        "reaper pass"
    );
    println!(
        "{}",
        ephemeral_core::metrics::alarmed::INSTANCES_REAPED
            .count(report.killed.len() as u64, now_ms)
    );
    println!(
        "{}",
        ephemeral_core::metrics::charted::LEAKED_SLOTS_GIVEN_BACK
            .count(report.leaked_slots.len() as u64, now_ms)
    );
}

impl HandlerError {
    /// The `errorType` Step Functions sees: one of [`TaskError::EC2_PROVISION`] or
    /// [`TaskError::EC2_TEARDOWN`] (the reaper's `FleetMisconfigured` goes to its schedule).
    pub fn error_type(&self) -> TaskError {
        match self {
            Self::Provision(ProvisionError::NoCapacity { .. }) => TaskError::NoCapacity,
            Self::Provision(ProvisionError::LaunchUnavailable { .. }) => TaskError::Ec2Unavailable,
            Self::Provision(ProvisionError::RunnerNotCreated { .. }) => {
                TaskError::GitLabRunnerNotCreated
            }
            Self::Provision(ProvisionError::Plan(_) | ProvisionError::UserData(_)) => {
                TaskError::Ec2Misconfigured
            }
            Self::Provision(ProvisionError::LaunchRefused { .. }) => TaskError::LaunchRefused,
            Self::Provision(ProvisionError::Step { .. } | ProvisionError::SlotInFlight { .. }) => {
                TaskError::ProvisionStepFailed
            }
            Self::Teardown(_) => TaskError::TeardownStepFailed,
            Self::Port(_) => TaskError::DependencyFailed,
            Self::Config(_) => TaskError::FleetMisconfigured,
            Self::NotAnEc2Route { .. } => TaskError::NotAnEc2Route,
            Self::Ec2NotConfigured { .. } => TaskError::Ec2NotConfigured,
            Self::LambdaRunnerNotConfigured { .. } => TaskError::LambdaRunnerNotConfigured,
        }
    }
}

impl From<HandlerError> for lambda_runtime::Diagnostic {
    fn from(e: HandlerError) -> Self {
        Self {
            error_type: e.error_type().name(),
            error_message: e.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The errors this crate's own checks raise answer with a name the workflow expects from
    /// its step (`tests/task_errors_contract.rs` in the core checks the definitions).
    #[test]
    fn the_steps_answer_with_the_names_the_workflows_expect() {
        let job_id = 1;
        for e in [
            HandlerError::Ec2NotConfigured {
                job_id,
                matched: "default".into(),
            },
            HandlerError::NotAnEc2Route {
                job_id,
                kind: ExecutorKind::Lambda,
            },
            HandlerError::LambdaRunnerNotConfigured { job_id },
            HandlerError::Port(PortError("ssm down".into())),
        ] {
            assert!(TaskError::EC2_PROVISION.contains(&e.error_type()), "{e}");
        }
        let teardown = HandlerError::Teardown(TeardownError {
            what: "delete the runner",
            runner_id: 7,
            error: PortError("GitLab down".into()),
        });
        assert!(TaskError::EC2_TEARDOWN.contains(&teardown.error_type()));
        assert!(teardown.error_type().is_retried());
    }

    #[test]
    fn not_configured_names_what_to_set() {
        let e = HandlerError::Ec2NotConfigured {
            job_id: 42,
            matched: "default".into(),
        };
        let text = e.to_string();
        assert_eq!(e.error_type(), TaskError::Ec2NotConfigured);
        assert!(!e.error_type().is_retried());
        assert!(
            text.starts_with(
                "job 42 was routed to EC2 (default), but EC2 runners are not configured"
            ),
            "{text}"
        );
        for name in [
            "RunnerApiTokenParameterName",
            "GitLabUrl",
            "SubnetIds",
            "LAMBDA",
        ] {
            assert!(text.contains(name), "{text}");
        }
    }
}
