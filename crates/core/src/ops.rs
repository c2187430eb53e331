//! What the operator CLI (`runner-ops`, crate `ops-cli`) decides, without AWS: what a job's
//! item says ([`JobView`]), the fleet's state from the jobs table ([`summarize`]), whether a
//! `retry` may start an attempt now ([`plan_retry`]), and why a dead-letter queue holds a
//! message and how it goes back through the normal path ([`classify_letter`]).

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

use crate::jobs::{JobKey, JobPhase};
use crate::jobs_table::{self, attr};
use crate::reconcile::{JobRecord, provision_execution_name};
use crate::slots::{HeldSlot, SlotCaps, SlotUsage};
use crate::webhook::{DEAD_LETTER_DETAIL_TYPE, DeadLetter, JOB_EVENT_DETAIL_TYPE, QueuedHook};

fn number(item: &Value, name: &str) -> Option<u64> {
    match item.get(name)? {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

fn text(item: &Value, name: &str) -> Option<String> {
    item.get(name).and_then(Value::as_str).map(str::to_owned)
}

/// A job's item, as far as an operator reads it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JobView {
    pub project_id: u64,
    pub job_id: u64,
    pub job_name: Option<String>,
    /// `None`: an item without a known phase rank.
    pub phase: Option<&'static str>,
    pub attempt: u32,
    pub last_status: Option<String>,
    pub route: Option<String>,
    pub runner_id: Option<u64>,
    /// The instance or Lambda host of the last attempt's runner.
    pub host: Option<String>,
    pub waiting_since_ms: Option<u64>,
    pub waiting_for: Option<String>,
    pub provision_error: Option<String>,
    pub provision_cause: Option<String>,
    pub provision_skipped: Option<String>,
    pub gave_up_at_ms: Option<u64>,
    pub reconcile_reason: Option<String>,
    /// GitLab's running hook was recorded: a runner took the job.
    pub picked_up: bool,
    /// Since when we hold it without a runner that took it, as far as the item tells: the
    /// earliest of its wait, its last attempt's start and its last update.
    pub pending_since_ms: Option<u64>,
    pub updated_at_ms: Option<u64>,
}

impl JobView {
    pub fn key(&self) -> JobKey {
        JobKey {
            project_id: self.project_id,
            job_id: self.job_id,
        }
    }

    /// Not finished on our side, and no runner took it yet.
    pub fn is_pending(&self) -> bool {
        !self.picked_up && matches!(self.phase, Some("seen" | "provisioning" | "running"))
    }

    fn is_open(&self) -> bool {
        !matches!(self.phase, Some("finished" | "cleaned"))
    }
}

/// The item as a [`JobView`]; `None` for an item that is no job's (the drain switch).
pub fn job_view(item: &Value) -> Option<JobView> {
    let key = jobs_table::key_of(item.get(jobs_table::KEY)?.as_str()?)?;
    let record = jobs_table::record_of(item);
    let updated_at_ms = number(item, attr::UPDATED_AT_MS);
    let waiting_since_ms = number(item, attr::WAITING_FOR_SLOT_SINCE_MS);
    let picked_up = item.get(attr::PICKED_UP_AT_MS).is_some();
    let pending_since_ms = [
        waiting_since_ms,
        number(item, attr::ATTEMPT_STARTED_AT_MS),
        updated_at_ms,
    ]
    .into_iter()
    .flatten()
    .min();
    Some(JobView {
        project_id: key.project_id,
        job_id: key.job_id,
        job_name: text(item, attr::JOB_NAME),
        phase: record.phase.map(JobPhase::as_str),
        attempt: record.attempt,
        last_status: text(item, attr::LAST_STATUS),
        route: text(item, attr::ROUTE_TYPE),
        runner_id: number(item, attr::LAUNCHED_RUNNER_ID),
        host: text(item, attr::INSTANCE_ID),
        waiting_since_ms,
        waiting_for: text(item, attr::WAITING_FOR_SLOT_CAP),
        provision_error: record.provision_error,
        provision_cause: text(item, attr::PROVISION_CAUSE),
        provision_skipped: text(item, attr::PROVISION_SKIPPED),
        gave_up_at_ms: number(item, attr::GAVE_UP_AT_MS),
        reconcile_reason: text(item, attr::RECONCILE_REASON),
        picked_up,
        pending_since_ms,
        updated_at_ms,
    })
}

/// The fleet's state as the jobs table holds it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Jobs per phase name (`unknown` for an item without a phase rank).
    pub by_phase: BTreeMap<String, usize>,
    /// Waiting for a slot under a cap (or because the fleet is drained), oldest first.
    pub waiting: Vec<JobView>,
    /// Not finished, and the last attempt recorded a `provision_error` (given-up ones apart).
    pub failed: Vec<JobView>,
    /// The reconciler stopped provisioning them (`gave_up_at_ms`), newest first.
    pub given_up: Vec<JobView>,
    /// The job we hold pending the longest (no runner took it, not finished).
    pub oldest_pending: Option<JobView>,
    pub pending: usize,
}

