//! `dead-letters list|show|replay`: the template's three dead-letter queues, why each message
//! was set aside ([`ephemeral_core::ops::classify_letter`]), and replay through the normal
//! path: a router dead letter is handed to the router as EventBridge hands it (a synchronous
//! invoke, so its answer is known); an intake dead letter goes back to the intake fallback
//! queue, which the drainer reads. A message is deleted from its queue only after its replay
//! succeeded. A replayed hook is deduplicated like any other: the drainer by delivery id,
//! the router per job and phase.
//!
//! Reading a queue receives its messages (hidden for a minute while they are looked at, then
//! made visible again): each listing adds one to a message's receive count.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use aws_sdk_sqs::error::DisplayErrorContext;
use aws_sdk_sqs::types::MessageSystemAttributeName;
use ephemeral_core::ops::{LetterQueue, Replay, SetAside, classify_letter};
use serde_json::{Value, json};

use crate::Outcome;
use crate::cli::{Context, Failure, OPERATIONAL};
use crate::show::{or_dash, plural, print_json, table, utc};
use crate::stack::Resource;

/// At most this many messages are read from a queue per run.
pub const MAX_PER_QUEUE: usize = 1000;
/// How long received messages stay hidden while a run looks at them (then they are made
/// visible again, or deleted after their replay).
const HOLD_SECONDS: i32 = 60;

fn resource(queue: LetterQueue) -> Resource {
    match queue {
        LetterQueue::Router => Resource::RouterDeadLetters,
        LetterQueue::Intake => Resource::IntakeDeadLetters,
        LetterQueue::Webhook => Resource::WebhookDeadLetters,
    }
}

/// One message as received.
#[derive(Debug, Clone)]
pub struct Letter {
    pub queue: LetterQueue,
    pub url: String,
    pub id: String,
    receipt: String,
    pub body: String,
    pub sent_ms: Option<u64>,
    pub receives: Option<u64>,
    pub system: BTreeMap<String, String>,
    pub attributes: BTreeMap<String, String>,
    pub set_aside: SetAside,
}

impl Letter {
    fn to_json(&self, with_body: bool) -> Value {
        let mut v = json!({
            "queue": self.queue, "id": self.id, "sent_ms": self.sent_ms,
            "receives": self.receives, "set_aside": self.set_aside,
        });
        if with_body {
            v["attributes"] = json!(self.attributes);
            v["system_attributes"] = json!(self.system);
            v["body"] =
                serde_json::from_str(&self.body).unwrap_or(Value::String(self.body.clone()));
        }
        v
    }

    fn job(&self) -> String {
        match (self.set_aside.project_id, self.set_aside.job_id) {
            (Some(p), Some(j)) => format!("{p}/{j}"),
            _ => "-".into(),
        }
    }
}

