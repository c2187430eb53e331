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
    let job = format!("project {} job {}", key.project_id, key.job_id);
    match plan_retry(key, &record, running, now, young_ms, force) {
        RetryPlan::Finished { phase } => Err(Failure::usage(format!(
            "{job} is {phase} in the jobs table: there is nothing to provision. If GitLab still lists it as pending, the reconciler moves it back and provisions it on its next pass (reason marked_finished)"
        ))),
        plan @ RetryPlan::InFlight { .. } => {
            let RetryPlan::InFlight {
                attempt,
                execution,
                why,
                ..
            } = &plan
            else {
                unreachable!()
            };
            if ctx.json {
                print_json(
                    out,
                    &json!({"project_id": key.project_id, "job_id": key.job_id, "started": false, "plan": plan}),
                );
            } else {
                let _ = writeln!(
                    out.stdout,
                    "not started: {job}'s attempt {attempt} ({execution}) is in flight: {why}. A second attempt now would run beside it; run retry again once it has failed or is older, or pass --force"
                );
            }
            Ok(0)
        }
        RetryPlan::Start {
            attempt,
            execution,
            notes,
        } => {
            let pending = pending_job(key, &item, current.as_ref().and_then(|e| e.input.as_ref()))?;
            let expires_in = item
                .get(attr::EXPIRES_AT)
                .and_then(Value::as_u64)
                .map_or(0, |at| at.saturating_sub(now / 1000));
            let jobs = JobsTable {
                client: aws_sdk_dynamodb::Client::new(ctx.sdk),
                table: jobs_table.clone(),
                ttl_seconds: JOB_TTL_SECONDS.max(expires_in),
            };
            let claimed = jobs
                .claim_attempt(key, attempt, Reason::OperatorRetry, now)
                .await
                .map_err(|e| Failure::aws(format!("claiming attempt {attempt} of {job}: {e}")))?;
            if !claimed {
                let text = format!(
                    "not started: attempt {attempt} of {job} was claimed meanwhile (by the reconciler or another retry), which starts it"
                );
                if ctx.json {
                    print_json(
                        out,
                        &json!({"project_id": key.project_id, "job_id": key.job_id, "started": false,
                                "claimed_by_another": attempt}),
                    );
                } else {
                    let _ = writeln!(out.stdout, "{text}");
                }
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
            if ctx.json {
                print_json(
                    out,
                    &json!({"project_id": key.project_id, "job_id": key.job_id, "started": true,
                            "attempt": attempt, "execution": execution, "new_execution": new,
                            "notes": notes}),
                );
            } else {
                let _ = writeln!(
                    out.stdout,
                    "started attempt {attempt} of {job}: execution {execution}{}",
                    if new { "" } else { " (it existed already)" }
                );
                for note in &notes {
                    let _ = writeln!(out.stdout, "note: {note}");
                }
            }
            Ok(0)
        }
    }
}
