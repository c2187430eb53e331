//! Teardown step of the teardown workflow: removes the runner that ran a finished job (and the
//! job's own runner when it never got a job).
use fleet::{FleetSetup, Functions, TeardownInput};
use lambda_runtime::{LambdaEvent, service_fn};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_runtime::Error> {
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
