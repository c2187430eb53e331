//! What the webhook does with one HTTP request: authenticate, classify, dedupe, forward.
//!
//! [`assess`] is pure and synchronous (it is what the benchmark measures); [`deliver`] acts on
//! an assessment through three small ports, [`DeliveryLedger`], [`EventSink`] and
//! [`FallbackQueue`], whose production implementations live in the webhook function crate.
//! [`drain`] is the intake drainer's half: a hook kept on the fallback queue goes through the
//! same [`forward`] (claim, publish, mark) as one straight from GitLab.
//!
//! Reply policy, shaped by GitLab: it never redelivers a hook it got a 5xx (or no answer) for,
//! disables hooks that keep failing, and treats 4xx as misconfiguration. So only failed
//! authentication gets 4xx (401); an authentic hook gets 2xx whenever something durable took
//! it (the bus, or the fallback queue when the delivery table or the bus fails); 5xx only when
//! nothing did, or when the secrets cannot be read and nothing can be authenticated.

use std::future::Future;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::auth::{AuthFailure, AuthMethod, AuthMode, Credentials, WebhookSecrets, authenticate};
use crate::hook::{JobEvent, JobHook, Unusable, parse_job_hook};

/// The value of `X-Gitlab-Event` for job events.
pub const JOB_HOOK_EVENT: &str = "Job Hook";

/// Everything the webhook looks at in a request, borrowed from the adapter's HTTP types.
#[derive(Debug, Clone, Copy, Default)]
pub struct HookRequest<'a> {
    pub credentials: Credentials<'a>,
    /// `X-Gitlab-Event`.
    pub gitlab_event: Option<&'a str>,
    /// `Idempotency-Key` (GitLab sets it equal to `webhook-id`).
    pub idempotency_key: Option<&'a str>,
    pub body: &'a [u8],
}

/// Operator settings that shape the decision.
#[derive(Debug, Clone)]
pub struct WebhookPolicy {
    pub auth_mode: AuthMode,
    pub signature_tolerance_seconds: u64,
    pub max_body_bytes: usize,
    /// How much of an unusable body is kept in the dead letter.
    pub dead_letter_body_bytes: usize,
}

impl Default for WebhookPolicy {
    fn default() -> Self {
        Self {
            auth_mode: AuthMode::Either,
            signature_tolerance_seconds: 300,
            max_body_bytes: 1024 * 1024,
            dead_letter_body_bytes: 64 * 1024,
        }
    }
}

/// What [`assess`] concluded about a request, before any I/O.
#[derive(Debug, Clone, PartialEq)]
pub enum Assessment {
    Unauthorized(AuthFailure),
    /// Authentic, but not something we act on (another hook kind, a test hook...).
    Ignored {
        method: AuthMethod,
        delivery_id: String,
        reason: String,
    },
    /// Authentic but unusable: kept as a dead letter.
    Unusable {
        method: AuthMethod,
        dead_letter: Box<DeadLetter>,
    },
    Accepted {
        method: AuthMethod,
        event: Box<JobEvent>,
    },
}

impl Assessment {
    pub fn delivery_id(&self) -> Option<&str> {
        match self {
            Self::Unauthorized(_) => None,
            Self::Ignored { delivery_id, .. } => Some(delivery_id),
            Self::Unusable { dead_letter, .. } => Some(&dead_letter.delivery_id),
            Self::Accepted { event, .. } => Some(&event.delivery_id),
        }
    }

    pub fn auth_method(&self) -> Option<AuthMethod> {
        match self {
            Self::Unauthorized(_) => None,
            Self::Ignored { method, .. }
            | Self::Unusable { method, .. }
            | Self::Accepted { method, .. } => Some(*method),
        }
    }
}

/// EventBridge refuses a PutEvents entry of 256 KiB or more, its size being the UTF-8 bytes of
/// its Source, DetailType, Detail, EventBusName and Resources, plus 14 for Time ("Calculating
/// PutEvents event entry size", Amazon EventBridge User Guide; "The maximum size for a
/// PutEvents event entry is 256 KB", PutEvents API reference).
pub const PUT_EVENTS_ENTRY_MAX_BYTES: usize = 256 * 1024;

/// What an entry keeps for everything but its Detail: the source and detail-type (under 50
/// bytes), the bus name or ARN (at most 1,600 characters), a time (14); the rest is margin.
pub const ENTRY_FIELDS_ROOM_BYTES: usize = 4 * 1024;

/// The most a [`DeadLetter`]'s Detail (its JSON as the sink sends it, `serde_json::to_string`)
/// may take, so that a dead letter always fits one PutEvents entry.
pub const DEAD_LETTER_DETAIL_MAX_BYTES: usize =
    PUT_EVENTS_ENTRY_MAX_BYTES - ENTRY_FIELDS_ROOM_BYTES;

/// An authentic hook we could not use, kept so that nothing is lost silently. It goes on the
/// bus with detail-type [`DEAD_LETTER_DETAIL_TYPE`]; a rule files it in the dead-letter queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub delivery_id: String,
    pub received_at_ms: u64,
    pub reason: String,
    pub gitlab_event: Option<String>,
    /// Size of the whole body as received.
    pub body_bytes: usize,
    /// SHA-256 of the whole body, hex: tells apart two bodies that share a truncated prefix.
    pub body_sha256: String,
    /// `body` holds less than the whole body: cut at `DeadLetterBodyBytes`, or shorter so that
    /// the letter fits one event ([`DEAD_LETTER_DETAIL_MAX_BYTES`]).
    pub body_truncated: bool,
    /// `utf8` (body is the text) or `base64` (body was not UTF-8).
    pub body_encoding: String,
    pub body: String,
}

impl DeadLetter {
    pub fn new(
        request: &HookRequest<'_>,
        delivery_id: String,
        reason: String,
        cap: usize,
        received_at_ms: u64,
    ) -> Self {
        let mut letter = Self {
            delivery_id,
            received_at_ms,
            reason,
            gitlab_event: request.gitlab_event.map(str::to_owned),
            body_bytes: request.body.len(),
            body_sha256: hex(&Sha256::digest(request.body)),
            body_truncated: false,
            body_encoding: String::new(),
            body: String::new(),
        };
        letter.keep_body(request.body, cap, DEAD_LETTER_DETAIL_MAX_BYTES);
        letter
    }

    /// Keeps the longest prefix of `body` that is at most `cap` bytes and leaves the letter's
    /// JSON within `budget` bytes: text cut on a character boundary, else base64 of whole
    /// 3-byte groups. One serialization measures the rest of the letter; the body's escaped
    /// length is counted as it is cut, so the cost is linear in the body.
    /// The event's `Detail` as it goes on the bus: the serialization [`Self::new`] sized the
    /// kept body for, so the entry fits one PutEvents entry.
    pub fn detail(&self) -> Result<String, serde_json::Error> {
        serde_json::to_string(self)
    }

