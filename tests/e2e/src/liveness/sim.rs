//! The liveness run on a virtual clock: jobs arrive in bursts in the GitLab stand-in, which
//! queues their hooks; the driver delivers each once through the real webhook (behind a fault
//! proxy), the intake drainer, the bus (moto, an SQS target), the real router, and runs each
//! newly started workflow by calling the real mapper and fleet handlers in the order and with
//! the retries of `statemachine/*.asl.json` (as `crate::chain` does; moto cannot run our
//! code). A launched instance becomes, after its boot time, a runner that asks the stand-in
//! for a job with its own token (read from SSM, as the instance does), runs what it gets, and
//! shuts its instance down (the user data's `trap 'shutdown -h now' EXIT`), also when no job
//! came within the wait timeout. The real reconciler runs every interval with now = virtual
//! time. Every duration in the field (boot, job, grace, interval, wait timeout) is virtual
//! seconds, so the run is fast and deterministic for a seed; the AWS calls are real (moto).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aws_config::SdkConfig;
use aws_lambda_events::eventbridge::EventBridgeEvent;
use aws_sdk_dynamodb::types::AttributeValue;
use ephemeral_core::fleet::Provisioned;
use ephemeral_core::hook::{JobEvent, JobStatus};
use ephemeral_core::jobs::{JobKey, RouterOutcome, Started, Workflow, WorkflowInput};
use ephemeral_core::mapping::{Executor, ExecutorKind};
use ephemeral_core::reconcile::{Reason, ReconcileSettings};
use ephemeral_core::slots::{Capped, SlotCaps};
use ephemeral_core::task_error::TaskError;
use ephemeral_core::testing::XorShift;
use ephemeral_gitlab::{GitLabClient, RetryPolicy, Secret};
use fleet::{Functions, ProvisionInput, TeardownInput};
use mapper::{DynamoMappingRules, GitLabJobs, Mapper, TokenSource};
use reconciler::aws::{JobsTable, ProvisionWorkflow};
use reconciler::gitlab::GitLabPending;
use reconciler::{Reconciler, RunnerLife, Scopes};
use router::Router;
use router::aws::{DynamoJobStore, StepFunctions};
use webhook::AwsWebhook;
use webhook::drainer::AwsDrainer;

use super::gitlab::GitLabSim;
use crate::chain::{
    WEBHOOK_TOKEN, add_fallback_redrive, create_workflows, drainer_config, hook_request,
    receive_batch, record_route, reply_says_queued, reply_text, sqs_event,
};
use crate::fleet_stack::{API_TOKEN, FleetStack, fleet_stack_in};
use crate::loopback::{FaultProxy, Request, ec2_error};
use crate::{WebhookStack, create_table, create_webhook_stack, sdk_config_at};

/// Our project (its hook points at the stack; the reconciler lists it).
pub const PROJECT: u64 = 4242;
/// A project without our hook whose jobs have the same tags: with instance runners, GitLab
/// hands them to ours (a stolen runner).
pub const FOREIGN_PROJECT: u64 = 9999;
pub const TAGS: [&str; 1] = ["docker"];

#[derive(Debug, Clone)]
pub struct LivenessOptions {
    pub jobs: u64,
    pub seed: u64,
    /// MaxRunnerInstances (below the burst size).
    pub cap: u32,
    pub burst_min: u64,
    pub burst_max: u64,
    /// A burst every this many virtual seconds.
    pub burst_every_s: u64,
    pub launch_min_s: u64,
    pub launch_max_s: u64,
    pub job_min_s: u64,
    pub job_max_s: u64,
    /// RunnerWaitTimeoutSeconds and RunnerBootGraceSeconds.
    pub wait_timeout_s: u64,
    pub boot_grace_s: u64,
    pub grace_s: u64,
    pub interval_s: u64,
    /// The reconciler's backoff (base, max) and attempt limit.
    pub backoff_base_s: u64,
    pub backoff_max_s: u64,
    pub max_attempts: u32,
    /// A runner asks for a job this often while it waits.
    pub poll_s: u64,
    pub drop_pending_percent: u64,
    pub webhook_fault_percent: u64,
    pub steal_percent: u64,
    /// Every RunInstances fails with InsufficientInstanceCapacity in [start, end) (virtual s).
    pub capacity_outage_s: (u64, u64),
    /// The run fails if our jobs are not all finished by then.
    pub max_virtual_s: u64,
    /// Jobs whose pending hooks are dropped (besides `drop_pending_percent`); ours are
    /// numbered from 1001 in the order they become pending.
    pub drop_pending_of: Vec<u64>,
    /// Keep, per job, what happened to it (for `run-local`'s printout).
    pub story: bool,
}

impl Default for LivenessOptions {
    fn default() -> Self {
        let env = |name: &str, default: u64| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        Self {
            jobs: env("LIVENESS_JOBS", 200),
            seed: env("LIVENESS_SEED", 11),
            cap: env("LIVENESS_CAP", 20) as u32,
            burst_min: 25,
            burst_max: 45,
            burst_every_s: 150,
            launch_min_s: 20,
            launch_max_s: 40,
            job_min_s: 20,
            job_max_s: 90,
            wait_timeout_s: 180,
            boot_grace_s: 60,
            grace_s: 60,
            interval_s: 60,
            // Backoff at most the grace: after capacity returns, a job's next attempt is
            // allowed within max(grace, backoff max) = grace, which is what the bound assumes.
            backoff_base_s: 30,
            backoff_max_s: 60,
            max_attempts: 10,
            poll_s: 1,
            drop_pending_percent: 15,
            webhook_fault_percent: 10,
            steal_percent: 10,
            capacity_outage_s: (200, 380),
            max_virtual_s: 8 * 3600,
            drop_pending_of: Vec::new(),
            story: false,
        }
    }
}

/// Faults injected, each counted.
#[derive(Debug, Default, Clone)]
pub struct Faults {
    pub pending_hooks_dropped: u64,
    /// Webhook DynamoDB/EventBridge calls answered with a throttle (the SDK retries).
    pub webhook_throttles: u64,
    /// ...and with a hard error (no retry: the hook goes to the fallback queue).
    pub webhook_hard_failures: u64,
    pub capacity_errors: u64,
    pub stolen_runners: u64,
}

