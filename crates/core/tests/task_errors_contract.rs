//! Both workflow definitions against the owner of our error names, `task_error::TaskError`
//! (issue 16): every `ErrorEquals` entry is a Step Functions name, an AWS integration error we
//! chose to handle, or one of ours; and each Lambda task retries exactly the errors its function
//! answers that a later attempt can fix, retries none of the others, and catches them all.
//! A rename on either side fails here rather than silently turning a retry off.

use std::collections::BTreeSet;
use std::path::Path;

use ephemeral_core::task_error::{RetryRules, TaskError};
use serde_json::Value;

/// The AWS integration errors the definitions may name (the Lambda invoke's and DynamoDB's
/// transient errors, and the conditional write that means "already done").
const AWS_ERRORS: &[&str] = &[
    "Lambda.ServiceException",
    "Lambda.AWSLambdaException",
    "Lambda.SdkClientException",
    "Lambda.TooManyRequestsException",
    "DynamoDB.ProvisionedThroughputExceededException",
    "DynamoDB.ThrottlingException",
    "DynamoDB.InternalServerErrorException",
    "DynamoDB.InternalServerError",
    "DynamoDB.RequestLimitExceeded",
    "DynamoDB.RequestLimitExceededException",
    "DynamoDB.ConditionalCheckFailedException",
];

/// The function a Lambda task invokes (its `FunctionName`) and what that function answers.
/// A task with a computed name (`FunctionName.$`, the asynchronous shell-runner invoke) gets
/// none of its function's errors: an `Event` invoke succeeds once Lambda has the event.
const FUNCTIONS: &[(&str, &[TaskError])] = &[
    ("${MapperFunctionArn}", TaskError::MAPPER),
    ("${Ec2ProvisionFunctionArn}", TaskError::EC2_PROVISION),
    ("${Ec2TeardownFunctionArn}", TaskError::EC2_TEARDOWN),
];

const DEFINITIONS: &[&str] = &["provision.asl.json", "teardown.asl.json"];

fn definition(file: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../statemachine")
        .join(file);
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Every state of a definition by name, those inside a Map's or a Parallel's own `States`
/// included (found wherever a `States` object sits).
fn states(definition: &Value) -> Vec<(String, Value)> {
    let mut found = Vec::new();
    let mut pending = vec![definition];
    while let Some(node) = pending.pop() {
        match node {
            Value::Object(map) => {
                if let Some(Value::Object(states)) = map.get("States") {
                    found.extend(states.iter().map(|(n, s)| (n.clone(), s.clone())));
                }
                pending.extend(map.values());
            }
            Value::Array(items) => pending.extend(items),
            _ => {}
        }
    }
    found
}

/// The names a state's `Retry` or `Catch` (`field`) lists.
fn names_in(state: &Value, field: &str) -> Vec<String> {
    let entries = state[field].as_array().map(Vec::as_slice).unwrap_or(&[]);
    entries
        .iter()
        .flat_map(|e| e["ErrorEquals"].as_array().expect("ErrorEquals is a list"))
        .map(|n| n.as_str().expect("an error name is a string").to_owned())
        .collect()
}

fn unknown_names(name: &str, state: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    for field in ["Retry", "Catch"] {
        for error in names_in(state, field) {
            let known = error.starts_with("States.")
                || AWS_ERRORS.contains(&error.as_str())
                || error.parse::<TaskError>().is_ok();
            if !known {
                problems.push(format!(
                    "{name}: {field} names `{error}`: not a States.* name, not in AWS_ERRORS, not a TaskError"
                ));
            }
        }
    }
    problems
}

/// What the function of a Lambda task answers; `None` for a state that invokes no Lambda.
fn answered_by(name: &str, state: &Value) -> Option<&'static [TaskError]> {
    if state["Resource"].as_str() != Some("arn:aws:states:::lambda:invoke") {
        return None;
    }
    let parameters = &state["Parameters"];
    if parameters.get("FunctionName.$").is_some() {
        return Some(&[]);
    }
    let function = parameters["FunctionName"].as_str().unwrap_or_default();
    let (_, answered) = FUNCTIONS
        .iter()
        .find(|(f, _)| *f == function)
        .unwrap_or_else(|| panic!("{name} invokes {function}: add it to FUNCTIONS"));
    Some(answered)
}

