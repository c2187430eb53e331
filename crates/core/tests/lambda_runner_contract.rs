//! The per-job Lambda runner's facts that the template restates: how long the shell runner's
//! invoke may wait (the reaper keeps a Lambda runner that long), and the token parameters the
//! shell runner's role may take (where the provision function puts them).

use std::path::Path;

use ephemeral_core::lambda_runner::{HOST_PREFIX, INVOKE_MAX_EVENT_AGE, token_parameter_name};
use serde_norway::Value;

fn template() -> (String, Value) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../template.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    let value = serde_norway::from_str(&text).unwrap();
    (text, value)
}

/// The text of a `!Sub` (or plain) scalar.
fn scalar(value: &Value) -> String {
    match value {
        Value::Tagged(tagged) => scalar(&tagged.value),
        other => other.as_str().unwrap_or_default().to_owned(),
    }
}

#[test]
fn the_shell_runner_invoke_waits_at_most_what_the_reaper_allows_for() {
    let (_, t) = template();
    let age = &t["Resources"]["ShellRunnerFunction"]["Properties"]["EventInvokeConfig"]["MaximumEventAgeInSeconds"];
    assert_eq!(age.as_u64(), Some(INVOKE_MAX_EVENT_AGE.as_secs()));
}

#[test]
fn the_shell_runner_role_takes_exactly_the_per_job_parameters_the_provision_function_puts() {
    let (_, t) = template();
    let prefix = scalar(
        &t["Resources"]["Ec2ProvisionFunction"]["Properties"]["Environment"]["Variables"]["TOKEN_PARAMETER_PREFIX"],
    );
    let statements = t["Resources"]["ShellRunnerRole"]["Properties"]["Policies"][0]
        ["PolicyDocument"]["Statement"]
        .as_sequence()
        .unwrap()
        .clone();
    let take = statements
        .iter()
        .find(|s| s["Sid"].as_str() == Some("TakeJobRunnerTokens"))
        .expect("the role's TakeJobRunnerTokens statement");
    let resource = scalar(&take["Resource"]);
    let expected = format!(
        "parameter{}",
        token_parameter_name(&prefix, &format!("{HOST_PREFIX}*"))
    );
    assert!(resource.ends_with(&expected), "{resource} vs {expected}");
}