#[derive(Debug, Default)]
pub struct LivenessReport {
    pub jobs: u64,
    pub foreign_jobs: u64,
    pub faults: Faults,
    pub hooks_delivered: u64,
    pub answered_2xx: u64,
    pub fallback_queued: u64,
    pub answered_5xx: u64,
    pub answered_4xx: u64,
    pub drain_retries: u64,
    pub reconciled: BTreeMap<Reason, u32>,
    pub gave_up: u64,
    pub reconcile_errors: Vec<String>,
    pub reconcile_passes: u64,
    pub max_oldest_pending_ms: u64,
    /// Per our job: `Launched` answers of ec2-provision.
    pub launches: BTreeMap<u64, u32>,
    pub waiting_for_slot: u64,
    /// Provision workflows the mapper ended: GitLab said the job was not pending.
    pub skipped_not_pending: u64,
    pub no_capacity_failures: u64,
    pub provision_failures: BTreeMap<String, u64>,
    pub teardown_failures: Vec<String>,
    pub idle_shutdowns: u64,
    pub peak_instances: usize,
    pub cap: u32,
    pub instance_samples: u64,
    /// Per our job: handed to a runner (stand-in count), and whether it finished.
    pub handed_out: BTreeMap<u64, u32>,
    pub unfinished: Vec<u64>,
    /// Per our job: (wait from pending to running, wait from when it could have started).
    pub waits_ms: BTreeMap<u64, (u64, u64)>,
    pub bound_ms: u64,
    pub over_bound: Vec<String>,
    /// Per job: when an instance launched for it, whose runner another job took, ended.
    pub taken_instance_ended_ms: BTreeMap<u64, u64>,
    /// Jobs that had an instance taken by another job before they ran.
    pub waited_for_taken_instance: u64,
    /// With [`LivenessOptions::story`]: per job, (virtual s, what happened), in order.
    pub story: BTreeMap<u64, Vec<(u64, String)>>,
    pub virtual_s: u64,
    pub wall: Duration,
    pub leftovers: Leftovers,
    pub reaped: usize,
    pub executions_run: usize,
    /// Wall time per stage of the driver.
    pub stage_time: BTreeMap<&'static str, Duration>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Leftovers {
    pub instances: usize,
    pub token_parameters: usize,
    pub gitlab_runners: usize,
    pub slots_used: u64,
    pub slot_items: usize,
}

impl LivenessReport {
    pub fn summary(&self) -> String {
        let launches: Vec<u32> = self.launches.values().copied().collect();
        let mean = launches.iter().sum::<u32>() as f64 / self.jobs.max(1) as f64;
        let max_wait = self.waits_ms.values().map(|w| w.0).max().unwrap_or(0);
        let max_ready_wait = self.waits_ms.values().map(|w| w.1).max().unwrap_or(0);
        format!(
            "liveness: {} jobs (+{} foreign) in {} virtual s, wall {:.1} s\n\
             faults: {} pending hooks dropped, webhook AWS faults {} throttled + {} hard, {} capacity errors (RunInstances), {} stolen runners\n\
             intake: {} hooks delivered, {} answered 2xx ({} via the fallback queue, {} drain retries), {} 5xx, {} 4xx\n\
             reconciler: {} passes, reconciled {:?}, {} given up, {} errors, max oldest pending {} s\n\
             provision: launches per job mean {:.2} max {}, {} waits for a slot, {} skipped (not pending in GitLab), {} NoCapacity failures, failures {:?}; {} idle shutdowns; teardown failures {}\n\
             instances: peak {} (cap {}), {} samples\n\
             waits: max pending-to-running {} s, max after capacity/slot was free {} s (bound {} s), {} over the bound; {} jobs had their instance taken by another job\n\
             after the reaper ({} reaped): {:?}; {} executions run\n\
             wall time per stage: {:?}",
            self.jobs,
            self.foreign_jobs,
            self.virtual_s,
            self.wall.as_secs_f64(),
            self.faults.pending_hooks_dropped,
            self.faults.webhook_throttles,
            self.faults.webhook_hard_failures,
            self.faults.capacity_errors,
            self.faults.stolen_runners,
            self.hooks_delivered,
            self.answered_2xx,
            self.fallback_queued,
            self.drain_retries,
            self.answered_5xx,
            self.answered_4xx,
            self.reconcile_passes,
            self.reconciled
                .iter()
                .map(|(r, n)| (r.as_str(), *n))
                .collect::<Vec<_>>(),
            self.gave_up,
            self.reconcile_errors.len(),
            self.max_oldest_pending_ms / 1000,
            mean,
            launches.iter().max().copied().unwrap_or(0),
            self.waiting_for_slot,
            self.skipped_not_pending,
            self.no_capacity_failures,
            self.provision_failures,
            self.idle_shutdowns,
            self.teardown_failures.len(),
            self.peak_instances,
            self.cap,
            self.instance_samples,
            max_wait / 1000,
            max_ready_wait / 1000,
            self.bound_ms / 1000,
            self.over_bound.len(),
            self.waited_for_taken_instance,
            self.reaped,
            self.leftovers,
            self.executions_run,
            self.stage_time,
        )
    }
}

/// A simulated instance: boots, then is a `gitlab-runner run-single` with its token.
#[derive(Debug, Clone)]
struct SimInstance {
    instance_id: String,
    runner_id: u64,
    /// The job it was launched for.
    made_for: u64,
    boot_at_ms: u64,
    /// Read from SSM at boot.
    token: Option<String>,
    /// A foreign job is put in its way when it first asks (a stolen runner).
    stolen: bool,
    running: Option<((u64, u64), u64)>,
    next_poll_ms: u64,
}

