//! `status`: the fleet as the jobs table, the runner registry and EC2 hold it.

use std::fmt::Write as _;

use aws_sdk_dynamodb::error::DisplayErrorContext;
use ephemeral_core::drain::Drain;
use ephemeral_core::fleet::{Fleet, Instance, InstanceQuery, RunnerEntry, RunnerLedger};
use ephemeral_core::jobs_table::{self, DRAIN_KEY};
use ephemeral_core::ops::{
    JobView, SlotScope, SlotView, Summary, job_view, slot_projects, slot_view, summarize,
};
use ephemeral_core::slots::{SlotCaps, SlotStore};
use ephemeral_core::webhook::PortError;
use serde::Serialize;
use serde_json::{Value, json};

use crate::Outcome;
use crate::cli::{Context, Failure};
use crate::show::{age, or_dash, plural, print_json, table, when};
use crate::stack::Resource;

/// Every item of the jobs table (consistent reads, every page), as JSON.
pub async fn scan_jobs(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
) -> Result<Vec<Value>, Failure> {
    let mut pages = client
        .scan()
        .table_name(table)
        .consistent_read(true)
        .into_paginator()
        .send();
    let mut items = Vec::new();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| {
            Failure::aws(format!(
                "Scan of the jobs table `{table}` failed: {}",
                DisplayErrorContext(&e)
            ))
        })?;
        items.extend(
            page.items()
                .iter()
                .map(|i| Value::Object(ephemeral_aws::item_to_json(i))),
        );
    }
    Ok(items)
}

/// The drain switch among scanned items.
pub fn drain_in(items: &[Value]) -> Option<Drain> {
    jobs_table::drain_of(
        items
            .iter()
            .find(|i| i.get(jobs_table::KEY).and_then(Value::as_str) == Some(DRAIN_KEY)),
    )
}

/// The runner registry through the functions' own adapter.
pub fn ledger(ctx: &Context<'_>, jobs: &str, runners: &str) -> fleet::aws::DynamoRunnerLedger {
    fleet::aws::DynamoRunnerLedger {
        client: aws_sdk_dynamodb::Client::new(ctx.sdk),
        jobs_table: jobs.to_owned(),
        runners_table: runners.to_owned(),
    }
}

/// The stack's instances through the functions' own adapter (the `managed-by` tag).
pub async fn instances(
    ctx: &Context<'_>,
    managed_by: &str,
    query: InstanceQuery,
) -> Result<Vec<Instance>, Failure> {
    let fleet = fleet::aws::Ec2Fleet {
        ec2: aws_sdk_ec2::Client::new(ctx.sdk),
        ssm: aws_sdk_ssm::Client::new(ctx.sdk),
        stack: managed_by.to_owned(),
        security_group_ids: Vec::new(),
        instance_profile_arn: None,
    };
    fleet
        .instances(query)
        .await
        .map_err(|e| Failure::aws(e.to_string()))
}

/// The runner slots: the counters the caps are checked against and the slot items they
/// count, through the functions' own adapter. `None` when the table is not named.
pub async fn slots(ctx: &Context<'_>) -> Result<Option<Slots>, Failure> {
    let Some(table) = ctx.stack.find_if_output(Resource::SlotsTable).await? else {
        return Ok(None);
    };
    let global = cap(ctx, Resource::InstanceCap).await?;
    let per_project = cap(ctx, Resource::InstanceCapPerProject).await?;
    let caps = SlotCaps::from_values(global.unwrap_or(0), per_project.unwrap_or(0));
    let store = fleet::slots::DynamoSlots {
        client: aws_sdk_dynamodb::Client::new(ctx.sdk),
        table: table.clone(),
    };
    let failed = |e: PortError| Failure::aws(format!("the slots table `{table}`: {e}"));
    let held = store.held().await.map_err(failed)?;
    let usage = store.usage(&slot_projects(&held)).await.map_err(failed)?;
    Ok(Some(Slots {
        view: slot_view(caps, &held, &usage),
        caps_known: global.is_some() && per_project.is_some(),
        table,
    }))
}

#[derive(Debug, Clone, Serialize)]
pub struct Slots {
    pub table: String,
    pub view: SlotView,
    /// False when neither a flag nor the stack gave the caps (a stack deployed before the
    /// outputs existed): `view.caps` then shows none.
    pub caps_known: bool,
}