pub fn summarize(jobs: &[JobView]) -> Summary {
    let mut summary = Summary::default();
    for job in jobs {
        *summary
            .by_phase
            .entry(job.phase.unwrap_or("unknown").to_owned())
            .or_default() += 1;
        if job.is_open() && job.waiting_since_ms.is_some() {
            summary.waiting.push(job.clone());
        }
        if job.is_open() && job.gave_up_at_ms.is_some() {
            summary.given_up.push(job.clone());
        } else if job.is_open() && job.provision_error.is_some() {
            summary.failed.push(job.clone());
        }
        if job.is_pending() {
            summary.pending += 1;
        }
    }
    let by_key = |j: &JobView| (j.project_id, j.job_id);
    summary
        .waiting
        .sort_by_key(|j| (j.waiting_since_ms, by_key(j)));
    summary.failed.sort_by_key(by_key);
    summary
        .given_up
        .sort_by_key(|j| (std::cmp::Reverse(j.gave_up_at_ms), by_key(j)));
    summary.oldest_pending = jobs
        .iter()
        .filter(|j| j.is_pending())
        .min_by_key(|j| (j.pending_since_ms.unwrap_or(u64::MAX), by_key(j)))
        .cloned();
    summary
}

/// The runner slots as `status` shows them: per scope (the stack, each project that holds a
/// slot or counts one) the counter, the slot items it counts, and the cap. A counter that
/// differs from its items is a leak the reaper gives back (see [`crate::slots`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SlotView {
    pub caps: SlotCaps,
    pub global: SlotScope,
    pub projects: Vec<(u64, SlotScope)>,
    /// When the oldest slot item was taken (or last found in use by a provision).
    pub oldest_taken_at_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SlotScope {
    /// The counter's value (what the caps are checked against).
    pub used: u32,
    /// The slot items it counts.
    pub items: u32,
}

impl SlotScope {
    pub fn agrees(&self) -> bool {
        self.used == self.items
    }
}

pub fn slot_view(caps: SlotCaps, held: &[HeldSlot], usage: &SlotUsage) -> SlotView {
    let mut projects: BTreeMap<u64, SlotScope> = usage
        .per_project
        .iter()
        .map(|(p, used)| {
            (
                *p,
                SlotScope {
                    used: *used,
                    items: 0,
                },
            )
        })
        .collect();
    for slot in held {
        projects.entry(slot.job.project_id).or_default().items += 1;
    }
    SlotView {
        caps,
        global: SlotScope {
            used: usage.global,
            items: u32::try_from(held.len()).unwrap_or(u32::MAX),
        },
        projects: projects.into_iter().collect(),
        oldest_taken_at_ms: held.iter().map(|s| s.taken_at_ms).min(),
    }
}