pub struct Liveness {
    o: LivenessOptions,
    sdk: SdkConfig,
    pub fleet_stack: FleetStack,
    pub gitlab: GitLabSim,
    webhook_stack: WebhookStack,
    webhook: webhook::AwsWebhook,
    drainer: webhook::drainer::AwsDrainer,
    router: Router<DynamoJobStore, StepFunctions>,
    mapper: Mapper<DynamoMappingRules, GitLabJobs>,
    fleet: Functions,
    fleet_env: Vec<(String, String)>,
    reconciler: Reconciler<fleet::aws::DynamoRunnerLedger>,
    settings: ReconcileSettings,
    provision_arn: String,
    teardown_arn: String,
    dynamo: aws_sdk_dynamodb::Client,
    webhook_proxy: FaultProxy,
    _fleet_proxy: FaultProxy,
    outage: Arc<AtomicBool>,
    throttles: Arc<AtomicU64>,
    hard: Arc<AtomicU64>,
    epoch_ms: u64,
    now_ms: u64,
    executions_run: BTreeSet<String>,
    instances: Vec<SimInstance>,
    /// Per our job: when it became pending (virtual ms).
    report: LivenessReport,
    rng: XorShift,
    /// Per tick: whether a job could not have started (cap full or no capacity).
    blocked: Vec<bool>,
    live_now: usize,
    slots_now: u64,
    changed: bool,
}

fn webhook_fault(
    n: u64,
    percent: u64,
    request: &Request,
    throttles: &AtomicU64,
    hard: &AtomicU64,
) -> Option<(u16, String)> {
    let target = request.header("x-amz-target").unwrap_or_default();
    let dynamo = target.starts_with("DynamoDB_20120810.");
    let bus = target == "AWSEvents.PutEvents";
    if !dynamo && !bus {
        return None;
    }
    let roll = XorShift(n.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1).next_u64() % 200;
    if roll >= percent * 2 {
        return None;
    }
    if roll.is_multiple_of(2) {
        throttles.fetch_add(1, Ordering::SeqCst);
        return Some((
            400,
            r#"{"__type":"ThrottlingException","message":"Rate exceeded (fault proxy)"}"#.into(),
        ));
    }
    hard.fetch_add(1, Ordering::SeqCst);
    Some(if dynamo {
        (
            400,
            r#"{"__type":"com.amazonaws.dynamodb.v20120810#ResourceNotFoundException","message":"Requested resource not found (fault proxy)"}"#.into(),
        )
    } else {
        (
            400,
            r#"{"__type":"ResourceNotFoundException","message":"Event bus does not exist (fault proxy)"}"#.into(),
        )
    })
}

impl Liveness {
    pub async fn new(o: LivenessOptions) -> Self {
        let endpoint = crate::start_private_moto();
        let sdk = sdk_config_at(&endpoint);
        let fleet_stack = fleet_stack_in(sdk.clone()).await;
        let first_runner = 500_000 + u64::from(std::process::id() % 1000) * 10_000;
        let gitlab = GitLabSim::start(API_TOKEN, first_runner, &[PROJECT]).await;

        // The webhook's DynamoDB and EventBridge calls fail `webhook_fault_percent` of the time;
        // its SDK retries throttles quickly (real backoff would only slow the run).
        let (throttles, hard) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let webhook_proxy = {
            let (t, h, percent) = (throttles.clone(), hard.clone(), o.webhook_fault_percent);
            let n = AtomicU64::new(o.seed);
            FaultProxy::start(
                &endpoint,
                Box::new(move |r| {
                    webhook_fault(n.fetch_add(1, Ordering::SeqCst), percent, r, &t, &h)
                }),
            )
        };
        let fast_retries = aws_config::retry::RetryConfig::standard()
            .with_max_attempts(3)
            .with_initial_backoff(Duration::from_millis(5))
            .with_max_backoff(Duration::from_millis(20));
        let webhook_sdk = sdk
            .to_builder()
            .endpoint_url(&webhook_proxy.url)
            .retry_config(fast_retries)
            .build();
        // Every RunInstances fails with InsufficientInstanceCapacity while `outage` is set.
        let outage = Arc::new(AtomicBool::new(false));
        let fleet_proxy = {
            let outage = outage.clone();
            FaultProxy::start(
                &endpoint,
                Box::new(move |r| {
                    (outage.load(Ordering::SeqCst) && r.body_text().contains("Action=RunInstances"))
                        .then(|| {
                            (
                                400,
                                ec2_error(
                                    "InsufficientInstanceCapacity",
                                    "We currently do not have sufficient capacity (fault proxy)",
                                ),
                            )
                        })
                }),
            )
        };
        let fleet_sdk = sdk.to_builder().endpoint_url(&fleet_proxy.url).build();

        let webhook_stack = create_webhook_stack(
            &sdk,
            WEBHOOK_TOKEN,
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        )
        .await;
        add_fallback_redrive(&sdk, &webhook_stack).await;
        let webhook =
            AwsWebhook::from_config(crate::webhook_config(&webhook_stack, "token"), &webhook_sdk);
        let drainer = AwsDrainer::from_config(drainer_config(&webhook_stack), &sdk);
        let (provision_arn, teardown_arn) = create_workflows(&sdk).await;
        let dynamo = aws_sdk_dynamodb::Client::new(&sdk);
        let router = Router {
            store: DynamoJobStore {
                client: dynamo.clone(),
                table: fleet_stack.jobs_table.clone(),
                ttl_seconds: 3600 * 24,
            },
            workflows: StepFunctions {
                client: aws_sdk_sfn::Client::new(&sdk),
                provision_arn: provision_arn.clone(),
                teardown_arn: teardown_arn.clone(),
            },
            provision_on: Default::default(),
        };
        let mappings = create_table(&sdk, "mappings", "pk", Some("sk")).await;
        let mapper = Mapper {
            rules: DynamoMappingRules {
                client: dynamo.clone(),
                table: mappings,
            },
            gitlab: GitLabJobs::new(
                Some(gitlab.url.clone()),
                Some(TokenSource::new(
                    aws_sdk_ssm::Client::new(&sdk),
                    fleet_stack.api_token_parameter.clone(),
                )),
            ),
            default_route: Executor::Ec2(Default::default()),
        };
        let cap = o.cap.to_string();
        let wait = o.wait_timeout_s.to_string();
        let boot = o.boot_grace_s.to_string();
        let fleet_env = fleet_stack.env(&[
            ("GITLAB_URL", gitlab.url.as_str()),
            ("MAX_RUNNER_INSTANCES", cap.as_str()),
            ("RUNNER_SCOPE", "instance"),
            ("RUNNER_WAIT_TIMEOUT_SECONDS", wait.as_str()),
            ("RUNNER_BOOT_GRACE_SECONDS", boot.as_str()),
        ]);
        let fleet = match FleetStack::setup_of(&fleet_env) {
            fleet::FleetSetup::Ec2(config) => fleet_stack.functions_at(&config, &fleet_sdk).await,
            fleet::FleetSetup::NotConfigured => panic!("the fleet is configured"),
        };
        let fast = RetryPolicy {
            max_retries: 2,
            min_delay: Duration::from_millis(5),
            max_delay: Duration::from_millis(20),
        };
        let reconciler = Reconciler::new(
            GitLabPending {
                client: GitLabClient::new(&gitlab.url, fast),
                token: Secret::new(API_TOKEN.to_owned()),
            },
            JobsTable {
                client: dynamo.clone(),
                table: fleet_stack.jobs_table.clone(),
                ttl_seconds: 3600 * 24,
            },
            fleet::aws::DynamoRunnerLedger {
                client: dynamo.clone(),
                jobs_table: fleet_stack.jobs_table.clone(),
                runners_table: fleet_stack.runners_table.clone(),
            },
            ProvisionWorkflow {
                client: aws_sdk_sfn::Client::new(&sdk),
                arn: provision_arn.clone(),
            },
            reconciler::aws::TeardownWorkflow {
                client: aws_sdk_sfn::Client::new(&sdk),
                arn: teardown_arn.clone(),
            },
            Scopes {
                project_ids: vec![PROJECT],
                group_ids: vec![],
            },
            50,
            RunnerLife {
                waits_ms: (o.wait_timeout_s + o.boot_grace_s) * 1000,
                project_scoped: false,
            },
            Some(Capped {
                store: fleet::slots::DynamoSlots {
                    client: dynamo.clone(),
                    table: fleet_stack.slots_table.clone(),
                },
                caps: SlotCaps::from_values(o.cap, 0),
            }),
        )
        // As deployed with RunnerApiTokenParameterName: a taken runner is seen at once.
        .with_runner_status(reconciler::gitlab::RunnerStatus {
            client: GitLabClient::new(&gitlab.url, fast),
            token: Secret::new(API_TOKEN.to_owned()),
        });
        let settings = ReconcileSettings {
            grace_ms: o.grace_s * 1000,
            max_attempts: o.max_attempts,
            backoff_base_ms: o.backoff_base_s * 1000,
            backoff_max_ms: o.backoff_max_s * 1000,
            ..ReconcileSettings::default()
        };
        // Virtual time starts at the wall clock (so that moto's own timestamps are never
        // later than it) on a whole minute.
        let epoch_ms = fleet::now_ms() / 60_000 * 60_000 + 60_000;
        let rng = XorShift(o.seed | 1);
        Self {
            sdk,
            fleet_stack,
            gitlab,
            webhook_stack,
            webhook,
            drainer,
            router,
            mapper,
            fleet,
            fleet_env,
            reconciler,
            settings,
            provision_arn,
            teardown_arn,
            dynamo,
            webhook_proxy,
            _fleet_proxy: fleet_proxy,
            outage,
            throttles,
            hard,
            epoch_ms,
            now_ms: epoch_ms,
            executions_run: BTreeSet::new(),
            instances: Vec::new(),
            report: LivenessReport::default(),
            rng,
            blocked: Vec::new(),
            live_now: 0,
            slots_now: 0,
            changed: false,
            o,
        }
    }

