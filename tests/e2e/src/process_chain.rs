//! The whole chain with every function as its own built binary, run as Lambda runs it (see
//! [`crate::lambda_process`]): webhook, intake-drainer, router, mapper, ec2-provision,
//! ec2-teardown, reaper and shell-runner each in one warm execution environment, against moto,
//! the GitLab runner API stand-in and `gitlab-runner-mock`. What it adds to the in-process
//! chain ([`crate::chain`]): each binary starts from its own environment variables and handles
//! its typed events through `lambda_runtime`, and each function's memory is its own.
//!
//! A job's life in three rounds, each stage's input being the previous stage's real output:
//! 1. every pending hook (1-5 copies each, shuffled) -> webhook -> bus (or, for every
//!    [`FALLBACK_EVERY`]th hook, whose PutEvents a proxy in front of moto refuses, the intake
//!    fallback queue -> intake-drainer -> bus) -> router -> the provision executions it
//!    started -> mapper -> ec2-provision, or the shell runner (which takes a job from
//!    `gitlab-runner-mock` and runs it in bash);
//! 2. the finished hooks that are not lost, naming the runner that ran the job -> webhook
//!    (and the fallback queue and the drainer, as in round 1) -> bus -> router -> the
//!    teardown executions -> ec2-teardown where the definition calls it;
//! 3. the reaper, three passes with no grace: what the lost finished hooks left.
//!
//! Each hook is sent once, as GitLab sends it: a 5xx would be a lost hook (counted; none is
//! expected here, as only the bus fails and the queue takes the hook).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use aws_config::SdkConfig;
use aws_sdk_dynamodb::types::AttributeValue;
use ephemeral_core::hook::JobEvent;
use ephemeral_core::jobs::JobKey;
use ephemeral_core::mapping::ExecutorKind;
use gitlab_runner_mock::{
    GitlabRunnerMock, MockJob, MockJobState, MockJobStepName, MockJobStepWhen,
};

use crate::chain::{
    ChainOptions, IntakeCounts, Leftovers, WEBHOOK_TOKEN, add_fallback_redrive, create_mappings,
    create_workflows, drainer_env, hook_body, hook_request, hooks_of, receive_batch, record_route,
    reply_says_queued, runner_that_ran, sqs_event,
};
use crate::fleet_stack::{FleetStack, fleet_stack_in};
use crate::lambda_process::{Answer, LambdaProcess, Memory};
use crate::loopback::FaultProxy;
use crate::{WebhookStack, bus_events, create_webhook_stack, sdk_config_at};

/// One function's execution environment after the run.
#[derive(Debug, Clone)]
pub struct FunctionReport {
    pub name: &'static str,
    pub invocations: usize,
    /// Invokes answered with a function error (each retried as the platform would).
    pub errors: usize,
    pub after_init: Memory,
    pub after_run: Memory,
    pub invoke_ms_p50: f64,
    pub invoke_ms_p99: f64,
    /// Size of the binary that ran.
    pub binary_bytes: u64,
}

#[derive(Debug, Default)]
pub struct ProcessChainReport {
    pub hooks: usize,
    pub functions: Vec<FunctionReport>,
    /// Per EC2 job: launches reported by ec2-provision.
    pub launches: BTreeMap<String, u32>,
    pub expected_ec2: BTreeSet<String>,
    /// Per LAMBDA job: shell-runner invocations.
    pub shell_invocations: BTreeMap<String, u32>,
    pub expected_lambda: BTreeSet<String>,
    /// Jobs `gitlab-runner-mock` saw end in success (the shell runner ran their script).
    pub shell_jobs_succeeded: usize,
    pub shell_jobs_enqueued: usize,
    /// EC2 jobs whose finished hooks were all lost: the reaper's to clean up.
    pub lost_finish_ec2: BTreeSet<String>,
    pub reaped: usize,
    pub leftovers: Option<Leftovers>,
    /// The webhook's answers and the intake drainer's work (see [`IntakeCounts`]).
    pub intake: IntakeCounts,
    /// Hooks sent while the proxy refused the webhook's PutEvents.
    pub bus_down_hooks: usize,
}

