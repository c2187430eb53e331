//! The webhook function: API Gateway HTTP API (payload v2) in, HTTP reply out, slim
//! `JobEvent`s on the bus (or on the fallback queue when the table or the bus fails).
//! Decisions are the core crate's; this crate translates and talks to AWS through the ports
//! in [`aws`]. The intake drainer ([`drainer`], binary `intake-drainer`) lives here too: it
//! forwards what the fallback queue holds through the same adapters and the same dedup.

pub mod aws;
pub mod config;
pub mod drainer;
pub mod function;

use std::borrow::Cow;
use std::time::Duration;

use aws_lambda_events::apigw::{ApiGatewayV2httpRequest, ApiGatewayV2httpResponse};
use aws_lambda_events::encodings::Body;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ephemeral_core::auth::Credentials;
use ephemeral_core::metrics::{alarmed, charted, emf_count};
use ephemeral_core::secrets::{SecretCache, SecretSource};
use ephemeral_core::webhook::{
    Assessment, DedupSettings, DeliveryLedger, EventSink, FallbackQueue, HookRequest, Outcome,
    WebhookPolicy, assess, deliver,
};
use http::{HeaderMap, HeaderValue};

use crate::aws::{DynamoLedger, EventBridgeSink, SqsFallback, SsmSecrets};
use crate::config::WebhookConfig;

/// The function's state, built once per cold start.
pub struct Webhook<L, S, Q, C> {
    pub policy: WebhookPolicy,
    pub dedup: DedupSettings,
    pub ledger: L,
    pub sink: S,
    pub fallback: Q,
    pub secrets: SecretCache<C>,
}

/// The production wiring: DynamoDB dedup table, EventBridge bus, SQS fallback queue, SSM
/// secrets.
pub type AwsWebhook = Webhook<DynamoLedger, EventBridgeSink, SqsFallback, SsmSecrets>;

/// Each dependency's time limit for one call, the SDK's retries included. The function has 9 s
/// (template) and GitLab gives up after about 10: a table or bus that hangs instead of failing
/// must still leave time to queue the hook and answer. At most secrets 2 + claim 1 + publish
/// 1.5 + release 1 + queue 2.5 = 8 s.
pub const SECRETS_TIMEOUT: Duration = Duration::from_secs(2);
pub const LEDGER_TIMEOUT: Duration = Duration::from_millis(1000);
pub const BUS_TIMEOUT: Duration = Duration::from_millis(1500);
pub const QUEUE_TIMEOUT: Duration = Duration::from_millis(2500);

/// `sdk` with an operation timeout of `limit` (connect timeout 1 s).
pub fn with_timeout(sdk: &aws_config::SdkConfig, limit: Duration) -> aws_config::SdkConfig {
    let timeouts = aws_config::timeout::TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(1))
        .operation_timeout(limit)
        .build();
    sdk.to_builder().timeout_config(timeouts).build()
}

impl AwsWebhook {
    pub fn from_config(config: WebhookConfig, sdk: &aws_config::SdkConfig) -> Self {
        let mode = config.policy.auth_mode;
        Webhook {
            policy: config.policy,
            dedup: config.dedup,
            ledger: DynamoLedger {
                client: aws_sdk_dynamodb::Client::new(&with_timeout(sdk, LEDGER_TIMEOUT)),
                table: config.dedup_table_name,
            },
            sink: EventBridgeSink {
                client: aws_sdk_eventbridge::Client::new(&with_timeout(sdk, BUS_TIMEOUT)),
                bus: config.event_bus_name,
            },
            fallback: SqsFallback {
                client: aws_sdk_sqs::Client::new(&with_timeout(sdk, QUEUE_TIMEOUT)),
                queue_url: config.fallback_queue_url,
            },
            secrets: SecretCache::new(
                SsmSecrets {
                    client: aws_sdk_ssm::Client::new(&with_timeout(sdk, SECRETS_TIMEOUT)),
                    token_parameter: config.secret_token_parameter,
                    signing_parameter: config.signing_token_parameter,
                    token_required: mode.needs_tokens(),
                    signing_required: mode.needs_signing_keys(),
                },
                config.secrets_ttl_seconds.saturating_mul(1000),
            ),
        }
    }
}

pub use ephemeral_aws::now_ms;

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a HeaderValue> {
    headers.get(name)
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    header(headers, name).and_then(|v| v.to_str().ok())
}

/// Builds the reply API Gateway returns to GitLab.
pub fn reply(status: u16, body: String) -> ApiGatewayV2httpResponse {
    let mut response = ApiGatewayV2httpResponse::default();
    response.status_code = i64::from(status);
    response.headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response.body = Some(Body::Text(body));
    response
}

/// CloudWatch metric name for an outcome: `Hooks` + the decision in CamelCase; a hook kept on
/// the fallback queue counts as `IntakeFallbacks` (alarm on it: the table or the bus is
/// failing), and every 5xx as `HooksFailed`.
pub fn metric_name(outcome: &Outcome) -> &'static str {
    match outcome {
        Outcome::Unauthorized(_) => charted::HOOKS_UNAUTHORIZED.name,
        Outcome::Ignored(_) => charted::HOOKS_IGNORED.name,
        Outcome::DeadLettered(_) => alarmed::HOOKS_DEAD_LETTERED.name,
        Outcome::Forwarded => charted::HOOKS_FORWARDED.name,
        Outcome::Duplicate => charted::HOOKS_DUPLICATE.name,
        Outcome::InFlight => charted::HOOKS_IN_FLIGHT.name,
        Outcome::Queued(_) | Outcome::DeadLetterQueued { .. } => alarmed::INTAKE_FALLBACKS.name,
        Outcome::SecretsUnavailable(_) | Outcome::Failed(_) => alarmed::HOOKS_FAILED.name,
    }
}