    fn timed(&mut self, stage: &'static str, since: Instant) {
        *self.report.stage_time.entry(stage).or_default() += since.elapsed();
    }

    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.rng.next_u64() % (hi - lo + 1)
    }

    /// The bound on a job's wait from when it could have started: the reconciler's grace
    /// (or the backoff, at most the grace), one interval for the next pass, the boot, one
    /// poll and one tick.
    pub fn bound_ms(&self) -> u64 {
        (self.o.grace_s.max(self.o.backoff_max_s)
            + self.o.interval_s
            + self.o.launch_max_s
            + self.o.poll_s
            + 1)
            * 1000
    }

    pub async fn run(mut self) -> (LivenessReport, Self) {
        let wall = Instant::now();
        let mut next_job_id = 1_000u64;
        let mut next_burst_s = 0u64;
        let mut created = 0u64;
        let mut pipeline = 100u64;
        let mut t = 0u64;
        loop {
            self.now_ms = self.epoch_ms + t * 1000;
            self.gitlab.state().now_ms = self.now_ms;
            let (from, to) = self.o.capacity_outage_s;
            let outage = (from..to).contains(&t);
            self.outage.store(outage, Ordering::SeqCst);
            // A burst: a pipeline's jobs, pending at once.
            if t == next_burst_s && created < self.o.jobs {
                let size = self
                    .between(self.o.burst_min, self.o.burst_max)
                    .min(self.o.jobs - created);
                pipeline += 1;
                let now = self.now_ms;
                let mut state = self.gitlab.state();
                for _ in 0..size {
                    next_job_id += 1;
                    state.add_pending_job(
                        PROJECT,
                        pipeline,
                        next_job_id,
                        "docker-build",
                        &TAGS,
                        now,
                    );
                }
                drop(state);
                created += size;
                next_burst_s += self.o.burst_every_s;
            }
            let clock = Instant::now();
            self.step_instances().await;
            self.timed("instances", clock);
            let clock = Instant::now();
            self.deliver_hooks().await;
            self.timed("hooks and workflows", clock);
            if t > 0 && t.is_multiple_of(self.o.interval_s) {
                let clock = Instant::now();
                self.reconcile().await;
                self.timed("reconciler and its workflows", clock);
                self.trace_jobs(t).await;
            }
            if self.changed {
                let clock = Instant::now();
                self.slots_now = self.fleet_stack.slots_used("global").await;
                self.timed("sampling", clock);
                self.changed = false;
            }
            // A job could not have started in this tick when EC2 had no capacity or every
            // slot under the cap was held (by a live instance, one booting, or a job whose
            // runner was taken and whose next attempt takes the slot over).
            self.blocked
                .push(outage || self.slots_now >= u64::from(self.o.cap));
            let done = created >= self.o.jobs && {
                let state = self.gitlab.state();
                state
                    .jobs
                    .values()
                    .filter(|j| j.project_id == PROJECT)
                    .all(|j| j.finished_ms.is_some())
                    && state.hooks.is_empty()
            };
            if done || t >= self.o.max_virtual_s {
                break;
            }
            t += 1;
        }
        self.report.virtual_s = t;
        self.finish_report(wall).await;
        let report = std::mem::take(&mut self.report);
        (report, self)
    }

    async fn sample(&mut self) {
        let live = self.fleet_stack.live_instances().await.len();
        self.report.instance_samples += 1;
        self.live_now = live;
        self.report.peak_instances = self.report.peak_instances.max(live);
    }

    /// Boot, ask for a job, run it, shut down.
    async fn step_instances(&mut self) {
        let now = self.now_ms;
        let mut instances = std::mem::take(&mut self.instances);
        let mut keep = Vec::new();
        for mut inst in instances.drain(..) {
            if now < inst.boot_at_ms {
                keep.push(inst);
                continue;
            }
            if inst.token.is_none() {
                // The instance reads its token parameter (user data); gone: it shuts down.
                let name = format!("{}/{}", self.fleet_stack.prefix, inst.instance_id);
                let token = self
                    .fleet_stack
                    .ssm
                    .get_parameter()
                    .name(name)
                    .with_decryption(true)
                    .send()
                    .await
                    .ok()
                    .and_then(|p| p.parameter?.value);
                match token {
                    Some(token) => inst.token = Some(token),
                    None => {
                        self.shut_down(&inst.instance_id).await;
                        continue;
                    }
                }
            }
            if let Some((key, until)) = inst.running {
                if now >= until {
                    self.gitlab.state().finish(key, JobStatus::Success);
                    self.tell(key.1, "finished (success)".into());
                    if key.1 != inst.made_for {
                        // Its job's instance ran another job: a new attempt for its job
                        // could not launch before this one ended (one instance per job).
                        self.report
                            .taken_instance_ended_ms
                            .insert(inst.made_for, now);
                    }
                    // run-single --max-builds 1 exits; the instance shuts down.
                    self.shut_down(&inst.instance_id).await;
                    continue;
                }
                keep.push(inst);
                continue;
            }
            if now >= inst.boot_at_ms + self.o.wait_timeout_s * 1000 {
                self.report.idle_shutdowns += 1;
                self.shut_down(&inst.instance_id).await;
                continue;
            }
            if now < inst.next_poll_ms {
                keep.push(inst);
                continue;
            }
            inst.next_poll_ms = now + self.o.poll_s * 1000;
            let token = inst.token.clone().unwrap();
            if inst.stolen {
                // A job of another project, waiting for an hour, with the same tags: the
                // oldest one this runner may take.
                inst.stolen = false;
                self.report.faults.stolen_runners += 1;
                self.report.foreign_jobs += 1;
                let id = 9_000_000 + self.report.foreign_jobs;
                self.gitlab.state().add_pending_job(
                    FOREIGN_PROJECT,
                    1,
                    id,
                    "their-build",
                    &TAGS,
                    now.saturating_sub(3_600_000),
                );
            }
            // A poll that would answer 204 changes nothing: only ask when it would not.
            let (has_job, runner_exists) = {
                let state = self.gitlab.state();
                (
                    state.has_job_for(&token),
                    state.runners.contains_key(&inst.runner_id),
                )
            };
            if !runner_exists {
                // Deleted (a teardown removed it): run-single exits, the instance shuts down.
                self.shut_down(&inst.instance_id).await;
                continue;
            }
            if !has_job {
                keep.push(inst);
                continue;
            }
            let answer = reqwest::Client::new()
                .post(format!("{}/api/v4/jobs/request", self.gitlab.url))
                .json(&serde_json::json!({"token": token, "info": {"name": "gitlab-runner"}}))
                .send()
                .await
                .unwrap();
            if answer.status().as_u16() != 201 {
                keep.push(inst);
                continue;
            }
            let job: serde_json::Value = answer.json().await.unwrap();
            let key = (
                job["job_info"]["project_id"].as_u64().unwrap(),
                job["id"].as_u64().unwrap(),
            );
            self.tell(
                key.1,
                format!("runner {} took it and runs it", inst.runner_id),
            );
            let duration = self.between(self.o.job_min_s, self.o.job_max_s) * 1000;
            inst.running = Some((key, now + duration));
            keep.push(inst);
        }
        self.instances = keep;
    }

    async fn shut_down(&mut self, instance_id: &str) {
        let _ = self
            .fleet_stack
            .ec2
            .terminate_instances()
            .instance_ids(instance_id)
            .send()
            .await;
        self.changed = true;
    }

    /// Every hook the stand-in queued, once each, in order.
    async fn deliver_hooks(&mut self) {
        loop {
            let Some(hook) = self.gitlab.state().hooks.pop_front() else {
                break;
            };
            let chosen = self.o.drop_pending_of.contains(&hook.job_id);
            if hook.status == JobStatus::Pending
                && (chosen || self.rng.next_u64() % 100 < self.o.drop_pending_percent)
            {
                self.report.faults.pending_hooks_dropped += 1;
                self.tell(
                    hook.job_id,
                    "pending hook lost before the webhook (GitLab never resends it)".into(),
                );
                continue;
            }
            self.report.hooks_delivered += 1;
            let clock = Instant::now();
            let reply = self
                .webhook
                .handle(hook_request(&hook.delivery_id, &hook.body))
                .await;
            self.timed("webhook", clock);
            let (code, text) = (reply.status_code, reply_text(&reply).to_owned());
            self.tell(
                hook.job_id,
                format!(
                    "hook {}: webhook answered {code} {text}",
                    hook.status.as_str()
                ),
            );
            match code {
                200..=299 => {
                    self.report.answered_2xx += 1;
                    if reply_says_queued(code, &text) {
                        self.report.fallback_queued += 1;
                    }
                }
                500.. => self.report.answered_5xx += 1,
                _ => self.report.answered_4xx += 1,
            }
            // The fallback queue's event source and the bus's rule work at once here.
            self.drain_fallback().await;
            self.route_bus().await;
        }
    }

    async fn drain_fallback(&mut self) {
        let sqs = aws_sdk_sqs::Client::new(&self.sdk);
        let queue = self.webhook_stack.fallback_queue_url.clone();
        let mut failed = Vec::new();
        loop {
            let messages = receive_batch(&sqs, &queue, 600).await;
            if messages.is_empty() {
                break;
            }
            // SQS hands a failed message out again a visibility timeout later: the drainer
            // sees the clock that far ahead (as chain.rs does), so the claim a failed webhook
            // call left (its lease) is taken over as it would be in AWS.
            let receives = messages
                .iter()
                .map(crate::chain::receive_count)
                .max()
                .unwrap_or(1);
            let now = webhook::now_ms()
                + u64::from(receives - 1) * crate::chain::FALLBACK_VISIBILITY_TIMEOUT_S * 1000;
            let response = self
                .drainer
                .handle_at(sqs_event(&queue, &messages), now)
                .await;
            let failures: BTreeSet<&str> = response
                .batch_item_failures
                .iter()
                .map(|f| f.item_identifier.as_str())
                .collect();
            for m in &messages {
                if failures.contains(m.message_id().unwrap_or_default()) {
                    self.report.drain_retries += 1;
                    failed.push(m.receipt_handle().unwrap_or_default().to_owned());
                } else {
                    sqs.delete_message()
                        .queue_url(&queue)
                        .receipt_handle(m.receipt_handle().unwrap_or_default())
                        .send()
                        .await
                        .unwrap();
                }
            }
        }
        for handle in failed {
            sqs.change_message_visibility()
                .queue_url(&queue)
                .receipt_handle(handle)
                .visibility_timeout(0)
                .send()
                .await
                .unwrap();
        }
    }

    async fn route_bus(&mut self) {
        let sqs = aws_sdk_sqs::Client::new(&self.sdk);
        loop {
            let out = sqs
                .receive_message()
                .queue_url(&self.webhook_stack.observer_queue_url)
                .max_number_of_messages(10)
                .send()
                .await
                .unwrap();
            if out.messages().is_empty() {
                break;
            }
            let mut envelopes = Vec::new();
            for m in out.messages() {
                sqs.delete_message()
                    .queue_url(&self.webhook_stack.observer_queue_url)
                    .receipt_handle(m.receipt_handle().unwrap())
                    .send()
                    .await
                    .unwrap();
                let envelope: EventBridgeEvent<serde_json::Value> =
                    serde_json::from_str(m.body().unwrap()).unwrap();
                if envelope.detail_type == "GitLab Job Event" {
                    envelopes.push(envelope);
                }
            }
            for envelope in envelopes {
                self.route(&envelope).await;
            }
        }
    }

    async fn route(&mut self, envelope: &EventBridgeEvent<serde_json::Value>) {
        let mut outcome = None;
        for _ in 0..3 {
            if let Ok(o) = self.router.handle(envelope, self.now_ms).await {
                outcome = Some(o);
                break;
            }
        }
        let Some(RouterOutcome::Started {
            workflow,
            started: Started::New,
            execution,
        }) = outcome
        else {
            return;
        };
        let event: JobEvent = serde_json::from_value(envelope.detail.clone()).unwrap();
        self.run_execution(workflow, execution, event).await;
    }

    async fn run_execution(&mut self, workflow: Workflow, execution: String, job: JobEvent) {
        if !self.executions_run.insert(execution) {
            return;
        }
        let input = WorkflowInput {
            job_key: JobKey::of(&job).table_key(),
            job,
        };
        let clock = Instant::now();
        match workflow {
            Workflow::Provision => self.provision_workflow(input).await,
            Workflow::Teardown => self.teardown_workflow(input).await,
        }
        self.timed(workflow.as_str(), clock);
        self.changed = true;
    }

    /// `statemachine/provision.asl.json`, EC2 branch: MapJob (retried), RecordRoute,
    /// ProvisionEc2Runner (retried on the errors the definition names), RecordFailure.
    async fn provision_workflow(&mut self, input: WorkflowInput) {
        // MapJob: retried as the definition says; the Catch records any error.
        let mut decision = None;
        let retries = crate::task_retries("provision.asl.json", "MapJob");
        for attempt in 1.. {
            match self.mapper.handle(&input).await {
                Ok(d) => {
                    decision = Some(d);
                    break;
                }
                Err(e) if attempt < retries.attempts(&e.error_type().name()) => {}
                Err(e) => {
                    *self
                        .report
                        .provision_failures
                        .entry(e.error_type().name())
                        .or_default() += 1;
                    self.record_failure(&input.job_key, &e.error_type().name(), &e.to_string())
                        .await;
                    return;
                }
            }
        }
        let Some(decision) = decision else { return };
        record_route(
            &self.dynamo,
            &self.fleet_stack.jobs_table,
            &input.job_key,
            decision.decision.executor.kind(),
            &decision.decision.matched,
        )
        .send()
        .await
        .unwrap();
        match &decision.decision.executor {
            Executor::Ec2(_) => {}
            Executor::Skip => {
                // RecordSkip: GitLab does not have the job waiting for a runner.
                self.report.skipped_not_pending += 1;
                self.dynamo
                    .update_item()
                    .table_name(&self.fleet_stack.jobs_table)
                    .key("job_key", AttributeValue::S(input.job_key.clone()))
                    .update_expression("SET #skipped = :skipped")
                    .expression_attribute_names("#skipped", "provision_skipped")
                    .expression_attribute_values(
                        ":skipped",
                        AttributeValue::S(decision.decision.reason.clone()),
                    )
                    .send()
                    .await
                    .unwrap();
                return;
            }
            Executor::Lambda { .. } => panic!("every job of the run routes to EC2"),
        }
        let state = serde_json::json!({"job_key": input.job_key, "job": input.job,
                                       "mapped": {"decision": decision}});
        let provision_input: ProvisionInput = serde_json::from_value(state).unwrap();
        let job_id = input.job.job_id;
        let retries = crate::task_retries("provision.asl.json", "ProvisionEc2Runner");
        for attempt in 1.. {
            let faults_before = self._fleet_proxy.fault_count();
            let result = self.fleet.provision(&provision_input, self.now_ms).await;
            self.report.faults.capacity_errors +=
                (self._fleet_proxy.fault_count() - faults_before) as u64;
            match result {
                Ok(outcome) => {
                    match outcome {
                        Provisioned::Launched {
                            instance_id,
                            runner_id,
                            ..
                        } => {
                            *self.report.launches.entry(job_id).or_default() += 1;
                            self.tell(
                                job_id,
                                format!(
                                    "ec2-provision: launched {instance_id}, runner {runner_id}"
                                ),
                            );
                            let boot = self.between(self.o.launch_min_s, self.o.launch_max_s);
                            let stolen = self.rng.next_u64() % 100 < self.o.steal_percent;
                            self.instances.push(SimInstance {
                                instance_id,
                                runner_id,
                                made_for: job_id,
                                boot_at_ms: self.now_ms + boot * 1000,
                                token: None,
                                stolen,
                                running: None,
                                next_poll_ms: 0,
                            });
                            // The cap holds at every launch.
                            self.sample().await;
                        }
                        Provisioned::WaitingForSlot { .. } => self.report.waiting_for_slot += 1,
                        _ => {}
                    }
                    return;
                }
                Err(e) if attempt < retries.attempts(&e.error_type().name()) => {}
                Err(e) => {
                    if e.error_type() == TaskError::NoCapacity {
                        self.report.no_capacity_failures += 1;
                    }
                    *self
                        .report
                        .provision_failures
                        .entry(e.error_type().name())
                        .or_default() += 1;
                    self.record_failure(&input.job_key, &e.error_type().name(), &e.to_string())
                        .await;
                    return;
                }
            }
        }
    }

    /// RecordFailure: the error on the job's item, where the reconciler reads it.
    async fn record_failure(&self, job_key: &str, error: &str, cause: &str) {
        self.dynamo
            .update_item()
            .table_name(&self.fleet_stack.jobs_table)
            .key("job_key", AttributeValue::S(job_key.into()))
            .update_expression("SET #error = :error, #cause = :cause")
            .expression_attribute_names("#error", "provision_error")
            .expression_attribute_names("#cause", "provision_cause")
            .expression_attribute_values(":error", AttributeValue::S(error.into()))
            .expression_attribute_values(":cause", AttributeValue::S(cause.into()))
            .send()
            .await
            .unwrap();
    }

    /// `statemachine/teardown.asl.json`: LookUpJob, TearDownRunners (retried), MarkCleaned.
    async fn teardown_workflow(&mut self, input: WorkflowInput) {
        let item = self
            .dynamo
            .get_item()
            .table_name(&self.fleet_stack.jobs_table)
            .key("job_key", AttributeValue::S(input.job_key.clone()))
            .consistent_read(true)
            .send()
            .await
            .unwrap()
            .item
            .unwrap_or_default();
        let ec2 = item.get("route_type") == Some(&AttributeValue::S(ExecutorKind::Ec2.to_string()));
        if ec2 || input.job.runner.is_some() {
            let teardown = TeardownInput {
                job_key: input.job_key.clone(),
                job: input.job.clone(),
            };
            let mut ok = false;
            let retries = crate::task_retries("teardown.asl.json", "TearDownRunners");
            for attempt in 1.. {
                match self.fleet.teardown(&teardown).await {
                    Ok(_) => {
                        ok = true;
                        break;
                    }
                    Err(e) if attempt < retries.attempts(&e.error_type().name()) => {}
                    Err(e) => {
                        self.report.teardown_failures.push(format!(
                            "{}: {}: {e}",
                            input.job_key,
                            e.error_type()
                        ));
                        break;
                    }
                }
            }
            if !ok {
                return;
            }
        }
        let _ =
            crate::mark_cleaned(&self.dynamo, &self.fleet_stack.jobs_table, &input.job_key).await;
    }

    /// A reconciler pass at virtual now, then the workflows it started.
    async fn reconcile(&mut self) {
        self.report.reconcile_passes += 1;
        match self.reconciler.run(&self.settings, self.now_ms).await {
            Ok(pass) => {
                for (reason, n) in &pass.reconciled {
                    *self.report.reconciled.entry(*reason).or_default() += n;
                }
                self.report.gave_up += pass.gave_up.len() as u64;
                self.report.reconcile_errors.extend(pass.errors.clone());
                self.report.max_oldest_pending_ms = self
                    .report
                    .max_oldest_pending_ms
                    .max(pass.oldest_pending_ms);
            }
            Err(e) => self.report.reconcile_errors.push(e.0),
        }
        if self.o.story {
            self.tell_attempts().await;
        }
        self.run_started_executions().await;
    }

    /// Notes `what` in the job's story (with [`LivenessOptions::story`]).
    fn tell(&mut self, job_id: u64, what: String) {
        if self.o.story {
            let at = self.now_ms.saturating_sub(self.epoch_ms) / 1000;
            self.report
                .story
                .entry(job_id)
                .or_default()
                .push((at, what));
        }
    }

    /// After a pass: the attempts it started, as the jobs' items record them.
    async fn tell_attempts(&mut self) {
        let ids: Vec<u64> = self
            .gitlab
            .state()
            .jobs
            .values()
            .filter(|j| j.project_id == PROJECT)
            .map(|j| j.id)
            .collect();
        for id in ids {
            let item = self.job_item(id).await;
            let text = |k: &str| {
                item.get(k)
                    .and_then(|v| v.as_s().or(v.as_n()).ok())
                    .cloned()
            };
            let (Some(attempt), Some(reason)) = (text("attempt"), text("reconcile_reason")) else {
                continue;
            };
            let line = format!("reconciler: started attempt {attempt} (reason {reason})");
            let told = self
                .report
                .story
                .get(&id)
                .is_some_and(|s| s.iter().any(|(_, l)| *l == line));
            if !told {
                self.tell(id, line);
            }
        }
    }

    /// Executions someone else (the reconciler) started: run each new one once.
    async fn run_started_executions(&mut self) {
        let sfn = aws_sdk_sfn::Client::new(&self.sdk);
        for (arn, workflow) in [
            (self.provision_arn.clone(), Workflow::Provision),
            (self.teardown_arn.clone(), Workflow::Teardown),
        ] {
            let mut fresh = Vec::new();
            let mut pages = sfn
                .list_executions()
                .state_machine_arn(&arn)
                .into_paginator()
                .items()
                .send();
            while let Some(e) = pages.next().await {
                let e = e.unwrap();
                if !self.executions_run.contains(&e.name) {
                    fresh.push((e.name, e.execution_arn));
                }
            }
            fresh.sort();
            for (name, execution_arn) in fresh {
                let described = sfn
                    .describe_execution()
                    .execution_arn(execution_arn)
                    .send()
                    .await
                    .unwrap();
                let input: WorkflowInput =
                    serde_json::from_str(described.input().unwrap_or("{}")).unwrap();
                self.run_execution(workflow, name, input.job).await;
            }
        }
    }

    async fn finish_report(&mut self, wall: Instant) {
        // Faults counted by the proxies.
        self.report.faults.webhook_throttles = self.throttles.load(Ordering::SeqCst);
        self.report.faults.webhook_hard_failures = self.hard.load(Ordering::SeqCst);
        let _ = self.webhook_proxy.fault_count();
        self.report.bound_ms = self.bound_ms();
        self.report.cap = self.o.cap;
        let bound = self.report.bound_ms;
        let jobs: Vec<_> = self
            .gitlab
            .state()
            .jobs
            .values()
            .filter(|j| j.project_id == PROJECT)
            .cloned()
            .collect();
        self.report.jobs = jobs.len() as u64;
        for job in &jobs {
            self.report.handed_out.insert(job.id, job.handed_out);
            if job.finished_ms.is_none() {
                self.report.unfinished.push(job.id);
            }
            let Some(started) = job.started_ms else {
                continue;
            };
            // From when it could have started: the end of the last tick during its wait in
            // which no job could have (every slot held by a live instance, or no capacity).
            // A job capped behind others waits honestly while the cap is full; from the
            // moment a slot is free (and EC2 has capacity) the bound applies.
            let first = ((job.queued_ms - self.epoch_ms) / 1000) as usize;
            let last = ((started - self.epoch_ms) / 1000) as usize;
            let ready_s = (first..last.min(self.blocked.len()))
                .rev()
                .find(|t| self.blocked[*t])
                .map_or(first, |t| t + 1);
            // A job whose instance another job took: a new attempt launches its own instance
            // (one per attempt), so the bound holds from the same start; counted for the
            // printout.
            let taken_until = self
                .report
                .taken_instance_ended_ms
                .get(&job.id)
                .copied()
                .filter(|t| *t < started);
            if taken_until.is_some() {
                self.report.waited_for_taken_instance += 1;
            }
            let ready_ms = (self.epoch_ms + ready_s as u64 * 1000).max(job.queued_ms);
            let ready_s = (ready_ms - self.epoch_ms) / 1000;
            let wait = started - job.queued_ms;
            let ready_wait = started.saturating_sub(ready_ms);
            self.report.waits_ms.insert(job.id, (wait, ready_wait));
            if ready_wait > bound {
                self.report.over_bound.push(format!(
                    "job {}: pending at {} s, could start from {} s, ran at {} s ({} s after; bound {} s), launches {}",
                    job.id,
                    (job.queued_ms - self.epoch_ms) / 1000,
                    ready_s,
                    (started - self.epoch_ms) / 1000,
                    ready_wait / 1000,
                    bound / 1000,
                    self.report.launches.get(&job.id).copied().unwrap_or(0),
                ));
            }
        }
        self.report.reaped = self.reap().await;
        let gitlab_runners = self.gitlab.state().live_runners();
        self.report.leftovers = Leftovers {
            instances: self.fleet_stack.live_instances().await.len(),
            token_parameters: self.fleet_stack.token_parameters().await.len(),
            gitlab_runners,
            slots_used: self.fleet_stack.slots_used("global").await,
            slot_items: self.fleet_stack.slot_items().await.len(),
        };
        self.report.executions_run = self.executions_run.len();
        self.report.wall = wall.elapsed();
    }

    /// Three reaper passes with no graces, an hour after the run (mark, then kill).
    async fn reap(&mut self) -> usize {
        let mut env = self.fleet_env.clone();
        for name in [
            "RUNNER_WAIT_TIMEOUT_SECONDS",
            "RUNNER_BOOT_GRACE_SECONDS",
            "ORPHAN_GRACE_SECONDS",
        ] {
            env.push((name.into(), "0".into()));
        }
        let fleet::FleetSetup::Ec2(config) = FleetStack::setup_of(&env) else {
            panic!("the reaper is configured");
        };
        let reaper = self.fleet_stack.functions_at(&config, &self.sdk).await;
        let later = self.now_ms + 3_600_000;
        let mut reaped = 0;
        for n in 0..3 {
            let invocation = fleet::Invocation {
                request_id: format!("reaper-{n}"),
                deadline_ms: later + 300_000,
            };
            if let Ok(report) = reaper.reap(later + n * 1000, &invocation).await {
                reaped += report.killed.len();
            }
        }
        reaped
    }

    /// Per job key, for diagnostics.
    /// `LIVENESS_TRACE=1199,1200`: after each pass, those jobs' items and GitLab status.
    async fn trace_jobs(&self, t: u64) {
        let Ok(ids) = std::env::var("LIVENESS_TRACE") else {
            return;
        };
        for id in ids.split(',').filter_map(|i| i.trim().parse::<u64>().ok()) {
            let item = self.job_item(id).await;
            let mut fields: Vec<String> = item
                .iter()
                .filter(|(k, _)| !matches!(k.as_str(), "job_key" | "expires_at" | "job_name"))
                .map(|(k, v)| format!("{k}={}", v.as_s().or(v.as_n()).map_or("?", |s| s.as_str())))
                .collect();
            fields.sort();
            let status = self
                .gitlab
                .state()
                .jobs
                .values()
                .find(|j| j.id == id)
                .map(|j| format!("{} runner {:?}", j.status.as_str(), j.runner_id));
            println!(
                "trace t={t} job {id} gitlab={status:?} slots={} item: {}",
                self.slots_now,
                fields.join(" ")
            );
        }
    }

    pub async fn job_item(&self, job_id: u64) -> HashMap<String, AttributeValue> {
        self.dynamo
            .get_item()
            .table_name(&self.fleet_stack.jobs_table)
            .key(
                "job_key",
                AttributeValue::S(
                    JobKey {
                        project_id: PROJECT,
                        job_id,
                    }
                    .table_key(),
                ),
            )
            .consistent_read(true)
            .send()
            .await
            .unwrap()
            .item
            .unwrap_or_default()
    }
}
