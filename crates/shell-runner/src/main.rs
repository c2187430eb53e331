use lambda_runtime::{LambdaEvent, service_fn};
use shell_runner::{Config, Invocation, RunnerToken, ShellRunner, lambda_handler, new_system_id};

/// The runner token, read once per cold start. The error names the parameter, never a value.
async fn read_token(
    ssm: &aws_sdk_ssm::Client,
    name: &str,
) -> Result<RunnerToken, lambda_runtime::Error> {
    let out = ssm
        .get_parameter()
        .name(name)
        .with_decryption(true)
        .send()
        .await
        .map_err(|e| ephemeral_aws::port_error(&format!("reading SSM parameter {name}"), e))?;
    out.parameter()
        .and_then(|p| p.value())
        .map(|v| RunnerToken(v.trim().to_owned()))
        .filter(|t| !t.0.is_empty())
        .ok_or_else(|| format!("SSM parameter {name} has no value").into())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_runtime::Error> {
    ephemeral_aws::init_logging();
    let config = Config::from_env()?;
    let sdk = aws_config::load_from_env().await;
    let token = read_token(&aws_sdk_ssm::Client::new(&sdk), &config.token_parameter).await?;
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
