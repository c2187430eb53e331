//! Provision step of the provision workflow: one GitLab runner on one EC2 instance for one
//! job (EC2 branch), or one GitLab runner for a LAMBDA job's shell-runner invocation.
use fleet::handlers::jobs_ledger_from_env;
use fleet::{FleetSetup, Functions, ProvisionInput, now_ms, shell_runner_mode_from_env};
use lambda_runtime::{LambdaEvent, service_fn};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_runtime::Error> {
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
