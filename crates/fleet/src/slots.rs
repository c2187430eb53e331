//! The slots table (DynamoDB) behind the core's [`SlotStore`] port: counters and slot items
//! written with `TransactWriteItems`, all or nothing, under the core's conditions. The
//! reconciler reads free slots through [`DynamoSlots`] too ([`count_free_slots`]).
//!
//! [`count_free_slots`]: ephemeral_core::slots::count_free_slots

use std::collections::HashMap;

use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::types::{
    AttributeValue, CancellationReason, Delete, Put, ReturnValuesOnConditionCheckFailure,
    TransactWriteItem, Update,
};
use ephemeral_aws::port_error;
use ephemeral_core::jobs::JobKey;
use ephemeral_core::slots::{
    ATTR_ATTEMPT, ATTR_JOB_ID, ATTR_PROJECT_ID, ATTR_SLOT_KEY, ATTR_TAKEN_AT_MS, ATTR_USED,
    BELOW_CAP, CapReached, GLOBAL_COUNTER, HeldSlot, SLOT_ABSENT, SLOT_PRESENT, SLOT_STALE,
    SLOT_UNCHANGED, SlotCaps, SlotRefresh, SlotStore, SlotTake, SlotUsage, project_counter,
    slot_item_key,
};
use ephemeral_core::webhook::PortError;

#[derive(Debug, Clone)]
pub struct DynamoSlots {
    pub client: aws_sdk_dynamodb::Client,
    pub table: String,
}

fn s(v: &str) -> AttributeValue {
    AttributeValue::S(v.to_owned())
}

fn n(v: impl ToString) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

/// A slot item as [`SlotStore::held`] reports it (`None` for a counter item).
fn held_slot(item: &HashMap<String, AttributeValue>) -> Option<HeldSlot> {
    Some(HeldSlot {
        job: JobKey {
            project_id: num(item, ATTR_PROJECT_ID)?,
            job_id: num(item, ATTR_JOB_ID)?,
        },
        // Taken before attempts had slots of their own: attempt 1.
        attempt: num(item, ATTR_ATTEMPT)
            .and_then(|a| u32::try_from(a).ok())
            .filter(|a| *a >= 1)
            .unwrap_or(1),
        taken_at_ms: num(item, ATTR_TAKEN_AT_MS)?,
    })
}

fn num(item: &HashMap<String, AttributeValue>, key: &str) -> Option<u64> {
    match item.get(key)? {
        AttributeValue::N(v) | AttributeValue::S(v) => v.parse().ok(),
        _ => None,
    }
}

fn built<T, E: std::error::Error + Send + Sync + 'static>(
    what: &str,
    r: Result<T, E>,
) -> Result<T, PortError> {
    r.map_err(|e| port_error(what, e))
}

impl DynamoSlots {
    /// `ADD used :delta` on a counter, within `cap` when there is one.
    fn count(&self, counter: &str, delta: i64, cap: Option<u32>) -> Result<Update, PortError> {
        let mut update = Update::builder()
            .table_name(&self.table)
            .key(ATTR_SLOT_KEY, s(counter))
            .update_expression("ADD #used :delta")
            .expression_attribute_names("#used", ATTR_USED)
            .expression_attribute_values(":delta", n(delta));
        if let Some(cap) = cap {
            update = update
                .condition_expression(BELOW_CAP)
                .expression_attribute_values(":cap", n(cap));
        }
        built("DynamoDB Update (slots)", update.build())
    }

    /// The global and the project counter, each within its cap (taking) or not (giving back).
    fn counters(
        &self,
        job: JobKey,
        delta: i64,
        caps: &SlotCaps,
    ) -> Result<[TransactWriteItem; 2], PortError> {
        let global = self.count(GLOBAL_COUNTER, delta, caps.global)?;
        let project = self.count(&project_counter(job.project_id), delta, caps.per_project)?;
        Ok([
            TransactWriteItem::builder().update(global).build(),
            TransactWriteItem::builder().update(project).build(),
        ])
    }

    async fn transact(
        &self,
        items: Vec<TransactWriteItem>,
    ) -> Result<Option<Vec<CancellationReason>>, PortError> {
        match self
            .client
            .transact_write_items()
            .set_transact_items(Some(items))
            .send()
            .await
        {
            Ok(_) => Ok(None),
            Err(e) => match e.into_service_error() {
                TransactWriteItemsError::TransactionCanceledException(c) => {
                    Ok(Some(c.cancellation_reasons().to_vec()))
                }
                other => Err(port_error("DynamoDB TransactWriteItems (slots)", other)),
            },
        }
    }
}

fn condition_failed(reasons: &[CancellationReason], index: usize) -> bool {
    reasons
        .get(index)
        .and_then(|r| r.code())
        .is_some_and(|c| c == "ConditionalCheckFailed")
}

/// Why a transaction was cancelled when no condition says (a conflict with a concurrent
/// transaction on the same item): retried by the step, like any DynamoDB failure.
fn cancelled(reasons: &[CancellationReason]) -> PortError {
    let codes: Vec<_> = reasons.iter().filter_map(|r| r.code()).collect();
    PortError(format!(
        "DynamoDB TransactWriteItems (slots) was cancelled ({}); the step may be retried",
        codes.join(", ")
    ))
}

