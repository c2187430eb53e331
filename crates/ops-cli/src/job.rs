//! `job PROJECT JOB`: one job's history as the stack recorded it.

use std::fmt::Write as _;

use aws_sdk_sfn::error::DisplayErrorContext;
use ephemeral_core::fleet::{Instance, InstanceQuery, RunnerEntry, RunnerLedger};
use ephemeral_core::jobs::JobKey;
use ephemeral_core::jobs_table::{self, KEY};
use ephemeral_core::reconcile::{is_teardown_execution_of, provision_execution_name};
use serde_json::{Map, Value, json};

use crate::Outcome;
use crate::cli::{Context, Failure};
use crate::show::{or_dash, print_json, table, utc, when};
use crate::stack::Resource;
use crate::status::{
    INSTANCE_HEADER, RUNNER_HEADER, instance_json, instance_rows, instances, ledger, runner_json,
    runner_rows,
};

/// The job's item, read consistently; `None` when there is none.
pub async fn item(
    ctx: &Context<'_>,
    table: &str,
    key: JobKey,
) -> Result<Option<Map<String, Value>>, Failure> {
    let out = aws_sdk_dynamodb::Client::new(ctx.sdk)
        .get_item()
        .table_name(table)
        .key(
            KEY,
            aws_sdk_dynamodb::types::AttributeValue::S(key.table_key()),
        )
        .consistent_read(true)
        .send()
        .await
        .map_err(|e| {
            Failure::aws(format!(
                "GetItem from the jobs table `{table}` failed: {}",
                aws_sdk_dynamodb::error::DisplayErrorContext(&e)
            ))
        })?;
    Ok(out.item().map(ephemeral_aws::item_to_json))
}

/// An execution's ARN from its state machine's and its name.
pub fn execution_arn(state_machine_arn: &str, name: &str) -> String {
    format!(
        "{}:{name}",
        state_machine_arn.replacen(":stateMachine:", ":execution:", 1)
    )
}

/// One execution as Step Functions describes it.
#[derive(Debug, Clone)]
pub struct Execution {
    pub workflow: &'static str,
    pub name: String,
    pub status: String,
    pub started_ms: Option<u64>,
    pub stopped_ms: Option<u64>,
    pub error: Option<String>,
    pub input: Option<Value>,
}

fn ms(t: Option<&aws_sdk_sfn::primitives::DateTime>) -> Option<u64> {
    t.and_then(|t| t.to_millis().ok())
        .and_then(|m| u64::try_from(m).ok())
}

/// The execution of that name, `None` if it does not exist.
pub async fn describe(
    ctx: &Context<'_>,
    workflow: &'static str,
    state_machine_arn: &str,
    name: &str,
) -> Result<Option<Execution>, Failure> {
    let result = aws_sdk_sfn::Client::new(ctx.sdk)
        .describe_execution()
        .execution_arn(execution_arn(state_machine_arn, name))
        .send()
        .await;
    match result {
        Ok(e) => Ok(Some(Execution {
            workflow,
            name: name.to_owned(),
            status: e.status().as_str().to_owned(),
            started_ms: ms(Some(e.start_date())),
            stopped_ms: ms(e.stop_date()),
            error: [e.error(), e.cause()]
                .into_iter()
                .flatten()
                .map(str::to_owned)
                .reduce(|a, b| format!("{a}: {b}")),
            input: e.input().and_then(|i| serde_json::from_str(i).ok()),
        })),
        Err(e)
            if e.as_service_error()
                .is_some_and(|s| s.is_execution_does_not_exist()) =>
        {
            Ok(None)
        }
        Err(e) => Err(Failure::aws(format!(
            "DescribeExecution {name} failed: {}",
            DisplayErrorContext(&e)
        ))),
    }
}

/// How many of the teardown workflow's executions, newest first, `job` looks through: a
/// reconciler's teardown is named after what GitLab answered (status, runner), which the
/// stack does not record, so its name is found by listing, not derived.
pub const TEARDOWN_LISTED: usize = 10_000;

