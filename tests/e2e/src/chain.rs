//! The whole chain in one process: GitLab Job Hooks -> webhook -> EventBridge bus (moto; an
//! SQS rule target stands in for the router's rule) -> router -> Step Functions starts (moto:
//! the deterministic execution names decide, exactly as in AWS) -> the workflow's steps ->
//! mapper, ec2-provision (EC2, SSM, DynamoDB in moto; GitLab stand-in) or the shell-runner
//! invoke -> teardown -> reaper.
//!
//! moto cannot run our Lambda code from a rule or a state machine, so this driver plays the
//! platform: it delivers each hook the way GitLab does (again on a 5xx), hands bus events to
//! the router (again on an error, like Lambda's asynchronous retries), and runs each newly
//! started workflow by calling the real handlers in the order of `statemachine/*.asl.json`,
//! with the retries those definitions declare. The definitions themselves run in moto's
//! interpreter in `statemachines_moto.rs`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aws_config::SdkConfig;
use aws_lambda_events::eventbridge::EventBridgeEvent;
use aws_sdk_dynamodb::types::AttributeValue;
use ephemeral_core::fleet::Provisioned;
use ephemeral_core::hook::JobEvent;
use ephemeral_core::jobs::{JobKey, RouterOutcome, Started, Workflow, WorkflowInput};
use ephemeral_core::mapping::Executor;
use ephemeral_core::testing::{XorShift, expected_provisions, redelivered_job_events};
use fleet::{Functions, ProvisionInput, TeardownInput};
use mapper::{DynamoMappingRules, GitLabJobTags, Mapper};
use router::Router;
use router::aws::{DynamoJobStore, StepFunctions};
use webhook::AwsWebhook;

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
        }
    }
}

/// What happened, per job and in total.
#[derive(Debug, Default)]
pub struct ChainReport {
    pub hooks: usize,
    pub elapsed: Duration,
    /// Job keys whose pending hook preceded every finish: each must get exactly one runner.
    pub expected_ec2: BTreeSet<String>,
    pub expected_lambda: BTreeSet<String>,
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
    pub webhook_retries: u64,
    pub platform_retries: u64,
    pub faults_injected: usize,
    pub live_instances_after_reaper: usize,
    pub token_parameters_after_reaper: usize,
    pub gitlab_runners_after_reaper: usize,
    pub reaped: usize,
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
            "{} hooks in {:.1} s = {:.1} hooks/s (time per stage: {:?}); launches {} (expected {}; instances with a runner in EC2 {}, without {}; already provisioned {}), shell-runner invocations {} (expected {}); hook-to-launch p50 {} ms, p99 {} ms; retries: webhook {}, platform {}; faults injected {}; reaped {}; left after the reaper: {} instances, {} token parameters, {} GitLab runners; peak RSS {} MiB",
            self.hooks,
            self.elapsed.as_secs_f64(),
            self.events_per_second(),
            self.stage_time,
            self.launches.values().sum::<u32>(),
            self.expected_ec2.len(),
            self.instances_per_job.values().sum::<u32>(),
            self.instances_without_runner,
            self.already_provisioned,
            self.shell_invocations.values().sum::<u32>(),
            self.expected_lambda.len(),
            self.latency_percentile(0.5),
            self.latency_percentile(0.99),
            self.webhook_retries,
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
    kind: &str,
    matched: &str,
) -> aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder {
    dynamo
        .update_item()
        .table_name(jobs_table)
        .key("job_key", AttributeValue::S(job_key.into()))
        .update_expression("SET route_type = :t, route_matched = :m")
        .expression_attribute_values(":t", AttributeValue::S(kind.into()))
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
    }?;
    Some(ephemeral_core::RunnerRef {
        id,
        description: None,
        tags: vec![],
    })
}

struct Worker {
    stack: WebhookStack,
    webhook: AwsWebhook,
}

/// Everything one run needs, built once.
pub struct Chain {
    options: ChainOptions,
    /// For the driver's own reads (SQS, checks): never faulted.
    sdk: SdkConfig,
    fleet_stack: FleetStack,
    workers: Vec<Worker>,
    router: Router<DynamoJobStore, StepFunctions>,
    mapper: Mapper<DynamoMappingRules, GitLabJobTags>,
    fleet: Functions,
    functions_dynamo: aws_sdk_dynamodb::Client,
    proxy: Option<FaultProxy>,
    report: Mutex<ChainReport>,
    first_pending: Mutex<HashMap<String, Instant>>,
    webhook_retries: AtomicU64,
    platform_retries: AtomicU64,
    stage_time: Mutex<BTreeMap<&'static str, Duration>>,
    started: Instant,
    /// Per job: what happened, when (for the local run's printout).
    trace: Mutex<BTreeMap<String, Vec<(Duration, String)>>>,
    /// Instance id -> job key, to name the job of a reaped instance.
    instances: Mutex<HashMap<String, String>>,
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