/// Every this many hooks of a round, the webhook's PutEvents is refused (the bus "does not
/// exist"), so that the hook goes to the fallback queue and through the intake drainer.
pub const FALLBACK_EVERY: usize = 4;

impl ProcessChainReport {
    /// One line per function: invocations, errors, RSS after init and at peak, invoke times.
    pub fn table(&self) -> String {
        let mut out = format!(
            "{:<14} {:>7} {:>6} {:>15} {:>14} {:>13} {:>13} {:>12}\n",
            "function",
            "invokes",
            "errors",
            "RSS init (MiB)",
            "peak RSS (MiB)",
            "invoke p50 ms",
            "invoke p99 ms",
            "binary (MB)"
        );
        for f in &self.functions {
            out += &format!(
                "{:<14} {:>7} {:>6} {:>15.1} {:>14.1} {:>13.1} {:>13.1} {:>12.2}\n",
                f.name,
                f.invocations,
                f.errors,
                f.after_init.rss_kib as f64 / 1024.0,
                f.after_run.peak_rss_kib as f64 / 1024.0,
                f.invoke_ms_p50,
                f.invoke_ms_p99,
                f.binary_bytes as f64 / 1e6,
            );
        }
        out
    }
}

struct Stack {
    sdk: SdkConfig,
    fleet: FleetStack,
    webhook: WebhookStack,
    mappings: String,
    provision_arn: String,
    teardown_arn: String,
    gitlab: GitlabRunnerMock,
    shell_token_parameter: String,
    shell_root: PathBuf,
    logs: PathBuf,
    bin_dir: PathBuf,
    /// In front of moto for the webhook only: refuses its PutEvents while `bus_down` is set.
    webhook_proxy: FaultProxy,
    bus_down: Arc<AtomicBool>,
    /// The fallback queue's dead-letter queue.
    fallback_dead_letters: String,
}

pub const AWS_ENV: [(&str, &str); 4] = [
    ("AWS_REGION", "us-east-1"),
    ("AWS_ACCESS_KEY_ID", "testing"),
    ("AWS_SECRET_ACCESS_KEY", "testing"),
    // The functions log at INFO in Lambda; the same here (to their log file).
    ("AWS_LAMBDA_LOG_LEVEL", "info"),
];

/// The binary `template.yaml` builds for every function but the shell runner.
const COMBINED_BINARY: &str = "lambda-functions";

impl Stack {
    /// `name`'s function with `env` and the template's `Timeout` for it (in seconds), as the
    /// template deploys it: the combined `lambda-functions` binary with `_HANDLER` = `name`
    /// (the function's `Handler`), or the function's own binary (the shell runner).
    async fn start_function(
        &self,
        name: &str,
        timeout_s: u64,
        env: Vec<(String, String)>,
        endpoint: &str,
    ) -> LambdaProcess {
        let mut full: Vec<(String, String)> = AWS_ENV
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        full.push(("AWS_ENDPOINT_URL".into(), endpoint.to_owned()));
        full.extend(env);
        let binary = match lambda_functions::Function::of_handler(Some(name)) {
            Ok(_) => {
                full.push((lambda_functions::HANDLER.into(), name.to_owned()));
                COMBINED_BINARY
            }
            Err(_) => name,
        };
        LambdaProcess::start(
            name,
            &self.bin_dir.join(binary),
            Duration::from_secs(timeout_s),
            &full,
            &self.logs,
        )
        .await
    }
}

fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
    p.iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// Runs the three rounds for `options.jobs` jobs (`workers` and the fault options are not
