//! Per-job runners for the in-Lambda shell runner: before the provision workflow invokes the
//! shell runner for a job, a GitLab runner is created for that job alone (project-scoped and
//! locked like an EC2 runner, with the job's tags), and its token is put in a per-job SSM
//! SecureString that the invocation reads and deletes at once. The invocation deletes the
//! runner when it is done (its own token suffices: `DELETE /runners`); the job's teardown and
//! the reaper delete it if that failed. A token a job steals from its invocation is therefore
//! useless once the job is over, and no invocation holds a token that can take another job of
//! another project.
//!
//! Such a runner has no instance. In the runner registry, the jobs table and the token vault
//! it stands where an EC2 runner's instance id stands, as a *Lambda host* id
//! ([`host_id`]): `lambda-<project>-<job>-<attempt>`. Every removal skips the instance
//! (there is none to terminate) and the slot (the Lambda route is capped by reserved
//! concurrency, not by slots).
//!
//! The shared-token mode (one long-lived `glrt-` token for every invocation) stays for a user
//! who asks for it explicitly (`ShellRunnerMode=shared-token`): any job can then take the
//! token and with it every later job this runner may run. Unsafe for untrusted projects.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::fleet::{
    Fleet, FleetPorts, FleetSettings, ProvisionError, RunnerApi, RunnerEntry, RunnerLedger,
    RunnerRequest, TokenVault, Waiting, cleanup_note, record_running_or_undo, register_and_store,
    remove_runner, step, wait_if_drained,
};
use crate::hook::JobEvent;
use crate::jobs::{JobKey, JobPhase};
use crate::slots::{CapReached, SlotStore};

/// What every Lambda host id starts with; no EC2 instance id does (`i-...`).
pub const HOST_PREFIX: &str = "lambda-";

/// The Lambda host of a (job, attempt): where an instance id stands for an EC2 runner.
pub fn host_id(key: JobKey, attempt: u32) -> String {
    format!(
        "{HOST_PREFIX}{}-{}-{}",
        key.project_id,
        key.job_id,
        attempt.max(1)
    )
}

/// Whether `id` (a registry entry's or token parameter's "instance") is a Lambda host.
pub fn is_lambda_host(id: &str) -> bool {
    id.starts_with(HOST_PREFIX)
}

/// The SSM parameter that holds a runner token: `<prefix>/<instance or Lambda host id>`. The
/// vault adapter names its parameters with this, and the shell runner is told this name.
pub fn token_parameter_name(prefix: &str, host_or_instance: &str) -> String {
    format!("{}/{host_or_instance}", prefix.trim_end_matches('/'))
}

/// The shell runner's async invoke waits in Lambda's queue for at most this long
/// (`MaximumEventAgeInSeconds` of the ShellRunnerFunction; a contract test reads the template).
pub const INVOKE_MAX_EVENT_AGE: Duration = Duration::from_secs(3600);

/// Lambda's longest invocation.
pub const LAMBDA_MAX: Duration = Duration::from_secs(900);

/// How long after its creation a Lambda runner can still be in use: its invoke may wait in the
/// queue for the maximum event age, then run for Lambda's maximum. After that no invocation
/// can hold its token, and the reaper removes it (and its parameter) whatever GitLab says.
pub fn usable_for() -> Duration {
    INVOKE_MAX_EVENT_AGE + LAMBDA_MAX + Duration::from_secs(60)
}

/// How the shell runner gets its runner token (`ShellRunnerMode`; env `SHELL_RUNNER_MODE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ShellRunnerMode {
    /// A runner and a token per job (the default).
    #[default]
    PerJob,
    /// One long-lived token for every invocation, read at cold start. Unsafe for untrusted
    /// projects: a job can take the token.
    SharedToken,
}

/// What the provision workflow hands the shell runner about its runner (no secret: the token
/// stays in SSM until the invocation takes it). The ProvisionLambdaRunner step's output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum RunnerGrant {
    /// A runner made for this job: read and delete `token_parameter` first thing.
    PerJob {
        runner_id: u64,
        token_parameter: String,
    },
    /// The stack runs the shell runner with its shared token (`ShellRunnerMode=shared-token`).
    SharedToken,
    /// The job finished before a runner was made: nothing to invoke.
    JobAlreadyFinished,
    /// The job finished while its runner was made: it was removed again.
    FinishedMeanwhile { runner_id: u64 },
    /// No runner may start now (the fleet is drained, [`crate::drain`]): nothing was made and
    /// nothing is invoked; the job's item notes that it waits, and the reconciler starts it
    /// again once a runner may start.
    WaitingForSlot { waiting_for: CapReached },
}

impl From<Waiting> for RunnerGrant {
    fn from(waiting: Waiting) -> Self {
        match waiting {
            Waiting::Noted(waiting_for) => Self::WaitingForSlot { waiting_for },
            Waiting::JobFinished => Self::JobAlreadyFinished,
        }
    }
}

/// The grant of a stack that runs the shell runner with its shared token
/// (`ShellRunnerMode=shared-token`), unless the fleet is drained: then the job waits like
/// any other. `ledger` is the jobs table; `None` only where the stack has none to read.
pub async fn shared_token_grant<L: RunnerLedger>(
    ledger: Option<&L>,
    key: JobKey,
    now_ms: u64,
) -> Result<RunnerGrant, ProvisionError> {
    if let Some(ledger) = ledger
        && let Some(waiting) = wait_if_drained(ledger, key, now_ms).await?
    {
        return Ok(waiting.into());
    }
    Ok(RunnerGrant::SharedToken)
}

