//! An invocation takes its job's own runner token from the job's parameter (gone once read),
//! and does without a shared token; against `gitlab-runner-mock`. That the runner is deleted
//! after the job and a stolen token is then refused is shown against a GitLab that keeps
//! runners (tests/e2e/tests/lambda_runner_moto.rs).

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use common::*;
use ephemeral_core::secrets::Secret;
use lambda_runtime::{Context, LambdaEvent};
use shell_runner::{Invocation, Outcome, RunnerTokens, ShellRunner, Tokens, lambda_handler};

/// Token parameters in memory; counts reads.
#[derive(Default)]
struct Parameters {
    values: Mutex<HashMap<String, String>>,
    takes: Mutex<u32>,
}

#[async_trait]
impl RunnerTokens for Parameters {
    async fn take(&self, parameter: &str) -> Result<Option<Secret>, String> {
        *self.takes.lock().unwrap() += 1;
        Ok(self
            .values
            .lock()
            .unwrap()
            .remove(parameter)
            .map(Secret::new))
    }
}

async fn invoke_with(runner: &ShellRunner, payload: serde_json::Value) -> Result<Outcome, String> {
    let payload: Invocation = serde_json::from_value(payload).unwrap();
    let mut context = Context::default();
    context.deadline = u64::MAX;
    lambda_handler(runner, LambdaEvent::new(payload, context))
        .await
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn the_job_s_token_is_taken_once_and_a_repeated_delivery_finds_none() {
    let mock = gitlab_runner_mock::GitlabRunnerMock::start().await;
    let root = tempfile::tempdir().unwrap();
    let parameters = Arc::new(Parameters::default());
    let parameter = "/er/ci/runner-tokens/lambda-4-1-1";
    parameters
        .values
        .lock()
        .unwrap()
        .insert(parameter.into(), mock.runner_token().into());
    // No shared token at all: the job's own is the only one.
    let runner = ShellRunner::with_tokens(
        config(&mock, root.path()),
        Tokens {
            shared: None,
            per_job: Some(parameters.clone()),
        },
        shell_runner::new_system_id(),
    );
    let job = common::job(&mock, "unit", &["echo per-job"], &[], 60, |_| {});
    let mut payload = payload(job.id());
    payload["runner"] = serde_json::json!({
        "outcome": "per_job", "runner_id": 9, "token_parameter": parameter
    });

    let first = invoke_with(&runner, payload.clone()).await.unwrap();
    assert!(matches!(first, Outcome::Ran(_)), "{first:?}");
    assert!(log(&job).contains("per-job"));
    assert!(
        parameters.values.lock().unwrap().is_empty(),
        "taken and gone"
    );

    // Lambda delivers the same invoke again: no token, no job taken, nothing to retry.
    let again = invoke_with(&runner, payload).await.unwrap();
    match again {
        Outcome::NoRunner { reason } => assert!(reason.contains(parameter), "{reason}"),
        other => panic!("expected no runner, got {other:?}"),
    }
    assert_eq!(*parameters.takes.lock().unwrap(), 2);
}

#[tokio::test]
async fn a_shared_token_grant_without_a_shared_token_is_a_configuration_error() {
    let mock = gitlab_runner_mock::GitlabRunnerMock::start().await;
    let root = tempfile::tempdir().unwrap();
    let runner = ShellRunner::with_tokens(
        config(&mock, root.path()),
        Tokens {
            shared: None,
            per_job: Some(Arc::new(Parameters::default())),
        },
        shell_runner::new_system_id(),
    );
    for grant in [
        serde_json::json!({"outcome": "shared_token"}),
        serde_json::Value::Null,
    ] {
        let mut payload = payload(1);
        if !grant.is_null() {
            payload["runner"] = grant;
        }
        let err = invoke_with(&runner, payload).await.unwrap_err();
        assert!(err.contains("ShellRunnerTokenParameterName"), "{err}");
    }
}