/// used: one environment per function, no proxy), with the binaries in `bin_dir` (see
/// [`crate::lambda_process::function_bin_dir`]); function logs go to `logs`.
pub async fn run(options: &ChainOptions, bin_dir: &Path, logs: &Path) -> ProcessChainReport {
    let endpoint = crate::start_private_moto();
    let sdk = sdk_config_at(&endpoint);
    let fleet = fleet_stack_in(sdk.clone()).await;
    let webhook = create_webhook_stack(
        &sdk,
        WEBHOOK_TOKEN,
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    )
    .await;
    let mappings = create_mappings(&sdk).await;
    let (provision_arn, teardown_arn) = create_workflows(&sdk).await;
    let gitlab = GitlabRunnerMock::start().await;
    let shell_token_parameter = format!("/{}/shell-runner-token", fleet.name);
    aws_sdk_ssm::Client::new(&sdk)
        .put_parameter()
        .name(&shell_token_parameter)
        .value(gitlab.runner_token())
        .r#type(aws_sdk_ssm::types::ParameterType::SecureString)
        .send()
        .await
        .unwrap();
    let shell_root = logs.join("shell-runner-root");
    let _ = std::fs::remove_dir_all(&shell_root);
    std::fs::create_dir_all(&shell_root).unwrap();
    // The template's redrive policy on the fallback queue (10 receives, then its DLQ).
    let fallback_dead_letters = add_fallback_redrive(&sdk, &webhook).await;
    let bus_down = Arc::new(AtomicBool::new(false));
    let down = bus_down.clone();
    let webhook_proxy = FaultProxy::start(
        &endpoint,
        Box::new(move |request| {
            let put_events = request.header("x-amz-target") == Some("AWSEvents.PutEvents");
            // Not retryable: the SDK gives up at once, the webhook queues the hook.
            (put_events && down.load(Ordering::SeqCst)).then(|| {
                (
                    400,
                    r#"{"__type":"ResourceNotFoundException","message":"Event bus does not exist (fault proxy)."}"#
                        .into(),
                )
            })
        }),
    );
    let stack = Stack {
        sdk,
        fleet,
        webhook,
        mappings,
        provision_arn,
        teardown_arn,
        gitlab,
        shell_token_parameter,
        shell_root,
        logs: logs.to_path_buf(),
        bin_dir: bin_dir.to_path_buf(),
        webhook_proxy,
        bus_down,
        fallback_dead_letters,
    };
    let mut f = start_all(&stack, &endpoint).await;

    let hooks = hooks_of(options);
    let mut report = ProcessChainReport {
        hooks: hooks.len(),
        ..Default::default()
    };
    for e in &hooks {
        let key = JobKey::of(e).table_key();
        if e.job_name == "docker-build" {
            report.expected_ec2.insert(key);
        } else {
            report.expected_lambda.insert(key);
        }
    }
    let (pending, finished): (Vec<JobEvent>, Vec<JobEvent>) =
        hooks.into_iter().partition(|e| !e.status.is_finished());
    let finishing: BTreeSet<String> = finished.iter().map(|e| JobKey::of(e).table_key()).collect();
    report.lost_finish_ec2 = report
        .expected_ec2
        .difference(&finishing)
        .cloned()
        .collect();

    // Round 1: pending hooks to runners.
    let mut forwarded = deliver(&stack, &mut f.webhook, &pending, &mut report).await;
    forwarded += drain(&stack, &mut f.drainer, &mut report.intake).await;
    route(&stack, &mut f.router, forwarded).await;
    let mut shell_jobs = Vec::new();
    for input in executions(&stack.sdk, &stack.provision_arn).await {
        let decision = with_retries(&mut f.mapper, &input, |_| 4).await;
        let job_key = input["job_key"].as_str().unwrap().to_owned();
        // CheckDecision and RecordRoute read the answer's `type`.
        let kind: ExecutorKind = decision["type"]
            .as_str()
            .expect("the mapper answers a type")
            .parse()
            .expect("the mapper's type is an executor kind");
        let matched = decision["matched"].as_str().unwrap_or_default();
        record_route(
            &aws_sdk_dynamodb::Client::new(&stack.sdk),
            &stack.fleet.jobs_table,
            &job_key,
            kind,
            matched,
        )
        .send()
        .await
        .unwrap();
        if kind == ExecutorKind::Lambda {
            // ProvisionLambdaRunner: the stack's shared token (no runner made).
            let state = serde_json::json!({"job_key": job_key, "job": input["job"], "mapped": {"decision": decision}});
            let grant = with_retries(
                &mut f.provision,
                &state,
                as_defined("provision.asl.json", "ProvisionLambdaRunner"),
            )
            .await;
            assert_eq!(grant["outcome"], "shared_token", "{grant}");
            // StartShellRunner: the invoke wakes the runner; the job comes from GitLab.
            shell_jobs.push(enqueue_shell_job(&stack.gitlab, &job_key));
            let payload =
                serde_json::json!({"job_key": job_key, "job": input["job"], "runner": grant});
            let answer = with_retries(&mut f.shell_runner, &payload, |_| 1).await;
            assert_eq!(answer["outcome"], "ran", "shell runner: {answer}");
            *report.shell_invocations.entry(job_key).or_default() += 1;
            continue;
        }
        let state = serde_json::json!({"job_key": job_key, "job": input["job"], "mapped": {"decision": decision}});
        let outcome = with_retries(
            &mut f.provision,
            &state,
            as_defined("provision.asl.json", "ProvisionEc2Runner"),
        )
        .await;
        if outcome["outcome"] == "launched" {
            *report.launches.entry(job_key).or_default() += 1;
        }
    }
    report.shell_jobs_enqueued = shell_jobs.len();
    report.shell_jobs_succeeded = shell_jobs
        .iter()
        .filter(|j| j.state() == MockJobState::Success)
        .count();

    // Round 2: the finished hooks that arrive, each naming the runner that ran its job.
    let mut finished_hooks = Vec::new();
    for mut e in finished {
        let on_shell = report
            .shell_invocations
            .contains_key(&JobKey::of(&e).table_key());
        e.runner = runner_that_ran(&stack.fleet, on_shell, &e).await;
        finished_hooks.push(e);
    }
    let mut forwarded = deliver(&stack, &mut f.webhook, &finished_hooks, &mut report).await;
    forwarded += drain(&stack, &mut f.drainer, &mut report.intake).await;
    route(&stack, &mut f.router, forwarded).await;
    for input in executions(&stack.sdk, &stack.teardown_arn).await {
        // LookUpJob, then TearDownRunners when the job went to EC2 or a runner ran it.
        let job: JobEvent = serde_json::from_value(input["job"].clone()).unwrap();
        let item = stack.fleet.job_item(&job).await;
        let ec2 = item.get("route_type") == Some(&AttributeValue::S(ExecutorKind::Ec2.to_string()));
        if ec2 || !input["job"]["runner"].is_null() {
            with_retries(
                &mut f.teardown,
                &input,
                as_defined("teardown.asl.json", "TearDownRunners"),
            )
            .await;
        }
    }

    // Round 3: the reaper, as its schedule would run it (three passes: mark, then kill).
    let scheduled = serde_json::json!({
        "version": "0", "id": "reaper-tick", "detail-type": "Scheduled Event",
        "source": "aws.events", "account": "123456789012", "time": "2026-11-24T00:00:00Z",
        "region": "us-east-1", "resources": [], "detail": {}
    });
    for _ in 0..3 {
        let answer = f.reaper.invoke(&scheduled).await.ok();
        report.reaped += answer["killed"].as_array().map_or(0, Vec::len);
    }
    report.leftovers = Some(Leftovers {
        instances: stack.fleet.live_instances().await.len(),
        token_parameters: stack.fleet.token_parameters().await.len(),
        gitlab_runners: stack.fleet.gitlab.state().runners.len(),
    });
    report.functions = f.reports();
    report
}

