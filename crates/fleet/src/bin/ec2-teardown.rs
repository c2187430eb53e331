//! Teardown step of the teardown workflow: removes the runner that ran a finished job (and the
//! job's own runner when it never got a job).
use fleet::{FleetConfig, Functions, TeardownInput};
use lambda_runtime::{LambdaEvent, service_fn};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_runtime::Error> {
    ephemeral_aws::init_logging();
    let config = FleetConfig::from_env()?;
    let sdk = aws_config::load_from_env().await;
    let functions = &Functions::new(&config, &sdk).await?;
    lambda_runtime::run(service_fn(
        move |event: LambdaEvent<TeardownInput>| async move {
            functions.teardown(&event.payload).await
        },
    ))
    .await
}