impl SlotStore for DynamoSlots {
    async fn take(
        &self,
        job: JobKey,
        attempt: u32,
        caps: &SlotCaps,
        now_ms: u64,
    ) -> Result<SlotTake, PortError> {
        let put = Put::builder()
            .table_name(&self.table)
            .item(ATTR_SLOT_KEY, s(&slot_item_key(job, attempt)))
            .item(ATTR_PROJECT_ID, n(job.project_id))
            .item(ATTR_JOB_ID, n(job.job_id))
            .item(ATTR_ATTEMPT, n(attempt))
            .item(ATTR_TAKEN_AT_MS, n(now_ms))
            .condition_expression(SLOT_ABSENT)
            .expression_attribute_names("#key", ATTR_SLOT_KEY);
        let put = built("DynamoDB Put (slots)", put.build())?;
        let [global, project] = self.counters(job, 1, caps)?;
        let items = vec![
            TransactWriteItem::builder().put(put).build(),
            global,
            project,
        ];
        let Some(reasons) = self.transact(items).await? else {
            return Ok(SlotTake::Taken);
        };
        // The reasons come in the order of the items: slot item, global, project.
        if condition_failed(&reasons, 0) {
            return Ok(SlotTake::AlreadyHeld);
        }
        if let (true, Some(limit)) = (condition_failed(&reasons, 1), caps.global) {
            return Ok(SlotTake::Full(CapReached::Global { limit }));
        }
        if let (true, Some(limit)) = (condition_failed(&reasons, 2), caps.per_project) {
            return Ok(SlotTake::Full(CapReached::Project {
                project_id: job.project_id,
                limit,
            }));
        }
        Err(cancelled(&reasons))
    }

    async fn refresh(
        &self,
        job: JobKey,
        attempt: u32,
        now_ms: u64,
        stale_ms: u64,
    ) -> Result<SlotRefresh, PortError> {
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .key(ATTR_SLOT_KEY, s(&slot_item_key(job, attempt)))
            .update_expression("SET #taken = :now")
            .condition_expression(SLOT_STALE)
            .expression_attribute_names("#key", ATTR_SLOT_KEY)
            .expression_attribute_names("#taken", ATTR_TAKEN_AT_MS)
            .expression_attribute_values(":now", n(now_ms))
            .expression_attribute_values(":stale", n(stale_ms))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .send()
            .await;
        match result {
            Ok(_) => Ok(SlotRefresh::TakenOver),
            Err(e) => match e.into_service_error() {
                UpdateItemError::ConditionalCheckFailedException(c) => Ok(match c.item() {
                    Some(item) => SlotRefresh::InFlight {
                        taken_at_ms: num(item, ATTR_TAKEN_AT_MS).unwrap_or(now_ms),
                    },
                    None => SlotRefresh::Gone,
                }),
                other => Err(port_error("DynamoDB UpdateItem (slots, take over)", other)),
            },
        }
    }

    async fn give_back(
        &self,
        job: JobKey,
        attempt: u32,
        seen: Option<u64>,
    ) -> Result<bool, PortError> {
        let mut delete = Delete::builder()
            .table_name(&self.table)
            .key(ATTR_SLOT_KEY, s(&slot_item_key(job, attempt)))
            .expression_attribute_names("#key", ATTR_SLOT_KEY);
        delete = match seen {
            None => delete.condition_expression(SLOT_PRESENT),
            Some(taken_at_ms) => delete
                .condition_expression(SLOT_UNCHANGED)
                .expression_attribute_names("#taken", ATTR_TAKEN_AT_MS)
                .expression_attribute_values(":seen", n(taken_at_ms)),
        };
        let delete = built("DynamoDB Delete (slots)", delete.build())?;
        let [global, project] = self.counters(job, -1, &SlotCaps::default())?;
        let items = vec![
            TransactWriteItem::builder().delete(delete).build(),
            global,
            project,
        ];
        match self.transact(items).await? {
            None => Ok(true),
            Some(reasons) if condition_failed(&reasons, 0) => Ok(false),
            Some(reasons) => Err(cancelled(&reasons)),
        }
    }

    async fn held(&self) -> Result<Vec<HeldSlot>, PortError> {
        let mut pages = self
            .client
            .scan()
            .table_name(&self.table)
            .consistent_read(true)
            .into_paginator()
            .send();
        let mut out = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| port_error("DynamoDB Scan (slots)", e))?;
            out.extend(page.items().iter().filter_map(held_slot));
        }
        Ok(out)
    }

    async fn usage(&self, projects: &[u64]) -> Result<SlotUsage, PortError> {
        let mut usage = SlotUsage {
            global: self.used(GLOBAL_COUNTER).await?,
            ..SlotUsage::default()
        };
        for project in projects {
            let used = self.used(&project_counter(*project)).await?;
            usage.per_project.insert(*project, used);
        }
        Ok(usage)
    }
}

impl DynamoSlots {
    /// A counter's value (absent: 0), read consistently.
    async fn used(&self, counter: &str) -> Result<u32, PortError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key(ATTR_SLOT_KEY, s(counter))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| port_error("DynamoDB GetItem (slots)", e))?;
        let used = out.item().and_then(|i| num(i, ATTR_USED)).unwrap_or(0);
        Ok(u32::try_from(used).unwrap_or(u32::MAX))
    }
}
