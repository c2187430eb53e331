//! Test harness: a real moto server on loopback, the real AWS SDK pointed at it, and the
//! resources the SAM template would create for the webhook.
//!
//! Uses `MOTO_ENDPOINT` when set (`.ci/run` starts one moto for all test binaries); otherwise
//! starts a private moto server that stops when the test process exits (its stdin closes).

pub mod chain;
pub mod fleet_stack;
pub mod lambda_process;
pub mod liveness;
pub mod loopback;
pub mod process_chain;

use std::io::Read as _;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
    TimeToLiveSpecification,
};

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The `Retry` of state `state` in `statemachine/<file>`, as Step Functions applies it: the
/// harnesses that play a workflow's steps take their retries from the definition, so they
/// retry what a deployed workflow would.
pub fn task_retries(file: &str, state: &str) -> ephemeral_core::task_error::RetryRules {
    let path = workspace_root().join("statemachine").join(file);
    let definition: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let found = &definition["States"][state];
    assert!(found.is_object(), "no state {state} in {}", path.display());
    ephemeral_core::task_error::RetryRules::of_state(found).unwrap()
}

/// The venv `helper-scripts/install-tools` creates.
pub fn tools_venv() -> PathBuf {
    std::env::var_os("EPHEMERAL_TOOLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/ephemeral-runners/tools")
        })
        .join("venv")
}

