//! The reaper, on a schedule: removes instances, runners and token parameters that outlived
//! their job. The scheduled event's content is not used.
use fleet::{FleetConfig, Functions, now_ms};
use lambda_runtime::{LambdaEvent, service_fn};
use serde_json::Value;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_runtime::Error> {
    ephemeral_aws::init_logging();
    let config = FleetConfig::from_env()?;
    let sdk = aws_config::load_from_env().await;
    let functions = &Functions::new(&config, &sdk).await?;
    lambda_runtime::run(service_fn(move |_: LambdaEvent<Value>| async move {
        functions.reap(now_ms()).await
    }))
    .await
}