struct Functions {
    webhook: LambdaProcess,
    drainer: LambdaProcess,
    router: LambdaProcess,
    mapper: LambdaProcess,
    provision: LambdaProcess,
    shell_runner: LambdaProcess,
    teardown: LambdaProcess,
    reaper: LambdaProcess,
    /// GitLab's jobs API the mapper asks; served while the functions run.
    _jobs_api: crate::GitLabStandIn,
}

impl Functions {
    fn reports(&self) -> Vec<FunctionReport> {
        [
            ("webhook", &self.webhook),
            ("intake-drainer", &self.drainer),
            ("router", &self.router),
            ("mapper", &self.mapper),
            ("ec2-provision", &self.provision),
            ("shell-runner", &self.shell_runner),
            ("ec2-teardown", &self.teardown),
            ("reaper", &self.reaper),
        ]
        .into_iter()
        .map(|(name, p)| {
            let mut times: Vec<f64> = p
                .invoke_times
                .iter()
                .map(|t| t.as_secs_f64() * 1000.0)
                .collect();
            times.sort_by(f64::total_cmp);
            let pct = |q: f64| {
                if times.is_empty() {
                    0.0
                } else {
                    times[((times.len() - 1) as f64 * q).round() as usize]
                }
            };
            FunctionReport {
                name,
                invocations: p.invoke_times.len(),
                errors: p.errors,
                after_init: p.after_init,
                after_run: p.memory(),
                invoke_ms_p50: pct(0.5),
                invoke_ms_p99: pct(0.99),
                binary_bytes: std::fs::metadata(&p.binary).map_or(0, |m| m.len()),
            }
        })
        .collect()
    }
}

