//! The whole chain in one process: GitLab Job Hooks -> webhook -> EventBridge bus (moto; an
//! SQS rule target stands in for the router's rule) -> router -> Step Functions starts (moto:
//! the deterministic execution names decide, exactly as in AWS) -> the workflow's steps ->
//! mapper, ec2-provision (EC2, SSM, DynamoDB in moto; GitLab stand-in) or the shell-runner
//! invoke -> teardown -> reaper.
//!
//! moto cannot run our Lambda code from a rule or a state machine, so this driver plays the
//! platform: it delivers each hook the way GitLab does (once: GitLab does not resend a hook
//! answered 5xx, so that hook is lost and counted, and left to the reconciler), hands what the
//! webhook kept on the intake fallback queue to the intake drainer the way the queue's event
//! source does (batches of up to 10, the failed items handed out again, at most 10 receives,
//! then the queue's dead-letter queue), hands bus events to the router (again on an error,
//! like Lambda's asynchronous retries), and runs each newly started workflow by calling the
//! real handlers in the order of `statemachine/*.asl.json`, with the retries those
//! definitions declare. The definitions themselves run in moto's interpreter in
//! `statemachines_moto.rs`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use aws_config::SdkConfig;
use aws_lambda_events::eventbridge::EventBridgeEvent;
use aws_lambda_events::sqs::SqsEvent;
use aws_sdk_dynamodb::types::AttributeValue;
use ephemeral_core::fleet::Provisioned;
use ephemeral_core::hook::JobEvent;
use ephemeral_core::jobs::{JobKey, RouterOutcome, Started, Workflow, WorkflowInput};
use ephemeral_core::lambda_runner::RunnerGrant;
use ephemeral_core::mapping::{Executor, ExecutorKind};
use ephemeral_core::task_error::TaskError;
use ephemeral_core::testing::{XorShift, expected_provisions, redelivered_job_events};
use ephemeral_core::webhook::{DeadLetter, EventSink, PortError, QueuedHook};
use fleet::{FleetSetup, Functions, ProvisionInput, ProvisionOutput, TeardownInput};
use mapper::{DynamoMappingRules, GitLabJobs, Mapper, TokenSource};
use router::Router;
use router::aws::{DynamoJobStore, StepFunctions};
use shell_runner::RunnerTokens as _;
use webhook::aws::{DynamoLedger, EventBridgeSink, SqsFallback, SsmSecrets};
use webhook::config::DrainerConfig;
use webhook::drainer::{AwsDrainer, Drainer};
use webhook::{AwsWebhook, Webhook};

use crate::fleet_stack::{FleetStack, fleet_stack_in};
use crate::loopback::FaultProxy;
use crate::{
    WebhookStack, api_request, create_table, create_webhook_stack, fixture, sdk_config_at,
};

pub const SHELL_RUNNER_ARN: &str = "arn:aws:lambda:us-east-1:123456789012:function:shell-runner";
/// The runner id GitLab reports for jobs the shell runner ran (a shared runner, not ours).
pub const SHELL_RUNNER_ID: u64 = 1;
pub const WEBHOOK_TOKEN: &str = "chain-secret-token";

#[derive(Debug, Clone)]
pub struct ChainOptions {
    pub jobs: u64,
    pub seed: u64,
    /// Jobs named `docker-build` (EC2, the default route); the rest `unit-test` (LAMBDA).
    pub ec2_percent: u64,
    /// Jobs whose finished hooks never arrive.
    pub lost_finish_percent: u64,
    /// Concurrent deliverers; a job's hooks stay with one of them, in order.
    pub workers: usize,
    /// Share of AWS calls answered with a throttling error by a proxy in front of moto.
    pub throttle_percent: u64,
    /// Share of GitLab runner API calls answered 502.
    pub gitlab_failure_percent: u64,
    /// Share of hooks sent during an intake outage (chosen by delivery id): the bus refuses
    /// the webhook's PutEvents, so the hook is queued and drained. Of those, 1 in 4 also finds
    /// the fallback queue refusing (answered 503: lost), 1 in 4 outlasts the hook's first two
    /// drains (retried, then forwarded), 1 in 8 outlasts every drain (the drainer's
    /// dead-letter queue: lost).
    pub intake_outage_percent: u64,
    /// A stack without EC2 settings (DefaultExecutor LAMBDA; RunnerApiTokenParameterName,
    /// GitLabUrl and SubnetIds empty): every job goes to the shell runner, and the fleet
    /// functions run unconfigured.
    pub lambda_only: bool,
}

impl Default for ChainOptions {
    fn default() -> Self {
        Self {
            // CHAIN_JOBS overrides, for a quick local run or a bigger benchmark.
            jobs: std::env::var("CHAIN_JOBS")
                .ok()
                .and_then(|n| n.parse().ok())
                .unwrap_or(1000),
            seed: 7,
            ec2_percent: 30,
            lost_finish_percent: 10,
            workers: std::env::var("CHAIN_WORKERS")
                .ok()
                .and_then(|n| n.parse().ok())
                .unwrap_or(4),
            throttle_percent: 0,
            gitlab_failure_percent: 0,
            intake_outage_percent: 0,
            lambda_only: false,
        }
    }
}

/// What happened, per job and in total.
#[derive(Debug, Default)]
pub struct ChainReport {
    pub hooks: usize,
    pub elapsed: Duration,
    /// Job keys whose pending event reached the router before any of its finishes (in the
    /// order the events reached it, from the webhook or the intake drainer): each must get
    /// exactly one runner.
    pub expected_ec2: BTreeSet<String>,
    pub expected_lambda: BTreeSet<String>,
    /// Jobs the hooks as sent would give a runner (their pending hook came before any finish)
    /// that are not in `expected_*`: their pending hook was lost (5xx, or the drainer's
    /// dead-letter queue) or reached the bus late (a drain retried after the finish went
    /// through). Each must be in `lost_jobs` or `delayed_jobs`: the reconciler's to provision.
    pub missed_jobs: BTreeSet<String>,
    /// What happened at the intake (webhook, fallback queue, intake drainer).
    pub intake: IntakeCounts,
    /// Delivery ids the webhook kept on the fallback queue (answered 202 `... queued`).
    pub queued_deliveries: BTreeSet<String>,
    /// Delivery ids the drainer's dead-letter queue got (10 receives failed).
    pub dead_lettered_deliveries: BTreeSet<String>,
    /// Per delivery id: job events of it that reached the bus (and so the router).
    pub events_per_delivery: BTreeMap<String, u32>,
    /// Per delivery id: each PutEvents of its job event, by the webhook or the drainer.
    pub puts: PutLog,
    /// Jobs with a hook lost: answered 5xx, or filed in the drainer's dead-letter queue.
    pub lost_jobs: BTreeSet<String>,
    /// Jobs with a queued hook the drainer failed at least once (forwarded in a later round).
    pub delayed_jobs: BTreeSet<String>,
    /// Per job: `launched` answers from ec2-provision.
    pub launches: BTreeMap<String, u32>,
    /// Per job: instances EC2 holds for it that got a runner, in any state (the exactly-once
    /// check: a retried step that launched before failing answers `already_provisioned`).
    pub instances_per_job: BTreeMap<String, u32>,
    /// Instances launched by a step that failed before giving them a runner, and removed by it.
    pub instances_without_runner: u32,
    /// `already_provisioned` answers: a retry or a repeated start found the job's runner.
    pub already_provisioned: u32,
    pub shell_invocations: BTreeMap<String, u32>,
    pub provision_failures: Vec<String>,
    pub hook_to_launch_ms: Vec<u64>,
    pub platform_retries: u64,
    pub faults_injected: usize,
    pub live_instances_after_reaper: usize,
    pub token_parameters_after_reaper: usize,
    pub gitlab_runners_after_reaper: usize,
    pub reaped: usize,
    /// Teardown steps and reaper passes: how many ran, how many did nothing because EC2
    /// runners are not configured, and which failed (a failed teardown ends the workflow in
    /// TeardownFailed; a failed pass is a failing scheduled invocation).
    pub steps: StepCounts,
    pub peak_rss_kib: u64,
    /// Wall time spent per stage, summed over workers.
    pub stage_time: BTreeMap<&'static str, Duration>,
}