/// A queue's messages (up to [`MAX_PER_QUEUE`]), hidden until [`release`] or deletion.
async fn receive_all(
    sqs: &aws_sdk_sqs::Client,
    queue: LetterQueue,
    url: &str,
) -> Result<Vec<Letter>, Failure> {
    let mut letters: Vec<Letter> = Vec::new();
    let mut empty = 0;
    while letters.len() < MAX_PER_QUEUE && empty < 2 {
        let got = sqs
            .receive_message()
            .queue_url(url)
            .max_number_of_messages(10)
            .visibility_timeout(HOLD_SECONDS)
            .wait_time_seconds(0)
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .message_attribute_names("All")
            .send()
            .await
            .map_err(|e| {
                Failure::aws(format!(
                    "ReceiveMessage on {} ({url}) failed: {}",
                    resource(queue).what(),
                    DisplayErrorContext(&e)
                ))
            })?;
        let messages = got.messages.unwrap_or_default();
        // Short polling samples some of SQS's servers: an empty answer may still leave
        // messages behind, so only a second one ends the read.
        if messages.is_empty() {
            empty += 1;
            continue;
        }
        empty = 0;
        for m in messages {
            let system: BTreeMap<String, String> = m
                .attributes()
                .into_iter()
                .flatten()
                .map(|(k, v)| (k.as_str().to_owned(), v.clone()))
                .collect();
            let attributes: BTreeMap<String, String> = m
                .message_attributes()
                .into_iter()
                .flatten()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        v.string_value()
                            .map(str::to_owned)
                            .unwrap_or_else(|| format!("<{}>", v.data_type())),
                    )
                })
                .collect();
            let number = |k: &str| system.get(k).and_then(|v| v.parse().ok());
            let body = m.body().unwrap_or_default().to_owned();
            let receives = number("ApproximateReceiveCount");
            let set_aside = classify_letter(queue, &body, &attributes, receives);
            letters.push(Letter {
                queue,
                url: url.to_owned(),
                id: m.message_id().unwrap_or_default().to_owned(),
                receipt: m.receipt_handle().unwrap_or_default().to_owned(),
                sent_ms: number("SentTimestamp"),
                receives,
                body,
                system,
                attributes,
                set_aside,
            });
        }
    }
    Ok(letters)
}

/// Makes the messages visible again (best effort: they reappear after the hold anyway).
async fn release(sqs: &aws_sdk_sqs::Client, letters: &[Letter]) {
    for letter in letters {
        let _ = sqs
            .change_message_visibility()
            .queue_url(&letter.url)
            .receipt_handle(&letter.receipt)
            .visibility_timeout(0)
            .send()
            .await;
    }
}

/// The queues a command reads: those asked for (all of them by default) that can be named.
async fn queues(
    ctx: &Context<'_>,
    wanted: &[LetterQueue],
    all_needed: bool,
) -> Result<Vec<(LetterQueue, String)>, Failure> {
    let mut found = Vec::new();
    for queue in wanted {
        let url = if all_needed {
            Some(ctx.stack.get(resource(*queue)).await?)
        } else {
            ctx.stack.find(resource(*queue)).await?
        };
        if let Some(url) = url {
            found.push((*queue, url));
        }
    }
    if found.is_empty() {
        return Err(Failure::usage(
            "name the dead-letter queues: --stack STACK (its outputs RouterDeadLetterQueueUrl, IntakeFallbackDeadLetterQueueUrl, DeadLetterQueueUrl), or --router-dlq, --intake-dlq, --webhook-dlq URL",
        ));
    }
    Ok(found)
}

async fn read(
    ctx: &Context<'_>,
    sqs: &aws_sdk_sqs::Client,
    wanted: &[LetterQueue],
    all_needed: bool,
) -> Result<Vec<(LetterQueue, String, Vec<Letter>)>, Failure> {
    let mut out = Vec::new();
    for (queue, url) in queues(ctx, wanted, all_needed).await? {
        match receive_all(sqs, queue, &url).await {
            Ok(letters) => out.push((queue, url, letters)),
            Err(e) => {
                release_all(sqs, &out).await;
                return Err(e);
            }
        }
    }
    Ok(out)
}

async fn release_all(sqs: &aws_sdk_sqs::Client, read: &[(LetterQueue, String, Vec<Letter>)]) {
    for (_, _, letters) in read {
        release(sqs, letters).await;
    }
}

fn replay_text(replay: &Replay) -> String {
    match replay {
        Replay::InvokeRouter { .. } => {
            "invoke the router with the event, as EventBridge does (the router is idempotent per job and phase)".into()
        }
        Replay::FallbackQueue { .. } => {
            "send it back to the intake fallback queue; the intake drainer forwards it, deduplicated by delivery id".into()
        }
        Replay::No { why } => format!("not replayable: {why}"),
    }
}

