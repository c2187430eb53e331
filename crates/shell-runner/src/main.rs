use std::sync::Arc;

use lambda_runtime::{LambdaEvent, service_fn};
use shell_runner::tokens::SsmRunnerTokens;
use shell_runner::{
    Config, Invocation, ShellRunner, ShellRunnerError, Tokens, lambda_handler, new_system_id,
};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_runtime::Error> {
    ephemeral_aws::init_logging();
    let config = Config::from_env()?;
    let ssm = shell_runner::ssm_client_from_env();
    // The shared token (ShellRunnerMode=shared-token only), read once per cold start. The
    // error names the parameter, never a value. Per-job tokens are taken per invocation.
    let shared = match &config.token_parameter {
        Some(name) => Some(ephemeral_aws::read_secret(&ssm, name).await?),
        None => None,
    };
    let tokens = Tokens {
        shared,
        per_job: Some(Arc::new(SsmRunnerTokens { ssm })),
    };
    // One runner manager in GitLab per execution environment: the id lives as long as it.
    let system_id = new_system_id();
    let runner = ShellRunner::with_tokens(config, tokens, system_id.clone());
    if let Some(refusal) = runner.url_refusal() {
        return Err(ShellRunnerError::Config(refusal.to_owned()).into());
    }
    tracing::info!(system_id = %system_id, "shell runner ready");
    let runner = &runner;
    lambda_runtime::run(service_fn(
        move |event: LambdaEvent<Invocation>| async move { lambda_handler(runner, event).await },
    ))
    .await
}