/// The projects whose counters `status` reads: those holding a slot item. (A project counter
/// above 0 without any item shows only in the stack's counter disagreeing with its items.)
pub fn slot_projects(held: &[HeldSlot]) -> Vec<u64> {
    let mut projects: Vec<u64> = held.iter().map(|s| s.job.project_id).collect();
    projects.sort_unstable();
    projects.dedup();
    projects
}

/// What `retry` does for a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "plan", rename_all = "snake_case")]
pub enum RetryPlan {
    /// Claim attempt `attempt` on the item (the reconciler's conditional update), then start
    /// the provision workflow under `execution`. `notes` say what the operator should know.
    Start {
        attempt: u32,
        execution: String,
        notes: Vec<String>,
    },
    /// Nothing is started: the current attempt is young (or its workflow still runs) and has
    /// not failed, and a second one now would run beside it.
    InFlight {
        attempt: u32,
        execution: String,
        started_ms_ago: Option<u64>,
        why: String,
    },
    /// The job is finished on our side: nothing to provision.
    Finished { phase: &'static str },
}

/// How long an attempt counts as young for `retry` by default: the reconciler's own
/// [`crate::reconcile::ReconcileSettings::attempt_timeout_ms`] (an attempt that has
/// neither a runner nor an error after this long has stalled).
pub const RETRY_YOUNG_MS: u64 = 10 * 60_000;

/// Whether `retry` starts an attempt now. `running`: the current attempt's execution still
/// runs. `force` starts one even while the current attempt is young (never for a finished
/// job, which the reconciler revives only on GitLab's word).
pub fn plan_retry(
    key: JobKey,
    record: &JobRecord,
    running: bool,
    now_ms: u64,
    young_ms: u64,
    force: bool,
) -> RetryPlan {
    if let Some(phase) = record.phase.filter(|p| *p >= JobPhase::Finished) {
        return RetryPlan::Finished {
            phase: phase.as_str(),
        };
    }
    let current = record.attempt;
    let execution = provision_execution_name(key, current.max(1));
    let age = record
        .attempt_started_at_ms
        .map(|at| now_ms.saturating_sub(at));
    let failed = record.provision_error.is_some();
    if !force && current >= 1 && !failed {
        let why = if running {
            Some(format!("its workflow {execution} is still running"))
        } else {
            age.filter(|a| *a < young_ms).map(|age| {
                format!(
                    "it started {} s ago and has not failed (young for {} s)",
                    age / 1000,
                    young_ms / 1000
                )
            })
        };
        if let Some(why) = why {
            return RetryPlan::InFlight {
                attempt: current,
                execution,
                started_ms_ago: age,
                why,
            };
        }
    }
    let attempt = current + 1;
    let mut notes = Vec::new();
    if record.gave_up {
        notes.push(
            "the reconciler had given up on this job: this attempt counts toward ReconcileMaxAttempts, and if it fails too the reconciler gives up again".to_owned(),
        );
    }
    if record.waiting_for_slot_since_ms.is_some() {
        notes.push(
            "the job waits for a slot (a full cap, or the fleet is drained): the new attempt waits too unless a runner may start now".to_owned(),
        );
    }
    RetryPlan::Start {
        attempt,
        execution: provision_execution_name(key, attempt),
        notes,
    }
}

/// Which dead-letter queue a message is in (the template's queues).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LetterQueue {
    /// `RouterDeadLetterQueue`: job events the router could not take.
    Router,
    /// `IntakeFallbackDeadLetterQueue`: hooks the intake drainer failed to forward.
    Intake,
    /// `DeadLetterQueue`: authentic hooks the webhook could not use.
    Webhook,
}

impl LetterQueue {
    pub const ALL: [LetterQueue; 3] = [Self::Router, Self::Intake, Self::Webhook];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Router => "router",
            Self::Intake => "intake",
            Self::Webhook => "webhook",
        }
    }
}

/// How a message goes back through the normal path.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "how", rename_all = "snake_case")]
pub enum Replay {
    /// Invoke the router with the event EventBridge delivered (the router is idempotent per
    /// job and phase).
    InvokeRouter { event: Value },
    /// Send the body back to the intake fallback queue: the drainer forwards it through the
    /// webhook's dedup (by delivery id), as it did the first time.
    FallbackQueue { body: String },
    /// Nothing to put back.
    No { why: String },
}