/// The job's teardown executions: the router's and any a reconciler pass started, oldest
/// first, among the newest [`TEARDOWN_LISTED`].
pub async fn teardown_names(
    ctx: &Context<'_>,
    state_machine_arn: &str,
    key: JobKey,
) -> Result<Vec<String>, Failure> {
    let mut pages = aws_sdk_sfn::Client::new(ctx.sdk)
        .list_executions()
        .state_machine_arn(state_machine_arn)
        .max_results(1000)
        .into_paginator()
        .items()
        .send();
    let mut names = Vec::new();
    let mut listed = 0;
    while listed < TEARDOWN_LISTED
        && let Some(execution) = pages.next().await
    {
        listed += 1;
        let execution = execution.map_err(|e| {
            Failure::aws(format!(
                "ListExecutions of the teardown workflow failed: {}",
                DisplayErrorContext(&e)
            ))
        })?;
        if is_teardown_execution_of(key, execution.name()) {
            names.push(execution.name().to_owned());
        }
    }
    names.reverse();
    Ok(names)
}

/// How an attribute reads: ms and s times also as UTC.
fn attribute_text(name: &str, value: &Value, now_ms: u64) -> String {
    let raw = match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let number = match value {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    };
    match number {
        Some(ms) if name.ends_with("_ms") && ms > 1_000_000_000_000 => {
            format!("{raw}  {}", when(ms, now_ms))
        }
        Some(s) if name == jobs_table::attr::EXPIRES_AT => format!("{raw}  {}", utc(s * 1000)),
        _ => raw,
    }
}

/// What `job` found of one job; `None`: that place was not read (not named).
struct History {
    key: JobKey,
    jobs_table: String,
    item: Option<Map<String, Value>>,
    /// Empty too when neither workflow is named (`workflows_named`).
    executions: Vec<Execution>,
    workflows_named: bool,
    instances: Option<Vec<Instance>>,
    runners: Option<Vec<RunnerEntry>>,
}

pub async fn job(out: &mut Outcome, ctx: &Context<'_>, key: JobKey) -> Result<u8, Failure> {
    let jobs_table = ctx.stack.get(Resource::JobsTable).await?;
    let provision = ctx.stack.find(Resource::ProvisionStateMachine).await?;
    let teardown = ctx.stack.find(Resource::TeardownStateMachine).await?;
    let runners_table = ctx.stack.find(Resource::RunnersTable).await?;
    let item = item(ctx, &jobs_table, key).await?;
    let record = item
        .as_ref()
        .map(|i| jobs_table::record_of(&Value::Object(i.clone())))
        .unwrap_or_default();
    let executions = executions(
        ctx,
        provision.as_deref(),
        teardown.as_deref(),
        key,
        record.attempt,
    )
    .await?;
    let instances = match ctx.stack.managed_by() {
        Some(stack) => Some(instances(ctx, stack, InstanceQuery::Job(key)).await?),
        None => None,
    };
    let runners = match &runners_table {
        Some(table) => Some(
            ledger(ctx, &jobs_table, table)
                .runners()
                .await
                .map_err(|e| Failure::aws(e.to_string()))?
                .into_iter()
                .filter(|r| r.project_id == key.project_id && r.job_id == key.job_id)
                .collect::<Vec<_>>(),
        ),
        None => None,
    };
    let nothing = item.is_none()
        && executions.is_empty()
        && instances.as_ref().is_none_or(Vec::is_empty)
        && runners.as_ref().is_none_or(Vec::is_empty);
    if nothing {
        return Err(Failure::not_found(format!(
            "no record of project {} job {}: no item in the jobs table `{jobs_table}`{}{}. Check the ids (GitLab's numeric project and job ids, as in the job's URL .../-/jobs/JOB); an item expires JobStateTtlSeconds after its last change",
            key.project_id,
            key.job_id,
            if provision.is_some() {
                ", no execution"
            } else {
                ""
            },
            if runners.is_some() { ", no runner" } else { "" },
        )));
    }
    let history = History {
        key,
        jobs_table,
        item,
        executions,
        workflows_named: provision.is_some() || teardown.is_some(),
        instances,
        runners,
    };
    if ctx.json {
        write_json(out, &history, ctx.now_ms);
    } else {
        write_human(out, &history, ctx.now_ms);
    }
    Ok(0)
}