impl ChainReport {
    pub fn events_per_second(&self) -> f64 {
        self.hooks as f64 / self.elapsed.as_secs_f64()
    }

    pub fn latency_percentile(&self, p: f64) -> u64 {
        let mut v = self.hook_to_launch_ms.clone();
        v.sort_unstable();
        if v.is_empty() {
            return 0;
        }
        v[((v.len() - 1) as f64 * p).round() as usize]
    }

    pub fn summary(&self) -> String {
        format!(
            "{} hooks in {:.1} s = {:.1} hooks/s (time per stage: {:?}); intake: {}; jobs: {} EC2 and {} LAMBDA to run, {} missed (lost or late hooks: the reconciler's); launches {} (expected {}; instances with a runner in EC2 {}, without {}; already provisioned {}), shell-runner invocations {} (expected {}); hook-to-launch p50 {} ms, p99 {} ms; platform retries {}; faults injected {}; reaped {}; left after the reaper: {} instances, {} token parameters, {} GitLab runners; peak RSS {} MiB",
            self.hooks,
            self.elapsed.as_secs_f64(),
            self.events_per_second(),
            self.stage_time,
            self.intake,
            self.expected_ec2.len(),
            self.expected_lambda.len(),
            self.missed_jobs.len(),
            self.launches.values().sum::<u32>(),
            self.expected_ec2.len(),
            self.instances_per_job.values().sum::<u32>(),
            self.instances_without_runner,
            self.already_provisioned,
            self.shell_invocations.values().sum::<u32>(),
            self.expected_lambda.len(),
            self.latency_percentile(0.5),
            self.latency_percentile(0.99),
            self.platform_retries,
            self.faults_injected,
            self.reaped,
            self.live_instances_after_reaper,
            self.token_parameters_after_reaper,
            self.gitlab_runners_after_reaper,
            self.peak_rss_kib / 1024,
        )
    }
}

/// The intake, counted the way GitLab and SQS see it. GitLab sends each hook once and does not
/// resend one answered 5xx: a 5xx is a lost hook (the reconciler's, which lists GitLab's
/// pending jobs). A 202 `accepted and queued` (or `not usable, queued`) put nothing on the bus:
/// the hook is on the fallback queue until the intake drainer forwards it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IntakeCounts {
    /// Hooks sent to the webhook, each once.
    pub hooks_sent: u64,
    /// Answered 2xx: accepted, queued, duplicate (also a concurrent one), ignored, dead letter.
    pub answered_2xx: u64,
    /// Of those, kept on the fallback queue (the table or the bus failed).
    pub queued: u64,
    /// Queued hooks the drainer was done with (its batch response did not list them), deleted
    /// from the queue as the event source mapping deletes them.
    pub drained: u64,
    /// Receives of a queued hook the drainer reported failed: left on the queue, handed out
    /// again in a later round.
    pub drain_retries: u64,
    /// Queued hooks moved to the drainer's dead-letter queue after 10 failed receives.
    pub drainer_dead_letters: u64,
    /// Answered 5xx: lost.
    pub lost: u64,
    /// Answered 4xx: never, for the chain's authentic hooks.
    pub rejected: u64,
}

impl std::fmt::Display for IntakeCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} hooks sent, {} answered 2xx ({} queued via the fallback queue), {} drained ({} drain retries, {} drainer dead letters), {} lost (5xx), {} rejected (4xx)",
            self.hooks_sent,
            self.answered_2xx,
            self.queued,
            self.drained,
            self.drain_retries,
            self.drainer_dead_letters,
            self.lost,
            self.rejected
        )
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepCounts {
    pub teardowns: u32,
    pub teardowns_skipped: u32,
    pub teardown_failures: Vec<String>,
    pub reaper_passes: u32,
    pub reaper_passes_skipped: u32,
    pub reaper_failures: Vec<String>,
}

impl StepCounts {
    pub fn failed(&self) -> bool {
        !self.teardown_failures.is_empty() || !self.reaper_failures.is_empty()
    }
}

impl std::fmt::Display for StepCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ec2-teardown: {} ran ({} with nothing to do: EC2 not configured), {} failed; reaper: {} passes ({} with nothing to do), {} failed",
            self.teardowns,
            self.teardowns_skipped,
            self.teardown_failures.len(),
            self.reaper_passes,
            self.reaper_passes_skipped,
            self.reaper_failures.len()
        )?;
        for failure in self.teardown_failures.iter().chain(&self.reaper_failures) {
            write!(f, "\n  failed: {failure}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leftovers {
    pub instances: usize,
    pub token_parameters: usize,
    pub gitlab_runners: usize,
}

impl Leftovers {
    pub fn is_empty(&self) -> bool {
        self.instances + self.token_parameters + self.gitlab_runners == 0
    }
}

impl std::fmt::Display for Leftovers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} instances running, {} token parameters, {} GitLab runners",
            self.instances, self.token_parameters, self.gitlab_runners
        )
    }
}

/// Peak resident set of this process (`VmHWM`), KiB.
pub fn peak_rss_kib() -> u64 {
    crate::lambda_process::memory_of(std::process::id()).peak_rss_kib
}

/// The API Gateway request GitLab's delivery of `body` becomes, with the chain's token.
pub fn hook_request(
    delivery_id: &str,
    body: &str,
) -> aws_lambda_events::apigw::ApiGatewayV2httpRequest {
    api_request(
        &[
            ("content-type", "application/json"),
            ("x-gitlab-event", "Job Hook"),
            ("x-gitlab-token", WEBHOOK_TOKEN),
            ("idempotency-key", delivery_id),
        ],
        body,
    )
}

/// RecordRoute, the provision definition's DynamoDB task after MapJob: the route on the
/// job's item, where the teardown workflow's LookUpJob reads it.
pub fn record_route(
    dynamo: &aws_sdk_dynamodb::Client,
    jobs_table: &str,
    job_key: &str,
    kind: ExecutorKind,
    matched: &str,
) -> aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder {
    dynamo
        .update_item()
        .table_name(jobs_table)
        .key("job_key", AttributeValue::S(job_key.into()))
        .update_expression("SET route_type = :t, route_matched = :m")
        .expression_attribute_values(":t", AttributeValue::S(kind.to_string()))
        .expression_attribute_values(":m", AttributeValue::S(matched.into()))
}

/// The job hook GitLab would send (a real GitLab 18 payload with this job's fields).
pub fn hook_body(event: &JobEvent) -> String {
    let mut hook: serde_json::Value =
        serde_json::from_str(&fixture("gitlab-docs-18.x.json")).unwrap();
    hook["build_id"] = event.job_id.into();
    hook["build_name"] = event.job_name.clone().into();
    hook["build_status"] = event.status.as_str().into();
    hook["project_id"] = event.project_id.into();
    hook["project"]["id"] = event.project_id.into();
    hook["pipeline_id"] = event.pipeline_id.unwrap_or(1).into();
    hook["runner"] = match &event.runner {
        Some(r) => serde_json::json!({"id": r.id, "description": "runner", "active": true,
                                      "is_shared": false, "tags": r.tags}),
        None => serde_json::Value::Null,
    };
    hook.to_string()
}

/// The hooks of a run: each job's pending and finished hooks delivered 1-5 times, shuffled;
/// some jobs' finished hooks lost. `docker-build` jobs go to EC2 (the default route),
/// `unit-test` jobs to the shell runner.
pub fn hooks_of(o: &ChainOptions) -> Vec<JobEvent> {
    let mut rng = XorShift(o.seed ^ 0xA5A5);
    let lost: BTreeSet<u64> = (1..=o.jobs)
        .filter(|_| (rng.next_u64() % 100) < o.lost_finish_percent)
        .collect();
    let project = 7000 + o.seed;
    redelivered_job_events(o.seed, project, o.jobs, false)
        .into_iter()
        .filter(|e| !(e.status.is_finished() && lost.contains(&e.job_id)))
        .map(|mut e| {
            e.job_name = if e.job_id % 100 < o.ec2_percent {
                "docker-build".into()
            } else {
                "unit-test".into()
            };
            e
        })
        .collect()
}