/// Why a message was set aside, and what it holds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SetAside {
    pub queue: LetterQueue,
    /// Who set it aside: `lambda` (the router's on-failure destination), `eventbridge` (the
    /// rule could not deliver), `intake-drainer`, `webhook`, or `unknown`.
    pub by: &'static str,
    pub why: String,
    pub project_id: Option<u64>,
    pub job_id: Option<u64>,
    pub status: Option<String>,
    pub delivery_id: Option<String>,
    pub replay: Replay,
}

/// Classifies one message of a dead-letter queue from its body and its message attributes
/// (string values; EventBridge puts `ERROR_CODE`, `ERROR_MESSAGE`, `RULE_ARN`,
/// `EXHAUSTED_RETRY_CONDITION`, `RETRY_ATTEMPTS` on what it could not deliver). `receives`:
/// SQS's `ApproximateReceiveCount` as the queue reports it.
pub fn classify_letter(
    queue: LetterQueue,
    body: &str,
    attributes: &BTreeMap<String, String>,
    receives: Option<u64>,
) -> SetAside {
    let parsed: Option<Value> = serde_json::from_str(body).ok();
    let mut letter = SetAside {
        queue,
        by: "unknown",
        why: String::new(),
        project_id: None,
        job_id: None,
        status: None,
        delivery_id: None,
        replay: Replay::No {
            why: "not a message this stack writes: inspect it with `dead-letters show`".into(),
        },
    };
    match queue {
        LetterQueue::Router => router_letter(&mut letter, parsed, attributes),
        LetterQueue::Intake => intake_letter(&mut letter, body, receives),
        LetterQueue::Webhook => webhook_letter(&mut letter, parsed),
    }
    if letter.why.is_empty() {
        letter.why = "unknown (not JSON this stack writes)".into();
    }
    letter
}

fn note_job(letter: &mut SetAside, job: &Value) {
    letter.project_id = number(job, "project_id");
    letter.job_id = number(job, "job_id");
    letter.status = text(job, "status");
    letter.delivery_id = text(job, "delivery_id");
}

fn router_letter(
    letter: &mut SetAside,
    parsed: Option<Value>,
    attributes: &BTreeMap<String, String>,
) {
    let Some(body) = parsed else { return };
    // Lambda's on-failure destination: the invocation record, the event under requestPayload.
    let (event, by, why) = if let Some(payload) = body.get("requestPayload") {
        let context = &body["requestContext"];
        let response = &body["responsePayload"];
        let error = [text(response, "errorType"), text(response, "errorMessage")]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(": ");
        let why = format!(
            "the router failed it ({}, {} invocations): {}",
            text(context, "condition").unwrap_or_else(|| "no condition".into()),
            number(context, "approximateInvokeCount").map_or("?".into(), |n| n.to_string()),
            if error.is_empty() {
                "no error in the record".to_owned()
            } else {
                error
            }
        );
        (payload.clone(), "lambda", why)
    } else if body.get("detail-type").is_some() {
        // EventBridge could not deliver it to the router (after the rule's retry policy).
        let attribute = |k: &str| attributes.get(k).cloned();
        let why = format!(
            "EventBridge could not deliver it to the router ({}, {} retries): {}",
            attribute("EXHAUSTED_RETRY_CONDITION").unwrap_or_else(|| "no condition".into()),
            attribute("RETRY_ATTEMPTS").unwrap_or_else(|| "?".into()),
            [attribute("ERROR_CODE"), attribute("ERROR_MESSAGE")]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join(": ")
        );
        (body.clone(), "eventbridge", why)
    } else {
        return;
    };
    letter.by = by;
    letter.why = why;
    note_job(letter, &event["detail"]);
    letter.replay =
        if event.get("detail-type").and_then(Value::as_str) == Some(JOB_EVENT_DETAIL_TYPE) {
            Replay::InvokeRouter { event }
        } else {
            Replay::No {
                why: format!(
                    "the event is no `{JOB_EVENT_DETAIL_TYPE}`: the router takes nothing else"
                ),
            }
        };
}

