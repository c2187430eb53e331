//! The three functions' main bodies, each run by its binary (`src/bin/`) and by the stack's
//! combined `functions` binary (`crates/functions`): configuration read and clients built once,
//! then the Lambda runtime's loop.

use crate::handlers::jobs_ledger_from_env;
use crate::{
    FleetSetup, Functions, Invocation, ProvisionInput, TeardownInput, now_ms,
    shell_runner_mode_from_env,
};
use lambda_runtime::{LambdaEvent, service_fn};
use serde_json::Value;

/// Provision step of the provision workflow: one GitLab runner on one EC2 instance for one
/// job (EC2 branch), or one GitLab runner for a LAMBDA job's shell-runner invocation.
pub async fn provision() -> Result<(), lambda_runtime::Error> {
    ephemeral_aws::init_logging();
    // Without EC2 runners (a Lambda-only stack) it starts without reading SSM and answers
    // every job with Ec2NotConfigured.
    let setup = FleetSetup::from_env()?;
    let sdk = aws_config::load_from_env().await;
    let shell_mode = shell_runner_mode_from_env()?;
    let functions = Functions::start(&setup, &sdk)
        .await?
        .with_shell_mode(shell_mode);
    // The drain switch is read through the EC2 ports; a stack without them reads it here.
    let functions = &match jobs_ledger_from_env(&sdk) {
        Some(ledger) => functions.with_jobs_ledger(ledger),
        None => functions,
    };
    lambda_runtime::run(service_fn(
        move |event: LambdaEvent<ProvisionInput>| async move {
            // An error fails the task: the workflow records it on the job's item.
            functions.provision_step(&event.payload, now_ms()).await
        },
    ))
    .await
}

/// Teardown step of the teardown workflow: removes the runner that ran a finished job (and the
/// job's own runner when it never got a job).
pub async fn teardown() -> Result<(), lambda_runtime::Error> {
    ephemeral_aws::init_logging();
    // Without EC2 runners it starts without reading SSM and answers success, nothing removed.
    let setup = FleetSetup::from_env()?;
    let sdk = aws_config::load_from_env().await;
    let functions = &Functions::start(&setup, &sdk).await?;
    lambda_runtime::run(service_fn(
        move |event: LambdaEvent<TeardownInput>| async move {
            functions.teardown(&event.payload).await
        },
    ))
    .await
}

/// The reaper, on a schedule: removes instances, runners and token parameters that outlived
/// their job. The scheduled event's content is not used. One pass at a time: each pass holds
/// the `reaper` lease in the leases table for its invocation (request id, until its deadline).
pub async fn reaper() -> Result<(), lambda_runtime::Error> {
    ephemeral_aws::init_logging();
    // Without EC2 runners every pass is a logged no-op.
    let setup = FleetSetup::from_env()?;
    if let FleetSetup::Ec2(config) = &setup {
        config.leases_table()?;
    }
    let sdk = aws_config::load_from_env().await;
    let functions = &Functions::start(&setup, &sdk).await?;
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Value>| async move {
        functions
            .reap(now_ms(), &Invocation::of(&event.context))
            .await
    }))
    .await
}