    fn keep_body(&mut self, body: &[u8], cap: usize, budget: usize) {
        let capped = &body[..body.len().min(cap)];
        let text = match std::str::from_utf8(capped) {
            Ok(text) => Some(text),
            // A cut through a multi-byte character is still text: keep the valid prefix.
            Err(e) if capped.len() < body.len() && e.error_len().is_none() => {
                std::str::from_utf8(&capped[..e.valid_up_to()]).ok()
            }
            Err(_) => None,
        };
        self.body_encoding = if text.is_some() { "utf8" } else { "base64" }.to_owned();
        // Measured with an empty body (its quotes counted) and `false`, the longer boolean.
        self.body.clear();
        self.body_truncated = false;
        let room = budget.saturating_sub(serde_json::to_vec(self).map_or(usize::MAX, |j| j.len()));
        let kept = match text {
            Some(text) => {
                let end = json_escaped_prefix_len(text, room);
                self.body = text[..end].to_owned();
                end
            }
            None => {
                let end = capped.len().min(room / 4 * 3);
                self.body = BASE64.encode(&capped[..end]);
                end
            }
        };
        self.body_truncated = kept < body.len();
    }
}

/// The length of the longest prefix of `text` (on a character boundary) that takes at most
/// `room` bytes inside a JSON string as serde_json writes it: `\"`, `\\` and `\b \t \n \f \r`
/// take 2 bytes, other control characters 6 (`\u0001`), anything else its UTF-8 length.
fn json_escaped_prefix_len(text: &str, room: usize) -> usize {
    let mut used = 0;
    for (at, c) in text.char_indices() {
        used += match c {
            '"' | '\\' | '\u{8}' | '\t' | '\n' | '\u{c}' | '\r' => 2,
            c if c < ' ' => 6,
            c => c.len_utf8(),
        };
        if used > room {
            return at;
        }
    }
    text.len()
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 0xf) as usize] as char);
    }
    out
}

/// Delivery ids longer than this, or with characters outside visible ASCII, are not used as
/// keys (a hostile or broken header must not shape our table); the body digest is used instead.
const MAX_DELIVERY_ID_CHARS: usize = 128;

fn usable_delivery_header(value: Option<&str>) -> Option<&str> {
    let value = value?.trim();
    let ok = !value.is_empty()
        && value.len() <= MAX_DELIVERY_ID_CHARS
        && value.bytes().all(|b| b.is_ascii_graphic());
    ok.then_some(value)
}

/// The id under which a delivery is deduplicated: `webhook-id` (covered by the signature),
/// else `Idempotency-Key`, else a digest of the body (a resend from Recent events carries the same bytes).
pub fn delivery_id(request: &HookRequest<'_>) -> String {
    usable_delivery_header(request.credentials.webhook_id)
        .or_else(|| usable_delivery_header(request.idempotency_key))
        .map(str::to_owned)
        .unwrap_or_else(|| format!("sha256:{}", hex(&Sha256::digest(request.body))))
}

/// Decides what a request is, without I/O. Authentication comes first, so nothing about an
/// unauthenticated body is ever parsed, logged or kept.
pub fn assess(
    request: &HookRequest<'_>,
    policy: &WebhookPolicy,
    secrets: &WebhookSecrets,
    now_ms: u64,
) -> Assessment {
    let now_unix = i64::try_from(now_ms / 1000).unwrap_or(i64::MAX);
    let (method, admits) = match authenticate(
        policy.auth_mode,
        &request.credentials,
        request.body,
        secrets,
        now_unix,
        policy.signature_tolerance_seconds,
    ) {
        Ok(method) => method,
        Err(failure) => return Assessment::Unauthorized(failure),
    };
    let delivery_id = delivery_id(request);

    if let Some(kind) = request.gitlab_event
        && kind != JOB_HOOK_EVENT
    {
        return Assessment::Ignored {
            method,
            delivery_id,
            reason: format!("X-Gitlab-Event `{}` is not a Job Hook", clip(kind, 64)),
        };
    }

    let unusable = |reason: Unusable, delivery_id: String| Assessment::Unusable {
        method,
        dead_letter: Box::new(DeadLetter::new(
            request,
            delivery_id,
            reason.to_string(),
            policy.dead_letter_body_bytes,
            now_ms,
        )),
    };

    if request.body.len() > policy.max_body_bytes {
        let reason = Unusable::TooLarge {
            bytes: request.body.len(),
            limit: policy.max_body_bytes,
        };
        return unusable(reason, delivery_id);
    }

    let hook = match job_hook(request) {
        Ok(hook) => hook,
        Err(Refused::Ignored(reason)) => {
            return Assessment::Ignored {
                method,
                delivery_id,
                reason,
            };
        }
        Err(Refused::Unusable(reason)) => return unusable(reason, delivery_id),
    };
    let event = JobEvent::from_hook(hook, delivery_id, now_ms);
    // A secret bound to some projects speaks for those only (issue 12): a hook for another
    // project is refused as unauthenticated, before anything of it is kept.
    if !admits.admits(event.project_id, event.project_path.as_deref()) {
        return Assessment::Unauthorized(AuthFailure::OutsideSecretScope {
            project_id: event.project_id,
        });
    }
    Assessment::Accepted {
        method,
        event: Box::new(event),
    }
}

/// Why an authentic body is not a Job Hook we forward.
enum Refused {
    /// Some other JSON an authentic sender posted without the Job Hook header: ignored.
    Ignored(String),
    /// Said to be a Job Hook and is not one: a dead letter.
    Unusable(Unusable),
}

/// The body as a Job Hook. Without the header we only know it is a Job Hook once it parses;
/// anything else without a header is some other JSON that an authentic sender posted.
fn job_hook(request: &HookRequest<'_>) -> Result<JobHook, Refused> {
    let headerless = request.gitlab_event.is_none();
    let hook = parse_job_hook(request.body).map_err(|reason| {
        if headerless {
            Refused::Ignored(format!(
                "no X-Gitlab-Event header and not a Job Hook ({reason})"
            ))
        } else {
            Refused::Unusable(reason)
        }
    })?;
    match hook.object_kind.as_deref() {
        Some("build") | None => Ok(hook),
        Some(other) if headerless => Err(Refused::Ignored(format!(
            "object_kind `{}` is not a Job Hook",
            clip(other, 64)
        ))),
        Some(other) => Err(Refused::Unusable(Unusable::KindMismatch(clip(other, 64)))),
    }
}

fn clip(s: &str, max_chars: usize) -> String {
    s.chars()
        .take(max_chars)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// A failure of one of our dependencies. The message must not contain secrets; adapters build
/// it from the service's error code and message only.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PortError(pub String);

/// What the ledger knew about a delivery when we tried to claim it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// First time (or an earlier attempt gave up): we forward it.
    New,
    /// Already forwarded: a redelivery.
    Forwarded,
    /// Another invocation is forwarding it right now.
    InFlight,
}