/// The job's executions of the workflows that are named: provision's, then teardown's.
async fn executions(
    ctx: &Context<'_>,
    provision: Option<&str>,
    teardown: Option<&str>,
    key: JobKey,
    attempt: u32,
) -> Result<Vec<Execution>, Failure> {
    let mut executions = Vec::new();
    if let Some(arn) = provision {
        // Every attempt's name (the router's is attempt 1), and one past the last in case a
        // claim's start is what the item does not show yet.
        for attempt in 1..=attempt.max(1) + 1 {
            let name = provision_execution_name(key, attempt);
            if let Some(e) = describe(ctx, "provision", arn, &name).await? {
                executions.push(e);
            }
        }
    }
    if let Some(arn) = teardown {
        for name in teardown_names(ctx, arn, key).await? {
            if let Some(e) = describe(ctx, "teardown", arn, &name).await? {
                executions.push(e);
            }
        }
    }
    Ok(executions)
}

fn write_json(out: &mut Outcome, history: &History, now: u64) {
    let History {
        key,
        item,
        executions,
        instances,
        runners,
        ..
    } = history;
    print_json(
        out,
        &json!({
            "project_id": key.project_id,
            "job_id": key.job_id,
            "item": item,
            "executions": executions.iter().map(|e| json!({
                "workflow": e.workflow, "name": e.name, "status": e.status,
                "started_ms": e.started_ms, "stopped_ms": e.stopped_ms, "error": e.error,
            })).collect::<Vec<_>>(),
            "instances": instances.as_ref().map(|i| i.iter().map(|i| instance_json(i, now)).collect::<Vec<_>>()),
            "runners": runners.as_ref().map(|r| r.iter().map(|r| runner_json(r, now)).collect::<Vec<_>>()),
        }),
    );
}

fn write_human(out: &mut Outcome, history: &History, now: u64) {
    let History {
        key,
        jobs_table,
        item,
        executions,
        workflows_named,
        instances,
        runners,
    } = history;
    let _ = writeln!(
        out.stdout,
        "project {} job {}\n\nitem (table {jobs_table}):",
        key.project_id, key.job_id
    );
    match item {
        Some(item) => {
            let mut rows: Vec<Vec<String>> = item
                .iter()
                .map(|(k, v)| vec![k.clone(), attribute_text(k, v, now)])
                .collect();
            rows.sort();
            table(out, &["ATTRIBUTE", "VALUE"], rows);
        }
        None => out
            .stdout
            .push_str("  none (expired, or never written: the hook path never saw the job)\n"),
    }
    out.stdout.push_str("\nexecutions:\n");
    if *workflows_named {
        write_executions(out, executions);
    } else {
        out.stdout.push_str(
            "  not read (name the workflows: --stack STACK or --provision-state-machine ARN)\n",
        );
    }
    out.stdout.push_str("\ninstances:\n");
    match instances {
        Some(instances) => table(out, &INSTANCE_HEADER, instance_rows(instances, now)),
        None => out.stdout.push_str(
            "  not listed (found by their managed-by tag: --stack STACK or --managed-by STACK)\n",
        ),
    }
    out.stdout.push_str("\nrunners:\n");
    match runners {
        Some(runners) => table(out, &RUNNER_HEADER, runner_rows(runners, now)),
        None => out
            .stdout
            .push_str("  not read (name the registry: --stack STACK or --runners-table NAME)\n"),
    }
}

fn write_executions(out: &mut Outcome, executions: &[Execution]) {
    let rows = executions
        .iter()
        .map(|e| {
            vec![
                e.workflow.to_owned(),
                e.name.clone(),
                e.status.clone(),
                e.started_ms.map_or("-".into(), utc),
                e.stopped_ms.map_or("-".into(), utc),
                or_dash(e.error.clone()),
            ]
        })
        .collect();
    table(
        out,
        &["WORKFLOW", "NAME", "STATUS", "STARTED", "STOPPED", "ERROR"],
        rows,
    );
}
