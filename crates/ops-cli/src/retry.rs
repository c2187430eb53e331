//! `retry PROJECT JOB`: one new provision attempt, the way the reconciler starts one: the
//! attempt is claimed on the job's item with the reconciler's conditional update (only one
//! claimer of attempt N wins: the reconciler, another retry, this one), then the provision
//! workflow is started under the attempt's execution name (a repeated start is the same
//! execution). Both through the reconciler's own adapter (`reconciler::aws`).

use std::fmt::Write as _;

use ephemeral_core::jobs::{JobKey, Started};
use ephemeral_core::jobs_table::{self, attr};
use ephemeral_core::ops::{RetryPlan, plan_retry};
use ephemeral_core::reconcile::{PendingJob, Reason, provision_execution_name};
use reconciler::aws::{JobsTable, ProvisionWorkflow};
use serde_json::{Map, Value, json};

use crate::Outcome;
use crate::cli::{Context, Failure};
use crate::job::{describe, item};
use crate::show::print_json;
use crate::stack::Resource;

/// The template's default `JobStateTtlSeconds`: the claim extends the item's expiry by this
/// from now, as the reconciler's does (never shortening what the item has).
const JOB_TTL_SECONDS: u64 = 1_209_600;

/// The job as the workflow's input needs it: its name from the item, else from the last
/// execution's input (which also gives its stage, pipeline and ref). The mapper asks GitLab
/// for its tags and confirms it is pending before anything is launched.
fn pending_job(
    key: JobKey,
    item: &Map<String, Value>,
    last_input: Option<&Value>,
) -> Result<PendingJob, Failure> {
    let job = last_input.map(|i| &i["job"]);
    let from_input = |field: &str| job.and_then(|j| j.get(field)).cloned();
    let name = item
        .get(attr::JOB_NAME)
        .and_then(Value::as_str)
        .map(str::to_owned)
        .or_else(|| from_input("job_name").and_then(|v| v.as_str().map(str::to_owned)))
        .ok_or_else(|| {
            Failure::usage(format!(
                "project {} job {}: neither its item nor an execution's input names the job, so no workflow input can be made; the reconciler provisions it from GitLab's pending list (reason lost_hook)",
                key.project_id, key.job_id
            ))
        })?;
    let text = |field: &str| from_input(field).and_then(|v| v.as_str().map(str::to_owned));
    Ok(PendingJob {
        key,
        name,
        stage: text("stage"),
        tags: Vec::new(),
        pipeline_id: from_input("pipeline_id").and_then(|v| v.as_u64()),
        git_ref: text("ref"),
        pending_for_ms: 0,
    })
}

pub async fn retry(
    out: &mut Outcome,
    ctx: &Context<'_>,
    key: JobKey,
    force: bool,
    young_ms: u64,
) -> Result<u8, Failure> {
    let jobs_table = ctx.stack.get(Resource::JobsTable).await?;
    let provision = ctx.stack.get(Resource::ProvisionStateMachine).await?;
    let Some(item) = item(ctx, &jobs_table, key).await? else {
        return Err(Failure::not_found(format!(
            "no item for project {} job {} in the jobs table `{jobs_table}`: nothing to retry. Check the ids (GitLab's numeric project and job ids); a job GitLab lists as pending without an item is provisioned by the reconciler (reason lost_hook)",
            key.project_id, key.job_id
        )));
    };
    let record = jobs_table::record_of(&Value::Object(item.clone()));
    let current = match record.attempt {
        0 => None,
        n => {
            describe(
                ctx,
                "provision",
                &provision,
                &provision_execution_name(key, n),
            )
            .await?
        }
    };
    let running = current.as_ref().is_some_and(|e| e.status == "RUNNING");
    let now = ctx.now_ms;
    let job = job_text(key);
    match plan_retry(key, &record, running, now, young_ms, force) {
        RetryPlan::Finished { phase } => Err(Failure::usage(format!(
            "{job} is {phase} in the jobs table: there is nothing to provision. If GitLab still lists it as pending, the reconciler moves it back and provisions it on its next pass (reason marked_finished)"
        ))),
        plan @ RetryPlan::InFlight { .. } => {
            write_in_flight(out, ctx.json, key, &plan);
            Ok(0)
        }
        RetryPlan::Start {
            attempt,
            execution,
            notes,
        } => {
            let pending = pending_job(key, &item, current.as_ref().and_then(|e| e.input.as_ref()))?;
            if !claim_attempt(ctx, &jobs_table, &item, key, attempt).await? {
                write_claimed_meanwhile(out, ctx.json, key, attempt);
                return Ok(0);
            }
            let workflow = ProvisionWorkflow {
                client: aws_sdk_sfn::Client::new(ctx.sdk),
                arn: provision.clone(),
            };
            let started = workflow.start(&pending, attempt, now).await.map_err(|e| {
                Failure::aws(format!(
                    "claimed attempt {attempt} of {job}, but its workflow did not start: {e}; the reconciler starts another attempt once this one counts as stalled (after 10 minutes), or run retry --force"
                ))
            })?;
            let new = started == Started::New;
            write_started(out, ctx.json, key, attempt, &execution, &notes, new);
            Ok(0)
        }
    }
}