/// A cap as deployed (0: none); `None` when neither the flag nor the stack's output gives it.
async fn cap(ctx: &Context<'_>, resource: Resource) -> Result<Option<u32>, Failure> {
    let Some(text) = ctx.stack.find_if_output(resource).await? else {
        return Ok(None);
    };
    text.trim().parse().map(Some).map_err(|_| {
        Failure::usage(format!(
            "{} is `{text}`, not a number: give {}",
            resource.what(),
            resource.flag()
        ))
    })
}

pub fn slot_rows(view: &SlotView, caps_known: bool) -> Vec<Vec<String>> {
    let cap = |c: Option<u32>| match c {
        _ if !caps_known => "?".to_owned(),
        Some(c) => c.to_string(),
        None => "none".to_owned(),
    };
    let row = |scope: String, s: &SlotScope, c: Option<u32>| {
        vec![
            scope,
            s.used.to_string(),
            cap(c),
            s.items.to_string(),
            if s.agrees() {
                "-".to_owned()
            } else {
                "counter and items differ: the reaper gives a leaked slot back".to_owned()
            },
        ]
    };
    std::iter::once(row("stack".to_owned(), &view.global, view.caps.global))
        .chain(
            view.projects
                .iter()
                .map(|(p, s)| row(format!("project {p}"), s, view.caps.per_project)),
        )
        .collect()
}
pub const SLOT_HEADER: [&str; 5] = ["SCOPE", "USED", "CAP", "SLOT ITEMS", "NOTE"];

pub fn drain_text(drain: &Drain, now_ms: u64) -> String {
    let mut s = format!("drained since {}", when(drain.since_ms, now_ms));
    if let Some(by) = &drain.by {
        let _ = write!(s, " by {by}");
    }
    if let Some(reason) = &drain.reason {
        let _ = write!(s, ": {reason}");
    }
    s
}

pub fn job_text(j: &JobView) -> String {
    format!("project {} job {}", j.project_id, j.job_id)
}

pub fn runner_rows(runners: &[RunnerEntry], now_ms: u64) -> Vec<Vec<String>> {
    runners
        .iter()
        .map(|r| {
            vec![
                r.runner_id.to_string(),
                r.project_id.to_string(),
                r.job_id.to_string(),
                r.attempt.to_string(),
                r.instance_id.clone(),
                age(now_ms.saturating_sub(r.created_at_ms)),
            ]
        })
        .collect()
}
pub const RUNNER_HEADER: [&str; 6] = ["RUNNER", "PROJECT", "JOB", "ATTEMPT", "HOST", "AGE"];