/// The jobs a sequential run over `events` must give a runner (their pending event comes
/// before any finish), with their job names: table key -> job name.
pub fn expected_jobs(events: &[JobEvent]) -> BTreeMap<String, String> {
    let expected = expected_provisions(events);
    events
        .iter()
        .filter(|e| expected.contains(&JobKey::of(e).execution_name(Workflow::Provision)))
        .map(|e| (JobKey::of(e).table_key(), e.job_name.clone()))
        .collect()
}

/// The mapping table with the chain's one rule: `unit-test` jobs run in the shell runner.
pub async fn create_mappings(sdk: &SdkConfig) -> String {
    let mappings = create_table(sdk, "mappings", "pk", Some("sk")).await;
    aws_sdk_dynamodb::Client::new(sdk)
        .put_item()
        .table_name(&mappings)
        .item("pk", AttributeValue::S("job#unit-test".into()))
        .item("sk", AttributeValue::S("tags#".into()))
        .item("type", AttributeValue::S("LAMBDA".into()))
        .item("arn", AttributeValue::S(SHELL_RUNNER_ARN.into()))
        .send()
        .await
        .unwrap();
    mappings
}

/// The provision and teardown state machines, for the router to start (moto cannot run our
/// functions from them; the driver runs their steps): (provision ARN, teardown ARN).
pub async fn create_workflows(sdk: &SdkConfig) -> (String, String) {
    let definition = r#"{"StartAt":"Run","States":{"Run":{"Type":"Succeed"}}}"#;
    (
        crate::create_state_machine(sdk, "provision", definition).await,
        crate::create_state_machine(sdk, "teardown", definition).await,
    )
}

/// GitLab's `runner` of a finished job: the runner launched for it if it got one (our
/// per-job runners take their own job here), the shared shell runner for LAMBDA jobs that ran
/// there (`on_shell`), none otherwise (finished before any runner took it).
pub async fn runner_that_ran(
    fleet: &FleetStack,
    on_shell: bool,
    event: &JobEvent,
) -> Option<ephemeral_core::RunnerRef> {
    let id = match fleet.job_item(event).await.get("launched_runner_id") {
        Some(AttributeValue::N(id)) => id.parse().ok(),
        _ if on_shell => Some(SHELL_RUNNER_ID),
        _ => None,
    };
    // GitLab's own record, which teardown confirms the finished hook with.
    fleet.gitlab_job(event, event.status.clone(), id);
    let id = id?;
    Some(ephemeral_core::RunnerRef {
        id,
        description: None,
        tags: vec![],
    })
}

/// The template's IntakeFallbackQueue: SQS hands a message the drainer failed out again after
/// this visibility timeout, and files it in the dead-letter queue after this many receives.
pub const FALLBACK_VISIBILITY_TIMEOUT_S: u64 = 180;
pub const FALLBACK_MAX_RECEIVES: u32 = 10;

/// A webhook reply's body text.
pub fn reply_text(reply: &aws_lambda_events::apigw::ApiGatewayV2httpResponse) -> &str {
    match &reply.body {
        Some(aws_lambda_events::encodings::Body::Text(text)) => text,
        _ => "",
    }
}

/// Whether a webhook reply says the hook went to the fallback queue (and nothing to the bus).
pub fn reply_says_queued(status: i64, body: &str) -> bool {
    status == 202
        && (body.starts_with("accepted and queued") || body.starts_with("not usable, queued"))
}

/// The intake drainer's configuration as the template sets it (IntakeDrainerFunction):
/// the webhook's bus and deliveries table, the stack's default `DedupTtlSeconds`.
pub fn drainer_env(stack: &WebhookStack) -> Vec<(String, String)> {
    vec![
        ("EVENT_BUS_NAME".into(), stack.bus.clone()),
        ("DEDUP_TABLE_NAME".into(), stack.table.clone()),
        ("DEDUP_TTL_SECONDS".into(), "259200".into()),
    ]
}

pub fn drainer_config(stack: &WebhookStack) -> DrainerConfig {
    let env = drainer_env(stack);
    DrainerConfig::from_lookup(|k| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()))
        .expect("the drainer's environment")
}

/// Gives the stack's fallback queue what the template gives IntakeFallbackQueue: its
/// visibility timeout and a redrive policy (10 receives) to a dead-letter queue of its own.
/// Answers the dead-letter queue's URL.
pub async fn add_fallback_redrive(sdk: &SdkConfig, stack: &WebhookStack) -> String {
    let sqs = aws_sdk_sqs::Client::new(sdk);
    let dead_letters = sqs
        .create_queue()
        .queue_name(crate::unique("intake-fallback-dlq"))
        .send()
        .await
        .unwrap()
        .queue_url
        .unwrap();
    let arn = sqs
        .get_queue_attributes()
        .queue_url(&dead_letters)
        .attribute_names(aws_sdk_sqs::types::QueueAttributeName::QueueArn)
        .send()
        .await
        .unwrap()
        .attributes
        .unwrap()
        .remove(&aws_sdk_sqs::types::QueueAttributeName::QueueArn)
        .unwrap();
    let redrive = serde_json::json!({"deadLetterTargetArn": arn,
                                     "maxReceiveCount": FALLBACK_MAX_RECEIVES.to_string()});
    sqs.set_queue_attributes()
        .queue_url(&stack.fallback_queue_url)
        .attributes(
            aws_sdk_sqs::types::QueueAttributeName::RedrivePolicy,
            redrive.to_string(),
        )
        .attributes(
            aws_sdk_sqs::types::QueueAttributeName::VisibilityTimeout,
            FALLBACK_VISIBILITY_TIMEOUT_S.to_string(),
        )
        .send()
        .await
        .unwrap();
    dead_letters
}

/// Receives up to 10 messages of `queue_url` with their system attributes (the receive count
/// among them), held invisible for `hold_s`.
pub async fn receive_batch(
    sqs: &aws_sdk_sqs::Client,
    queue_url: &str,
    hold_s: i32,
) -> Vec<aws_sdk_sqs::types::Message> {
    sqs.receive_message()
        .queue_url(queue_url)
        .max_number_of_messages(10)
        .visibility_timeout(hold_s)
        .message_system_attribute_names(aws_sdk_sqs::types::MessageSystemAttributeName::All)
        .send()
        .await
        .unwrap()
        .messages
        .unwrap_or_default()
}

/// The SQS event Lambda's event source mapping makes of `messages` of `queue_url`.
pub fn sqs_event(queue_url: &str, messages: &[aws_sdk_sqs::types::Message]) -> SqsEvent {
    let queue_name = queue_url.rsplit('/').next().unwrap_or_default();
    let records: Vec<serde_json::Value> = messages
        .iter()
        .map(|m| {
            let attributes: serde_json::Map<String, serde_json::Value> = m
                .attributes()
                .into_iter()
                .flatten()
                .map(|(k, v)| (k.as_str().to_owned(), v.clone().into()))
                .collect();
            serde_json::json!({
                "messageId": m.message_id(), "receiptHandle": m.receipt_handle(),
                "body": m.body(), "attributes": attributes, "messageAttributes": {},
                "md5OfBody": m.md5_of_body(), "eventSource": "aws:sqs", "awsRegion": "us-east-1",
                "eventSourceARN": format!("arn:aws:sqs:us-east-1:123456789012:{queue_name}"),
            })
        })
        .collect();
    serde_json::from_value(serde_json::json!({ "Records": records })).unwrap()
}