fn job_text(key: JobKey) -> String {
    format!("project {} job {}", key.project_id, key.job_id)
}

/// Claims `attempt` on the job's item with the reconciler's conditional update: false when
/// another claimer won it.
async fn claim_attempt(
    ctx: &Context<'_>,
    jobs_table: &str,
    item: &Map<String, Value>,
    key: JobKey,
    attempt: u32,
) -> Result<bool, Failure> {
    let now = ctx.now_ms;
    let expires_in = item
        .get(attr::EXPIRES_AT)
        .and_then(Value::as_u64)
        .map_or(0, |at| at.saturating_sub(now / 1000));
    let jobs = JobsTable {
        client: aws_sdk_dynamodb::Client::new(ctx.sdk),
        table: jobs_table.to_owned(),
        ttl_seconds: JOB_TTL_SECONDS.max(expires_in),
    };
    jobs.claim_attempt(key, attempt, Reason::OperatorRetry, now)
        .await
        .map_err(|e| {
            Failure::aws(format!(
                "claiming attempt {attempt} of {}: {e}",
                job_text(key)
            ))
        })
}

/// Says that nothing was started: `plan` is a [`RetryPlan::InFlight`].
fn write_in_flight(out: &mut Outcome, json: bool, key: JobKey, plan: &RetryPlan) {
    let RetryPlan::InFlight {
        attempt,
        execution,
        why,
        ..
    } = plan
    else {
        unreachable!("called for an in-flight plan only")
    };
    if json {
        print_json(
            out,
            &json!({"project_id": key.project_id, "job_id": key.job_id, "started": false, "plan": plan}),
        );
    } else {
        let _ = writeln!(
            out.stdout,
            "not started: {}'s attempt {attempt} ({execution}) is in flight: {why}. A second attempt now would run beside it; run retry again once it has failed or is older, or pass --force",
            job_text(key)
        );
    }
}

/// Says that nothing was started: another claimer won `attempt`, and starts it.
fn write_claimed_meanwhile(out: &mut Outcome, json: bool, key: JobKey, attempt: u32) {
    if json {
        print_json(
            out,
            &json!({"project_id": key.project_id, "job_id": key.job_id, "started": false,
                    "claimed_by_another": attempt}),
        );
    } else {
        let _ = writeln!(
            out.stdout,
            "not started: attempt {attempt} of {} was claimed meanwhile (by the reconciler or another retry), which starts it",
            job_text(key)
        );
    }
}

/// Says which attempt was started; `new`: its execution did not exist yet.
fn write_started(
    out: &mut Outcome,
    json: bool,
    key: JobKey,
    attempt: u32,
    execution: &str,
    notes: &[String],
    new: bool,
) {
    if json {
        print_json(
            out,
            &json!({"project_id": key.project_id, "job_id": key.job_id, "started": true,
                    "attempt": attempt, "execution": execution, "new_execution": new,
                    "notes": notes}),
        );
    } else {
        let _ = writeln!(
            out.stdout,
            "started attempt {attempt} of {}: execution {execution}{}",
            job_text(key),
            if new { "" } else { " (it existed already)" }
        );
        for note in notes {
            let _ = writeln!(out.stdout, "note: {note}");
        }
    }
}