pub async fn list(
    out: &mut Outcome,
    ctx: &Context<'_>,
    wanted: &[LetterQueue],
) -> Result<u8, Failure> {
    let sqs = aws_sdk_sqs::Client::new(ctx.sdk);
    let read = read(ctx, &sqs, wanted, true).await?;
    release_all(&sqs, &read).await;
    if ctx.json {
        let queues: Vec<Value> = read
            .iter()
            .map(|(queue, url, letters)| {
                json!({"queue": queue, "url": url,
                       "messages": letters.iter().map(|l| l.to_json(false)).collect::<Vec<_>>()})
            })
            .collect();
        print_json(out, &json!({ "queues": queues }));
        return Ok(0);
    }
    for (n, (queue, url, letters)) in read.iter().enumerate() {
        let _ = writeln!(
            out.stdout,
            "{}{} ({url}): {}",
            if n > 0 { "\n" } else { "" },
            resource(*queue).what(),
            plural(letters.len(), "message", "messages")
        );
        let rows = letters
            .iter()
            .map(|l| {
                vec![
                    l.id.clone(),
                    l.sent_ms.map_or("-".into(), utc),
                    or_dash(l.receives),
                    l.job(),
                    or_dash(l.set_aside.status.clone()),
                    short(&l.set_aside.why),
                ]
            })
            .collect();
        table(
            out,
            &["ID", "SENT", "RECEIVES", "JOB", "STATUS", "WHY"],
            rows,
        );
    }
    Ok(0)
}

/// The first [`WHY_WIDTH`] characters of a reason, for a table (`show` has all of it).
fn short(why: &str) -> String {
    if why.chars().count() <= WHY_WIDTH {
        return why.to_owned();
    }
    let cut: String = why.chars().take(WHY_WIDTH - 1).collect();
    format!("{}… (dead-letters show ID)", cut.trim_end())
}

const WHY_WIDTH: usize = 100;

/// SQS message ids are UUIDs.
fn check_id(id: &str) -> Result<(), Failure> {
    let ok = id.len() == 36
        && id.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        });
    if ok {
        Ok(())
    } else {
        Err(Failure::usage(format!(
            "`{id}` is not a message id: give the ID column of `runner-ops dead-letters list` (a UUID such as 0c4b6f1e-6b1a-4a62-9a53-2f4b9f0e2a11)"
        )))
    }
}