fn intake_letter(letter: &mut SetAside, body: &str, receives: Option<u64>) {
    match QueuedHook::from_message(body) {
        Ok(hook) => {
            letter.by = "intake-drainer";
            letter.why = format!(
                "the intake drainer could not forward it (the deliveries table or the bus failed; {} receives; the drainer's log has each error)",
                receives.map_or("?".into(), |n| n.to_string())
            );
            letter.delivery_id = Some(hook.delivery_id().to_owned());
            if let Some(job) = hook.job_event() {
                letter.project_id = Some(job.project_id);
                letter.job_id = Some(job.job_id);
                letter.status = Some(job.status.as_str().to_owned());
            }
            letter.replay = Replay::FallbackQueue {
                body: body.to_owned(),
            };
        }
        Err(e) => letter.why = e,
    }
}

fn webhook_letter(letter: &mut SetAside, parsed: Option<Value>) {
    let Some(body) = parsed else { return };
    if body.get("detail-type").and_then(Value::as_str) != Some(DEAD_LETTER_DETAIL_TYPE) {
        return;
    }
    let Ok(dead) = serde_json::from_value::<DeadLetter>(body["detail"].clone()) else {
        return;
    };
    letter.by = "webhook";
    letter.why = format!(
        "the webhook could not use the hook: {} ({} bytes{})",
        dead.reason,
        dead.body_bytes,
        if dead.body_truncated {
            ", kept truncated"
        } else {
            ""
        }
    );
    letter.delivery_id = Some(dead.delivery_id);
    letter.replay = Replay::No {
        why: "the webhook could not use this hook, so there is nothing to forward: fix the cause (the reason says it); the reconciler provisions a job GitLab still lists as pending without the hook (a Resend from the webhook's Recent events in GitLab only makes it sooner)".into(),
    };
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn key() -> JobKey {
        JobKey {
            project_id: 7,
            job_id: 1,
        }
    }

    fn record(attempt: u32, started: u64) -> JobRecord {
        JobRecord {
            phase: Some(JobPhase::Provisioning),
            attempt,
            attempt_started_at_ms: Some(started),
            ..JobRecord::default()
        }
    }

    #[test]
    fn a_slot_view_counts_items_per_scope_and_shows_a_counter_that_disagrees() {
        let held = |project_id, job_id, taken_at_ms| HeldSlot {
            job: JobKey { project_id, job_id },
            attempt: 1,
            taken_at_ms,
        };
        let slots = [held(7, 1, 500), held(7, 2, 300), held(9, 3, 400)];
        assert_eq!(slot_projects(&slots), [7, 9]);
        // Project 9's counter says 2 for its one item: a leak.
        let usage = SlotUsage {
            global: 4,
            per_project: [(7, 2), (9, 2)].into(),
        };
        let view = slot_view(SlotCaps::from_values(10, 0), &slots, &usage);
        assert_eq!(view.global, SlotScope { used: 4, items: 3 });
        assert!(!view.global.agrees());
        assert_eq!(
            view.projects,
            [
                (7, SlotScope { used: 2, items: 2 }),
                (9, SlotScope { used: 2, items: 1 })
            ]
        );
        assert_eq!(view.oldest_taken_at_ms, Some(300));
        assert_eq!(view.caps.global, Some(10));
        assert_eq!(view.caps.per_project, None);
    }

    #[test]
    fn a_retry_while_the_attempt_is_young_starts_nothing() {
        let now = 100 * 60_000;
        let young = plan_retry(
            key(),
            &record(2, now - 5_000),
            false,
            now,
            RETRY_YOUNG_MS,
            false,
        );
        assert!(
            matches!(&young, RetryPlan::InFlight { attempt: 2, execution, .. } if execution == "p7-j1-provision-a2"),
            "{young:?}"
        );
        // Still running, however old: in flight.
        let running = plan_retry(key(), &record(2, 0), true, now, RETRY_YOUNG_MS, false);
        assert!(matches!(running, RetryPlan::InFlight { .. }));
        // Old and done: the next attempt. Failed: at once.
        let old = plan_retry(key(), &record(2, 0), false, now, RETRY_YOUNG_MS, false);
        assert!(
            matches!(&old, RetryPlan::Start { attempt: 3, execution, .. } if execution == "p7-j1-provision-a3")
        );
        let failed = JobRecord {
            provision_error: Some("NoCapacity".into()),
            ..record(1, now - 1_000)
        };
        assert!(matches!(
            plan_retry(key(), &failed, false, now, RETRY_YOUNG_MS, false),
            RetryPlan::Start { attempt: 2, .. }
        ));
        // --force, young or not; never for a finished job.
        assert!(matches!(
            plan_retry(key(), &record(2, now), true, now, RETRY_YOUNG_MS, true),
            RetryPlan::Start { attempt: 3, .. }
        ));
        let finished = JobRecord {
            phase: Some(JobPhase::Cleaned),
            ..record(1, 0)
        };
        assert_eq!(
            plan_retry(key(), &finished, false, now, RETRY_YOUNG_MS, true),
            RetryPlan::Finished { phase: "cleaned" }
        );
        // Seen only (never provisioned): attempt 1, the router's own execution name.
        let seen = JobRecord {
            phase: Some(JobPhase::Seen),
            ..JobRecord::default()
        };
        assert!(
            matches!(plan_retry(key(), &seen, false, now, RETRY_YOUNG_MS, false),
            RetryPlan::Start { attempt: 1, execution, .. } if execution == "p7-j1-provision")
        );
        let given_up = JobRecord {
            gave_up: true,
            provision_error: Some("NoCapacity".into()),
            ..record(5, 0)
        };
        let RetryPlan::Start { notes, .. } =
            plan_retry(key(), &given_up, false, now, RETRY_YOUNG_MS, false)
        else {
            panic!()
        };
        assert!(notes[0].contains("given up"), "{notes:?}");
    }

    #[test]
    fn the_summary_counts_phases_and_lists_what_waits_failed_and_was_given_up() {
        let items = [
            json!({"job_key": "project#7#job#1", "phase_rank": 2, "updated_at_ms": 500,
                   "waiting_for_slot_since_ms": 300, "waiting_for_slot_cap": "drained"}),
            json!({"job_key": "project#7#job#2", "phase_rank": 2, "updated_at_ms": 100,
                   "provision_error": "NoCapacity", "provision_cause": "none left"}),
            json!({"job_key": "project#7#job#3", "phase_rank": 2, "attempt": 5, "updated_at_ms": 50,
                   "provision_error": "NoCapacity", "gave_up_at_ms": 900}),
            json!({"job_key": "project#7#job#4", "phase_rank": 3, "picked_up_at_ms": 10, "updated_at_ms": 1}),
            json!({"job_key": "project#7#job#5", "phase_rank": 5, "provision_error": "old"}),
            json!({"job_key": jobs_table::DRAIN_KEY, "drained_at_ms": 1}),
        ];
        let views: Vec<JobView> = items.iter().filter_map(job_view).collect();
        assert_eq!(views.len(), 5, "the drain switch is no job");
        let s = summarize(&views);
        assert_eq!(
            s.by_phase,
            BTreeMap::from([
                ("provisioning".into(), 3),
                ("running".into(), 1),
                ("cleaned".into(), 1)
            ])
        );
        assert_eq!(s.waiting.len(), 1);
        assert_eq!(s.waiting[0].waiting_for.as_deref(), Some("drained"));
        assert_eq!(
            s.failed.iter().map(|j| j.job_id).collect::<Vec<_>>(),
            [2],
            "a cleaned job's old error is history"
        );
        assert_eq!(s.given_up.iter().map(|j| j.job_id).collect::<Vec<_>>(), [3]);
        assert_eq!(s.pending, 3, "job 4 was picked up");
        assert_eq!(s.oldest_pending.unwrap().job_id, 3);
    }

    #[test]
    fn router_letters_say_why_and_carry_the_event_back_to_the_router() {
        let event = json!({"version": "0", "id": "e1", "detail-type": "GitLab Job Event",
            "source": "ephemeral-runners.webhook", "detail": {"project_id": 7, "job_id": 1,
            "status": "pending", "delivery_id": "d-1"}});
        let record = json!({"version": "1.0", "requestContext": {"condition": "RetriesExhausted",
            "approximateInvokeCount": 3}, "requestPayload": event,
            "responsePayload": {"errorType": "RouterError", "errorMessage": "jobs table: ResourceNotFoundException"}});
        let letter = classify_letter(
            LetterQueue::Router,
            &record.to_string(),
            &BTreeMap::new(),
            Some(1),
        );
        assert_eq!(letter.by, "lambda");
        assert!(
            letter.why.contains("RetriesExhausted, 3 invocations")
                && letter.why.contains("ResourceNotFoundException"),
            "{}",
            letter.why
        );
        assert_eq!((letter.project_id, letter.job_id), (Some(7), Some(1)));
        assert_eq!(
            letter.replay,
            Replay::InvokeRouter {
                event: event.clone()
            }
        );

        let attributes = BTreeMap::from([
            ("ERROR_CODE".to_owned(), "SDK_CLIENT_ERROR".to_owned()),
            ("ERROR_MESSAGE".to_owned(), "throttled".to_owned()),
            ("RETRY_ATTEMPTS".to_owned(), "185".to_owned()),
            (
                "EXHAUSTED_RETRY_CONDITION".to_owned(),
                "MaximumRetryAttempts".to_owned(),
            ),
        ]);
        let undelivered =
            classify_letter(LetterQueue::Router, &event.to_string(), &attributes, None);
        assert_eq!(undelivered.by, "eventbridge");
        assert!(
            undelivered.why.contains("185 retries") && undelivered.why.contains("throttled"),
            "{}",
            undelivered.why
        );
        assert_eq!(undelivered.replay, Replay::InvokeRouter { event });

        let junk = classify_letter(LetterQueue::Router, "not json", &BTreeMap::new(), None);
        assert!(matches!(junk.replay, Replay::No { .. }));
        assert!(junk.why.contains("unknown"));
    }

    #[test]
    fn intake_letters_go_back_to_the_fallback_queue_and_webhook_letters_nowhere() {
        let hook = json!({"kind": "job_event", "detail": crate::testing::job_event(7, 1, "build", crate::JobStatus::Pending)});
        let letter = classify_letter(
            LetterQueue::Intake,
            &hook.to_string(),
            &BTreeMap::new(),
            Some(10),
        );
        assert_eq!(letter.by, "intake-drainer");
        assert!(letter.why.contains("10 receives"));
        assert_eq!((letter.project_id, letter.job_id), (Some(7), Some(1)));
        assert!(matches!(letter.replay, Replay::FallbackQueue { .. }));

        let dead = json!({"detail-type": DEAD_LETTER_DETAIL_TYPE, "detail": {
            "delivery_id": "d-9", "received_at_ms": 1, "reason": "body is not JSON",
            "gitlab_event": "Job Hook", "body_bytes": 12, "body_sha256": "00",
            "body_truncated": false, "body_encoding": "utf8", "body": "not json at"}});
        let letter = classify_letter(
            LetterQueue::Webhook,
            &dead.to_string(),
            &BTreeMap::new(),
            None,
        );
        assert_eq!(letter.by, "webhook");
        assert!(letter.why.contains("body is not JSON"), "{}", letter.why);
        assert_eq!(letter.delivery_id.as_deref(), Some("d-9"));
        assert!(matches!(letter.replay, Replay::No { .. }));
    }
}
