//! The error names our Lambda tasks answer Step Functions with (the `errorType` a `Retry` or
//! `Catch` of `statemachine/*.asl.json` matches). They are a contract with the definitions:
//! this enum owns the text, and `tests/task_errors_contract.rs` checks both definitions
//! against it, so renaming one side fails a test instead of silently turning a retry off.
//!
//! It lives in the core because both the mapper (its errors are [`crate::mapping::MapError`])
//! and the fleet's handlers answer with these names, and the contract test needs no AWS SDK.

use serde::{Deserialize, Serialize};

/// Why a workflow's Lambda task failed, as Step Functions sees it. The serde text is the
/// `errorType`: the variant's own name, PascalCase like the AWS error names beside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub enum TaskError {
    /// The route needs the mapper's `read_api` token and the stack has none.
    GitLabApiTokenMissing,
    /// GitLab answered 5xx or timed out after the client's own retries.
    GitLabUnavailable,
    /// GitLab refused the token (401/403): a person must replace it.
    GitLabTokenRejected,
    /// A table, a parameter or another AWS dependency failed after the SDK's retries.
    DependencyFailed,
    NoCapacity,
    Ec2Unavailable,
    GitLabRunnerNotCreated,
    Ec2Misconfigured,
    LaunchRefused,
    ProvisionStepFailed,
    TeardownStepFailed,
    NotAnEc2Route,
    Ec2NotConfigured,
    LambdaRunnerNotConfigured,
    /// The reaper's configuration error: it goes to the reaper's schedule, not a workflow.
    FleetMisconfigured,
}

use TaskError::*;

impl TaskError {
    /// What the mapper (state MapJob) answers.
    pub const MAPPER: &[TaskError] = &[
        GitLabApiTokenMissing,
        GitLabUnavailable,
        GitLabTokenRejected,
        DependencyFailed,
    ];

    /// What the ec2-provision function (ProvisionEc2Runner, ProvisionLambdaRunner) answers.
    pub const EC2_PROVISION: &[TaskError] = &[
        NoCapacity,
        Ec2Unavailable,
        GitLabRunnerNotCreated,
        Ec2Misconfigured,
        LaunchRefused,
        ProvisionStepFailed,
        DependencyFailed,
        NotAnEc2Route,
        Ec2NotConfigured,
        LambdaRunnerNotConfigured,
    ];

    /// What the ec2-teardown function (TearDownRunners) may answer: its handler's error type
    /// allows `DependencyFailed` too, though today every port error of a teardown comes
    /// wrapped as `TeardownStepFailed`.
    pub const EC2_TEARDOWN: &[TaskError] = &[TeardownStepFailed, DependencyFailed];

    /// A later attempt can fix it (an outage, a race between two runs of a step), so the
    /// workflow retries it; the others need a person (a setting, a token) and fail at once.
    pub const fn is_retried(self) -> bool {
        matches!(
            self,
            GitLabUnavailable
                | DependencyFailed
                | Ec2Unavailable
                | ProvisionStepFailed
                | GitLabRunnerNotCreated
                | TeardownStepFailed
        )
    }

    /// Those of `answered` the workflow retries, in their order.
    pub fn retried(answered: &[TaskError]) -> Vec<TaskError> {
        answered
            .iter()
            .copied()
            .filter(|e| e.is_retried())
            .collect()
    }

    /// The `errorType` text, as serde writes it.
    pub fn name(self) -> String {
        match serde_json::to_value(self) {
            Ok(serde_json::Value::String(name)) => name,
            other => unreachable!("a unit variant serializes to a string, not {other:?}"),
        }
    }
}

impl std::fmt::Display for TaskError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

impl std::str::FromStr for TaskError {
    type Err = serde_json::Error;

    /// An `errorType` (or an `ErrorEquals` entry) back to its variant.
    fn from_str(name: &str) -> Result<Self, Self::Err> {
        serde_json::from_value(serde_json::Value::String(name.to_owned()))
    }
}

/// One `Retry` entry of a Task state.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Retrier {
    pub error_equals: Vec<String>,
    /// Retries after the first attempt; Step Functions' default is 3.
    #[serde(default = "three")]
    pub max_attempts: u32,
}

fn three() -> u32 {
    3
}

impl Retrier {
    /// Whether this entry takes an error a task answered (never a `States.Timeout`).
    pub fn matches(&self, error: &str) -> bool {
        self.error_equals
            .iter()
            .any(|e| e == error || e == "States.ALL" || e == "States.TaskFailed")
    }
}

/// A Task state's `Retry` list as Step Functions applies it: the first entry that matches an
/// error decides. Tests that play a workflow's steps read it from the definition rather than
/// restating its names and counts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetryRules(pub Vec<Retrier>);

impl RetryRules {
    /// The `Retry` of `state` (a state object of a definition); none when it has no `Retry`.
    pub fn of_state(state: &serde_json::Value) -> Result<Self, serde_json::Error> {
        match state.get("Retry") {
            None => Ok(Self::default()),
            Some(retry) => serde_json::from_value(retry.clone()).map(Self),
        }
    }

    pub fn matching(&self, error: &str) -> Option<&Retrier> {
        self.0.iter().find(|r| r.matches(error))
    }

    /// How many attempts in all the step gets while it keeps failing with `error`.
    pub fn attempts(&self, error: &str) -> u32 {
        1 + self.matching(error).map_or(0, |r| r.max_attempts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_name_is_the_text_step_functions_matches_and_parses_back() {
        for e in TaskError::EC2_PROVISION
            .iter()
            .chain(TaskError::MAPPER)
            .chain(TaskError::EC2_TEARDOWN)
        {
            assert_eq!(e.name().parse::<TaskError>().unwrap(), *e);
        }
        assert_eq!(GitLabApiTokenMissing.to_string(), "GitLabApiTokenMissing");
        assert_eq!(Ec2Unavailable.name(), "Ec2Unavailable");
        assert!("States.ALL".parse::<TaskError>().is_err());
    }

    #[test]
    fn only_what_a_later_attempt_can_fix_is_retried() {
        assert_eq!(
            TaskError::retried(TaskError::MAPPER),
            [GitLabUnavailable, DependencyFailed]
        );
        assert_eq!(
            TaskError::retried(TaskError::EC2_TEARDOWN),
            [TeardownStepFailed, DependencyFailed]
        );
        assert!(!Ec2NotConfigured.is_retried() && !GitLabTokenRejected.is_retried());
    }

    #[test]
    fn the_first_matching_retrier_decides_the_attempts() {
        let state = serde_json::json!({"Retry": [
            {"ErrorEquals": ["Lambda.ServiceException"], "MaxAttempts": 5},
            {"ErrorEquals": ["GitLabUnavailable", "DependencyFailed"], "MaxAttempts": 2},
            {"ErrorEquals": ["States.ALL"]}
        ]});
        let rules = RetryRules::of_state(&state).unwrap();
        assert_eq!(rules.attempts("Lambda.ServiceException"), 6);
        assert_eq!(rules.attempts(&DependencyFailed.name()), 3);
        assert_eq!(
            rules.attempts("Anything"),
            4,
            "States.ALL, default MaxAttempts 3"
        );
        let none = RetryRules::of_state(&serde_json::json!({"Type": "Task"})).unwrap();
        assert_eq!(none.attempts("GitLabUnavailable"), 1);
    }
}