    fn timed(&self, stage: &'static str, since: Instant) {
        *self.stage_time.lock().unwrap().entry(stage).or_default() += since.elapsed();
    }

    pub async fn new(options: ChainOptions) -> Self {
        // A moto server of its own: moto is the bottleneck and uses one core, so two chains
        // (the tests run in parallel) each get one instead of sharing one.
        let endpoint = crate::start_private_moto();
        let sdk = sdk_config_at(&endpoint);
        let fleet_stack = fleet_stack_in(sdk.clone()).await;
        let proxy = (options.throttle_percent > 0).then(|| {
            let percent = options.throttle_percent;
            let counter = AtomicU64::new(0);
            FaultProxy::start(
                &endpoint,
                Box::new(move |request| {
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
        for _ in 0..options.workers {
            let stack = create_webhook_stack(
                &sdk,
                WEBHOOK_TOKEN,
                "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            )
            .await;
            let webhook =
                AwsWebhook::from_config(crate::webhook_config(&stack, "token"), &functions_sdk);
            workers.push(Worker { stack, webhook });
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
        let mapper = Mapper {
            rules: DynamoMappingRules {
                client: functions_dynamo.clone(),
                table: mappings,
            },
            tags: GitLabJobTags::new(None, None),
            default_route: Executor::Ec2(Default::default()),
        };
        let fleet = fleet_stack
            .functions_at(&fleet_stack.config(&[]), &functions_sdk)
            .await;
        Self {
            options,
            sdk,
            fleet_stack,
            workers,
            router,
            mapper,
            fleet,
            functions_dynamo,
            proxy,
            report: Mutex::default(),
            first_pending: Mutex::default(),
            webhook_retries: AtomicU64::new(0),
            platform_retries: AtomicU64::new(0),
            stage_time: Mutex::default(),
            started: Instant::now(),
            trace: Mutex::default(),
            instances: Mutex::default(),
        }
    }

    pub fn hooks(&self) -> Vec<JobEvent> {
        hooks_of(&self.options)
    }

    pub async fn run(&self) -> ChainReport {
        let hooks = self.hooks();
        let expected = expected_provisions(&hooks);
        {
            let mut report = self.report.lock().unwrap();
            report.hooks = hooks.len();
            for e in &hooks {
                let key = JobKey::of(e);
                if !expected.contains(&key.execution_name(Workflow::Provision)) {
                    continue;
                }
                let set = if e.job_name == "docker-build" {
                    &mut report.expected_ec2
                } else {
                    &mut report.expected_lambda
                };
                set.insert(key.table_key());
            }
        }
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
        report.webhook_retries = self.webhook_retries.load(Ordering::SeqCst);
        report.platform_retries = self.platform_retries.load(Ordering::SeqCst);
        report.faults_injected = self.proxy.as_ref().map_or(0, FaultProxy::fault_count);
        report.live_instances_after_reaper = self.fleet_stack.live_instances().await.len();
        report.token_parameters_after_reaper = self.fleet_stack.token_parameters().await.len();
        report.gitlab_runners_after_reaper = self.fleet_stack.gitlab.state().runners.len();
        (report.instances_per_job, report.instances_without_runner) =
            self.fleet_stack.runner_instances_per_job().await;
        report.peak_rss_kib = peak_rss_kib();
        report.stage_time = std::mem::take(&mut *self.stage_time.lock().unwrap());
        report
    }

    async fn deliver_all(&self, worker: usize, hooks: Vec<JobEvent>) {
        for hook in hooks {
            self.deliver(worker, hook).await;
        }
    }

    /// One hook, the way GitLab sends it (again after a 5xx), then everything it causes.
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
        self.reap().await;
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
        let t = Instant::now();
        let w = &self.workers[worker];
        let mut reply = 0;
        for attempt in 0.. {
            reply = w
                .webhook
                .handle(hook_request(delivery_id, body))
                .await
                .status_code;
            if (200..300).contains(&reply) {
                break;
            }
            assert!(attempt < 20, "GitLab gave up on {delivery_id}: {reply}");
            self.webhook_retries.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.timed("webhook", t);
        self.note(
            &job_key,
            format!("hook {status} (delivery {delivery_id}): webhook answered {reply}"),
        );
        self.drain_bus(w, reply).await;
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

    /// Hands every event on the worker's bus to the router (Lambda retries it on an error),
    /// then runs the workflows it started.
    /// Hands the event a forwarded hook put on the worker's bus to the router (Lambda
    /// retries it on an error), then runs the workflow it started. A 202 from the webhook
    /// means exactly one event; any other answer, none (duplicate, not ours): no poll then.
    async fn drain_bus(&self, w: &Worker, reply: i64) {
        if reply != 202 {
            return;
        }
        let sqs = aws_sdk_sqs::Client::new(&self.sdk);
        let t = Instant::now();
        let message = loop {
            let out = sqs
                .receive_message()
                .queue_url(&w.stack.observer_queue_url)
                .max_number_of_messages(1)
                .send()
                .await
                .unwrap();
            if let Some(m) = out.messages().first() {
                break m.clone();
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "the forwarded hook's event never reached the bus's queue"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        sqs.delete_message()
            .queue_url(&w.stack.observer_queue_url)
            .receipt_handle(message.receipt_handle().unwrap())
            .send()
            .await
            .unwrap();
        self.timed("bus", t);
        let envelope: EventBridgeEvent<serde_json::Value> =
            serde_json::from_str(message.body().unwrap()).unwrap();
        if envelope.detail_type == "GitLab Job Event" {
            self.route(&envelope).await;
        }
    }

    async fn route(&self, envelope: &EventBridgeEvent<serde_json::Value>) {
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

    /// `statemachine/provision.asl.json`: MapJob (retried), RecordRoute, then the shell-runner
    /// invoke or ProvisionEc2Runner (retried on the error types the definition names).
    async fn provision_workflow(&self, input: WorkflowInput) {
        let decision = self
            .retried("MapJob", 4, || self.mapper.handle(&input))
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
            self.note(&input.job_key, format!("shell runner invoked: {arn}"));
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
        for attempt in 0..4 {
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
                Err(e)
                    if attempt < 3
                        && matches!(
                            e.error_type(),
                            "Ec2Unavailable"
                                | "ProvisionStepFailed"
                                | "DependencyFailed"
                                | "GitLabRunnerNotCreated"
                        ) =>
                {
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
        let ec2 = item.get("route_type") == Some(&AttributeValue::S("EC2".into()));
        if ec2 || input.job.runner.is_some() {
            let teardown = TeardownInput {
                job_key: input.job_key.clone(),
                job: input.job.clone(),
            };
            let done = self
                .retried("TearDownRunners", 4, || self.fleet.teardown(&teardown))
                .await;
            self.note(
                &input.job_key,
                format!("ec2-teardown: {}", serde_json::to_string(&done).unwrap()),
            );
        }
        // MarkCleaned: a failed condition means already cleaned (AlreadyCleaned); throttling
        // is retried 5 times.
        self.retried("MarkCleaned", 5, || async {
            let result = self
                .functions_dynamo
                .update_item()
                .table_name(&self.fleet_stack.jobs_table)
                .key("job_key", AttributeValue::S(input.job_key.clone()))
                .update_expression("SET phase = :p, phase_rank = :r")
                .condition_expression("phase_rank < :r")
                .expression_attribute_values(":p", AttributeValue::S("cleaned".into()))
                .expression_attribute_values(":r", AttributeValue::N("5".into()))
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
        })
        .await;
    }

    /// What is left of the stack's runners: instances, token parameters, GitLab runners.
    pub async fn leftovers(&self) -> Leftovers {
        Leftovers {
            instances: self.fleet_stack.live_instances().await.len(),
            token_parameters: self.fleet_stack.token_parameters().await.len(),
            gitlab_runners: self.fleet_stack.gitlab.state().runners.len(),
        }
    }

    /// Two reaper passes with no grace (mark, then kill): what lost finished hooks left.
    async fn reap(&self) {
        let config = self.fleet_stack.config(&[
            ("RUNNER_WAIT_TIMEOUT_SECONDS", "0"),
            ("RUNNER_BOOT_GRACE_SECONDS", "0"),
            ("ORPHAN_GRACE_SECONDS", "0"),
        ]);
        let reaper = self.fleet_stack.functions_at(&config, &self.sdk).await;
        let mut reaped = 0;
        for _ in 0..3 {
            let report = reaper.reap(fleet::now_ms()).await.unwrap();
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