pub fn instance_rows(instances: &[Instance], now_ms: u64) -> Vec<Vec<String>> {
    instances
        .iter()
        .map(|i| {
            let key = i.job_key();
            // A warm pool instance waits for a job: say so rather than "-".
            let job = match ephemeral_core::pool::pool_of(i) {
                Some(_) => "(warm pool)".to_owned(),
                None => or_dash(key.map(|k| k.job_id)),
            };
            vec![
                i.id.clone(),
                state_name(i),
                or_dash(key.map(|k| k.project_id)),
                job,
                i.attempt().to_string(),
                or_dash(i.runner_id()),
                age(now_ms.saturating_sub(i.launched_at_ms)),
            ]
        })
        .collect()
}
/// EC2's name of the state (`running`, `shutting-down`, ...).
pub fn state_name(i: &Instance) -> String {
    serde_json::to_value(i.state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

pub const INSTANCE_HEADER: [&str; 7] = [
    "INSTANCE", "STATE", "PROJECT", "JOB", "ATTEMPT", "RUNNER", "AGE",
];

pub fn runner_json(r: &RunnerEntry, now_ms: u64) -> Value {
    json!({"runner_id": r.runner_id, "project_id": r.project_id, "job_id": r.job_id,
           "attempt": r.attempt, "host": r.instance_id, "created_at_ms": r.created_at_ms,
           "age_ms": now_ms.saturating_sub(r.created_at_ms)})
}

pub fn instance_json(i: &Instance, now_ms: u64) -> Value {
    let key = i.job_key();
    json!({"instance_id": i.id, "state": i.state, "project_id": key.map(|k| k.project_id),
           "job_id": key.map(|k| k.job_id), "attempt": i.attempt(), "runner_id": i.runner_id(),
           "launched_at_ms": i.launched_at_ms, "age_ms": now_ms.saturating_sub(i.launched_at_ms),
           "warm_pool": ephemeral_core::pool::pool_of(i)})
}

pub async fn status(out: &mut Outcome, ctx: &Context<'_>) -> Result<u8, Failure> {
    let jobs_table = ctx.stack.get(Resource::JobsTable).await?;
    let runners_table = ctx.stack.find(Resource::RunnersTable).await?;
    let items = scan_jobs(&aws_sdk_dynamodb::Client::new(ctx.sdk), &jobs_table).await?;
    let drain = drain_in(&items);
    let views: Vec<JobView> = items.iter().filter_map(job_view).collect();
    let summary = summarize(&views);
    let runners = match &runners_table {
        Some(table) => Some(
            ledger(ctx, &jobs_table, table)
                .runners()
                .await
                .map_err(|e| Failure::aws(e.to_string()))?,
        ),
        None => None,
    };
    let instances = match ctx.stack.managed_by() {
        Some(stack) => Some(instances(ctx, stack, InstanceQuery::Live).await?),
        None => None,
    };
    let slots = slots(ctx).await?;
    let now = ctx.now_ms;
    if ctx.json {
        print_json(
            out,
            &json!({
                "jobs_table": jobs_table,
                "slots": slots,
                "drained": drain,
                "jobs": views.len(),
                "by_phase": summary.by_phase,
                "pending": summary.pending,
                "oldest_pending": summary.oldest_pending,
                "waiting": summary.waiting,
                "failed": summary.failed,
                "given_up": summary.given_up,
                "runners": runners.as_ref().map(|r| r.iter().map(|r| runner_json(r, now)).collect::<Vec<_>>()),
                "instances": instances.as_ref().map(|i| i.iter().map(|i| instance_json(i, now)).collect::<Vec<_>>()),
            }),
        );
        return Ok(0);
    }
    write_human(out, ctx, &jobs_table, drain.as_ref(), &views, &summary);
    write_slots(out, slots.as_ref(), now);
    write_runners(out, runners.as_deref(), runners_table.as_deref(), now);
    write_instances(out, instances.as_deref(), ctx.stack.managed_by(), now);
    Ok(0)
}

/// The runner registry's section; `runners` is `None` when the registry is not named.
fn write_runners(
    out: &mut Outcome,
    runners: Option<&[RunnerEntry]>,
    runners_table: Option<&str>,
    now_ms: u64,
) {
    let s = &mut out.stdout;
    match runners {
        Some(runners) => {
            let _ = writeln!(
                s,
                "\nrunners we own (table {}): {}",
                runners_table.unwrap_or_default(),
                runners.len()
            );
            let mut rows = runner_rows(runners, now_ms);
            rows.sort();
            table(out, &RUNNER_HEADER, rows);
        }
        None => {
            let _ = writeln!(
                s,
                "\nrunners: not read (name the registry: --stack STACK or --runners-table NAME)"
            );
        }
    }
}

/// The instances' section; `instances` is `None` when the stack's tag is not named.
fn write_instances(
    out: &mut Outcome,
    instances: Option<&[Instance]>,
    managed_by: Option<&str>,
    now_ms: u64,
) {
    let s = &mut out.stdout;
    match (instances, managed_by) {
        (Some(instances), Some(stack)) => {
            let _ = writeln!(
                s,
                "\ninstances we own (tag ephemeral-runners:managed-by={stack}): {}",
                instances.len()
            );
            table(out, &INSTANCE_HEADER, instance_rows(instances, now_ms));
        }
        _ => {
            let _ = writeln!(
                s,
                "\ninstances: not listed (they are found by their managed-by tag: --stack STACK or --managed-by STACK)"
            );
        }
    }
}

fn write_slots(out: &mut Outcome, slots: Option<&Slots>, now_ms: u64) {
    let Some(Slots {
        table: name,
        view,
        caps_known,
    }) = slots
    else {
        out.stdout.push_str(
            "\nrunner slots: not read (name the slots table: --slots-table NAME, or --stack STACK of a stack deployed with its SlotsTableName output)\n",
        );
        return;
    };
    let _ = writeln!(
        out.stdout,
        "\nrunner slots (table {name}): {} in use, {}{}",
        view.global.used,
        match view.caps.global {
            _ if !caps_known => "cap unknown".to_owned(),
            Some(c) => format!("cap {c}"),
            None => "no cap".to_owned(),
        },
        view.oldest_taken_at_ms.map_or(String::new(), |ms| format!(
            ", oldest taken {}",
            when(ms, now_ms)
        ))
    );
    table(out, &SLOT_HEADER, slot_rows(view, *caps_known));
    if !caps_known {
        out.stdout.push_str(
            "  the caps are not known (the stack has no InstanceCap output): deploy the current template.yaml, or give --instance-cap N --instance-cap-per-project N\n",
        );
    }
}

fn write_human(
    out: &mut Outcome,
    ctx: &Context<'_>,
    jobs_table: &str,
    drain: Option<&Drain>,
    views: &[JobView],
    summary: &Summary,
) {
    let now = ctx.now_ms;
    let s = &mut out.stdout;
    let _ = match drain {
        Some(d) => writeln!(
            s,
            "fleet: {}; no runner starts, new jobs wait (runner-ops undrain)",
            drain_text(d, now)
        ),
        None => writeln!(s, "fleet: not drained, runners start as jobs arrive"),
    };
    let phases: Vec<String> = summary
        .by_phase
        .iter()
        .map(|(p, n)| format!("{p} {n}"))
        .collect();
    let _ = writeln!(
        s,
        "jobs (table {jobs_table}): {}{}",
        views.len(),
        if phases.is_empty() {
            String::new()
        } else {
            format!(": {}", phases.join(", "))
        }
    );
    let _ = match &summary.oldest_pending {
        Some(j) => writeln!(
            s,
            "pending (no runner took them yet): {}; oldest: {}, {}, attempt {}, since {}",
            summary.pending,
            job_text(j),
            j.phase.unwrap_or("unknown"),
            j.attempt,
            j.pending_since_ms
                .map_or("?".to_owned(), |ms| when(ms, now))
        ),
        None => writeln!(s, "pending (no runner took them yet): 0"),
    };
    write_waiting(out, &summary.waiting, now);
    write_failed(out, &summary.failed);
    write_given_up(out, &summary.given_up, now);
}

/// The jobs waiting for a runner slot (under a cap, or drained), oldest first.
fn write_waiting(out: &mut Outcome, waiting: &[JobView], now_ms: u64) {
    let _ = writeln!(
        out.stdout,
        "\nwaiting for a runner slot, oldest first: {}",
        waiting.len()
    );
    let rows = waiting
        .iter()
        .map(|j| {
            vec![
                j.project_id.to_string(),
                j.job_id.to_string(),
                j.attempt.to_string(),
                or_dash(j.waiting_for.clone()),
                j.waiting_since_ms
                    .map_or("-".to_owned(), |ms| when(ms, now_ms)),
            ]
        })
        .collect();
    table(
        out,
        &["PROJECT", "JOB", "ATTEMPT", "WAITING FOR", "SINCE"],
        rows,
    );
}

/// The open jobs whose last provision failed, which the reconciler retries.
fn write_failed(out: &mut Outcome, failed: &[JobView]) {
    let _ = writeln!(
        out.stdout,
        "\nfailed provisions (the reconciler retries them): {}",
        failed.len()
    );
    let rows = failed
        .iter()
        .map(|j| {
            vec![
                j.project_id.to_string(),
                j.job_id.to_string(),
                j.attempt.to_string(),
                or_dash(j.provision_error.clone()),
                or_dash(j.provision_cause.clone()),
            ]
        })
        .collect();
    table(out, &["PROJECT", "JOB", "ATTEMPT", "ERROR", "CAUSE"], rows);
}

/// The jobs the reconciler stopped provisioning, newest first.
fn write_given_up(out: &mut Outcome, given_up: &[JobView], now_ms: u64) {
    let _ = writeln!(
        out.stdout,
        "\ngiven up (runner-ops retry PROJECT JOB once the cause is fixed): {}",
        plural(given_up.len(), "job", "jobs")
    );
    let rows = given_up
        .iter()
        .map(|j| {
            vec![
                j.project_id.to_string(),
                j.job_id.to_string(),
                j.attempt.to_string(),
                j.gave_up_at_ms
                    .map_or("-".to_owned(), |ms| when(ms, now_ms)),
                or_dash(j.provision_error.clone()),
            ]
        })
        .collect();
    table(
        out,
        &["PROJECT", "JOB", "ATTEMPTS", "GAVE UP", "ERROR"],
        rows,
    );
}