fn lambda_task_problems(name: &str, state: &Value, answered: &[TaskError]) -> Vec<String> {
    let mut problems = Vec::new();
    let rules = RetryRules::of_state(state).expect("a Retry list");
    let ours_retried: BTreeSet<TaskError> = names_in(state, "Retry")
        .iter()
        .filter_map(|n| n.parse().ok())
        .collect();
    let should: BTreeSet<TaskError> = TaskError::retried(answered).into_iter().collect();
    if ours_retried != should {
        problems.push(format!(
            "{name}: Retry names {ours_retried:?}, the function's retried errors are {should:?}"
        ));
    }
    for error in answered {
        let text = error.name();
        match rules.matching(&text) {
            Some(r) if !error.is_retried() => problems.push(format!(
                "{name}: {text} needs a person, yet the retrier {:?} retries it",
                r.error_equals
            )),
            Some(r) if r.max_attempts == 0 => {
                problems.push(format!("{name}: {text}'s retrier has MaxAttempts 0"))
            }
            _ => {}
        }
        let caught = names_in(state, "Catch")
            .iter()
            .any(|c| *c == text || c == "States.ALL" || c == "States.TaskFailed");
        if !caught {
            problems.push(format!("{name}: no Catch records {text} on the job's item"));
        }
    }
    problems
}

/// Every disagreement between a definition and [`TaskError`], one line each.
fn problems(definition: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    for (name, state) in states(definition) {
        problems.extend(unknown_names(&name, &state));
        if let Some(answered) = answered_by(&name, &state) {
            problems.extend(lambda_task_problems(&name, &state, answered));
        }
    }
    problems
}

#[test]
fn the_definitions_name_only_our_errors_and_retry_exactly_the_retryable_ones() {
    let mut lambda_tasks = 0;
    for file in DEFINITIONS {
        let definition = definition(file);
        assert_eq!(problems(&definition), Vec::<String>::new(), "{file}");
        lambda_tasks += states(&definition)
            .iter()
            .filter(|(n, s)| answered_by(n, s).is_some_and(|a| !a.is_empty()))
            .count();
    }
    // MapJob, ProvisionLambdaRunner, ProvisionEc2Runner, TearDownRunners.
    assert_eq!(lambda_tasks, 4);
}

/// The check itself fails on a one-sided change: a renamed entry, a retried configuration
/// error, a retry taken away (each made on a copy of the real definition).
#[test]
fn a_one_sided_change_to_a_definition_is_caught() {
    let edit = |state: &str, retrier: usize, names: Value| {
        let mut d = definition("provision.asl.json");
        d["States"][state]["Retry"][retrier]["ErrorEquals"] = names;
        problems(&d)
    };
    let renamed = edit(
        "ProvisionEc2Runner",
        1,
        serde_json::json!([
            "Ec2Unavailable",
            "ProvisionStepFailed",
            "DependencyFailed",
            "GitLabRunnerNotMade"
        ]),
    );
    assert!(
        renamed.iter().any(|p| p.contains("`GitLabRunnerNotMade`")),
        "{renamed:?}"
    );
    assert!(
        renamed.iter().any(|p| p.contains("Retry names")),
        "{renamed:?}"
    );
    let wildcard = edit("MapJob", 1, serde_json::json!(["States.ALL"]));
    assert!(
        wildcard
            .iter()
            .any(|p| p.contains("GitLabApiTokenMissing needs a person")),
        "{wildcard:?}"
    );
    let dropped = edit("MapJob", 1, serde_json::json!(["GitLabUnavailable"]));
    assert!(
        dropped.iter().any(|p| p.contains("MapJob: Retry names")),
        "{dropped:?}"
    );
}

#[test]
fn states_inside_a_map_or_parallel_are_checked_too() {
    let nested = serde_json::json!({"StartAt": "Fan", "States": {"Fan": {
        "Type": "Parallel", "End": true, "Branches": [{"StartAt": "Inner", "States": {
            "Inner": {"Type": "Task", "Resource": "arn:aws:states:::lambda:invoke",
                      "Parameters": {"FunctionName": "${Ec2TeardownFunctionArn}"},
                      "Retry": [{"ErrorEquals": ["TeardownStepFailed"]}], "End": true}}}]}}});
    let found = problems(&nested);
    assert!(
        found.iter().any(|p| p.starts_with("Inner: Retry names")),
        "{found:?}"
    );
    assert!(found.iter().any(|p| p.contains("no Catch")), "{found:?}");
}