/// A claim on a delivery id, so that a redelivered hook yields no second event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryClaim<'a> {
    pub delivery_id: &'a str,
    pub now_ms: u64,
    /// Until then, another invocation seeing the claim treats it as in flight; after it, an
    /// abandoned claim (crash between claim and publish) may be taken over.
    pub lease_until_ms: u64,
    /// When the record may be forgotten (DynamoDB TTL), Unix seconds.
    pub expires_at_s: u64,
    pub job_id: u64,
    pub project_id: u64,
    pub status: &'a str,
}

pub trait DeliveryLedger {
    fn claim(
        &self,
        claim: &DeliveryClaim<'_>,
    ) -> impl Future<Output = Result<Claim, PortError>> + Send;
    /// The event is on the bus: later deliveries are duplicates.
    fn mark_forwarded(
        &self,
        delivery_id: &str,
        now_ms: u64,
    ) -> impl Future<Output = Result<(), PortError>> + Send;
    /// Publishing failed: drop the claim so that the drainer (or a resend) can forward it.
    fn release(&self, delivery_id: &str) -> impl Future<Output = Result<(), PortError>> + Send;
}

pub trait EventSink {
    fn put_job_event(&self, event: &JobEvent)
    -> impl Future<Output = Result<(), PortError>> + Send;
    fn put_dead_letter(
        &self,
        letter: &DeadLetter,
    ) -> impl Future<Output = Result<(), PortError>> + Send;
}

/// The durable place an authentic hook goes when the delivery table or the bus fails (an SQS
/// queue in production), so that a 2xx never loses it. The intake drainer forwards it later.
pub trait FallbackQueue {
    fn keep(&self, hook: &QueuedHook) -> impl Future<Output = Result<(), PortError>> + Send;
}

/// SQS refuses a message body over 256 KiB (262,144 bytes, "Amazon SQS message quotas").
pub const FALLBACK_MESSAGE_MAX_BYTES: usize = 256 * 1024;

/// What the webhook would have published, as it waits on the fallback queue: already slimmed
/// (no personal data, no token), so the queue holds nothing the bus would not.
///
/// The message is `{"kind":"job_event"|"dead_letter","detail":{...}}`, the `detail` being the
/// bus event's Detail. The largest dead letter ([`DEAD_LETTER_DETAIL_MAX_BYTES`]) and this
/// wrapper stay under [`FALLBACK_MESSAGE_MAX_BYTES`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "detail", rename_all = "snake_case")]
pub enum QueuedHook {
    JobEvent(Box<JobEvent>),
    DeadLetter(Box<DeadLetter>),
}

impl QueuedHook {
    /// The message body the queue holds.
    pub fn to_message(&self) -> Result<String, PortError> {
        serde_json::to_string(self)
            .map_err(|e| PortError(format!("serializing the hook for the fallback queue: {e}")))
    }

    /// A message body back; the error says what is wrong with it (it was not written by this
    /// version of the webhook, or not by the webhook at all).
    pub fn from_message(body: &str) -> Result<Self, String> {
        serde_json::from_str(body).map_err(|e| {
            format!("not a hook the webhook queued (expected {{\"kind\":\"job_event\"|\"dead_letter\",\"detail\":...}}): {e}")
        })
    }

    pub fn delivery_id(&self) -> &str {
        match self {
            Self::JobEvent(event) => &event.delivery_id,
            Self::DeadLetter(letter) => &letter.delivery_id,
        }
    }

    /// The job event, for log lines keyed by project, pipeline and job.
    pub fn job_event(&self) -> Option<&JobEvent> {
        match self {
            Self::JobEvent(event) => Some(event),
            Self::DeadLetter(_) => None,
        }
    }
}

/// EventBridge `source` of everything the webhook publishes.
pub const EVENT_SOURCE: &str = "ephemeral-runners.webhook";
/// EventBridge `detail-type` of a [`JobEvent`].
pub const JOB_EVENT_DETAIL_TYPE: &str = "GitLab Job Event";
/// EventBridge `detail-type` of a [`DeadLetter`].
pub const DEAD_LETTER_DETAIL_TYPE: &str = "GitLab Hook Dead Letter";

/// How long dedup records live, and how long a claim is held before it may be taken over.
#[derive(Debug, Clone, Copy)]
pub struct DedupSettings {
    pub ttl_seconds: u64,
    pub lease_ms: u64,
}

impl Default for DedupSettings {
    fn default() -> Self {
        Self {
            // Covers a resend by hand and every retry of the fallback queue; a hook redriven
            // from the drainer's dead-letter queue later than this may publish twice, which
            // the router absorbs (a job's phase only moves forward).
            ttl_seconds: 3 * 24 * 3600,
            // Longer than the function's timeout, so a live invocation is never overtaken.
            lease_ms: 60_000,
        }
    }
}

/// What happened to a request; drives the HTTP reply, the log line and the metric.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Unauthorized(AuthFailure),
    Ignored(String),
    DeadLettered(String),
    Forwarded,
    Duplicate,
    /// The same delivery is claimed by another invocation that is forwarding it right now.
    /// Answered 2xx: that invocation either publishes it, or falls back to the queue, or (if
    /// it dies between claim and publish) leaves a pending job that the reconciler, which
    /// lists GitLab's pending jobs, provisions. A 5xx here would gain nothing (GitLab does not
    /// redeliver it) and count towards disabling the hook.
    InFlight,
    /// The delivery table or the bus failed (the reason says which and why); the job event is
    /// on the fallback queue, and the intake drainer forwards it through the usual dedup.
    Queued(String),
    /// Authentic but unusable, and the bus refused the dead letter: it is on the fallback
    /// queue, and the drainer puts it on the bus (then the dead-letter queue) later.
    DeadLetterQueued {
        reason: String,
        failure: String,
    },
    /// No secrets could be loaded (SSM unavailable or the parameters missing, and none cached):
    /// nothing can be authenticated, so nothing is kept (an unauthenticated body must not reach
    /// the queue). 5xx: it is our failure, not the sender's.
    SecretsUnavailable(String),
    /// Nothing durable took an authentic hook: the bus or the table failed, and so did the
    /// fallback queue. The only 5xx for an authentic hook; GitLab will not send it again.
    Failed(String),
}

