//! The intake drainer: the fallback queue's SQS event source hands it batches; each message
//! goes through the same claim, publish and mark as a hook straight from GitLab (the core's
//! `drain`, over the webhook's own adapters), so a replayed hook is deduplicated like any
//! other. Messages not done are reported as batch item failures: SQS hands them out again
//! after the queue's visibility timeout, and after its redrive policy's `maxReceiveCount`
//! files them in the drainer's dead-letter queue.

use aws_lambda_events::sqs::{SqsBatchResponse, SqsEvent, SqsMessage};
use ephemeral_core::metrics::emf_count;
use ephemeral_core::webhook::{
    DedupSettings, DeliveryLedger, Drained, EventSink, QueuedHook, drain,
};

use crate::aws::{DynamoLedger, EventBridgeSink};
use crate::config::DrainerConfig;
use crate::now_ms;

/// The function name in metrics.
pub const FUNCTION: &str = "intake-drainer";

/// The function's state, built once per cold start.
pub struct Drainer<L, S> {
    pub ledger: L,
    pub sink: S,
    pub dedup: DedupSettings,
}

/// The production wiring: the webhook's DynamoDB dedup table and EventBridge bus.
pub type AwsDrainer = Drainer<DynamoLedger, EventBridgeSink>;

impl AwsDrainer {
    pub fn from_config(config: DrainerConfig, sdk: &aws_config::SdkConfig) -> Self {
        Drainer {
            ledger: DynamoLedger {
                client: aws_sdk_dynamodb::Client::new(sdk),
                table: config.dedup_table_name,
            },
            sink: EventBridgeSink {
                client: aws_sdk_eventbridge::Client::new(sdk),
                bus: config.event_bus_name,
            },
            dedup: config.dedup,
        }
    }
}

/// What happened to one message: the core's answer, or a body that is not ours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessageOutcome {
    Drained(Drained),
    /// Retrying cannot fix it, but it is kept: it ends in the dead-letter queue for the
    /// operator, like any message that keeps failing.
    Unreadable(String),
}

impl MessageOutcome {
    pub fn done(&self) -> bool {
        !matches!(self, Self::Drained(Drained::Retry(_)) | Self::Unreadable(_))
    }

    /// CloudWatch metric name (namespace `EphemeralRunners`, `Function=intake-drainer`).
    pub fn metric_name(&self) -> &'static str {
        match self {
            Self::Drained(Drained::Forwarded) => "DrainedForwarded",
            Self::Drained(Drained::Duplicate) => "DrainedDuplicate",
            Self::Drained(Drained::DeadLettered) => "DrainedDeadLettered",
            Self::Drained(Drained::Retry(_)) => "DrainRetries",
            Self::Unreadable(_) => "DrainUnreadable",
        }
    }
}

impl<L: DeliveryLedger, S: EventSink> Drainer<L, S> {
    pub async fn handle(&self, event: SqsEvent) -> SqsBatchResponse {
        self.handle_at(event, now_ms()).await
    }

    /// [`Self::handle`] at a given time (tests move the clock). Messages are taken one at a
    /// time: a batch is at most 10, each a few calls.
    pub async fn handle_at(&self, event: SqsEvent, now_ms: u64) -> SqsBatchResponse {
        let mut response = SqsBatchResponse::default();
        for message in &event.records {
            // Boxed: the SDK's futures nest deep enough to pass the compiler's layout depth
            // limit in the binary's main future otherwise.
            let outcome = Box::pin(self.handle_message(message, now_ms)).await;
            if !outcome.done() {
                // A missing id makes Lambda retry the whole batch: safe, as every step is.
                response.add_failure(message.message_id.clone().unwrap_or_default());
            }
        }
        response
    }

    /// One message at a given time (tests move the clock): drained, logged, counted.
    pub async fn handle_message(&self, message: &SqsMessage, now_ms: u64) -> MessageOutcome {
        let body = message.body.as_deref().unwrap_or_default();
        let outcome = match QueuedHook::from_message(body) {
            Err(why) => {
                log_unreadable(message, &why);
                MessageOutcome::Unreadable(why)
            }
            Ok(hook) => {
                let drained = drain(&hook, &self.ledger, &self.sink, self.dedup, now_ms).await;
                log_drained(message, &hook, &drained);
                MessageOutcome::Drained(drained)
            }
        };
        println!("{}", emf_count(FUNCTION, outcome.metric_name(), 1, now_ms));
        outcome
    }
}

/// SQS's count of receives, this one included ("1" the first time).
fn receive_count(message: &SqsMessage) -> Option<&str> {
    message
        .attributes
        .get("ApproximateReceiveCount")
        .map(String::as_str)
}

/// One JSON log line per message, keyed like the webhook's: delivery, project, pipeline, job.
fn log_drained(message: &SqsMessage, hook: &QueuedHook, drained: &Drained) {
    let event = hook.job_event();
    let delivery_id = hook.delivery_id();
    let message_id = message.message_id.as_deref();
    let receive_count = receive_count(message);
    let project_id = event.map(|e| e.project_id);
    let pipeline_id = event.and_then(|e| e.pipeline_id);
    let job_id = event.map(|e| e.job_id);
    let job_status = event.map(|e| e.status.as_str());
    let decision = drained.decision();
    match drained {
        Drained::Retry(why) => tracing::warn!(
            decision, reason = %why, delivery_id, project_id, pipeline_id, job_id, job_status,
            message_id, receive_count,
            "queued hook not forwarded yet; SQS hands it out again, then files it in the drainer's dead-letter queue"
        ),
        _ => tracing::info!(
            decision,
            delivery_id,
            project_id,
            pipeline_id,
            job_id,
            job_status,
            message_id,
            receive_count,
            "queued hook drained"
        ),
    }
}

fn log_unreadable(message: &SqsMessage, why: &str) {
    tracing::error!(
        decision = "unreadable",
        reason = %why,
        message_id = message.message_id.as_deref(),
        receive_count = receive_count(message),
        "fallback queue message is not a queued hook; it ends in the drainer's dead-letter queue: inspect it there"
    );
}