/// SQS's count of receives of `message`, this one included.
pub fn receive_count(message: &aws_sdk_sqs::types::Message) -> u32 {
    message
        .attributes()
        .and_then(|a| {
            a.get(&aws_sdk_sqs::types::MessageSystemAttributeName::ApproximateReceiveCount)
        })
        .and_then(|n| n.parse().ok())
        .unwrap_or(1)
}

/// (job key, delivery id) of a fallback queue message, for the trace.
fn queued_ids(body: &str) -> (String, String) {
    match QueuedHook::from_message(body) {
        Ok(hook) => (
            hook.job_event()
                .map_or_else(|| "(dead letter)".into(), |e| JobKey::of(e).table_key()),
            hook.delivery_id().to_owned(),
        ),
        Err(_) => ("(unreadable)".into(), "?".into()),
    }
}

/// Every job event put on the bus, per delivery id: which function put it, and how the call
/// ended (an error that was a time-out may still have reached the bus).
pub type PutLog = BTreeMap<String, Vec<(&'static str, Result<(), String>)>>;

/// A function's bus, watched: each job event it puts is logged in a [`PutLog`].
pub struct WatchedSink<S> {
    pub inner: S,
    pub function: &'static str,
    pub log: std::sync::Arc<Mutex<PutLog>>,
}

impl<S: EventSink + Send + Sync> EventSink for WatchedSink<S> {
    async fn put_job_event(&self, event: &JobEvent) -> Result<(), PortError> {
        let result = self.inner.put_job_event(event).await;
        self.log
            .lock()
            .unwrap()
            .entry(event.delivery_id.clone())
            .or_default()
            .push((self.function, result.clone().map_err(|e| e.0)));
        result
    }

    async fn put_dead_letter(&self, letter: &DeadLetter) -> Result<(), PortError> {
        self.inner.put_dead_letter(letter).await
    }
}

type WatchedWebhook = Webhook<DynamoLedger, WatchedSink<EventBridgeSink>, SqsFallback, SsmSecrets>;
type WatchedDrainer = Drainer<DynamoLedger, WatchedSink<EventBridgeSink>>;

struct Worker {
    stack: WebhookStack,
    webhook: WatchedWebhook,
    drainer: WatchedDrainer,
    /// The fallback queue's dead-letter queue.
    dead_letters_url: String,
    /// Messages the drainer failed in the last round: handed out again before the next hook.
    waiting: AtomicUsize,
}

/// Everything one run needs, built once.
pub struct Chain {
    options: ChainOptions,
    /// For the driver's own reads (SQS, checks): never faulted.
    sdk: SdkConfig,
    fleet_stack: FleetStack,
    workers: Vec<Worker>,
    router: Router<DynamoJobStore, StepFunctions>,
    mapper: Mapper<DynamoMappingRules, GitLabJobs>,
    fleet: Functions,
    /// The fleet functions' environment (as the template gives it) that the reaper starts from.
    fleet_env: Vec<(String, String)>,
    functions_dynamo: aws_sdk_dynamodb::Client,
    /// GitLab's jobs API the mapper asks; served while the chain lives.
    _jobs_api: crate::GitLabStandIn,
    proxy: Option<FaultProxy>,
    /// The intake outages in progress, read by the proxy.
    refusals: Refusals,
    /// What the webhook and the drainer put on the bus.
    puts: std::sync::Arc<Mutex<PutLog>>,
    report: Mutex<ChainReport>,
    first_pending: Mutex<HashMap<String, Instant>>,
    /// Every job event handed to the router, in order (a job's events stay on one worker).
    routed: Mutex<Vec<JobEvent>>,
    /// The workflow executions run so far, by name.
    executions_run: Mutex<BTreeSet<String>>,
    platform_retries: AtomicU64,
    stage_time: Mutex<BTreeMap<&'static str, Duration>>,
    started: Instant,
    /// Per job: what happened, when (for the local run's printout).
    trace: Mutex<BTreeMap<String, Vec<(Duration, String)>>>,
    counts: Mutex<StepCounts>,
    /// Instance id -> job key, to name the job of a reaped instance.
    instances: Mutex<HashMap<String, String>>,
}

/// The fleet functions as `env` configures them (with or without EC2 runners), with the
/// stack's fast GitLab retries.
async fn fleet_functions(
    stack: &FleetStack,
    env: &[(String, String)],
    sdk: &SdkConfig,
) -> Functions {
    let vars: HashMap<_, _> = env.iter().cloned().collect();
    let mode = fleet::shell_runner_mode(|k| vars.get(k).cloned()).unwrap();
    let functions = match FleetStack::setup_of(env) {
        FleetSetup::Ec2(config) => stack.functions_at(&config, sdk).await,
        FleetSetup::NotConfigured => Functions::not_configured(),
    };
    functions.with_shell_mode(mode)
}

/// An intake outage a hook is sent in (see [`ChainOptions::intake_outage_percent`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outage {
    /// The bus refuses the webhook: the hook is queued, and drained at once.
    Bus,
    /// The same, and the hook's first two drains too: retried, then forwarded.
    BusForTwoDrains,
    /// The same, and every drain: the drainer's dead-letter queue after 10 receives.
    BusForever,
    /// The bus and the fallback queue refuse the webhook: 503, lost.
    BusAndQueue,
}

/// What the fault proxy refuses right now, per delivery id (found in the request's body): the
/// bus's PutEvents while present, SendMessage to the fallback queue when `queue`; `drains`
/// counts the drains still to refuse (`u32::MAX`: all).
#[derive(Debug, Clone, Copy)]
struct Refusal {
    queue: bool,
    drains: u32,
}

type Refusals = std::sync::Arc<Mutex<HashMap<String, Refusal>>>;

/// The proxy's answer to a PutEvents or SendMessage that concerns a delivery in an outage: an
/// error the SDK does not retry, as from a bus or queue that does not exist.
fn refuse(refusals: &Refusals, request: &crate::loopback::Request) -> Option<(u16, String)> {
    let target = request.header("x-amz-target").unwrap_or_default();
    let (bus, queue) = (
        target == "AWSEvents.PutEvents",
        target == "AmazonSQS.SendMessage",
    );
    if !bus && !queue {
        return None;
    }
    let body = request.body_text();
    let refusals = refusals.lock().unwrap();
    let refused = refusals.iter().any(|(id, r)| {
        (bus || r.queue)
            && (body.contains(&format!("{id}\\\"")) || body.contains(&format!("{id}\"")))
    });
    refused.then(|| {
        if bus {
            (
                400,
                r#"{"__type":"ResourceNotFoundException","message":"Event bus does not exist (fault proxy)."}"#.into(),
            )
        } else {
            (
                400,
                r#"{"__type":"com.amazonaws.sqs#QueueDoesNotExist","message":"The specified queue does not exist (fault proxy)."}"#.into(),
            )
        }
    })
}

/// A throttling error in the protocol of the request (JSON services, or EC2's query API).
fn throttle(request: &crate::loopback::Request) -> (u16, String) {
    let json = request
        .header("content-type")
        .is_some_and(|t| t.contains("json"));
    if json {
        (
            400,
            r#"{"__type":"ThrottlingException","message":"Rate exceeded (fault proxy)"}"#.into(),
        )
    } else {
        (
            503,
            crate::loopback::ec2_error("RequestLimitExceeded", "Request limit exceeded."),
        )
    }
}

impl Chain {
    fn note(&self, job_key: &str, what: String) {
        self.trace
            .lock()
            .unwrap()
            .entry(job_key.to_owned())
            .or_default()
            .push((self.started.elapsed(), what));
    }

    /// Per job, in job order: (elapsed since the chain was built, what happened).
    pub fn trace(&self) -> BTreeMap<String, Vec<(Duration, String)>> {
        self.trace.lock().unwrap().clone()
    }