/// Each function with the environment the template gives it.
async fn start_all(stack: &Stack, endpoint: &str) -> Functions {
    let w = &stack.webhook;
    let webhook = stack
        .start_function(
            "webhook",
            9,
            pairs(&[
                ("EVENT_BUS_NAME", &w.bus),
                ("DEDUP_TABLE_NAME", &w.table),
                ("SECRET_TOKEN_PARAMETER", &w.token_parameter),
                ("SIGNING_TOKEN_PARAMETER", &w.signing_parameter),
                ("AUTH_MODE", "either"),
                ("FALLBACK_QUEUE_URL", &w.fallback_queue_url),
            ]),
            // Through the proxy that can refuse its PutEvents.
            &stack.webhook_proxy.url,
        )
        .await;
    // IntakeDrainerFunction: Timeout 30, the webhook's bus and table, DedupTtlSeconds.
    let drainer = stack
        .start_function("intake-drainer", 30, drainer_env(w), endpoint)
        .await;
    let router = stack
        .start_function(
            "router",
            30,
            pairs(&[
                ("JOBS_TABLE_NAME", &stack.fleet.jobs_table),
                ("PROVISION_STATE_MACHINE_ARN", &stack.provision_arn),
                ("TEARDOWN_STATE_MACHINE_ARN", &stack.teardown_arn),
            ]),
            endpoint,
        )
        .await;
    // The mapper confirms each job with GitLab's jobs API (a stand-in that has every job
    // pending) with a read_api token from SSM, as GitLabApiTokenParameterName gives it.
    let jobs_api = crate::GitLabStandIn::start(crate::fleet_stack::API_TOKEN, vec![], vec![]).await;
    jobs_api.answer_every_job();
    let mapper = stack
        .start_function(
            "mapper",
            30,
            pairs(&[
                ("MAPPING_TABLE_NAME", &stack.mappings),
                ("DEFAULT_EXECUTOR", "EC2"),
                ("GITLAB_URL", &jobs_api.url),
                (
                    "GITLAB_API_TOKEN_PARAMETER",
                    &stack.fleet.api_token_parameter,
                ),
            ]),
            endpoint,
        )
        .await;
    // The shell runner here takes jobs from gitlab-runner-mock, which knows one runner token:
    // the explicit shared-token mode. Per-job runners through the real binary are
    // tests/lambda_runner_moto.rs's, against a GitLab that keeps runners.
    let provision = stack
        .start_function(
            "ec2-provision",
            120,
            stack.fleet.env(&[("SHELL_RUNNER_MODE", "shared-token")]),
            endpoint,
        )
        .await;
    let gitlab_url = stack.gitlab.uri().to_string();
    let shell_runner = stack
        .start_function(
            "shell-runner",
            900,
            pairs(&[
                ("GITLAB_URL", gitlab_url.trim_end_matches('/')),
                ("RUNNER_TOKEN_PARAMETER", &stack.shell_token_parameter),
                ("SHELL_RUNNER_ROOT", stack.shell_root.to_str().unwrap()),
                // The sweep as deployed: this process's jobs are its only descendants.
                ("SANDBOX_SCRATCH_ROOT", stack.shell_root.to_str().unwrap()),
                // The job is queued before the invoke: one request finds it.
                ("REQUEST_WAIT_SECONDS", "0"),
            ]),
            endpoint,
        )
        .await;
    let teardown = stack
        .start_function("ec2-teardown", 120, stack.fleet.env(&[]), endpoint)
        .await;
    let reaper = stack
        .start_function(
            "reaper",
            300,
            stack.fleet.env(&[
                ("RUNNER_WAIT_TIMEOUT_SECONDS", "0"),
                ("RUNNER_BOOT_GRACE_SECONDS", "0"),
                ("ORPHAN_GRACE_SECONDS", "0"),
            ]),
            endpoint,
        )
        .await;
    Functions {
        webhook,
        drainer,
        router,
        mapper,
        provision,
        shell_runner,
        teardown,
        reaper,
        _jobs_api: jobs_api,
    }
}