/// Makes the runner of `job`'s current attempt and puts its token in the attempt's parameter.
/// Safe to repeat: a runner an earlier run of this step made for the same attempt is removed
/// first (its token may have been lost with that run); a runner of an older attempt is left
/// alone (an invocation may be running a job with it; its teardown or the reaper removes it).
pub async fn provision_lambda_runner<F, V, A, L, S>(
    ports: &FleetPorts<F, V, A, L, S>,
    settings: &FleetSettings,
    job: &JobEvent,
    job_tags: Option<&[String]>,
    now_ms: u64,
) -> Result<RunnerGrant, ProvisionError>
where
    F: Fleet,
    V: TokenVault,
    A: RunnerApi,
    L: RunnerLedger,
    S: SlotStore,
{
    let key = JobKey::of(job);
    let record = ports
        .ledger
        .job(key)
        .await
        .map_err(step("reading the job's item"))?
        .unwrap_or_default();
    if record.phase.is_some_and(|p| p >= JobPhase::Finished) {
        return Ok(RunnerGrant::JobAlreadyFinished);
    }
    if let Some(waiting) = wait_if_drained(&ports.ledger, key, now_ms).await? {
        return Ok(waiting.into());
    }
    let attempt = record.attempt.max(1);
    let host = host_id(key, attempt);
    remove_earlier_run(ports, record.runner_id, &host).await?;

    let request = RunnerRequest {
        description: format!(
            "ephemeral lambda {} job {} ({})",
            job.project_path
                .clone()
                .unwrap_or_else(|| format!("project {}", job.project_id)),
            job.job_id,
            job.job_name
        ),
        project_id: key.project_id,
        tags: job_tags.map(<[String]>::to_vec).unwrap_or_default(),
    };
    let (runner_id, token) =
        ports
            .api
            .create(&request)
            .await
            .map_err(|error| ProvisionError::RunnerNotCreated {
                error,
                cleanup: String::new(),
            })?;
    let entry = RunnerEntry {
        runner_id,
        project_id: key.project_id,
        job_id: key.job_id,
        attempt,
        instance_id: host.clone(),
        created_at_ms: now_ms,
    };
    let delivered = register_and_store(ports, &entry, &token).await;
    drop(token);
    if let Err((what, error)) = delivered {
        let cleanup = remove_runner(ports, runner_id, Some(&host)).await;
        return Err(ProvisionError::Step {
            what,
            error,
            cleanup: cleanup_note(&cleanup),
        });
    }
    if !record_running_or_undo(ports, key, attempt, runner_id, &host, now_ms).await? {
        return Ok(RunnerGrant::FinishedMeanwhile { runner_id });
    }
    Ok(RunnerGrant::PerJob {
        runner_id,
        token_parameter: token_parameter_name(&settings.token_parameter_prefix, &host),
    })
}

/// Removes the runner an earlier run of this step made for the same (job, attempt).
async fn remove_earlier_run<F: Fleet, V: TokenVault, A: RunnerApi, L: RunnerLedger, S>(
    ports: &FleetPorts<F, V, A, L, S>,
    recorded: Option<u64>,
    host: &str,
) -> Result<(), ProvisionError> {
    let Some(stale) = recorded else {
        return Ok(());
    };
    let entry = ports
        .ledger
        .runner(stale)
        .await
        .map_err(step("looking up the job's earlier runner"))?;
    if entry.is_none_or(|e| e.instance_id != host) {
        return Ok(());
    }
    let cleanup = remove_runner(ports, stale, Some(host)).await;
    match cleanup.into_iter().find(|(_, r)| r.is_err()) {
        Some((what, Err(error))) => Err(ProvisionError::Step {
            what,
            error,
            cleanup: "; removing the runner of an earlier, interrupted run of this step".into(),
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_named_per_attempt_and_never_look_like_instances() {
        let key = JobKey {
            project_id: 7,
            job_id: 42,
        };
        assert_eq!(host_id(key, 1), "lambda-7-42-1");
        assert_eq!(host_id(key, 0), "lambda-7-42-1");
        assert_eq!(host_id(key, 3), "lambda-7-42-3");
        assert!(is_lambda_host(&host_id(key, 2)));
        assert!(!is_lambda_host("i-0123456789abcdef0"));
        assert_eq!(
            token_parameter_name("/er/stack/runner-tokens/", "lambda-7-42-1"),
            "/er/stack/runner-tokens/lambda-7-42-1"
        );
    }

    #[test]
    fn grants_and_modes_have_stable_text() {
        let grant = RunnerGrant::PerJob {
            runner_id: 5,
            token_parameter: "/p/lambda-1-2-1".into(),
        };
        assert_eq!(
            serde_json::to_value(&grant).unwrap(),
            serde_json::json!({"outcome": "per_job", "runner_id": 5, "token_parameter": "/p/lambda-1-2-1"})
        );
        // The workflow's CheckLambdaRunner invokes nothing for this outcome.
        let waiting = RunnerGrant::WaitingForSlot {
            waiting_for: CapReached::Drained,
        };
        assert_eq!(
            serde_json::to_value(&waiting).unwrap(),
            serde_json::json!({"outcome": "waiting_for_slot", "waiting_for": {"cap": "drained"}})
        );
        let back: RunnerGrant =
            serde_json::from_value(serde_json::json!({"outcome": "shared_token"})).unwrap();
        assert_eq!(back, RunnerGrant::SharedToken);
        let mode: ShellRunnerMode = serde_json::from_str("\"shared-token\"").unwrap();
        assert_eq!(mode, ShellRunnerMode::SharedToken);
        assert_eq!(
            serde_json::to_string(&ShellRunnerMode::PerJob).unwrap(),
            "\"per-job\""
        );
    }
}
