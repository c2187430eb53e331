//! The function's main body, run by its binary and by the stack's combined `functions` binary
//! (`crates/functions`): configuration read and clients built once, then the Lambda runtime's
//! loop.

use std::sync::Arc;

use crate::tokens::SsmRunnerTokens;
use crate::{
    Config, Invocation, ShellRunner, ShellRunnerError, Tokens, lambda_handler, new_system_id,
};
use lambda_runtime::{LambdaEvent, service_fn};

/// The shell runner: one GitLab job per invocation, in this Lambda.
pub async fn serve() -> Result<(), lambda_runtime::Error> {
    ephemeral_aws::init_logging();
    let config = Config::from_env()?;
    let ssm = crate::ssm_client_from_env();
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