/// Invokes until the answer is not an error; `attempts` says how many attempts in all an
/// error (`{errorType, errorMessage}`) gets, and one beyond them fails the run with the
/// function's own message.
async fn with_retries(
    process: &mut LambdaProcess,
    payload: &serde_json::Value,
    attempts: impl Fn(&serde_json::Value) -> u32,
) -> serde_json::Value {
    for attempt in 1.. {
        match process.invoke(payload).await {
            Answer::Ok(v) => return v,
            Answer::Error(e) => {
                process.errors += 1;
                let allowed = attempts(&e);
                assert!(
                    attempt < allowed,
                    "{} failed (attempt {attempt} of {allowed}): {e}",
                    process.name
                );
            }
        }
    }
    unreachable!()
}

/// The attempts the `Retry` of a Lambda task of the workflows gives the error its function
/// answered (by `errorType`), as the definition says.
fn as_defined(file: &str, state: &str) -> impl Fn(&serde_json::Value) -> u32 + use<> {
    let rules = crate::task_retries(file, state);
    move |e| rules.attempts(e["errorType"].as_str().unwrap_or_default())
}

/// Each hook as GitLab sends it: once (GitLab does not resend a hook answered 5xx; such a hook
/// is counted lost). Every [`FALLBACK_EVERY`]th hook goes while the bus refuses the webhook's
/// PutEvents. Answers how many were forwarded (202 `accepted`: exactly one event each on the
/// bus); the queued ones (202 `... queued`) are the drainer's.
async fn deliver(
    stack: &Stack,
    webhook: &mut LambdaProcess,
    hooks: &[JobEvent],
    report: &mut ProcessChainReport,
) -> usize {
    let mut forwarded = 0;
    for (i, e) in hooks.iter().enumerate() {
        let payload = serde_json::to_value(hook_request(&e.delivery_id, &hook_body(e))).unwrap();
        let bus_down = i % FALLBACK_EVERY == FALLBACK_EVERY - 1;
        report.bus_down_hooks += usize::from(bus_down);
        stack.bus_down.store(bus_down, Ordering::SeqCst);
        let answer = webhook.invoke(&payload).await.ok();
        stack.bus_down.store(false, Ordering::SeqCst);
        let status = answer["statusCode"].as_i64().unwrap();
        let body = answer["body"].as_str().unwrap_or_default();
        let intake = &mut report.intake;
        intake.hooks_sent += 1;
        match status {
            200..=299 => intake.answered_2xx += 1,
            500.. => intake.lost += 1,
            _ => intake.rejected += 1,
        }
        if reply_says_queued(status, body) {
            intake.queued += 1;
        } else if status == 202 && body == "accepted" {
            forwarded += 1;
        }
        assert!(
            (200..300).contains(&status) && (reply_says_queued(status, body) == bus_down),
            "the webhook answered {status} `{body}` to {} (bus down: {bus_down})",
            e.delivery_id
        );
    }
    forwarded
}