    /// A workflow task with the retries its definition declares.
    async fn retried<T, E, F, Fut>(&self, task: &str, attempts: u32, mut call: F) -> T
    where
        E: std::fmt::Debug,
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        for attempt in 1.. {
            match call().await {
                Ok(v) => return v,
                Err(e) => {
                    assert!(attempt < attempts, "{task} failed {attempts} times: {e:?}");
                    self.platform_retries.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
        unreachable!()
    }

    /// The intake outage `delivery_id` is sent in, if any: deterministic for the seed.
    fn outage_of(&self, delivery_id: &str) -> Option<Outage> {
        let percent = self.options.intake_outage_percent;
        if percent == 0 {
            return None;
        }
        let hash = delivery_id
            .bytes()
            .fold(self.options.seed ^ 0xCBF2_9CE4_8422_2325, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x100_0000_01B3)
            });
        let mut rng = XorShift(hash | 1);
        if rng.next_u64() % 100 >= percent {
            return None;
        }
        Some(match rng.next_u64() % 8 {
            0 | 1 => Outage::BusAndQueue,
            2 | 3 => Outage::BusForTwoDrains,
            4 => Outage::BusForever,
            _ => Outage::Bus,
        })
    }

    /// A drain of these deliveries happened: one fewer to refuse.
    fn drained_in_outage(&self, delivery_ids: &[String]) {
        let mut refusals = self.refusals.lock().unwrap();
        for id in delivery_ids {
            if let Some(r) = refusals.get_mut(id) {
                if r.drains != u32::MAX {
                    r.drains = r.drains.saturating_sub(1);
                }
                if r.drains == 0 {
                    refusals.remove(id);
                }
            }
        }
    }

    fn timed(&self, stage: &'static str, since: Instant) {
        *self.stage_time.lock().unwrap().entry(stage).or_default() += since.elapsed();
    }

