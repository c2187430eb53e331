//! The function's main body, run by its binary and by the stack's combined `functions` binary
//! (`crates/functions`): configuration read and clients built once, then the Lambda runtime's
//! loop.

use crate::aws::{JobsTable, ProvisionWorkflow, TeardownWorkflow};
use crate::gitlab::{GitLabPending, RunnerStatus};
use crate::{LEASE_NAME, Reconciler, ReconcilerConfig, RunnerLife};
use ephemeral_core::lease::{Lease, LeaseRun, with_lease};
use ephemeral_core::slots::Capped;
use ephemeral_gitlab::{GitLabClient, RetryPolicy};
use lambda_runtime::{LambdaEvent, service_fn};
use serde_json::Value;

use ephemeral_aws::now_ms;

/// The reconciler, on a schedule: provisions every job GitLab has pending for us that no
/// runner of ours can take. The scheduled event's content is not used.
pub async fn serve() -> Result<(), lambda_runtime::Error> {
    ephemeral_aws::init_logging();
    let config = ReconcilerConfig::from_env()?;
    let sdk = aws_config::load_from_env().await;
    let reconciler = &reconciler(&config, &sdk).await?;
    let settings = &config.settings;
    let leases = &fleet::lease::DynamoLeases {
        client: aws_sdk_dynamodb::Client::new(&sdk),
        table: config.leases_table_name.clone(),
    };
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Value>| async move {
        let now = now_ms();
        // Held until this invocation's deadline: a pass that dies leaves it to expire.
        let lease = Lease::until_deadline(LEASE_NAME, &event.context.request_id, now, event.context.deadline);
        let pass = match with_lease(leases, &lease, now, || reconciler.run(settings, now)).await? {
            LeaseRun::Held(current) => {
                tracing::info!(holder = %current.holder, until_ms = current.expires_at_ms,
                    "reconciler: another pass holds the lease; this one does nothing");
                return Ok::<_, lambda_runtime::Error>(serde_json::json!({ "skipped": "another pass is running" }));
            }
            LeaseRun::Ran { output, released } => {
                if let Err(e) = released {
                    tracing::warn!(error = %e, "reconciler: the lease was not given back; the next pass waits for it to expire");
                }
                output
            }
        };
        // A pass that could not list or read fails the invocation (the next one retries).
        let report = pass?;
        Ok(serde_json::json!({
            "pending": report.pending,
            "reconciled": report.reconciled_total(),
            "gave_up": report.gave_up.len(),
            "oldest_pending_ms": report.oldest_pending_ms,
            "errors": report.errors.len(),
        }))
    }))
    .await
}

/// The reconciler over its ports, with the GitLab tokens read once (at cold start).
async fn reconciler(
    config: &ReconcilerConfig,
    sdk: &aws_config::SdkConfig,
) -> Result<Reconciler<fleet::aws::DynamoRunnerLedger>, lambda_runtime::Error> {
    let ssm = aws_sdk_ssm::Client::new(sdk);
    let dynamodb = aws_sdk_dynamodb::Client::new(sdk);
    let token = ephemeral_aws::read_secret(&ssm, &config.gitlab_api_token_parameter).await?;
    let reconciler = Reconciler::new(
        GitLabPending {
            client: GitLabClient::new(&config.gitlab_url, RetryPolicy::default()),
            token,
        },
        JobsTable {
            client: dynamodb.clone(),
            table: config.jobs_table_name.clone(),
            ttl_seconds: config.job_ttl_seconds,
        },
        fleet::aws::DynamoRunnerLedger {
            client: dynamodb.clone(),
            jobs_table: config.jobs_table_name.clone(),
            runners_table: config.runners_table_name.clone(),
        },
        ProvisionWorkflow {
            client: aws_sdk_sfn::Client::new(sdk),
            arn: config.provision_state_machine_arn.clone(),
        },
        TeardownWorkflow {
            client: aws_sdk_sfn::Client::new(sdk),
            arn: config.teardown_state_machine_arn.clone(),
        },
        config.scopes.clone(),
        config.request_budget,
        RunnerLife {
            waits_ms: config.runner_waits_ms,
            project_scoped: config.runner_project_scoped,
        },
        // The caps the EC2 functions enforce, read by the same names.
        config.slots.clone().map(|slots| Capped {
            store: fleet::slots::DynamoSlots {
                client: dynamodb,
                table: slots.table,
            },
            caps: slots.caps,
        }),
    );
    Ok(match &config.runner_api_token_parameter {
        Some(parameter) => reconciler.with_runner_status(RunnerStatus {
            client: GitLabClient::new(&config.gitlab_url, RetryPolicy::default()),
            token: ephemeral_aws::read_secret(&ssm, parameter).await?,
        }),
        None => reconciler,
    })
}
