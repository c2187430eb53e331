//! The leases table (DynamoDB) behind the core's [`Leases`] port: one item per lease name,
//! taken and released with the core's conditions. Generic over the name, so the reaper and
//! later scheduled functions share one table.

use std::collections::HashMap;

use aws_sdk_dynamodb::operation::put_item::PutItemError;
use aws_sdk_dynamodb::types::{AttributeValue, ReturnValuesOnConditionCheckFailure};
use ephemeral_aws::port_error;
use ephemeral_core::lease::{
    ATTR_EXPIRES_AT, ATTR_EXPIRES_AT_MS, ATTR_HOLDER, ATTR_NAME, Lease, Leases, RELEASE_CONDITION,
    TAKE_CONDITION,
};
use ephemeral_core::webhook::PortError;

#[derive(Debug, Clone)]
pub struct DynamoLeases {
    pub client: aws_sdk_dynamodb::Client,
    pub table: String,
}

fn s(v: &str) -> AttributeValue {
    AttributeValue::S(v.to_owned())
}

fn n(v: u64) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

/// The hold that refused a take, as the table returned it.
fn lease_of(name: &str, item: Option<&HashMap<String, AttributeValue>>) -> Lease {
    let text = |key| match item.and_then(|i| i.get(key)) {
        Some(AttributeValue::S(v) | AttributeValue::N(v)) => v.clone(),
        _ => String::new(),
    };
    Lease {
        name: name.to_owned(),
        holder: text(ATTR_HOLDER),
        expires_at_ms: text(ATTR_EXPIRES_AT_MS).parse().unwrap_or(0),
    }
}

impl Leases for DynamoLeases {
    async fn take(&self, lease: &Lease, now_ms: u64) -> Result<Option<Lease>, PortError> {
        let result = self
            .client
            .put_item()
            .table_name(&self.table)
            .item(ATTR_NAME, s(&lease.name))
            .item(ATTR_HOLDER, s(&lease.holder))
            .item(ATTR_EXPIRES_AT_MS, n(lease.expires_at_ms))
            .item(ATTR_EXPIRES_AT, n(lease.expires_at_ms.div_ceil(1000)))
            .condition_expression(TAKE_CONDITION)
            .expression_attribute_names("#name", ATTR_NAME)
            .expression_attribute_names("#holder", ATTR_HOLDER)
            .expression_attribute_names("#expires", ATTR_EXPIRES_AT_MS)
            .expression_attribute_values(":now", n(now_ms))
            .expression_attribute_values(":holder", s(&lease.holder))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .send()
            .await;
        match result {
            Ok(_) => Ok(None),
            Err(e) => match e.into_service_error() {
                PutItemError::ConditionalCheckFailedException(held) => {
                    Ok(Some(lease_of(&lease.name, held.item())))
                }
                other => Err(port_error(
                    &format!("DynamoDB PutItem (lease `{}`)", lease.name),
                    other,
                )),
            },
        }
    }

    async fn release(&self, name: &str, holder: &str) -> Result<(), PortError> {
        let result = self
            .client
            .delete_item()
            .table_name(&self.table)
            .key(ATTR_NAME, s(name))
            .condition_expression(RELEASE_CONDITION)
            .expression_attribute_names("#holder", ATTR_HOLDER)
            .expression_attribute_values(":holder", s(holder))
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            // Not ours any more (it expired and was taken over) or already gone: nothing to do.
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
            {
                Ok(())
            }
            Err(e) => Err(port_error(
                &format!("DynamoDB DeleteItem (lease `{name}`)"),
                e,
            )),
        }
    }
}