impl<L, S, Q, C> Webhook<L, S, Q, C>
where
    L: DeliveryLedger,
    S: EventSink,
    Q: FallbackQueue,
    C: SecretSource,
{
    pub async fn handle(&self, request: ApiGatewayV2httpRequest) -> ApiGatewayV2httpResponse {
        self.handle_at(request, now_ms()).await
    }

    /// [`Self::handle`] at a given time (tests move the clock).
    pub async fn handle_at(
        &self,
        request: ApiGatewayV2httpRequest,
        now_ms: u64,
    ) -> ApiGatewayV2httpResponse {
        // Borrowed as is; only a base64 body (API Gateway's encoding) needs a new buffer.
        let body: Cow<'_, [u8]> = match (request.body.as_deref(), request.is_base64_encoded) {
            (None, _) => Cow::Borrowed(&[]),
            (Some(text), false) => Cow::Borrowed(text.as_bytes()),
            (Some(text), true) => match BASE64.decode(text) {
                Ok(bytes) => Cow::Owned(bytes),
                Err(_) => {
                    // Only a broken gateway integration sends this; GitLab cannot cause it.
                    tracing::error!(
                        decision = "bad_encoding",
                        "isBase64Encoded body is not base64"
                    );
                    return reply(400, "request body is not valid base64".into());
                }
            },
        };
        let headers = &request.headers;
        let hook_request = HookRequest {
            credentials: Credentials {
                gitlab_token: header(headers, "x-gitlab-token").map(HeaderValue::as_bytes),
                webhook_id: header_str(headers, "webhook-id"),
                webhook_timestamp: header_str(headers, "webhook-timestamp"),
                webhook_signature: header_str(headers, "webhook-signature"),
            },
            gitlab_event: header_str(headers, "x-gitlab-event"),
            idempotency_key: header_str(headers, "idempotency-key"),
            body: &body,
        };

        let outcome = match self.secrets.get(now_ms).await {
            // Only when no secrets were ever loaded in this sandbox (a refresh that fails
            // keeps the last ones): nothing is authentic yet, so nothing may be kept.
            Err(e) => {
                let outcome = Outcome::SecretsUnavailable(format!("webhook secrets: {e}"));
                log_outcome(None, &outcome);
                outcome
            }
            Ok(lookup) => {
                if let Some(e) = &lookup.refresh_error {
                    tracing::warn!(error = %e, "could not refresh webhook secrets; using the last ones loaded");
                }
                let assessment = assess(&hook_request, &self.policy, &lookup.secrets, now_ms);
                let outcome = deliver(
                    &assessment,
                    &self.ledger,
                    &self.sink,
                    &self.fallback,
                    self.dedup,
                    now_ms,
                )
                .await;
                log_outcome(Some(&assessment), &outcome);
                outcome
            }
        };
        println!("{}", emf_count("webhook", metric_name(&outcome), 1, now_ms));
        let (status, text) = outcome.reply();
        reply(status, text)
    }
}

/// One JSON log line per request: ids, decision and reason; never a secret or a body.
fn log_outcome(assessment: Option<&Assessment>, outcome: &Outcome) {
    let event = match assessment {
        Some(Assessment::Accepted { event, .. }) => Some(event.as_ref()),
        _ => None,
    };
    let delivery_id = assessment.and_then(Assessment::delivery_id);
    let auth = assessment
        .and_then(Assessment::auth_method)
        .map(|m| m.as_str());
    let project_id = event.map(|e| e.project_id);
    let pipeline_id = event.and_then(|e| e.pipeline_id);
    let job_id = event.map(|e| e.job_id);
    let job_status = event.map(|e| e.status.as_str());
    let decision = outcome.decision();
    match outcome {
        Outcome::Unauthorized(why) => {
            tracing::warn!(decision, reason = %why, "hook rejected: authentication failed")
        }
        Outcome::Failed(why) => tracing::error!(
            decision, reason = %why, delivery_id, project_id, pipeline_id, job_id, job_status,
            "authentic hook not kept: the table or the bus failed, and so did the fallback queue; GitLab does not resend it: resend it from the hook's Recent events once they recover"
        ),
        Outcome::SecretsUnavailable(why) => tracing::error!(
            decision, reason = %why,
            "hook not authenticated: no webhook secrets loaded; check the SSM parameters and the function's access to them"
        ),
        Outcome::Queued(why) => tracing::warn!(
            decision, reason = %why, delivery_id, auth, project_id, pipeline_id, job_id, job_status,
            "job hook kept on the fallback queue; the intake drainer forwards it"
        ),
        Outcome::DeadLetterQueued { reason, failure } => tracing::warn!(
            decision, reason = %reason, failure = %failure, delivery_id, auth,
            "authentic hook unusable: its dead letter is on the fallback queue; the intake drainer files it"
        ),
        Outcome::DeadLettered(why) => tracing::warn!(
            decision, reason = %why, delivery_id, auth, "authentic hook unusable: kept as a dead letter"
        ),
        Outcome::Ignored(why) => {
            tracing::info!(decision, reason = %why, delivery_id, auth, "hook ignored")
        }
        Outcome::Forwarded | Outcome::Duplicate | Outcome::InFlight => tracing::info!(
            decision,
            delivery_id,
            auth,
            project_id,
            pipeline_id,
            job_id,
            job_status,
            "job hook"
        ),
    }
}
