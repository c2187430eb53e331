use lambda_runtime::{LambdaEvent, service_fn};
use shell_runner::{Config, Invocation, ShellRunner, lambda_handler, new_system_id};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_runtime::Error> {
    ephemeral_aws::init_logging();
    let config = Config::from_env()?;
    let sdk = aws_config::load_from_env().await;
    // The runner token, read once per cold start. The error names the parameter, never a value.
    let token =
        ephemeral_aws::read_secret(&aws_sdk_ssm::Client::new(&sdk), &config.token_parameter)
            .await?;
    // One runner manager in GitLab per execution environment: the id lives as long as it.
    let system_id = new_system_id();
    tracing::info!(system_id = %system_id, "shell runner ready");
    let runner = ShellRunner::new(config, token, system_id).await;
    let runner = &runner;
    lambda_runtime::run(service_fn(
        move |event: LambdaEvent<Invocation>| async move { lambda_handler(runner, event).await },
    ))
    .await
}