    pub async fn new(options: ChainOptions) -> Self {
        // A moto server of its own: moto is the bottleneck and uses one core, so two chains
        // (the tests run in parallel) each get one instead of sharing one.
        let endpoint = crate::start_private_moto();
        let sdk = sdk_config_at(&endpoint);
        let fleet_stack = fleet_stack_in(sdk.clone()).await;
        let refusals = Refusals::default();
        let faulty = options.throttle_percent > 0 || options.intake_outage_percent > 0;
        let proxy = faulty.then(|| {
            let percent = options.throttle_percent;
            let counter = AtomicU64::new(0);
            let refusals = refusals.clone();
            FaultProxy::start(
                &endpoint,
                Box::new(move |request| {
                    if let Some(refused) = refuse(&refusals, request) {
                        return Some(refused);
                    }
                    // Deterministic spread: the n-th call fails when its hash falls in the share.
                    let n = counter.fetch_add(1, Ordering::SeqCst);
                    let roll = XorShift(n.wrapping_mul(0x9E37_79B9) | 1).next_u64() % 100;
                    (roll < percent).then(|| throttle(request))
                }),
            )
        });
        let functions_sdk = match &proxy {
            Some(p) => sdk.to_builder().endpoint_url(&p.url).build(),
            None => sdk.clone(),
        };
        fleet_stack.gitlab.state().failure_percent = options.gitlab_failure_percent;
        let mappings = create_mappings(&sdk).await;
        let (provision_arn, teardown_arn) = create_workflows(&sdk).await;
        let mut workers = Vec::new();
        let puts = std::sync::Arc::<Mutex<PutLog>>::default();
        for _ in 0..options.workers {
            let stack = create_webhook_stack(
                &sdk,
                WEBHOOK_TOKEN,
                "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            )
            .await;
            let Webhook {
                policy,
                dedup,
                ledger,
                sink,
                fallback,
                secrets,
            } = AwsWebhook::from_config(crate::webhook_config(&stack, "token"), &functions_sdk);
            let webhook = Webhook {
                policy,
                dedup,
                ledger,
                sink: WatchedSink {
                    inner: sink,
                    function: "webhook",
                    log: puts.clone(),
                },
                fallback,
                secrets,
            };
            // The drainer, like every function, talks to AWS through the fault proxy.
            let Drainer {
                ledger,
                sink,
                dedup,
            } = AwsDrainer::from_config(drainer_config(&stack), &functions_sdk);
            let drainer = Drainer {
                ledger,
                sink: WatchedSink {
                    inner: sink,
                    function: "intake-drainer",
                    log: puts.clone(),
                },
                dedup,
            };
            let dead_letters_url = add_fallback_redrive(&sdk, &stack).await;
            workers.push(Worker {
                stack,
                webhook,
                drainer,
                dead_letters_url,
                waiting: AtomicUsize::new(0),
            });
        }
        let functions_dynamo = aws_sdk_dynamodb::Client::new(&functions_sdk);
        let router = Router {
            store: DynamoJobStore {
                client: functions_dynamo.clone(),
                table: fleet_stack.jobs_table.clone(),
                ttl_seconds: 3600,
            },
            workflows: StepFunctions {
                client: aws_sdk_sfn::Client::new(&functions_sdk),
                provision_arn,
                teardown_arn,
            },
            provision_on: Default::default(),
        };
        // The mapper confirms each job with GitLab (a stand-in with every job pending,
        // no tags) using a read_api token from SSM (here the fleet's token parameter).
        let jobs_api =
            crate::GitLabStandIn::start(crate::fleet_stack::API_TOKEN, vec![], vec![]).await;
        jobs_api.answer_every_job();
        let mapper = Mapper {
            rules: DynamoMappingRules {
                client: functions_dynamo.clone(),
                table: mappings,
            },
            gitlab: GitLabJobs::new(
                Some(jobs_api.url.clone()),
                Some(TokenSource::new(
                    aws_sdk_ssm::Client::new(&functions_sdk),
                    fleet_stack.api_token_parameter.clone(),
                )),
            ),
            default_route: if options.lambda_only {
                Executor::Lambda {
                    arn: SHELL_RUNNER_ARN.into(),
                }
            } else {
                Executor::Ec2(Default::default())
            },
        };
        let fleet_env = if options.lambda_only {
            fleet_stack.lambda_only_env()
        } else {
            fleet_stack.env(&[])
        };
        let fleet = fleet_functions(&fleet_stack, &fleet_env, &functions_sdk).await;
        Self {
            options,
            sdk,
            fleet_stack,
            workers,
            router,
            mapper,
            fleet,
            fleet_env,
            functions_dynamo,
            _jobs_api: jobs_api,
            proxy,
            refusals,
            puts,
            report: Mutex::default(),
            first_pending: Mutex::default(),
            routed: Mutex::default(),
            executions_run: Mutex::default(),
            platform_retries: AtomicU64::new(0),
            stage_time: Mutex::default(),
            started: Instant::now(),
            trace: Mutex::default(),
            counts: Mutex::default(),
            instances: Mutex::default(),
        }
    }

    pub fn hooks(&self) -> Vec<JobEvent> {
        hooks_of(&self.options)
    }

    pub async fn run(&self) -> ChainReport {
        let hooks = self.hooks();
        // The jobs the hooks as sent would give a runner, were none lost or late.
        let as_sent = expected_jobs(&hooks);
        self.report.lock().unwrap().hooks = hooks.len();
        // A job's hooks go to one worker, in order (GitLab sends a job's hooks in order of
        // its transitions; redeliveries and the shuffle reorder them, as in the field).
        let mut shards: Vec<Vec<JobEvent>> = vec![Vec::new(); self.workers.len()];
        for e in hooks {
            shards[(e.job_id as usize) % self.workers.len()].push(e);
        }
        let started = Instant::now();
        let runs = shards
            .into_iter()
            .enumerate()
            .map(|(i, shard)| self.deliver_all(i, shard));
        futures_util::future::join_all(runs).await;
        let elapsed = started.elapsed();
        self.reap().await;
        let mut report = std::mem::take(&mut *self.report.lock().unwrap());
        report.elapsed = elapsed;
        // What must have a runner follows from the events that reached the router, in the
        // order they did; what the hooks as sent would have given and did not is accounted
        // for by lost and late hooks (checked by the tests).
        let routed = expected_jobs(&self.routed.lock().unwrap());
        for (key, name) in &routed {
            let set = if name == "docker-build" && !self.options.lambda_only {
                &mut report.expected_ec2
            } else {
                &mut report.expected_lambda
            };
            set.insert(key.clone());
        }
        report.puts = self.puts.lock().unwrap().clone();
        report.missed_jobs = as_sent
            .keys()
            .filter(|k| !routed.contains_key(*k))
            .cloned()
            .collect();
        report.platform_retries = self.platform_retries.load(Ordering::SeqCst);
        report.faults_injected = self.proxy.as_ref().map_or(0, FaultProxy::fault_count);
        report.live_instances_after_reaper = self.fleet_stack.live_instances().await.len();
        report.token_parameters_after_reaper = self.fleet_stack.token_parameters().await.len();
        report.gitlab_runners_after_reaper = self.fleet_stack.gitlab.state().runners.len();
        (report.instances_per_job, report.instances_without_runner) =
            self.fleet_stack.runner_instances_per_job().await;
        report.peak_rss_kib = peak_rss_kib();
        report.steps = self.steps();
        report.stage_time = std::mem::take(&mut *self.stage_time.lock().unwrap());
        report
    }

    async fn deliver_all(&self, worker: usize, hooks: Vec<JobEvent>) {
        for hook in hooks {
            self.deliver(worker, hook).await;
        }
        self.drain_fallback_to_the_end(&self.workers[worker]).await;
    }

    /// One hook, the way GitLab sends it (once: never again after a 5xx), then everything it
    /// causes.
    async fn deliver(&self, worker: usize, mut event: JobEvent) {
        if event.status.is_finished() {
            event.runner = self.runner_that_ran(&event).await;
        }
        self.deliver_body(worker, &event.delivery_id, &hook_body(&event))
            .await;
    }

    /// Replays Job Hook bodies as given (delivery id, body), in order, on one worker.
    pub async fn replay(&self, hooks: &[(String, String)]) {
        for (delivery_id, body) in hooks {
            self.deliver_body(0, delivery_id, body).await;
        }
        self.drain_fallback_to_the_end(&self.workers[0]).await;
        self.reap().await;
    }

    /// What happened at the intake so far.
    pub fn intake(&self) -> IntakeCounts {
        self.report.lock().unwrap().intake
    }

    async fn deliver_body(&self, worker: usize, delivery_id: &str, body: &str) {
        let hook: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
        let job_key = JobKey {
            project_id: hook["project_id"].as_u64().unwrap_or(0),
            job_id: hook["build_id"].as_u64().unwrap_or(0),
        }
        .table_key();
        let status = hook["build_status"].as_str().unwrap_or("?").to_owned();
        if status == "pending" {
            self.first_pending
                .lock()
                .unwrap()
                .entry(job_key.clone())
                .or_insert_with(Instant::now);
        }
        let w = &self.workers[worker];
        // SQS hands out again what the drainer failed last time (a later round).
        if w.waiting.load(Ordering::SeqCst) > 0 {
            self.drain_fallback(w).await;
        }
        let outage = self.outage_of(delivery_id);
        if let Some(outage) = outage {
            let drains = match outage {
                Outage::BusForTwoDrains => 2,
                Outage::BusForever => u32::MAX,
                Outage::Bus | Outage::BusAndQueue => 0,
            };
            let queue = outage == Outage::BusAndQueue;
            self.refusals
                .lock()
                .unwrap()
                .insert(delivery_id.to_owned(), Refusal { queue, drains });
            self.note(
                &job_key,
                format!("intake outage for delivery {delivery_id}: {outage:?}"),
            );
        }
        let t = Instant::now();
        let reply = w.webhook.handle(hook_request(delivery_id, body)).await;
        self.timed("webhook", t);
        if outage.is_some() {
            let mut refusals = self.refusals.lock().unwrap();
            match refusals.get_mut(delivery_id) {
                Some(r) if r.drains > 0 => r.queue = false,
                _ => {
                    refusals.remove(delivery_id);
                }
            }
        }
        let (code, text) = (reply.status_code, reply_text(&reply));
        let queued = reply_says_queued(code, text);
        let fate = {
            let mut report = self.report.lock().unwrap();
            report.intake.hooks_sent += 1;
            match code {
                200..=299 => {
                    report.intake.answered_2xx += 1;
                    if queued {
                        report.intake.queued += 1;
                        report.queued_deliveries.insert(delivery_id.to_owned());
                    }
                    ""
                }
                500.. => {
                    report.intake.lost += 1;
                    report.lost_jobs.insert(job_key.clone());
                    " -- lost: GitLab does not resend it (the reconciler's)"
                }
                _ => {
                    report.intake.rejected += 1;
                    " -- rejected"
                }
            }
        };
        self.note(
            &job_key,
            format!("hook {status} (delivery {delivery_id}): webhook answered {code} {text}{fate}"),
        );
        if queued {
            // Nothing on the bus: the hook is on the fallback queue, whose event source hands
            // it to the drainer (at once here), which forwards it to the bus.
            self.drain_fallback(w).await;
        } else if code == 202 && text == "accepted" {
            // Exactly one event on the bus. A 200 (a duplicate, a concurrent one too) put
            // none, an ignored hook none, and a dead letter is not for the router.
            self.route_bus(w, 1).await;
        }
    }

    /// One round of the fallback queue's event source: batches of up to 10 messages to the
    /// drainer's handler until none is left visible; the messages its batch response does
    /// not list are deleted, the listed ones made visible again at the end of the round (SQS
    /// would after the visibility timeout) for a later round. Then what reached the bus is
    /// routed. Answers how many messages it received.
    async fn drain_fallback(&self, w: &Worker) -> usize {
        let sqs = aws_sdk_sqs::Client::new(&self.sdk);
        let queue = &w.stack.fallback_queue_url;
        let mut received = 0;
        let mut failed_handles = Vec::new();
        loop {
            // Held past the round, so that a failed message is not handed out twice in it.
            let messages = receive_batch(&sqs, queue, 600).await;
            if messages.is_empty() {
                break;
            }
            received += messages.len();
            // SQS hands a failed message out again a visibility timeout later: the drainer
            // sees the clock that far ahead for each earlier receive, so a claim a failed
            // webhook invocation left (60 s lease) is taken over on the next receive, as in
            // AWS, rather than failing all 10 receives within a second.
            let receives = messages.iter().map(receive_count).max().unwrap_or(1);
            let now =
                webhook::now_ms() + u64::from(receives - 1) * FALLBACK_VISIBILITY_TIMEOUT_S * 1000;
            let t = Instant::now();
            let response = w.drainer.handle_at(sqs_event(queue, &messages), now).await;
            self.timed("intake-drainer", t);
            let ids: Vec<String> = messages
                .iter()
                .map(|m| queued_ids(m.body().unwrap_or_default()).1)
                .collect();
            self.drained_in_outage(&ids);
            let failed: BTreeSet<&str> = response
                .batch_item_failures
                .iter()
                .map(|f| f.item_identifier.as_str())
                .collect();
            for m in &messages {
                let (job_key, delivery_id) = queued_ids(m.body().unwrap_or_default());
                let n = receive_count(m);
                if failed.contains(m.message_id().unwrap_or_default()) {
                    let mut report = self.report.lock().unwrap();
                    report.intake.drain_retries += 1;
                    report.delayed_jobs.insert(job_key.clone());
                    drop(report);
                    self.note(
                        &job_key,
                        format!("intake-drainer: delivery {delivery_id} not forwarded yet (receive {n} of {FALLBACK_MAX_RECEIVES}): left on the fallback queue"),
                    );
                    failed_handles.push(m.receipt_handle().unwrap_or_default().to_owned());
                } else {
                    sqs.delete_message()
                        .queue_url(queue)
                        .receipt_handle(m.receipt_handle().unwrap_or_default())
                        .send()
                        .await
                        .unwrap();
                    self.report.lock().unwrap().intake.drained += 1;
                    self.note(
                        &job_key,
                        format!("intake-drainer: delivery {delivery_id} drained from the fallback queue (receive {n})"),
                    );
                }
            }
            // The drainer published synchronously (moto hands an event to its rule's queue
            // within PutEvents): route whatever it put on the bus.
            self.route_bus(w, 0).await;
        }
        for handle in &failed_handles {
            sqs.change_message_visibility()
                .queue_url(queue)
                .receipt_handle(handle)
                .visibility_timeout(0)
                .send()
                .await
                .unwrap();
        }
        w.waiting.store(failed_handles.len(), Ordering::SeqCst);
        received
    }

    /// Rounds of the fallback queue until it is empty: what keeps failing goes to the
    /// dead-letter queue after 10 receives (moto applies the redrive policy on the next
    /// receive), and counts as lost.
    async fn drain_fallback_to_the_end(&self, w: &Worker) {
        while self.drain_fallback(w).await > 0 {}
        let sqs = aws_sdk_sqs::Client::new(&self.sdk);
        loop {
            let messages = receive_batch(&sqs, &w.dead_letters_url, 600).await;
            if messages.is_empty() {
                break;
            }
            for m in &messages {
                let (job_key, delivery_id) = queued_ids(m.body().unwrap_or_default());
                let mut report = self.report.lock().unwrap();
                report.intake.drainer_dead_letters += 1;
                report.lost_jobs.insert(job_key.clone());
                report.dead_lettered_deliveries.insert(delivery_id.clone());
                drop(report);
                self.note(
                    &job_key,
                    format!("intake-drainer: delivery {delivery_id} failed {FALLBACK_MAX_RECEIVES} receives: in the drainer's dead-letter queue -- lost until redriven (the reconciler's)"),
                );
            }
        }
    }

    async fn runner_that_ran(&self, event: &JobEvent) -> Option<ephemeral_core::RunnerRef> {
        let key = JobKey::of(event).table_key();
        let on_shell = self
            .report
            .lock()
            .unwrap()
            .shell_invocations
            .contains_key(&key);
        runner_that_ran(&self.fleet_stack, on_shell, event).await
    }

    /// Hands the events on the worker's bus to the router (Lambda retries each on an error),
    /// then runs the workflows it started: at least `expected` job events (waited for), and
    /// whatever else is there (moto's rule delivers within PutEvents, so "there" is "put").
    async fn route_bus(&self, w: &Worker, expected: usize) {
        let sqs = aws_sdk_sqs::Client::new(&self.sdk);
        let t = Instant::now();
        let mut envelopes = Vec::new();
        let mut job_events = 0;
        loop {
            let out = sqs
                .receive_message()
                .queue_url(&w.stack.observer_queue_url)
                .max_number_of_messages(10)
                .send()
                .await
                .unwrap();
            let got = out.messages().len();
            for m in out.messages() {
                sqs.delete_message()
                    .queue_url(&w.stack.observer_queue_url)
                    .receipt_handle(m.receipt_handle().unwrap())
                    .send()
                    .await
                    .unwrap();
                let envelope: EventBridgeEvent<serde_json::Value> =
                    serde_json::from_str(m.body().unwrap()).unwrap();
                job_events += usize::from(envelope.detail_type == "GitLab Job Event");
                envelopes.push(envelope);
            }
            if job_events >= expected && got < 10 {
                break;
            }
            if got == 0 {
                assert!(
                    t.elapsed() < Duration::from_secs(30),
                    "a forwarded hook's event never reached the bus's queue"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        self.timed("bus", t);
        for envelope in &envelopes {
            if envelope.detail_type == "GitLab Job Event" {
                self.route(envelope).await;
            }
        }
    }

    async fn route(&self, envelope: &EventBridgeEvent<serde_json::Value>) {
        if let Ok(event) = serde_json::from_value::<JobEvent>(envelope.detail.clone()) {
            *self
                .report
                .lock()
                .unwrap()
                .events_per_delivery
                .entry(event.delivery_id.clone())
                .or_default() += 1;
            self.routed.lock().unwrap().push(event);
        }
        let t = Instant::now();
        // Lambda's asynchronous invoke: the event, then up to two retries; the template
        // files a still failing event in the router's dead-letter queue (a loss here).
        let outcome = self
            .retried("router", 3, || {
                self.router.handle(envelope, fleet::now_ms())
            })
            .await;
        self.timed("router", t);
        let t = Instant::now();
        let event: JobEvent = serde_json::from_value(envelope.detail.clone()).unwrap();
        let job_key = JobKey::of(&event).table_key();
        let RouterOutcome::Started {
            workflow,
            started: Started::New,
            execution,
        } = outcome
        else {
            self.note(&job_key, format!("router: {outcome:?}"));
            return;
        };
        // Step Functions answers a start with the same name and input as one that runs with
        // that execution (the router then says New): one execution per name, run once. This
        // happens when one delivery reached the bus twice (a PutEvents that timed out after it
        // had gone through, then the drainer's).
        if !self
            .executions_run
            .lock()
            .unwrap()
            .insert(execution.clone())
        {
            self.note(
                &job_key,
                format!("router: started {execution} again: the same execution, not run twice"),
            );
            return;
        }
        self.note(&job_key, format!("router: started {execution}"));
        let input = WorkflowInput {
            job_key: JobKey::of(&event).table_key(),
            job: event,
        };
        match workflow {
            Workflow::Provision => self.provision_workflow(input).await,
            Workflow::Teardown => self.teardown_workflow(input).await,
        }
        self.timed(workflow.as_str(), t);
    }

    /// ProvisionLambdaRunner (retried like ProvisionEc2Runner), then CheckLambdaRunner: the
    /// runner to invoke the shell runner with, `None` when there is none (the job finished,
    /// or the step failed: recorded like a failed EC2 provision).
    async fn lambda_runner(&self, job_key: &str, state: &serde_json::Value) -> Option<RunnerGrant> {
        let input: ProvisionInput = serde_json::from_value(state.clone()).unwrap();
        let retries = crate::task_retries("provision.asl.json", "ProvisionLambdaRunner");
        for attempt in 1.. {
            match self.fleet.provision_step(&input, fleet::now_ms()).await {
                Ok(ProvisionOutput::Lambda(grant)) => {
                    self.note(
                        job_key,
                        format!("lambda runner: {}", serde_json::to_string(&grant).unwrap()),
                    );
                    return matches!(grant, RunnerGrant::PerJob { .. } | RunnerGrant::SharedToken)
                        .then_some(grant);
                }
                Ok(other) => panic!("a LAMBDA route answered {other:?}"),
                Err(e) if attempt < retries.attempts(&e.error_type().name()) => {
                    self.platform_retries.fetch_add(1, Ordering::SeqCst);
                }
                Err(e) => {
                    self.note(job_key, format!("lambda runner failed: {e}"));
                    self.report
                        .lock()
                        .unwrap()
                        .provision_failures
                        .push(format!("{job_key}: {e}"));
                    return None;
                }
            }
        }
        None
    }

    /// What the shell-runner invocation does with a per-job runner, short of running a job
    /// (that is process_chain's and lambda_runner_moto's): it takes the token from its
    /// parameter with the function's own adapter, and deletes its runner with that token.
    async fn invocation_takes_its_runner(&self, job_key: &str, grant: &RunnerGrant) {
        let RunnerGrant::PerJob {
            token_parameter, ..
        } = grant
        else {
            return;
        };
        let tokens = shell_runner::tokens::SsmRunnerTokens {
            ssm: self.fleet_stack.ssm.clone(),
        };
        let Some(token) = tokens.take(token_parameter).await.unwrap() else {
            panic!("{job_key}: the per-job token parameter {token_parameter} is missing");
        };
        let gitlab = ephemeral_gitlab::GitLabClient::new(
            &self.fleet_stack.gitlab.url,
            ephemeral_gitlab::RetryPolicy::default(),
        );
        gitlab.delete_own_runner(&token).await.unwrap();
    }

    /// `statemachine/provision.asl.json`: MapJob (retried), RecordRoute, then
    /// ProvisionLambdaRunner and the shell-runner invoke, or ProvisionEc2Runner (retried on
    /// the error types the definition names).
    async fn provision_workflow(&self, input: WorkflowInput) {
        let decision = self
            .retried(
                "MapJob",
                crate::task_retries("provision.asl.json", "MapJob")
                    .attempts(&TaskError::GitLabUnavailable.name()),
                || self.mapper.handle(&input),
            )
            .await;
        // RecordRoute: a Step Functions DynamoDB task, retried 5 times on throttling.
        let kind = decision.decision.executor.kind();
        let matched = decision.decision.matched.clone();
        self.retried("RecordRoute", 5, || {
            record_route(
                &self.functions_dynamo,
                &self.fleet_stack.jobs_table,
                &input.job_key,
                kind,
                &matched,
            )
            .send()
        })
        .await;
        self.note(
            &input.job_key,
            format!(
                "mapper: {} ({}: {})",
                decision.decision.executor.kind(),
                decision.decision.matched,
                decision.decision.reason
            ),
        );
        if let Executor::Lambda { arn } = &decision.decision.executor {
            let state = serde_json::json!({"job_key": input.job_key, "job": input.job,
                                           "mapped": {"decision": decision}});
            let Some(grant) = self.lambda_runner(&input.job_key, &state).await else {
                return;
            };
            self.note(&input.job_key, format!("shell runner invoked: {arn}"));
            self.invocation_takes_its_runner(&input.job_key, &grant)
                .await;
            *self
                .report
                .lock()
                .unwrap()
                .shell_invocations
                .entry(input.job_key.clone())
                .or_default() += 1;
            return;
        }
        let state = serde_json::json!({"job_key": input.job_key, "job": input.job,
                                       "mapped": {"decision": decision}});
        let provision_input: ProvisionInput = serde_json::from_value(state).unwrap();
        let retries = crate::task_retries("provision.asl.json", "ProvisionEc2Runner");
        for attempt in 1.. {
            match self
                .fleet
                .provision(&provision_input, fleet::now_ms())
                .await
            {
                Ok(outcome) => {
                    self.note(
                        &input.job_key,
                        format!(
                            "ec2-provision: {}",
                            serde_json::to_string(&outcome).unwrap()
                        ),
                    );
                    if let Provisioned::AlreadyProvisioned { .. } = &outcome {
                        self.report.lock().unwrap().already_provisioned += 1;
                    }
                    if let Provisioned::Launched { instance_id, .. } = &outcome {
                        self.instances
                            .lock()
                            .unwrap()
                            .insert(instance_id.clone(), input.job_key.clone());
                        let started = self.first_pending.lock().unwrap()[&input.job_key];
                        let mut report = self.report.lock().unwrap();
                        *report.launches.entry(input.job_key.clone()).or_default() += 1;
                        report
                            .hook_to_launch_ms
                            .push(started.elapsed().as_millis() as u64);
                    }
                    return;
                }
                Err(e) if attempt < retries.attempts(&e.error_type().name()) => {
                    self.platform_retries.fetch_add(1, Ordering::SeqCst);
                }
                Err(e) => {
                    self.note(&input.job_key, format!("ec2-provision failed: {e}"));
                    self.report
                        .lock()
                        .unwrap()
                        .provision_failures
                        .push(format!("{}: {e}", input.job_key));
                    return;
                }
            }
        }
    }

    /// `statemachine/teardown.asl.json`: LookUpJob, TearDownRunners when the job went to EC2
    /// or a runner ran it (retried), MarkCleaned.
    async fn teardown_workflow(&self, input: WorkflowInput) {
        // LookUpJob: retried 5 times on throttling, like the definition's task.
        let item = self
            .retried("LookUpJob", 5, || {
                self.functions_dynamo
                    .get_item()
                    .table_name(&self.fleet_stack.jobs_table)
                    .key("job_key", AttributeValue::S(input.job_key.clone()))
                    .consistent_read(true)
                    .send()
            })
            .await
            .item
            .unwrap_or_default();
        let ec2 = item.get("route_type") == Some(&AttributeValue::S(ExecutorKind::Ec2.to_string()));
        if (ec2 || input.job.runner.is_some()) && !self.tear_down_runners(&input).await {
            return;
        }
        // MarkCleaned: a failed condition means already cleaned (AlreadyCleaned); throttling
        // is retried 5 times.
        self.retried("MarkCleaned", 5, || {
            crate::mark_cleaned(
                &self.functions_dynamo,
                &self.fleet_stack.jobs_table,
                &input.job_key,
            )
        })
        .await;
    }

    /// TearDownRunners with the definition's retries; `false` when it failed, and the workflow
    /// ends in TeardownFailed.
    async fn tear_down_runners(&self, input: &WorkflowInput) -> bool {
        let teardown = TeardownInput {
            job_key: input.job_key.clone(),
            job: input.job.clone(),
        };
        self.counts.lock().unwrap().teardowns += 1;
        let retries = crate::task_retries("teardown.asl.json", "TearDownRunners");
        for attempt in 1.. {
            match self.fleet.teardown(&teardown).await {
                Ok(done) => {
                    if done.skipped.is_some() {
                        self.counts.lock().unwrap().teardowns_skipped += 1;
                    }
                    let json = serde_json::to_string(&done).unwrap();
                    self.note(&input.job_key, format!("ec2-teardown: {json}"));
                    return true;
                }
                Err(e) if attempt < retries.attempts(&e.error_type().name()) => {
                    self.platform_retries.fetch_add(1, Ordering::SeqCst);
                }
                Err(e) => {
                    let failure = format!("{}: {}: {e}", input.job_key, e.error_type());
                    self.note(
                        &input.job_key,
                        format!("ec2-teardown failed (TeardownFailed): {e}"),
                    );
                    self.counts.lock().unwrap().teardown_failures.push(failure);
                    return false;
                }
            }
        }
        unreachable!()
    }

    /// Teardown steps and reaper passes so far.
    pub fn steps(&self) -> StepCounts {
        self.counts.lock().unwrap().clone()
    }

    /// What is left of the stack's runners: instances, token parameters, GitLab runners.
    pub async fn leftovers(&self) -> Leftovers {
        Leftovers {
            instances: self.fleet_stack.live_instances().await.len(),
            token_parameters: self.fleet_stack.token_parameters().await.len(),
            gitlab_runners: self.fleet_stack.gitlab.state().runners.len(),
        }
    }

    /// Three reaper passes with no grace (mark, then kill): what lost finished hooks left.
    async fn reap(&self) {
        let mut env = self.fleet_env.clone();
        for name in [
            "RUNNER_WAIT_TIMEOUT_SECONDS",
            "RUNNER_BOOT_GRACE_SECONDS",
            "ORPHAN_GRACE_SECONDS",
        ] {
            env.push((name.into(), "0".into()));
        }
        let reaper = fleet_functions(&self.fleet_stack, &env, &self.sdk).await;
        let mut reaped = 0;
        for _ in 0..3 {
            let pass = reaper
                .reap(fleet::now_ms(), &crate::fleet_stack::invocation())
                .await;
            let report = {
                let mut counts = self.counts.lock().unwrap();
                counts.reaper_passes += 1;
                match pass {
                    Ok(report) => {
                        counts.reaper_passes_skipped += u32::from(report.skipped.is_some());
                        report
                    }
                    Err(e) => {
                        counts
                            .reaper_failures
                            .push(format!("{}: {e}", e.error_type()));
                        continue;
                    }
                }
            };
            reaped += report.killed.len();
            for killed in &report.killed {
                let job = self
                    .instances
                    .lock()
                    .unwrap()
                    .get(&killed.instance_id)
                    .cloned();
                self.note(
                    job.as_deref().unwrap_or("(unknown job)"),
                    format!("reaper: terminated {} ({})", killed.instance_id, killed.why),
                );
            }
        }
        self.report.lock().unwrap().reaped = reaped;
    }
}