impl Outcome {
    /// Status and body of the HTTP reply. Bodies are short: GitLab shows them in the hook's
    /// "Recent events". A 401 says nothing about why.
    pub fn reply(&self) -> (u16, String) {
        match self {
            Self::Unauthorized(_) => (401, "unauthorized".into()),
            Self::Ignored(reason) => (202, format!("ignored: {reason}")),
            Self::DeadLettered(reason) => (
                202,
                format!("not usable, kept for the operator as a dead letter: {reason}"),
            ),
            Self::Forwarded => (202, "accepted".into()),
            Self::Duplicate => (200, "duplicate delivery, already accepted".into()),
            Self::InFlight => (
                200,
                "duplicate delivery, being accepted by a concurrent request".into(),
            ),
            Self::Queued(_) => (
                202,
                "accepted and queued: forwarded once the bus and delivery table recover".into(),
            ),
            Self::DeadLetterQueued { reason, .. } => (
                202,
                format!("not usable, queued for the operator as a dead letter: {reason}"),
            ),
            Self::SecretsUnavailable(_) => (
                503,
                "not kept: webhook secrets unavailable, cannot authenticate; resend this hook once the service recovers".into(),
            ),
            Self::Failed(_) => (
                503,
                "not kept: bus, delivery table and fallback queue unavailable; resend this hook once the service recovers".into(),
            ),
        }
    }

    /// Stable short name for logs and metrics.
    pub fn decision(&self) -> &'static str {
        match self {
            Self::Unauthorized(_) => "unauthorized",
            Self::Ignored(_) => "ignored",
            Self::DeadLettered(_) => "dead_lettered",
            Self::Forwarded => "forwarded",
            Self::Duplicate => "duplicate",
            Self::InFlight => "in_flight",
            Self::Queued(_) => "queued",
            Self::DeadLetterQueued { .. } => "dead_letter_queued",
            Self::SecretsUnavailable(_) => "secrets_unavailable",
            Self::Failed(_) => "failed",
        }
    }

    /// The hook went to the fallback queue (the `IntakeFallbacks` metric).
    pub fn fell_back(&self) -> bool {
        matches!(self, Self::Queued(_) | Self::DeadLetterQueued { .. })
    }
}

/// Acts on an assessment: dead letters go to the sink; accepted events are claimed in the
/// ledger, published, then marked forwarded ([`forward`]). When the ledger or the sink fails,
/// the hook goes to the fallback queue instead. Every step is safe to repeat.
pub async fn deliver<L: DeliveryLedger, S: EventSink, Q: FallbackQueue>(
    assessment: &Assessment,
    ledger: &L,
    sink: &S,
    fallback: &Q,
    dedup: DedupSettings,
    now_ms: u64,
) -> Outcome {
    match assessment {
        Assessment::Unauthorized(failure) => Outcome::Unauthorized(failure.clone()),
        Assessment::Ignored { reason, .. } => Outcome::Ignored(reason.clone()),
        // Dead letters are not deduplicated: two copies of a broken body in the queue cost
        // nothing, while a dedup record without a letter would lose it.
        Assessment::Unusable { dead_letter, .. } => {
            let reason = dead_letter.reason.clone();
            let Err(e) = sink.put_dead_letter(dead_letter).await else {
                return Outcome::DeadLettered(reason);
            };
            let failure = format!("could not keep the dead letter on the bus: {e}");
            match fallback
                .keep(&QueuedHook::DeadLetter(dead_letter.clone()))
                .await
            {
                Ok(()) => Outcome::DeadLetterQueued { reason, failure },
                Err(q) => Outcome::Failed(format!("{failure}; fallback queue: {q}")),
            }
        }
        Assessment::Accepted { event, .. } => {
            match forward(event, ledger, sink, dedup, now_ms).await {
                Forward::Forwarded => Outcome::Forwarded,
                Forward::Duplicate => Outcome::Duplicate,
                Forward::InFlight => Outcome::InFlight,
                Forward::Failed(failure) => {
                    match fallback.keep(&QueuedHook::JobEvent(event.clone())).await {
                        Ok(()) => Outcome::Queued(failure),
                        Err(q) => Outcome::Failed(format!("{failure}; fallback queue: {q}")),
                    }
                }
            }
        }
    }
}

/// What [`forward`] came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Forward {
    /// Published (and marked forwarded, or about to expire into a harmless re-publish).
    Forwarded,
    /// Already forwarded: nothing published.
    Duplicate,
    /// Another invocation holds the claim: nothing published by this one.
    InFlight,
    /// The ledger or the sink failed; the claim (if taken) is released for the next attempt.
    Failed(String),
}

/// Claims the delivery in the ledger, publishes the event, marks it forwarded: the one path
/// an event takes to the bus, from the webhook and from the drainer alike, so a hook replayed
/// from the fallback queue is deduplicated like any other.
pub async fn forward<L: DeliveryLedger, S: EventSink>(
    event: &JobEvent,
    ledger: &L,
    sink: &S,
    dedup: DedupSettings,
    now_ms: u64,
) -> Forward {
    let claim = DeliveryClaim {
        delivery_id: &event.delivery_id,
        now_ms,
        lease_until_ms: now_ms.saturating_add(dedup.lease_ms),
        expires_at_s: now_ms / 1000 + dedup.ttl_seconds,
        job_id: event.job_id,
        project_id: event.project_id,
        status: event.status.as_str(),
    };
    match ledger.claim(&claim).await {
        Err(e) => Forward::Failed(format!("could not record the delivery: {e}")),
        Ok(Claim::Forwarded) => Forward::Duplicate,
        Ok(Claim::InFlight) => Forward::InFlight,
        Ok(Claim::New) => match sink.put_job_event(event).await {
            Ok(()) => {
                // The event is out; if marking fails the claim expires after its lease and a
                // later redelivery may publish again, which the router absorbs.
                let _ = ledger.mark_forwarded(&event.delivery_id, now_ms).await;
                Forward::Forwarded
            }
            Err(e) => {
                // Released so that the drainer (or a resend) can claim it at once; if the
                // release fails too, the claim's lease runs out first.
                let _ = ledger.release(&event.delivery_id).await;
                Forward::Failed(format!("could not publish the event: {e}"))
            }
        },
    }
}

/// What the intake drainer did with one message of the fallback queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Drained {
    Forwarded,
    /// Already forwarded (by the webhook for a resent hook, or by an earlier drain whose
    /// delete did not reach SQS): nothing published.
    Duplicate,
    DeadLettered,
    /// Not done: the message stays on the queue, SQS hands it out again after its visibility
    /// timeout, and after the redrive policy's maxReceiveCount files it in the drainer's
    /// dead-letter queue.
    Retry(String),
}

impl Drained {
    /// Stable short name for logs and metrics.
    pub fn decision(&self) -> &'static str {
        match self {
            Self::Forwarded => "forwarded",
            Self::Duplicate => "duplicate",
            Self::DeadLettered => "dead_lettered",
            Self::Retry(_) => "retry",
        }
    }
}

