//! `drain` / `undrain`: the drain switch ([`ephemeral_core::drain`]), one control item in the
//! jobs table that the provision step and the reconciler read.

use std::fmt::Write as _;

use aws_sdk_dynamodb::error::DisplayErrorContext;
use aws_sdk_dynamodb::types::{AttributeValue, ReturnValue};
use ephemeral_core::jobs_table::{DRAIN_KEY, KEY, drain_attr, drain_of};
use ephemeral_core::ops::{job_view, summarize};
use serde_json::{Value, json};

use crate::Outcome;
use crate::cli::{Context, Failure};
use crate::show::{age, plural, print_json};
use crate::stack::Resource;
use crate::status::{drain_text, scan_jobs};

pub async fn drain(
    out: &mut Outcome,
    ctx: &Context<'_>,
    by: Option<String>,
    reason: Option<String>,
) -> Result<u8, Failure> {
    let table = ctx.stack.get(Resource::JobsTable).await?;
    let client = aws_sdk_dynamodb::Client::new(ctx.sdk);
    let mut put = client
        .put_item()
        .table_name(&table)
        .item(KEY, AttributeValue::S(DRAIN_KEY.to_owned()))
        .item(
            drain_attr::SINCE_MS,
            AttributeValue::N(ctx.now_ms.to_string()),
        )
        // The first drain's time and reason stay: a second drain changes nothing.
        .condition_expression("attribute_not_exists(#key)")
        .expression_attribute_names("#key", KEY)
        .return_values_on_condition_check_failure(
            aws_sdk_dynamodb::types::ReturnValuesOnConditionCheckFailure::AllOld,
        );
    if let Some(by) = &by {
        put = put.item(drain_attr::BY, AttributeValue::S(by.clone()));
    }
    if let Some(reason) = &reason {
        put = put.item(drain_attr::REASON, AttributeValue::S(reason.clone()));
    }
    let (drain, already) = match put.send().await {
        Ok(_) => (
            ephemeral_core::drain::Drain {
                since_ms: ctx.now_ms,
                by,
                reason,
            },
            false,
        ),
        Err(e) => match e.into_service_error() {
            aws_sdk_dynamodb::operation::put_item::PutItemError::ConditionalCheckFailedException(c) => {
                let old = c.item().map(|i| Value::Object(ephemeral_aws::item_to_json(i)));
                let drain = drain_of(old.as_ref()).unwrap_or(ephemeral_core::drain::Drain {
                    since_ms: 0,
                    by: None,
                    reason: None,
                });
                (drain, true)
            }
            other => {
                return Err(Failure::aws(format!(
                    "writing the drain switch into the jobs table `{table}` failed: {}",
                    DisplayErrorContext(&other)
                )));
            }
        },
    };
    if ctx.json {
        print_json(
            out,
            &json!({"jobs_table": table, "drained": drain, "already_drained": already}),
        );
    } else if already {
        let _ = writeln!(
            out.stdout,
            "already {}: nothing changed",
            drain_text(&drain, ctx.now_ms)
        );
    } else {
        let _ = writeln!(
            out.stdout,
            "drained: no new runner starts (EC2 instance or Lambda runner); running jobs finish; new jobs wait, noted on their items (waiting_for_slot_cap = drained, see status). runner-ops undrain lets the reconciler start them, oldest first"
        );
    }
    Ok(0)
}

pub async fn undrain(out: &mut Outcome, ctx: &Context<'_>) -> Result<u8, Failure> {
    let table = ctx.stack.get(Resource::JobsTable).await?;
    let client = aws_sdk_dynamodb::Client::new(ctx.sdk);
    let deleted = client
        .delete_item()
        .table_name(&table)
        .key(KEY, AttributeValue::S(DRAIN_KEY.to_owned()))
        .return_values(ReturnValue::AllOld)
        .send()
        .await
        .map_err(|e| {
            Failure::aws(format!(
                "deleting the drain switch from the jobs table `{table}` failed: {}",
                DisplayErrorContext(&e)
            ))
        })?;
    let was = drain_of(
        deleted
            .attributes()
            .filter(|a| !a.is_empty())
            .map(|a| Value::Object(ephemeral_aws::item_to_json(a)))
            .as_ref(),
    );
    let items = scan_jobs(&client, &table).await?;
    let views: Vec<_> = items.iter().filter_map(job_view).collect();
    let waiting = summarize(&views).waiting.len();
    if ctx.json {
        print_json(
            out,
            &json!({"jobs_table": table, "was_drained": was, "waiting": waiting}),
        );
        return Ok(0);
    }
    let s = &mut out.stdout;
    let _ = match &was {
        Some(d) => writeln!(
            s,
            "undrained (was {}, for {}): runners start again",
            drain_text(d, ctx.now_ms),
            age(ctx.now_ms.saturating_sub(d.since_ms))
        ),
        None => writeln!(s, "not drained: nothing changed"),
    };
    let _ = writeln!(
        s,
        "{} for a runner slot; the reconciler starts {} on its next pass (every minute), oldest first, within the caps",
        plural(waiting, "job waits", "jobs wait"),
        if waiting == 1 { "it" } else { "them" }
    );
    Ok(0)
}
