//! The reaper, on a schedule: removes instances, runners and token parameters that outlived
//! their job. The scheduled event's content is not used. One pass at a time: each pass holds
//! the `reaper` lease in the leases table for its invocation (request id, until its deadline).
use fleet::{FleetSetup, Functions, Invocation, now_ms};
use lambda_runtime::{LambdaEvent, service_fn};
use serde_json::Value;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_runtime::Error> {
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