fn not_found(ids: &[&str], searched: &[(LetterQueue, String, Vec<Letter>)]) -> Failure {
    Failure::not_found(format!(
        "no message {} in {} (deleted already, or in another stack's queues): see runner-ops dead-letters list",
        ids.join(", "),
        searched
            .iter()
            .map(|(q, _, _)| resource(*q).what())
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

pub async fn show(out: &mut Outcome, ctx: &Context<'_>, id: &str) -> Result<u8, Failure> {
    check_id(id)?;
    let sqs = aws_sdk_sqs::Client::new(ctx.sdk);
    let read = read(ctx, &sqs, &LetterQueue::ALL, false).await?;
    release_all(&sqs, &read).await;
    let Some(letter) = read
        .iter()
        .flat_map(|(_, _, letters)| letters)
        .find(|l| l.id == id)
    else {
        return Err(not_found(&[id], &read));
    };
    if ctx.json {
        print_json(out, &letter.to_json(true));
        return Ok(0);
    }
    let s = &mut out.stdout;
    let _ = writeln!(
        s,
        "message {id}\nqueue: {} ({})",
        resource(letter.queue).what(),
        letter.url
    );
    let _ = writeln!(
        s,
        "sent: {}, receives: {}",
        letter.sent_ms.map_or("-".into(), utc),
        or_dash(letter.receives)
    );
    let _ = writeln!(s, "set aside by: {}", letter.set_aside.by);
    let _ = writeln!(s, "why: {}", letter.set_aside.why);
    let _ = writeln!(
        s,
        "job: {} (status {}, delivery {})",
        letter.job(),
        or_dash(letter.set_aside.status.clone()),
        or_dash(letter.set_aside.delivery_id.clone())
    );
    let _ = writeln!(s, "replay: {}", replay_text(&letter.set_aside.replay));
    let _ = writeln!(s, "message attributes:");
    let rows = letter
        .attributes
        .iter()
        .map(|(k, v)| vec![k.clone(), v.clone()])
        .collect();
    table(out, &["NAME", "VALUE"], rows);
    out.stdout.push_str("body:\n");
    let body = serde_json::from_str::<Value>(&letter.body)
        .map(|v| serde_json::to_string_pretty(&v).unwrap_or_default())
        .unwrap_or_else(|_| letter.body.clone());
    for line in body.lines() {
        let _ = writeln!(out.stdout, "  {line}");
    }
    Ok(0)
}

/// Hands a router dead letter's event to the router, synchronously: its error, if any.
async fn invoke_router(ctx: &Context<'_>, function: &str, event: &Value) -> Result<(), String> {
    let answer = aws_sdk_lambda::Client::new(ctx.sdk)
        .invoke()
        .function_name(function)
        .invocation_type(aws_sdk_lambda::types::InvocationType::RequestResponse)
        .payload(aws_sdk_lambda::primitives::Blob::new(event.to_string()))
        .send()
        .await
        .map_err(|e| {
            format!(
                "Invoke {function} failed: {}",
                aws_sdk_lambda::error::DisplayErrorContext(&e)
            )
        })?;
    match answer.function_error() {
        None => Ok(()),
        Some(kind) => Err(format!(
            "the router failed it again ({kind}): {}",
            answer
                .payload()
                .map(|p| String::from_utf8_lossy(p.as_ref()).into_owned())
                .unwrap_or_default()
        )),
    }
}

pub async fn replay(out: &mut Outcome, ctx: &Context<'_>, ids: &[String]) -> Result<u8, Failure> {
    for id in ids {
        check_id(id)?;
    }
    let sqs = aws_sdk_sqs::Client::new(ctx.sdk);
    let read = read(ctx, &sqs, &LetterQueue::ALL, false).await?;
    let all: Vec<&Letter> = read.iter().flat_map(|(_, _, l)| l).collect();
    let chosen = match chosen_letters(ids, &all, &read) {
        Ok(chosen) => chosen,
        Err(failure) => {
            release_all(&sqs, &read).await;
            return Err(failure);
        }
    };
    let (router, intake) = match replay_targets(ctx, &chosen).await {
        Ok(targets) => targets,
        Err(e) => {
            release_all(&sqs, &read).await;
            return Err(e);
        }
    };

    let mut results = Vec::new();
    for letter in &chosen {
        let result = replay_letter(ctx, &sqs, letter, router.as_deref(), intake.as_deref()).await;
        results.push((letter.id.clone(), result));
    }
    // Everything else read (and the failed ones) is visible again at once.
    let done: Vec<&str> = results
        .iter()
        .filter(|(_, r)| r.is_ok())
        .map(|(id, _)| id.as_str())
        .collect();
    let others: Vec<Letter> = all
        .iter()
        .filter(|l| !done.contains(&l.id.as_str()))
        .map(|l| (*l).clone())
        .collect();
    release(&sqs, &others).await;

    let failed = results.iter().filter(|(_, r)| r.is_err()).count();
    if ctx.json {
        print_json(
            out,
            &json!({"replayed": results.iter().map(|(id, r)| match r {
                Ok(done) => json!({"id": id, "replayed": true, "result": done}),
                Err(e) => json!({"id": id, "replayed": false, "error": e}),
            }).collect::<Vec<_>>()}),
        );
    } else {
        for (id, result) in &results {
            let _ = match result {
                Ok(done) => writeln!(out.stdout, "replayed {id}: {done}"),
                Err(e) => writeln!(out.stderr, "not replayed {id}: {e}"),
            };
        }
    }
    Ok(if failed > 0 { OPERATIONAL } else { 0 })
}

/// The letters `ids` name, each once, in the order given; the failure when any is missing or
/// not replayable. All or nothing before anything is sent: a typo must not leave half a
/// replay behind.
fn chosen_letters<'a>(
    ids: &[String],
    all: &[&'a Letter],
    read: &[(LetterQueue, String, Vec<Letter>)],
) -> Result<Vec<&'a Letter>, Failure> {
    let mut chosen: Vec<&Letter> = Vec::new();
    let mut missing = Vec::new();
    for id in ids {
        match all.iter().find(|l| &l.id == id) {
            Some(l) if !chosen.iter().any(|c| c.id == l.id) => chosen.push(l),
            Some(_) => {}
            None => missing.push(id.as_str()),
        }
    }
    let refused: Vec<String> = chosen
        .iter()
        .filter_map(|l| match &l.set_aside.replay {
            Replay::No { why } => Some(format!("{}: {why}", l.id)),
            _ => None,
        })
        .collect();
    if !missing.is_empty() {
        Err(not_found(&missing, read))
    } else if !refused.is_empty() {
        Err(Failure::usage(format!(
            "not replayable, nothing was replayed: {}",
            refused.join("; ")
        )))
    } else {
        Ok(chosen)
    }
}

/// Where the chosen letters go: the router function and the intake fallback queue, each
/// looked up only when a letter needs it (a stack may name only one of them).
async fn replay_targets(
    ctx: &Context<'_>,
    chosen: &[&Letter],
) -> Result<(Option<String>, Option<String>), Failure> {
    let needs = |f: fn(&Replay) -> bool| chosen.iter().any(|l| f(&l.set_aside.replay));
    let router = if needs(|r| matches!(r, Replay::InvokeRouter { .. })) {
        Some(ctx.stack.get(Resource::RouterFunction).await)
    } else {
        None
    };
    let intake = if needs(|r| matches!(r, Replay::FallbackQueue { .. })) {
        Some(ctx.stack.get(Resource::IntakeQueue).await)
    } else {
        None
    };
    match (router.transpose(), intake.transpose()) {
        (Ok(r), Ok(i)) => Ok((r, i)),
        (Err(e), _) | (_, Err(e)) => Err(e),
    }
}

/// Replays one letter, then deletes it from its queue: what was done, or why it was not (or
/// not completely).
async fn replay_letter(
    ctx: &Context<'_>,
    sqs: &aws_sdk_sqs::Client,
    letter: &Letter,
    router: Option<&str>,
    intake: Option<&str>,
) -> Result<String, String> {
    let sent = match &letter.set_aside.replay {
        Replay::InvokeRouter { event } => {
            let function = router.unwrap_or_default();
            invoke_router(ctx, function, event)
                .await
                .map(|()| format!("the router ({function}) took it"))
        }
        Replay::FallbackQueue { body } => {
            let queue = intake.unwrap_or_default();
            sqs.send_message()
                .queue_url(queue)
                .message_body(body)
                .send()
                .await
                .map(|_| "back on the intake fallback queue; the drainer forwards it".to_owned())
                .map_err(|e| format!("SendMessage to {queue} failed: {}", DisplayErrorContext(&e)))
        }
        Replay::No { .. } => unreachable!("refused by chosen_letters"),
    };
    match sent {
        Ok(done) => match sqs
            .delete_message()
            .queue_url(&letter.url)
            .receipt_handle(&letter.receipt)
            .send()
            .await
        {
            Ok(_) => Ok(format!(
                "{done}; deleted from {}",
                resource(letter.queue).what()
            )),
            Err(e) => Err(format!(
                "{done}, but it could not be deleted from {} ({}): a second replay is deduplicated",
                resource(letter.queue).what(),
                DisplayErrorContext(&e)
            )),
        },
        Err(e) => Err(format!("{e}; kept in {}", resource(letter.queue).what())),
    }
}