pub fn tool(name: &str) -> PathBuf {
    let candidate = tools_venv().join("bin").join(name);
    assert!(
        candidate.exists(),
        "{} not found: run helper-scripts/install-tools first",
        candidate.display()
    );
    candidate
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A moto server of this process's own, stopped when the process exits.
pub fn start_private_moto() -> String {
    let port = free_port();
    let moto = tool("moto_server");
    // `read` returns when our end of the pipe closes, i.e. when this process exits, however it
    // exits; then moto is killed. No server outlives the tests.
    let script = format!(
        "MOTO_PORT={port} '{}' -H 127.0.0.1 -p {port} >/dev/null 2>&1 & pid=$!; read _; kill $pid",
        moto.display()
    );
    let child = Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("start moto_server");
    // Keep the stdin pipe open for the life of the process.
    std::mem::forget(child);
    let endpoint = format!("http://127.0.0.1:{port}");
    wait_ready(&endpoint);
    endpoint
}

fn wait_ready(endpoint: &str) {
    let addr = endpoint.trim_start_matches("http://");
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(mut s) = std::net::TcpStream::connect(addr) {
            use std::io::Write as _;
            let _ = write!(
                s,
                "GET /moto-api/data.json HTTP/1.0\r\nHost: {addr}\r\n\r\n"
            );
            let mut head = [0u8; 12];
            if s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.") {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("moto server at {endpoint} did not become ready within 30 s");
}

/// Endpoint of the moto server for this test process.
pub fn moto_endpoint() -> &'static str {
    static ENDPOINT: OnceLock<String> = OnceLock::new();
    ENDPOINT.get_or_init(|| match std::env::var("MOTO_ENDPOINT") {
        Ok(e) if !e.is_empty() => {
            wait_ready(&e);
            e
        }
        _ => start_private_moto(),
    })
}

/// SDK configuration for moto: dummy credentials, us-east-1, loopback endpoint.
pub fn sdk_config() -> SdkConfig {
    sdk_config_at(moto_endpoint())
}

/// The same for the moto server at `endpoint`.
pub fn sdk_config_at(endpoint: &str) -> SdkConfig {
    SdkConfig::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .credentials_provider(aws_sdk_dynamodb::config::SharedCredentialsProvider::new(
            aws_sdk_dynamodb::config::Credentials::new("testing", "testing", None, None, "moto"),
        ))
        .build()
}

/// A name no other test in this run uses, so tests share one moto server safely.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

/// What the template creates for the webhook, plus a queue that sees everything on the bus.
pub struct WebhookStack {
    pub bus: String,
    pub table: String,
    pub token_parameter: String,
    pub signing_parameter: String,
    /// Receives every event put on the bus (a rule with a catch-all pattern).
    pub observer_queue_url: String,
    /// The intake fallback queue (the template's IntakeFallbackQueue).
    pub fallback_queue_url: String,
}

pub async fn create_webhook_stack(
    sdk: &SdkConfig,
    tokens: &str,
    signing_tokens: &str,
) -> WebhookStack {
    let events = aws_sdk_eventbridge::Client::new(sdk);
    let dynamo = aws_sdk_dynamodb::Client::new(sdk);
    let ssm = aws_sdk_ssm::Client::new(sdk);
    let sqs = aws_sdk_sqs::Client::new(sdk);

    let bus = unique("jobs");
    events.create_event_bus().name(&bus).send().await.unwrap();

    let table = unique("deliveries");
    dynamo
        .create_table()
        .table_name(&table)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(
            AttributeDefinition::builder()
                .attribute_name("delivery_id")
                .attribute_type(ScalarAttributeType::S)
                .build()
                .unwrap(),
        )
        .key_schema(
            KeySchemaElement::builder()
                .attribute_name("delivery_id")
                .key_type(KeyType::Hash)
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    dynamo
        .update_time_to_live()
        .table_name(&table)
        .time_to_live_specification(
            TimeToLiveSpecification::builder()
                .attribute_name("expires_at")
                .enabled(true)
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();

    let prefix = format!("/{}", unique("ephemeral-runners"));
    let token_parameter = format!("{prefix}/secret-token");
    let signing_parameter = format!("{prefix}/signing-token");
    for (name, value) in [
        (&token_parameter, tokens),
        (&signing_parameter, signing_tokens),
    ] {
        ssm.put_parameter()
            .name(name)
            .value(value)
            .r#type(aws_sdk_ssm::types::ParameterType::SecureString)
            .send()
            .await
            .unwrap();
    }

    let queue = unique("observer");
    let queue_url = sqs
        .create_queue()
        .queue_name(&queue)
        .send()
        .await
        .unwrap()
        .queue_url
        .unwrap();
    let queue_arn = format!("arn:aws:sqs:us-east-1:123456789012:{queue}");
    let rule = unique("observe-all");
    events
        .put_rule()
        .name(&rule)
        .event_bus_name(&bus)
        .event_pattern(r#"{"source":["ephemeral-runners.webhook"]}"#)
        .send()
        .await
        .unwrap();
    events
        .put_targets()
        .rule(&rule)
        .event_bus_name(&bus)
        .targets(
            aws_sdk_eventbridge::types::Target::builder()
                .id("observer")
                .arn(queue_arn)
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();

    let fallback_queue_url = sqs
        .create_queue()
        .queue_name(unique("intake-fallback"))
        .send()
        .await
        .unwrap()
        .queue_url
        .unwrap();

    WebhookStack {
        bus,
        table,
        token_parameter,
        signing_parameter,
        observer_queue_url: queue_url,
        fallback_queue_url,
    }
}

/// Every EventBridge envelope that reached the observer queue, waiting up to `wait` for at
/// least `at_least` of them and then a little longer for stragglers.
pub async fn bus_events(
    sdk: &SdkConfig,
    stack: &WebhookStack,
    at_least: usize,
    wait: Duration,
) -> Vec<serde_json::Value> {
    let sqs = aws_sdk_sqs::Client::new(sdk);
    let mut out = Vec::new();
    let deadline = Instant::now() + wait;
    let mut quiet_polls = 0;
    while Instant::now() < deadline {
        let got = sqs
            .receive_message()
            .queue_url(&stack.observer_queue_url)
            .max_number_of_messages(10)
            .send()
            .await
            .unwrap();
        let messages = got.messages.unwrap_or_default();
        if messages.is_empty() {
            quiet_polls += 1;
            if out.len() >= at_least && quiet_polls >= 3 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        quiet_polls = 0;
        for m in messages {
            out.push(serde_json::from_str(m.body.as_deref().unwrap()).unwrap());
            sqs.delete_message()
                .queue_url(&stack.observer_queue_url)
                .receipt_handle(m.receipt_handle.unwrap())
                .send()
                .await
                .unwrap();
        }
    }
    out
}

/// The webhook's configuration for a stack, as the template's environment sets it.
pub fn webhook_config(stack: &WebhookStack, auth_mode: &str) -> webhook::config::WebhookConfig {
    let pairs = [
        ("EVENT_BUS_NAME", stack.bus.clone()),
        ("DEDUP_TABLE_NAME", stack.table.clone()),
        ("SECRET_TOKEN_PARAMETER", stack.token_parameter.clone()),
        ("SIGNING_TOKEN_PARAMETER", stack.signing_parameter.clone()),
        ("AUTH_MODE", auth_mode.to_owned()),
        ("FALLBACK_QUEUE_URL", stack.fallback_queue_url.clone()),
    ];
    webhook::config::WebhookConfig::from_lookup(|k| {
        pairs
            .iter()
            .find(|(name, _)| *name == k)
            .map(|(_, v)| v.clone())
    })
    .unwrap()
}

/// Runs the Standard Webhooks reference implementation (Python `standardwebhooks`) on a batch
/// of requests, so that our code is checked against code we did not write. Each request is
/// `{"op": "sign", key, id, ts, body}` (answers the `webhook-signature` value) or
/// `{"op": "verify", key, id, ts, body, signature}` (answers "ok" or the exception name).
pub fn reference_webhooks(requests: &[serde_json::Value]) -> Vec<String> {
    let script = r#"
import sys, json, datetime
from standardwebhooks.webhooks import Webhook
out = []
for a in json.load(sys.stdin):
    wh = Webhook(a["key"])
    if a["op"] == "sign":
        ts = datetime.datetime.fromtimestamp(a["ts"], tz=datetime.timezone.utc)
        out.append(wh.sign(a["id"], ts, a["body"]))
    else:
        headers = {"webhook-id": a["id"], "webhook-timestamp": str(a["ts"]),
                   "webhook-signature": a["signature"]}
        try:
            wh.verify(a["body"], headers)
            out.append("ok")
        except Exception as e:
            out.append(type(e).__name__)
print(json.dumps(out))
"#;
    let mut child = Command::new(tool("python"))
        .arg("-c")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write as _;
        let input = serde_json::Value::from(requests.to_vec()).to_string();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "standardwebhooks failed");
    serde_json::from_slice(&out.stdout).unwrap()
}

pub fn reference_signature(
    signing_token: &str,
    msg_id: &str,
    timestamp: i64,
    body: &str,
) -> String {
    let request = serde_json::json!({"op": "sign", "key": signing_token, "id": msg_id, "ts": timestamp, "body": body});
    reference_webhooks(&[request]).remove(0)
}

/// An API Gateway HTTP API (payload v2) request as Lambda delivers it to the webhook.
pub fn api_request(
    headers: &[(&str, &str)],
    body: &str,
) -> aws_lambda_events::apigw::ApiGatewayV2httpRequest {
    let header_map: serde_json::Map<String, serde_json::Value> = headers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), serde_json::Value::from(*v)))
        .collect();
    let envelope = serde_json::json!({
        "version": "2.0",
        "routeKey": "POST /webhook",
        "rawPath": "/webhook",
        "rawQueryString": "",
        "headers": header_map,
        "requestContext": {
            "accountId": "123456789012",
            "apiId": "api",
            "domainName": "api.execute-api.us-east-1.amazonaws.com",
            "http": {"method": "POST", "path": "/webhook", "protocol": "HTTP/1.1",
                     "sourceIp": "192.0.2.1", "userAgent": "GitLab/18.2.0"},
            "requestId": "req",
            "routeKey": "POST /webhook",
            "stage": "$default",
            "time": "23/Nov/2026:19:00:00 +0000",
            "timeEpoch": 1_795_460_400_000_i64
        },
        "body": body,
        "isBase64Encoded": false
    });
    serde_json::from_value(envelope).unwrap()
}

pub fn fixture(name: &str) -> String {
    std::fs::read_to_string(
        workspace_root()
            .join("crates/core/tests/fixtures/job_hooks")
            .join(name),
    )
    .unwrap()
}

/// A stand-in for GitLab's jobs API on loopback: `GET /api/v4/projects/:id/jobs/:job_id`
/// answers `{"id", "name", "status", "tag_list"}` for the jobs it knows (status `pending`
/// unless [`GitLabStandIn::set_status`] says otherwise), 404 for others (or, once
/// [`GitLabStandIn::answer_every_job`] is called, any other job as pending with no tags), 500
/// for job ids in `failing`, and 401 without the right `PRIVATE-TOKEN`. Counts requests.
/// On wiremock ([`loopback::serve_stateful`]); dropping the stand-in stops it.
pub struct GitLabStandIn {
    pub url: String,
    pub requests: std::sync::Arc<AtomicU32>,
    jobs: std::sync::Arc<std::sync::Mutex<StandInJobs>>,
    _server: wiremock::MockServer,
}

#[derive(Default)]
struct StandInJobs {
    /// Job id -> (status, tags).
    known: std::collections::HashMap<u64, (String, Vec<String>)>,
    failing: Vec<u64>,
    every_job: bool,
}

impl StandInJobs {
    fn answer(&self, job_id: Option<u64>) -> (u16, String) {
        let job = |id: u64, status: &str, tags: &[String]| {
            serde_json::json!({"id": id, "name": format!("job-{id}"), "status": status,
                               "stage": "test", "tag_list": tags})
            .to_string()
        };
        match job_id {
            Some(id) if self.failing.contains(&id) => (500, "{}".to_owned()),
            Some(id) => match self.known.get(&id) {
                Some((status, tags)) => (200, job(id, status, tags)),
                None if self.every_job => (200, job(id, "pending", &[])),
                None => (404, r#"{"message":"404 Not found"}"#.to_owned()),
            },
            None => (404, r#"{"message":"404 Not found"}"#.to_owned()),
        }
    }
}

impl GitLabStandIn {
    /// Jobs `tags` (pending, with these tags) and `failing` (500).
    pub async fn start(token: &str, tags: Vec<(u64, Vec<&str>)>, failing: Vec<u64>) -> Self {
        let known = tags
            .into_iter()
            .map(|(job, t)| {
                (
                    job,
                    (
                        "pending".to_owned(),
                        t.into_iter().map(str::to_owned).collect(),
                    ),
                )
            })
            .collect();
        let jobs = std::sync::Arc::new(std::sync::Mutex::new(StandInJobs {
            known,
            failing,
            every_job: false,
        }));
        let requests = std::sync::Arc::new(AtomicU32::new(0));
        let (shared, counter, token) = (jobs.clone(), requests.clone(), token.to_owned());
        let server = loopback::serve_stateful(move |request| {
            counter.fetch_add(1, Ordering::SeqCst);
            let job_id: Option<u64> = request
                .path()
                .rsplit('/')
                .next()
                .and_then(|id| id.parse().ok());
            let (status, body) = if request.header("private-token") == Some(token.as_str()) {
                shared.lock().unwrap().answer(job_id)
            } else {
                (401, r#"{"message":"401 Unauthorized"}"#.to_owned())
            };
            (status, Vec::new(), body)
        })
        .await;
        Self {
            url: server.uri(),
            requests,
            jobs,
            _server: server,
        }
    }

    /// Answers jobs it was not told about as pending with no tags (a whole run's jobs).
    pub fn answer_every_job(&self) -> &Self {
        self.jobs.lock().unwrap().every_job = true;
        self
    }

    /// GitLab's status of a job from now on (`running`, `success`, ...); keeps its tags.
    pub fn set_status(&self, job_id: u64, status: &str) {
        self.jobs
            .lock()
            .unwrap()
            .known
            .entry(job_id)
            .or_insert_with(|| (String::new(), vec![]))
            .0 = status.to_owned();
    }
}

/// A DynamoDB table with string keys, as the template declares them.
pub async fn create_table(
    sdk: &SdkConfig,
    prefix: &str,
    hash: &str,
    range: Option<&str>,
) -> String {
    let dynamo = aws_sdk_dynamodb::Client::new(sdk);
    let table = unique(prefix);
    let mut request = dynamo
        .create_table()
        .table_name(&table)
        .billing_mode(BillingMode::PayPerRequest);
    for (name, kind) in [(Some(hash), KeyType::Hash), (range, KeyType::Range)] {
        let Some(name) = name else { continue };
        request = request
            .attribute_definitions(
                AttributeDefinition::builder()
                    .attribute_name(name)
                    .attribute_type(ScalarAttributeType::S)
                    .build()
                    .unwrap(),
            )
            .key_schema(
                KeySchemaElement::builder()
                    .attribute_name(name)
                    .key_type(kind)
                    .build()
                    .unwrap(),
            );
    }
    request.send().await.unwrap();
    table
}

/// A Standard state machine in moto whose executions stay RUNNING (moto does not execute
/// definitions unless told to), which is all the router's tests need.
pub async fn create_state_machine(sdk: &SdkConfig, prefix: &str, definition: &str) -> String {
    let sfn = aws_sdk_sfn::Client::new(sdk);
    sfn.create_state_machine()
        .name(unique(prefix))
        .definition(definition)
        .role_arn("arn:aws:iam::123456789012:role/ephemeral-runners-test")
        .r#type(aws_sdk_sfn::types::StateMachineType::Standard)
        .send()
        .await
        .unwrap()
        .state_machine_arn
}

/// Names of every execution of a state machine (paginated).
pub async fn execution_names(sdk: &SdkConfig, state_machine_arn: &str) -> Vec<String> {
    let sfn = aws_sdk_sfn::Client::new(sdk);
    let mut names = Vec::new();
    let mut pages = sfn
        .list_executions()
        .state_machine_arn(state_machine_arn)
        .into_paginator()
        .items()
        .send();
    while let Some(e) = pages.next().await {
        names.push(e.unwrap().name);
    }
    names.sort();
    names
}

/// Every item of a table (paginated), as stored.
pub async fn scan_items(
    sdk: &SdkConfig,
    table: &str,
) -> Vec<std::collections::HashMap<String, aws_sdk_dynamodb::types::AttributeValue>> {
    let mut pages = aws_sdk_dynamodb::Client::new(sdk)
        .scan()
        .table_name(table)
        .into_paginator()
        .items()
        .send();
    let mut items = Vec::new();
    while let Some(item) = pages.next().await {
        items.push(item.unwrap());
    }
    items
}

/// The teardown definition's MarkCleaned state, as the in-process drivers (chain, liveness)
/// play it: the job's phase to `cleaned` unless it is there already (a failed condition is
/// success). Names and rank from the jobs-table owner.
pub async fn mark_cleaned(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    job_key: &str,
) -> Result<
    (),
    aws_sdk_dynamodb::error::SdkError<aws_sdk_dynamodb::operation::update_item::UpdateItemError>,
> {
    use ephemeral_core::jobs::JobPhase;
    use ephemeral_core::jobs_table::{KEY, attr};
    let cleaned = JobPhase::Cleaned;
    let result = client
        .update_item()
        .table_name(table)
        .key(
            KEY,
            aws_sdk_dynamodb::types::AttributeValue::S(job_key.to_owned()),
        )
        .update_expression(format!(
            "SET {} = :p, {} = :r",
            attr::PHASE,
            attr::PHASE_RANK
        ))
        .condition_expression(format!("{} < :r", attr::PHASE_RANK))
        .expression_attribute_values(
            ":p",
            aws_sdk_dynamodb::types::AttributeValue::S(cleaned.as_str().into()),
        )
        .expression_attribute_values(
            ":r",
            aws_sdk_dynamodb::types::AttributeValue::N(cleaned.rank().to_string()),
        )
        .send()
        .await;
    match result {
        Err(e)
            if e.as_service_error()
                .is_some_and(|s| s.is_conditional_check_failed_exception()) =>
        {
            Ok(())
        }
        other => other.map(|_| ()),
    }
}
