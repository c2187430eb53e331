//! Where an invocation's runner token comes from: the job's own parameter, read and deleted
//! at once (per-job runners), or the token shared by every invocation, read at cold start
//! (`ShellRunnerMode=shared-token`).

use std::sync::Arc;

use async_trait::async_trait;
use ephemeral_core::lambda_runner::RunnerGrant;
use ephemeral_core::secrets::Secret;

use crate::{Invocation, ShellRunnerError};

/// The per-job token parameters (SSM SecureStrings the provision workflow put).
#[async_trait]
pub trait RunnerTokens: Send + Sync {
    /// Reads the parameter and deletes it. `Ok(None)`: it is not there (an earlier delivery
    /// of the same invoke took it, or the reaper removed it). A failed delete after a read
    /// still returns the token: the reaper removes the parameter later.
    async fn take(&self, parameter: &str) -> Result<Option<Secret>, String>;
}

/// The token sources of one execution environment.
#[derive(Clone, Default)]
pub struct Tokens {
    pub shared: Option<Secret>,
    pub per_job: Option<Arc<dyn RunnerTokens>>,
}

/// The token an invocation asks GitLab with, and whether it is the job's own runner's.
pub struct Taken {
    pub token: Secret,
    pub per_job: bool,
}

impl Tokens {
    pub fn shared(token: Secret) -> Self {
        Self {
            shared: Some(token),
            per_job: None,
        }
    }

    /// `Ok(Err(reason))`: nothing to ask GitLab with, and nothing to retry (see
    /// [`crate::Outcome::NoRunner`]). `Err`: a failure Lambda should retry (SSM unavailable),
    /// or a configuration this environment cannot serve.
    pub async fn for_invocation(
        &self,
        invocation: &Invocation,
    ) -> Result<Result<Taken, String>, ShellRunnerError> {
        let shared = || {
            self.shared.clone().map(|token| Taken {
                token,
                per_job: false,
            })
        };
        match &invocation.runner {
            Some(RunnerGrant::PerJob {
                token_parameter, ..
            }) => {
                let tokens = self.per_job.as_ref().ok_or_else(|| {
                    ShellRunnerError::Config(
                        "the workflow made a per-job runner, but this shell runner cannot read per-job token parameters".into(),
                    )
                })?;
                match tokens
                    .take(token_parameter)
                    .await
                    .map_err(ShellRunnerError::Request)?
                {
                    Some(token) => Ok(Ok(Taken {
                        token,
                        per_job: true,
                    })),
                    None => Ok(Err(format!(
                        "the job's token parameter {token_parameter} is gone: an earlier delivery of this invoke took it, or the reaper removed it"
                    ))),
                }
            }
            Some(RunnerGrant::SharedToken) | None => shared().map(Ok).ok_or_else(|| {
                ShellRunnerError::Config(
                    "the workflow asked for the shared runner token (ShellRunnerMode=shared-token), but RUNNER_TOKEN_PARAMETER (ShellRunnerTokenParameterName) is not set".into(),
                )
            }),
            Some(other) => Ok(Err(format!(
                "the workflow made no runner for this invocation ({})",
                serde_json::to_value(other)
                    .ok()
                    .and_then(|v| v["outcome"].as_str().map(str::to_owned))
                    .unwrap_or_default()
            ))),
        }
    }
}

/// The per-job token parameters in SSM.
pub struct SsmRunnerTokens {
    pub ssm: aws_sdk_ssm::Client,
}

#[async_trait]
impl RunnerTokens for SsmRunnerTokens {
    async fn take(&self, parameter: &str) -> Result<Option<Secret>, String> {
        use aws_sdk_ssm::error::ProvideErrorMetadata as _;
        let read = self
            .ssm
            .get_parameter()
            .name(parameter)
            .with_decryption(true)
            .send()
            .await;
        let value = match read {
            Ok(out) => out.parameter.and_then(|p| p.value).map(Secret::new),
            Err(e) if e.code() == Some("ParameterNotFound") => return Ok(None),
            Err(e) => {
                return Err(format!(
                    "SSM GetParameter {parameter}: {}",
                    e.code().unwrap_or("unknown error")
                ));
            }
        };
        // Deleted before any job starts: a job that got hold of our credentials finds nothing.
        if let Err(e) = self.ssm.delete_parameter().name(parameter).send().await
            && e.code() != Some("ParameterNotFound")
        {
            tracing::warn!(
                parameter,
                error = e.code().unwrap_or("unknown error"),
                "could not delete the job's token parameter; the reaper removes it"
            );
        }
        Ok(value)
    }
}