/// Forwards a hook the webhook kept on the fallback queue, through [`forward`] like any other.
pub async fn drain<L: DeliveryLedger, S: EventSink>(
    hook: &QueuedHook,
    ledger: &L,
    sink: &S,
    dedup: DedupSettings,
    now_ms: u64,
) -> Drained {
    match hook {
        QueuedHook::DeadLetter(letter) => match sink.put_dead_letter(letter).await {
            Ok(()) => Drained::DeadLettered,
            Err(e) => Drained::Retry(format!("could not keep the dead letter on the bus: {e}")),
        },
        QueuedHook::JobEvent(event) => match forward(event, ledger, sink, dedup, now_ms).await {
            Forward::Forwarded => Drained::Forwarded,
            Forward::Duplicate => Drained::Duplicate,
            // The holder forwards it (the next try is a duplicate) or died, or is the webhook
            // whose release failed (the lease runs out before the queue's visibility timeout
            // does, and the next try forwards). Either way: later, not now.
            Forward::InFlight => Drained::Retry(
                "the delivery is claimed by another invocation; retried after its lease".into(),
            ),
            Forward::Failed(failure) => Drained::Retry(failure),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Faulty, InMemoryLedger, Op, RecordingSink};

    fn secrets() -> WebhookSecrets {
        WebhookSecrets {
            tokens: WebhookSecrets::parse_tokens("s3cret").unwrap(),
            signing_keys: vec![],
        }
    }

    fn policy() -> WebhookPolicy {
        WebhookPolicy {
            auth_mode: AuthMode::Token,
            ..Default::default()
        }
    }

    const BODY: &[u8] = br#"{"object_kind":"build","build_id":7,"build_name":"b",
        "build_status":"pending","project_id":3,"runner":null}"#;

    fn request(body: &[u8]) -> HookRequest<'_> {
        HookRequest {
            credentials: Credentials {
                gitlab_token: Some(b"s3cret"),
                ..Default::default()
            },
            gitlab_event: Some(JOB_HOOK_EVENT),
            idempotency_key: Some("idem-1"),
            body,
        }
    }

    #[test]
    fn delivery_id_prefers_signed_header_then_key_then_digest() {
        let mut r = request(BODY);
        assert_eq!(delivery_id(&r), "idem-1");
        r.credentials.webhook_id = Some("msg_9");
        assert_eq!(delivery_id(&r), "msg_9");
        r.credentials.webhook_id = Some("has space");
        r.idempotency_key = None;
        assert!(delivery_id(&r).starts_with("sha256:"));
        assert_eq!(delivery_id(&r).len(), 7 + 64);
    }

    #[test]
    fn other_hook_kinds_are_ignored_and_wrong_token_is_unauthorized() {
        let mut r = request(b"{}");
        r.gitlab_event = Some("Push Hook");
        assert!(matches!(
            assess(&r, &policy(), &secrets(), 0),
            Assessment::Ignored { .. }
        ));
        r.credentials.gitlab_token = Some(b"nope");
        assert_eq!(
            assess(&r, &policy(), &secrets(), 0),
            Assessment::Unauthorized(AuthFailure::TokenMismatch)
        );
    }

    #[test]
    fn oversized_body_becomes_a_capped_dead_letter() {
        let big = vec![b'x'; 2000];
        let p = WebhookPolicy {
            max_body_bytes: 1000,
            dead_letter_body_bytes: 100,
            ..policy()
        };
        match assess(&request(&big), &p, &secrets(), 0) {
            Assessment::Unusable { dead_letter, .. } => {
                assert_eq!(dead_letter.body.len(), 100);
                assert!(dead_letter.body_truncated);
                assert_eq!(dead_letter.body_bytes, 2000);
                assert!(dead_letter.reason.contains("over the 1000-byte limit"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn non_utf8_dead_letter_is_base64() {
        match assess(&request(b"\xff\x00abc"), &policy(), &secrets(), 0) {
            Assessment::Unusable { dead_letter, .. } => {
                assert_eq!(dead_letter.body_encoding, "base64");
                assert_eq!(BASE64.decode(&dead_letter.body).unwrap(), b"\xff\x00abc");
            }
            other => panic!("{other:?}"),
        }
    }

    fn run<F: Future>(f: F) -> F::Output {
        crate::testing::block_on(f)
    }

    /// The fallback queue over a `Vec`; `down` makes every `keep` fail (and counts it).
    #[derive(Default)]
    struct TestQueue {
        kept: std::sync::Mutex<Vec<QueuedHook>>,
        down: std::sync::atomic::AtomicBool,
        refused: std::sync::atomic::AtomicUsize,
    }

    impl TestQueue {
        fn down() -> Self {
            let q = Self::default();
            q.down.store(true, std::sync::atomic::Ordering::SeqCst);
            q
        }
        fn kept(&self) -> Vec<QueuedHook> {
            self.kept.lock().unwrap().clone()
        }
        fn refused(&self) -> usize {
            self.refused.load(std::sync::atomic::Ordering::SeqCst)
        }
    }

    impl FallbackQueue for TestQueue {
        async fn keep(&self, hook: &QueuedHook) -> Result<(), PortError> {
            if self.down.load(std::sync::atomic::Ordering::SeqCst) {
                self.refused
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                return Err(PortError("queue down".into()));
            }
            // What goes on the queue is the message text: keep what comes back out of it.
            let text = hook.to_message()?;
            self.kept
                .lock()
                .unwrap()
                .push(QueuedHook::from_message(&text).unwrap());
            Ok(())
        }
    }

    /// A ledger whose every call fails, counting them.
    #[derive(Default)]
    struct DownLedger(std::sync::atomic::AtomicUsize);

    impl DownLedger {
        fn fail(&self) -> Result<(), PortError> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Err(PortError("table down".into()))
        }
    }

    impl DeliveryLedger for DownLedger {
        async fn claim(&self, _: &DeliveryClaim<'_>) -> Result<Claim, PortError> {
            self.fail().map(|()| Claim::New)
        }
        async fn mark_forwarded(&self, _: &str, _: u64) -> Result<(), PortError> {
            self.fail()
        }
        async fn release(&self, _: &str) -> Result<(), PortError> {
            self.fail()
        }
    }

    const DEDUP: DedupSettings = DedupSettings {
        ttl_seconds: 3600,
        lease_ms: 60_000,
    };

    #[test]
    fn second_delivery_is_a_duplicate_and_publishes_nothing() {
        let (ledger, sink) = (
            InMemoryLedger::default(),
            Faulty::new(RecordingSink::default()),
        );
        let queue = TestQueue::default();
        let a = assess(&request(BODY), &policy(), &secrets(), 1_000);
        let first = run(deliver(&a, &ledger, &sink, &queue, DEDUP, 1_000));
        let second = run(deliver(&a, &ledger, &sink, &queue, DEDUP, 2_000));
        assert_eq!((first, second), (Outcome::Forwarded, Outcome::Duplicate));
        assert_eq!(sink.inner().job_events().len(), 1);
        assert!(queue.kept().is_empty());
    }

    #[test]
    fn failed_publish_is_queued_then_drained_once() {
        let (ledger, sink) = (
            InMemoryLedger::default(),
            Faulty::new(RecordingSink::default()),
        );
        let queue = TestQueue::default();
        let a = assess(&request(BODY), &policy(), &secrets(), 1_000);
        sink.fail(Op::PutJobEvent, 1);
        let first = run(deliver(&a, &ledger, &sink, &queue, DEDUP, 1_000));
        assert!(matches!(&first, Outcome::Queued(why) if why.contains("could not publish")));
        assert_eq!(first.reply().0, 202);
        assert!(first.fell_back());
        assert!(sink.inner().job_events().is_empty(), "the bus refused it");
        let kept = queue.kept();
        let Assessment::Accepted { event, .. } = &a else {
            panic!("{a:?}")
        };
        assert_eq!(kept, vec![QueuedHook::JobEvent(event.clone())]);
        // The claim was released: the drainer claims it at once, forwards, and a second
        // delivery of the same message is a duplicate.
        assert_eq!(
            run(drain(&kept[0], &ledger, &sink, DEDUP, 2_000)),
            Drained::Forwarded
        );
        assert_eq!(
            run(drain(&kept[0], &ledger, &sink, DEDUP, 3_000)),
            Drained::Duplicate
        );
        assert_eq!(sink.inner().job_events(), vec![(**event).clone()]);
        // GitLab (or a person) resends the hook: a duplicate too.
        assert_eq!(
            run(deliver(&a, &ledger, &sink, &queue, DEDUP, 4_000)),
            Outcome::Duplicate
        );
    }

    #[test]
    fn failed_ledger_is_queued_and_drained_when_it_recovers() {
        let (down, sink, queue) = (
            DownLedger::default(),
            Faulty::new(RecordingSink::default()),
            TestQueue::default(),
        );
        let a = assess(&request(BODY), &policy(), &secrets(), 1_000);
        let outcome = run(deliver(&a, &down, &sink, &queue, DEDUP, 1_000));
        assert!(
            matches!(&outcome, Outcome::Queued(why) if why.contains("could not record the delivery: table down")),
            "{outcome:?}"
        );
        assert_eq!(down.0.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(
            sink.inner().job_events().is_empty(),
            "nothing published unclaimed"
        );
        // While the table is down the drainer retries; once it is back, it forwards.
        let kept = queue.kept();
        assert_eq!(kept.len(), 1);
        assert!(matches!(
            run(drain(&kept[0], &down, &sink, DEDUP, 2_000)),
            Drained::Retry(why) if why.contains("table down")
        ));
        let ledger = InMemoryLedger::default();
        assert_eq!(
            run(drain(&kept[0], &ledger, &sink, DEDUP, 3_000)),
            Drained::Forwarded
        );
        assert_eq!(sink.inner().job_events().len(), 1);
    }

    #[test]
    fn nothing_durable_is_the_only_5xx_for_an_authentic_hook() {
        let (down, sink, queue) = (
            DownLedger::default(),
            Faulty::new(RecordingSink::default()),
            TestQueue::down(),
        );
        let a = assess(&request(BODY), &policy(), &secrets(), 1_000);
        let outcome = run(deliver(&a, &down, &sink, &queue, DEDUP, 1_000));
        assert!(
            matches!(&outcome, Outcome::Failed(why) if why.contains("table down") && why.contains("queue down")),
            "{outcome:?}"
        );
        assert_eq!(queue.refused(), 1);
        assert!(!outcome.fell_back());
        let (status, body) = outcome.reply();
        assert_eq!(status, 503);
        assert!(body.starts_with("not kept"), "{body}");

        // The same with the bus down instead of the table: the claim is released too, so a
        // resend is not answered "in flight".
        let ledger = InMemoryLedger::default();
        sink.fail(Op::PutJobEvent, 1);
        let outcome = run(deliver(&a, &ledger, &sink, &queue, DEDUP, 1_000));
        assert!(matches!(outcome, Outcome::Failed(_)), "{outcome:?}");
        assert_eq!(queue.refused(), 2);
        assert_eq!(
            run(deliver(
                &a,
                &ledger,
                &sink,
                &TestQueue::default(),
                DEDUP,
                2_000
            )),
            Outcome::Forwarded
        );
    }

    #[test]
    fn dead_letter_the_bus_refuses_is_queued_then_drained() {
        let (ledger, sink, queue) = (
            InMemoryLedger::default(),
            Faulty::new(RecordingSink::default()),
            TestQueue::default(),
        );
        let a = assess(&request(b"{not json"), &policy(), &secrets(), 1_000);
        sink.fail(Op::PutDeadLetter, 1);
        let outcome = run(deliver(&a, &ledger, &sink, &queue, DEDUP, 1_000));
        let Outcome::DeadLetterQueued { reason, failure } = &outcome else {
            panic!("{outcome:?}")
        };
        assert!(reason.contains("not a Job Hook"), "{reason}");
        assert!(failure.contains("injected fault"), "{failure}");
        let (status, body) = outcome.reply();
        assert_eq!(status, 202);
        assert_eq!(
            body,
            format!("not usable, queued for the operator as a dead letter: {reason}")
        );
        let kept = queue.kept();
        assert!(matches!(&kept[..], [QueuedHook::DeadLetter(l)] if &l.reason == reason));
        assert_eq!(
            run(drain(&kept[0], &ledger, &sink, DEDUP, 2_000)),
            Drained::DeadLettered
        );
        assert_eq!(sink.inner().dead_letters().len(), 1);

        // Bus and queue both down: 503.
        sink.fail(Op::PutDeadLetter, 1);
        let outcome = run(deliver(
            &a,
            &ledger,
            &sink,
            &TestQueue::down(),
            DEDUP,
            3_000,
        ));
        assert!(matches!(&outcome, Outcome::Failed(why) if why.contains("queue down")));
    }

    #[test]
    fn a_concurrent_duplicate_is_2xx_and_the_drainer_retries_it() {
        let (ledger, sink, queue) = (
            InMemoryLedger::default(),
            Faulty::new(RecordingSink::default()),
            TestQueue::default(),
        );
        let a = assess(&request(BODY), &policy(), &secrets(), 0);
        // Another invocation holds the claim (it is between claim and publish).
        let claim = DeliveryClaim {
            delivery_id: "idem-1",
            now_ms: 0,
            lease_until_ms: 60_000,
            expires_at_s: 1000,
            job_id: 7,
            project_id: 3,
            status: "pending",
        };
        assert_eq!(run(ledger.claim(&claim)), Ok(Claim::New));
        let outcome = run(deliver(&a, &ledger, &sink, &queue, DEDUP, 10));
        assert_eq!(outcome, Outcome::InFlight);
        assert_eq!(outcome.reply().0, 200);
        assert!(sink.inner().job_events().is_empty() && queue.kept().is_empty());
        // The drainer holding a message of that delivery tries again later.
        let Assessment::Accepted { event, .. } = &a else {
            panic!()
        };
        let hook = QueuedHook::JobEvent(event.clone());
        assert!(matches!(
            run(drain(&hook, &ledger, &sink, DEDUP, 20)),
            Drained::Retry(why) if why.contains("claimed by another invocation")
        ));
        // After the lease (the holder died), it forwards.
        assert_eq!(
            run(drain(&hook, &ledger, &sink, DEDUP, 60_001)),
            Drained::Forwarded
        );
    }

    #[test]
    fn drainer_retries_when_the_bus_fails_and_forwards_on_the_next_try() {
        let (ledger, sink) = (
            InMemoryLedger::default(),
            Faulty::new(RecordingSink::default()),
        );
        let a = assess(&request(BODY), &policy(), &secrets(), 0);
        let Assessment::Accepted { event, .. } = &a else {
            panic!()
        };
        let hook = QueuedHook::JobEvent(event.clone());
        sink.fail(Op::PutJobEvent, 1);
        assert!(matches!(
            run(drain(&hook, &ledger, &sink, DEDUP, 1)),
            Drained::Retry(why) if why.contains("could not publish")
        ));
        // Released, so the next receive need not wait for the lease.
        assert_eq!(
            run(drain(&hook, &ledger, &sink, DEDUP, 2)),
            Drained::Forwarded
        );
        assert_eq!(sink.inner().job_events().len(), 1);
    }

    /// Every outcome's reply, as docs/how-it-works.md's table states it.
    #[test]
    fn every_outcome_has_its_documented_reply() {
        let cases = [
            (
                Outcome::Unauthorized(AuthFailure::TokenMismatch),
                401,
                "unauthorized",
            ),
            (Outcome::Ignored("why".into()), 202, "ignored: why"),
            (
                Outcome::DeadLettered("why".into()),
                202,
                "not usable, kept for the operator as a dead letter: why",
            ),
            (Outcome::Forwarded, 202, "accepted"),
            (
                Outcome::Duplicate,
                200,
                "duplicate delivery, already accepted",
            ),
            (
                Outcome::InFlight,
                200,
                "duplicate delivery, being accepted by a concurrent request",
            ),
            (
                Outcome::Queued("bus down".into()),
                202,
                "accepted and queued: forwarded once the bus and delivery table recover",
            ),
            (
                Outcome::DeadLetterQueued {
                    reason: "why".into(),
                    failure: "bus down".into(),
                },
                202,
                "not usable, queued for the operator as a dead letter: why",
            ),
            (
                Outcome::SecretsUnavailable("ssm down".into()),
                503,
                "not kept: webhook secrets unavailable, cannot authenticate; resend this hook once the service recovers",
            ),
            (
                Outcome::Failed("all down".into()),
                503,
                "not kept: bus, delivery table and fallback queue unavailable; resend this hook once the service recovers",
            ),
        ];
        for (outcome, status, body) in cases {
            assert_eq!(outcome.reply(), (status, body.to_owned()), "{outcome:?}");
            // Our failures' details go to the log, never to the sender.
            assert!(!outcome.reply().1.contains("down"), "{outcome:?}");
            assert_eq!(
                outcome.fell_back(),
                matches!(outcome.decision(), "queued" | "dead_letter_queued")
            );
        }
    }

    #[test]
    fn queued_message_is_the_bus_detail_with_its_kind() {
        let a = assess(&request(BODY), &policy(), &secrets(), 5);
        let Assessment::Accepted { event, .. } = &a else {
            panic!()
        };
        let hook = QueuedHook::JobEvent(event.clone());
        let message: serde_json::Value = serde_json::from_str(&hook.to_message().unwrap()).unwrap();
        assert_eq!(message["kind"], "job_event");
        assert_eq!(message["detail"], serde_json::to_value(&**event).unwrap());
        assert_eq!(hook.delivery_id(), "idem-1");
        assert_eq!(hook.job_event().map(|e| e.job_id), Some(7));
        let err = QueuedHook::from_message(r#"{"kind":"push"}"#).unwrap_err();
        assert!(err.starts_with("not a hook the webhook queued"), "{err}");
    }

    #[test]
    fn largest_dead_letter_fits_one_fallback_message() {
        let p = WebhookPolicy {
            dead_letter_body_bytes: MAX_CAP,
            ..policy()
        };
        for (name, body, _) in worst_bodies() {
            let Assessment::Unusable { dead_letter, .. } =
                assess(&request(&body), &p, &secrets(), 0)
            else {
                panic!("{name}")
            };
            let message = QueuedHook::DeadLetter(dead_letter.clone())
                .to_message()
                .unwrap();
            assert!(
                message.len() <= FALLBACK_MESSAGE_MAX_BYTES,
                "{name}: {}",
                message.len()
            );
            assert_eq!(
                QueuedHook::from_message(&message).unwrap(),
                QueuedHook::DeadLetter(dead_letter)
            );
        }
    }

    #[test]
    fn abandoned_claim_is_taken_over_after_its_lease() {
        let (ledger, sink, queue) = (
            InMemoryLedger::default(),
            Faulty::new(RecordingSink::default()),
            TestQueue::default(),
        );
        let a = assess(&request(BODY), &policy(), &secrets(), 0);
        let settings = DedupSettings {
            lease_ms: 100,
            ..Default::default()
        };
        // Simulate a crash between claim and publish.
        let claim = DeliveryClaim {
            delivery_id: "idem-1",
            now_ms: 0,
            lease_until_ms: 100,
            expires_at_s: 1000,
            job_id: 7,
            project_id: 3,
            status: "pending",
        };
        assert_eq!(run(ledger.claim(&claim)), Ok(Claim::New));
        assert_eq!(
            run(deliver(&a, &ledger, &sink, &queue, settings, 50)),
            Outcome::InFlight
        );
        assert_eq!(
            run(deliver(&a, &ledger, &sink, &queue, settings, 150)),
            Outcome::Forwarded
        );
    }

    /// DeadLetterBodyBytes' maximum (template.yaml).
    const MAX_CAP: usize = 131072;
    /// The longest bus name or ARN a PutEvents entry accepts.
    const LONGEST_BUS: usize = 1600;

    /// Bodies whose JSON escaping grows most, each DeadLetterBodyBytes' maximum long (or more).
    /// Whether the budget (not the cap) must cut each is the third value.
    fn worst_bodies() -> Vec<(&'static str, Vec<u8>, bool)> {
        let fill = |unit: &str, len: usize| -> Vec<u8> {
            let mut s = unit.repeat(len / unit.len() + 1);
            let mut cut = len;
            while !s.is_char_boundary(cut) {
                cut -= 1;
            }
            s.truncate(cut);
            while s.len() < len {
                s.push('\u{1}');
            }
            s.into_bytes()
        };
        let mut not_utf8 = fill("\u{1}\"\\", MAX_CAP);
        not_utf8[0] = 0xff;
        vec![
            ("\\u0001 x 131072", fill("\u{1}", MAX_CAP), true),
            ("quotes x 131072", fill("\"", MAX_CAP), true),
            ("backslashes x 131072", fill("\\", MAX_CAP), true),
            (
                "mixed 131072",
                fill("\u{1f}\"\\\n\u{7f}é€😀", MAX_CAP),
                false,
            ),
            (
                "\\u0001 x 1 MiB (over the cap)",
                fill("\u{1}", 1024 * 1024),
                true,
            ),
            // 131072 bytes take 174764 in base64: the cap cuts, the letter fits.
            ("not UTF-8 131072", not_utf8, false),
        ]
    }

    /// What the letter keeps of `body`, as raw bytes (decoding base64).
    fn kept_bytes(letter: &DeadLetter) -> Vec<u8> {
        match letter.body_encoding.as_str() {
            "utf8" => letter.body.as_bytes().to_vec(),
            _ => BASE64.decode(&letter.body).unwrap(),
        }
    }

    /// The letter tells the truth about the body: whole size and digest, a prefix kept, and
    /// `body_truncated` exactly when the prefix is not all of it.
    fn assert_truthful(name: &str, letter: &DeadLetter, body: &[u8], cap: usize) {
        let kept = kept_bytes(letter);
        assert_eq!(letter.body_bytes, body.len(), "{name}");
        assert_eq!(letter.body_sha256, hex(&Sha256::digest(body)), "{name}");
        assert!(kept.len() <= cap && body.starts_with(&kept), "{name}");
        assert_eq!(letter.body_truncated, kept.len() < body.len(), "{name}");
    }

    #[test]
    fn dead_letter_of_escaped_characters_fits_one_putevents_entry() {
        let p = WebhookPolicy {
            dead_letter_body_bytes: MAX_CAP,
            ..policy()
        };
        for (name, body, budget_cuts) in worst_bodies() {
            let letter = match assess(&request(&body), &p, &secrets(), 0) {
                Assessment::Unusable { dead_letter, .. } => dead_letter,
                other => panic!("{name}: {other:?}"),
            };
            // The Detail exactly as the EventBridge sink serializes it, and the whole entry
            // with the longest bus ARN and a time.
            let detail = serde_json::to_string(&letter).unwrap();
            let entry = EVENT_SOURCE.len()
                + DEAD_LETTER_DETAIL_TYPE.len()
                + detail.len()
                + LONGEST_BUS
                + 14;
            assert!(
                detail.len() <= DEAD_LETTER_DETAIL_MAX_BYTES,
                "{name}: detail {}",
                detail.len()
            );
            assert!(entry < PUT_EVENTS_ENTRY_MAX_BYTES, "{name}: entry {entry}");
            assert_truthful(name, &letter, &body, MAX_CAP);
            let kept = kept_bytes(&letter).len();
            if budget_cuts {
                // No more than the next character (at most 6 bytes escaped, one more for
                // `true` measured as `false`) is given away.
                assert!(
                    detail.len() + 7 > DEAD_LETTER_DETAIL_MAX_BYTES,
                    "{name}: detail {} keeps {kept} bytes",
                    detail.len()
                );
            } else {
                assert_eq!(kept, MAX_CAP, "{name}");
            }
        }
    }

    #[test]
    fn dead_letter_within_budget_is_kept_whole() {
        let body = b"{\"build_id\": \"\\u0001\"}\n\x01";
        match assess(&request(body), &policy(), &secrets(), 0) {
            Assessment::Unusable { dead_letter, .. } => {
                assert_eq!(dead_letter.body.as_bytes(), body);
                assert!(!dead_letter.body_truncated);
            }
            other => panic!("{other:?}"),
        }
    }

    proptest::proptest! {
        /// For any body, cap and budget (small, so that the budget cuts): the letter's JSON
        /// fits the budget whenever its fields without a body do, the escaped length counted
        /// while cutting is serde_json's, and the letter is truthful.
        #[test]
        fn kept_body_fits_the_budget_and_is_truthful(
            body in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::sample::select(b"\x01\x08\t\n\x1f\"\\ax\x7f".to_vec()),
                    proptest::num::u8::ANY,
                ],
                0..400,
            ),
            text in "[\u{1}\"\\\\a\u{e9}\u{20ac}\u{1f600}\n]{0,200}",
            use_text in proptest::bool::ANY,
            cap in 0usize..500,
            extra in 0usize..600,
        ) {
            let body = if use_text { text.into_bytes() } else { body };
            let mut letter = DeadLetter::new(&request(&body), "id".into(), "why".into(), 0, 0);
            letter.body_truncated = false;
            let budget = serde_json::to_string(&letter).unwrap().len() + extra;
            letter.keep_body(&body, cap, budget);
            let json = serde_json::to_string(&letter).unwrap();
            // The room the body had: the budget less the letter without its body (base64
            // makes that 2 bytes longer than the letter `budget` was derived from).
            let without_body = DeadLetter { body: String::new(), body_truncated: false, ..letter.clone() };
            let fixed = serde_json::to_string(&without_body).unwrap().len();
            let room = budget.saturating_sub(fixed);
            if fixed <= budget {
                proptest::prop_assert!(json.len() <= budget, "{} > {budget}", json.len());
            } else {
                proptest::prop_assert!(letter.body.is_empty());
            }
            assert_truthful("proptest", &letter, &body, cap);
            let kept = kept_bytes(&letter).len();
            if letter.body_encoding == "utf8" {
                let counted = json_escaped_prefix_len(&letter.body, usize::MAX);
                let escaped = serde_json::to_string(&letter.body).unwrap().len() - 2;
                proptest::prop_assert_eq!(counted, letter.body.len());
                proptest::prop_assert!(escaped <= room);
                // Maximal: stopped at the cap, the end, or where the next character would not fit.
                if kept < body.len().min(cap) && std::str::from_utf8(&body[..kept]).is_ok() {
                    let next = std::str::from_utf8(&body[kept..body.len().min(cap)])
                        .map_or(None, |rest| rest.chars().next());
                    if let Some(c) = next {
                        let c_escaped = serde_json::to_string(&c.to_string()).unwrap().len() - 2;
                        proptest::prop_assert!(escaped + c_escaped > room);
                    }
                }
            } else {
                proptest::prop_assert!(kept == body.len().min(cap) || kept + 3 > room / 4 * 3);
            }
        }
    }
}
