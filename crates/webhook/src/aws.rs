//! Production implementations of the core's ports, on the AWS SDK.

use std::collections::HashMap;

use aws_sdk_dynamodb::operation::put_item::PutItemError;
use aws_sdk_dynamodb::types::{AttributeValue, ReturnValuesOnConditionCheckFailure};
use aws_sdk_eventbridge::types::PutEventsRequestEntry;
use ephemeral_aws::port_error;
use ephemeral_core::auth::WebhookSecrets;
use ephemeral_core::hook::JobEvent;
use ephemeral_core::secrets::SecretSource;
use ephemeral_core::webhook::{
    Claim, DEAD_LETTER_DETAIL_TYPE, DeadLetter, DeliveryClaim, DeliveryLedger, EVENT_SOURCE,
    EventSink, FallbackQueue, JOB_EVENT_DETAIL_TYPE, PortError, QueuedHook,
};

/// Reads the secret token and signing token parameters (SecureString) in one call.
///
/// A parameter the authentication mode requires must exist. With mode `either`, one of the
/// two may be missing (an operator who only uses the secret token need not create the
/// signing token parameter); that is logged, and at least one must exist.
#[derive(Debug, Clone)]
pub struct SsmSecrets {
    pub client: aws_sdk_ssm::Client,
    pub token_parameter: Option<String>,
    pub signing_parameter: Option<String>,
    pub token_required: bool,
    pub signing_required: bool,
}

impl SecretSource for SsmSecrets {
    async fn load(&self) -> Result<WebhookSecrets, PortError> {
        let names: Vec<String> = [&self.token_parameter, &self.signing_parameter]
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        let out = self
            .client
            .get_parameters()
            .set_names(Some(names))
            .with_decryption(true)
            .send()
            .await
            .map_err(|e| port_error("reading webhook secrets from SSM", e))?;
        let missing = out.invalid_parameters();
        let is_missing = |name: &Option<String>| name.as_ref().is_some_and(|n| missing.contains(n));
        let required_missing = (self.token_required && is_missing(&self.token_parameter))
            || (self.signing_required && is_missing(&self.signing_parameter));
        if required_missing || out.parameters().is_empty() {
            return Err(PortError(format!(
                "SSM parameter(s) not found: {}; create them as SecureString (README, \"Deploy\", step 1)",
                missing.join(", ")
            )));
        }
        for name in missing {
            tracing::warn!(
                parameter = %name,
                "SSM parameter not found; only the other authentication method can succeed"
            );
        }
        let value_of = |name: &Option<String>| -> Option<&str> {
            let name = name.as_deref()?;
            out.parameters()
                .iter()
                .find(|p| p.name() == Some(name))
                .and_then(|p| p.value())
        };
        let mut secrets = WebhookSecrets::default();
        if let Some(text) = value_of(&self.token_parameter) {
            secrets.tokens = WebhookSecrets::parse_tokens(text).map_err(|e| {
                PortError(format!(
                    "SSM parameter {}: {e}",
                    self.token_parameter.as_deref().unwrap_or_default()
                ))
            })?;
        }
        if let Some(text) = value_of(&self.signing_parameter) {
            secrets.signing_keys = WebhookSecrets::parse_signing_keys(text).map_err(|e| {
                PortError(format!(
                    "SSM parameter {}: {e}",
                    self.signing_parameter.as_deref().unwrap_or_default()
                ))
            })?;
        }
        Ok(secrets)
    }
}

/// The dedup table: one item per delivery id, `state` `in_flight` then `forwarded`, removed by
/// DynamoDB TTL on `expires_at`.
#[derive(Debug, Clone)]
pub struct DynamoLedger {
    pub client: aws_sdk_dynamodb::Client,
    pub table: String,
}

const IN_FLIGHT: &str = "in_flight";
const FORWARDED: &str = "forwarded";

fn n(v: u64) -> AttributeValue {
    AttributeValue::N(v.to_string())
}
fn s(v: &str) -> AttributeValue {
    AttributeValue::S(v.to_owned())
}

impl DynamoLedger {
    fn claim_from_item(item: &HashMap<String, AttributeValue>) -> Claim {
        match item.get("state") {
            Some(AttributeValue::S(state)) if state == FORWARDED => Claim::Forwarded,
            _ => Claim::InFlight,
        }
    }
}