/// The fallback queue's event source: batches of up to 10 messages, as Lambda builds the SQS
/// event, to the intake-drainer process; the messages its `SqsBatchResponse` does not list
/// are deleted, the listed ones handed out again in the next round, until the queue is empty
/// (the redrive policy files a message in the dead-letter queue after 10 receives). Answers
/// how many job events it forwarded to the bus.
async fn drain(stack: &Stack, drainer: &mut LambdaProcess, intake: &mut IntakeCounts) -> usize {
    let sqs = aws_sdk_sqs::Client::new(&stack.sdk);
    let queue = &stack.webhook.fallback_queue_url;
    let mut forwarded = 0;
    loop {
        let mut received = 0;
        let mut failed_handles = Vec::new();
        loop {
            let messages = receive_batch(&sqs, queue, 600).await;
            if messages.is_empty() {
                break;
            }
            received += messages.len();
            let event = serde_json::to_value(sqs_event(queue, &messages)).unwrap();
            let answer = drainer.invoke(&event).await.ok();
            let failed: BTreeSet<&str> = answer["batchItemFailures"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|f| f["itemIdentifier"].as_str())
                .collect();
            for m in &messages {
                if failed.contains(m.message_id().unwrap_or_default()) {
                    intake.drain_retries += 1;
                    failed_handles.push(m.receipt_handle().unwrap_or_default().to_owned());
                    continue;
                }
                sqs.delete_message()
                    .queue_url(queue)
                    .receipt_handle(m.receipt_handle().unwrap_or_default())
                    .send()
                    .await
                    .unwrap();
                intake.drained += 1;
                let body: serde_json::Value =
                    serde_json::from_str(m.body().unwrap_or_default()).unwrap_or_default();
                forwarded += usize::from(body["kind"] == "job_event");
            }
        }
        // What failed is visible again for the next round (SQS: after the visibility timeout).
        for handle in &failed_handles {
            sqs.change_message_visibility()
                .queue_url(queue)
                .receipt_handle(handle)
                .visibility_timeout(0)
                .send()
                .await
                .unwrap();
        }
        if received == 0 {
            // Moved there by that last receive: failed 10 times, lost until redriven.
            loop {
                let dead = receive_batch(&sqs, &stack.fallback_dead_letters, 600).await;
                if dead.is_empty() {
                    return forwarded;
                }
                intake.drainer_dead_letters += dead.len() as u64;
                for m in &dead {
                    sqs.delete_message()
                        .queue_url(&stack.fallback_dead_letters)
                        .receipt_handle(m.receipt_handle().unwrap_or_default())
                        .send()
                        .await
                        .unwrap();
                }
            }
        }
    }
}

/// Every job event on the bus goes to the router (up to 3 attempts: Lambda's asynchronous
/// invoke and its two retries).
async fn route(stack: &Stack, router: &mut LambdaProcess, forwarded: usize) {
    let envelopes = bus_events(
        &stack.sdk,
        &stack.webhook,
        forwarded,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(envelopes.len(), forwarded, "events on the bus");
    for envelope in envelopes {
        if envelope["detail-type"] == "GitLab Job Event" {
            with_retries(router, &envelope, |_| 3).await;
        }
    }
}

/// The inputs of the state machine's executions, in start order.
async fn executions(sdk: &SdkConfig, state_machine_arn: &str) -> Vec<serde_json::Value> {
    let sfn = aws_sdk_sfn::Client::new(sdk);
    let mut executions = Vec::new();
    let mut pages = sfn
        .list_executions()
        .state_machine_arn(state_machine_arn)
        .into_paginator()
        .items()
        .send();
    while let Some(e) = pages.next().await {
        let e = e.unwrap();
        executions.push((e.start_date().secs(), e.execution_arn().to_owned()));
    }
    executions.sort();
    let mut inputs = Vec::new();
    for (_, arn) in executions {
        let described = sfn
            .describe_execution()
            .execution_arn(arn)
            .send()
            .await
            .unwrap();
        inputs.push(serde_json::from_str(described.input().unwrap()).unwrap());
    }
    inputs
}

/// A job in GitLab for the shell runner to take: a script that says which job it is.
fn enqueue_shell_job(gitlab: &GitlabRunnerMock, job_key: &str) -> MockJob {
    let mut b = gitlab.job_builder(job_key.to_owned());
    b.add_step(
        MockJobStepName::Script,
        vec![
            format!("echo 'running {job_key}'"),
            "test -d \"$CI_PROJECT_DIR\"".into(),
        ],
        600,
        MockJobStepWhen::OnSuccess,
        false,
    );
    b.add_variable("GIT_STRATEGY".into(), "none".into(), true, false);
    let job = b.build();
    gitlab.enqueue_job(job.clone());
    job
}