impl DeliveryLedger for DynamoLedger {
    async fn claim(&self, claim: &DeliveryClaim<'_>) -> Result<Claim, PortError> {
        let result = self
            .client
            .put_item()
            .table_name(&self.table)
            .item("delivery_id", s(claim.delivery_id))
            .item("state", s(IN_FLIGHT))
            .item("lease_until_ms", n(claim.lease_until_ms))
            .item("claimed_at_ms", n(claim.now_ms))
            .item("expires_at", n(claim.expires_at_s))
            .item("job_id", n(claim.job_id))
            .item("project_id", n(claim.project_id))
            .item("job_status", s(claim.status))
            // New, or an in-flight claim whose lease ran out (its invocation died).
            .condition_expression(
                "attribute_not_exists(delivery_id) OR (#state = :in_flight AND lease_until_ms < :now)",
            )
            .expression_attribute_names("#state", "state")
            .expression_attribute_values(":in_flight", s(IN_FLIGHT))
            .expression_attribute_values(":now", n(claim.now_ms))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .send()
            .await;
        match result {
            Ok(_) => Ok(Claim::New),
            Err(e) => match e.into_service_error() {
                PutItemError::ConditionalCheckFailedException(failed) => {
                    if let Some(item) = failed.item() {
                        return Ok(Self::claim_from_item(item));
                    }
                    // Not every DynamoDB implementation returns the old item: read it.
                    let current = self
                        .client
                        .get_item()
                        .table_name(&self.table)
                        .key("delivery_id", s(claim.delivery_id))
                        .consistent_read(true)
                        .send()
                        .await
                        .map_err(|e| port_error("reading the delivery record", e))?;
                    Ok(current
                        .item()
                        .map_or(Claim::InFlight, Self::claim_from_item))
                }
                other => Err(port_error("recording the delivery", other)),
            },
        }
    }

    async fn mark_forwarded(&self, delivery_id: &str, now_ms: u64) -> Result<(), PortError> {
        self.client
            .update_item()
            .table_name(&self.table)
            .key("delivery_id", s(delivery_id))
            .update_expression("SET #state = :forwarded, forwarded_at_ms = :now")
            .expression_attribute_names("#state", "state")
            .expression_attribute_values(":forwarded", s(FORWARDED))
            .expression_attribute_values(":now", n(now_ms))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| {
                // The event is out; the claim will expire after its lease, and a redelivery
                // after that may publish again (the router absorbs it). Worth a warning.
                let e = port_error("marking the delivery forwarded", e);
                tracing::warn!(delivery_id, error = %e, "delivery forwarded but not marked; a later redelivery may publish it again");
                e
            })
    }

    async fn release(&self, delivery_id: &str) -> Result<(), PortError> {
        let result = self
            .client
            .delete_item()
            .table_name(&self.table)
            .key("delivery_id", s(delivery_id))
            .condition_expression("#state = :in_flight")
            .expression_attribute_names("#state", "state")
            .expression_attribute_values(":in_flight", s(IN_FLIGHT))
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            // Someone else finished it meanwhile: nothing to release.
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
            {
                Ok(())
            }
            Err(e) => {
                // The hook goes to the fallback queue anyway; the drainer's tries (and a resend)
                // see the claim in flight until its lease runs out, then forward it.
                let e = port_error("releasing the delivery claim", e);
                tracing::warn!(delivery_id, error = %e, "could not release the claim; retries wait for its lease");
                Err(e)
            }
        }
    }
}

/// Puts events on the product's EventBridge bus.
#[derive(Debug, Clone)]
pub struct EventBridgeSink {
    pub client: aws_sdk_eventbridge::Client,
    pub bus: String,
}

impl EventBridgeSink {
    async fn put(&self, detail_type: &str, detail: String) -> Result<(), PortError> {
        let entry = PutEventsRequestEntry::builder()
            .event_bus_name(&self.bus)
            .source(EVENT_SOURCE)
            .detail_type(detail_type)
            .detail(detail)
            .build();
        let out = self
            .client
            .put_events()
            .entries(entry)
            .send()
            .await
            .map_err(|e| port_error("putting the event on the bus", e))?;
        // PutEvents answers 200 even when an entry was rejected; the entry says why.
        if out.failed_entry_count() > 0 {
            let why = out
                .entries()
                .iter()
                .find_map(|e| {
                    e.error_code()
                        .map(|c| format!("{c}: {}", e.error_message().unwrap_or_default()))
                })
                .unwrap_or_else(|| "no reason given".into());
            return Err(PortError(format!("the bus rejected the event ({why})")));
        }
        Ok(())
    }
}

impl EventSink for EventBridgeSink {
    async fn put_job_event(&self, event: &JobEvent) -> Result<(), PortError> {
        let detail = serde_json::to_string(event)
            .map_err(|e| PortError(format!("serializing the event: {e}")))?;
        self.put(JOB_EVENT_DETAIL_TYPE, detail).await
    }

    async fn put_dead_letter(&self, letter: &DeadLetter) -> Result<(), PortError> {
        let detail = letter
            .detail()
            .map_err(|e| PortError(format!("serializing the dead letter: {e}")))?;
        self.put(DEAD_LETTER_DETAIL_TYPE, detail).await
    }
}

/// The fallback queue (SQS, SSE on): the webhook's last resort for an authentic hook, drained
/// by the intake drainer.
#[derive(Debug, Clone)]
pub struct SqsFallback {
    pub client: aws_sdk_sqs::Client,
    pub queue_url: String,
}

impl FallbackQueue for SqsFallback {
    async fn keep(&self, hook: &QueuedHook) -> Result<(), PortError> {
        self.client
            .send_message()
            .queue_url(&self.queue_url)
            .message_body(hook.to_message()?)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| port_error("keeping the hook on the fallback queue", e))
    }
}
