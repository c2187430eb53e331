//! A stack for the EC2 runner functions in moto (jobs and runners tables, GitLab token
//! parameter, a VPC with two subnets) plus a GitLab runner API stand-in, and helpers to drive
//! the functions the way the workflows do.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_ec2::types::Filter;
use base64::Engine as _;
use ephemeral_core::fleet::Provisioned;
use ephemeral_core::hook::{JobEvent, JobStatus, RunnerRef};
use ephemeral_core::jobs::JobKey;
use ephemeral_gitlab::RetryPolicy;
use fleet::{FleetConfig, FleetSetup, Functions, Invocation, ProvisionInput, TeardownInput};

use crate::loopback::RunnerApiStandIn;
use crate::{create_table, sdk_config, unique};

pub const API_TOKEN: &str = "glpat-test-api-token-0000";
/// The `read_api` token's value: the same as [`API_TOKEN`], because the stand-ins check one
/// token; the functions read it from its own parameter (`GITLAB_API_TOKEN_PARAMETER`).
pub const READ_API_TOKEN: &str = API_TOKEN;
pub const AMI_PARAMETER: &str =
    "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64";

/// Log lines written while the guard lives (the functions log JSON through `tracing`).
#[derive(Clone, Default)]
pub struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub fn capture_logs() -> (Captured, tracing::subscriber::DefaultGuard) {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_writer(move || writer.clone())
        .finish();
    (captured, tracing::subscriber::set_default(subscriber))
}

pub struct FleetStack {
    pub sdk: aws_config::SdkConfig,
    pub ec2: aws_sdk_ec2::Client,
    pub ssm: aws_sdk_ssm::Client,
    pub gitlab: RunnerApiStandIn,
    pub name: String,
    pub jobs_table: String,
    pub runners_table: String,
    pub leases_table: String,
    /// Counts instances against the caps; used only when a test sets a cap
    /// (`MAX_RUNNER_INSTANCES` or `MAX_RUNNER_INSTANCES_PER_PROJECT`).
    pub slots_table: String,
    pub prefix: String,
    pub subnets: Vec<String>,
    pub api_token_parameter: String,
    /// The `read_api` token's parameter (GitLabApiTokenParameterName): teardown confirms
    /// finished hooks with it.
    pub read_token_parameter: String,
}

/// What the template creates for the EC2 runners: the jobs and runners tables, the GitLab
/// token parameter, two subnets; plus a GitLab stand-in.
pub async fn fleet_stack() -> FleetStack {
    fleet_stack_in(sdk_config()).await
}

/// The same in the moto server `sdk` points at.
pub async fn fleet_stack_in(sdk: aws_config::SdkConfig) -> FleetStack {
    let ec2 = aws_sdk_ec2::Client::new(&sdk);
    let ssm = aws_sdk_ssm::Client::new(&sdk);
    let name = unique("fleet");
    let vpc = ec2
        .create_vpc()
        .cidr_block("10.9.0.0/16")
        .send()
        .await
        .unwrap()
        .vpc
        .unwrap()
        .vpc_id
        .unwrap();
    let mut subnets = Vec::new();
    for (n, zone) in ["us-east-1a", "us-east-1b"].iter().enumerate() {
        subnets.push(
            ec2.create_subnet()
                .vpc_id(&vpc)
                .cidr_block(format!("10.9.{n}.0/24"))
                .availability_zone(*zone)
                .send()
                .await
                .unwrap()
                .subnet
                .unwrap()
                .subnet_id
                .unwrap(),
        );
    }
    let api_token_parameter = format!("/{name}/gitlab-runner-api-token");
    ssm.put_parameter()
        .name(&api_token_parameter)
        .value(API_TOKEN)
        .r#type(aws_sdk_ssm::types::ParameterType::SecureString)
        .send()
        .await
        .unwrap();
    let read_token_parameter = format!("/{name}/gitlab-read-api-token");
    ssm.put_parameter()
        .name(&read_token_parameter)
        .value(READ_API_TOKEN)
        .r#type(aws_sdk_ssm::types::ParameterType::SecureString)
        .send()
        .await
        .unwrap();
    // Distinct runner ids per test: the runner registry is per stack, GitLab is not.
    let first_id = u64::from(std::process::id()) * 1000 + rand_offset();
    FleetStack {
        jobs_table: create_table(&sdk, "jobs", "job_key", None).await,
        runners_table: create_table(&sdk, "runners", "runner_id", None).await,
        leases_table: create_table(&sdk, "leases", "lease_name", None).await,
        slots_table: create_table(&sdk, "slots", "slot_key", None).await,
        gitlab: RunnerApiStandIn::start(API_TOKEN, first_id).await,
        prefix: format!("/{name}/runner-tokens"),
        subnets,
        api_token_parameter,
        read_token_parameter,
        name,
        sdk,
        ec2,
        ssm,
    }
}

fn rand_offset() -> u64 {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    N.fetch_add(100, std::sync::atomic::Ordering::SeqCst)
}

impl FleetStack {
    pub fn config(&self, extra: &[(&str, &str)]) -> FleetConfig {
        let vars: std::collections::HashMap<String, String> = self.env(extra).into_iter().collect();
        FleetConfig::from_lookup(|k| vars.get(k).cloned()).unwrap()
    }

    /// The EC2 functions' environment, as the template sets it, with `extra` on top.
    pub fn env(&self, extra: &[(&str, &str)]) -> Vec<(String, String)> {
        let subnets = self.subnets.join(",");
        let mut vars: std::collections::BTreeMap<&str, String> = [
            ("GITLAB_URL", self.gitlab.url.clone()),
            ("STACK_NAME", self.name.clone()),
            ("TOKEN_PARAMETER_PREFIX", self.prefix.clone()),
            ("AWS_REGION", "us-east-1".into()),
            ("JOBS_TABLE_NAME", self.jobs_table.clone()),
            ("RUNNERS_TABLE_NAME", self.runners_table.clone()),
            ("LEASES_TABLE_NAME", self.leases_table.clone()),
            // As the template sets it; without a cap it is not used.
            ("SLOTS_TABLE_NAME", self.slots_table.clone()),
            (
                "GITLAB_RUNNER_TOKEN_PARAMETER",
                self.api_token_parameter.clone(),
            ),
            (
                "GITLAB_API_TOKEN_PARAMETER",
                self.read_token_parameter.clone(),
            ),
            (
                "INSTANCE_ARN_PREFIX",
                "arn:aws:ec2:us-east-1:123456789012:instance/".into(),
            ),
            ("SUBNET_IDS", subnets),
            ("DEFAULT_AMI", format!("ssm:{AMI_PARAMETER}")),
            ("DEFAULT_INSTANCE_TYPE", "t3.micro".into()),
            ("COST_TAGS", "team=ci".into()),
        ]
        .into_iter()
        .collect();
        for (k, v) in extra {
            vars.insert(k, (*v).to_owned());
        }
        vars.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
    }

    /// The functions' environment in a stack without EC2 settings, as the template gives it:
    /// RunnerApiTokenParameterName, RegistrationTokenParameterName, GitLabUrl and SubnetIds
    /// empty, everything else as usual.
    pub fn lambda_only_env(&self) -> Vec<(String, String)> {
        self.env(&[
            ("GITLAB_URL", ""),
            ("GITLAB_RUNNER_TOKEN_PARAMETER", ""),
            ("GITLAB_REGISTRATION_TOKEN_PARAMETER", ""),
            ("SUBNET_IDS", ""),
            // No runner can be made without the runner API token: the shared token it is.
            ("SHELL_RUNNER_MODE", "shared-token"),
        ])
    }

    /// What the functions make of `env` (configured, or not).
    pub fn setup_of(env: &[(String, String)]) -> FleetSetup {
        let vars: std::collections::HashMap<_, _> = env.iter().cloned().collect();
        FleetSetup::from_lookup(|k| vars.get(k).cloned()).unwrap()
    }

    pub async fn functions(&self, config: &FleetConfig) -> Functions {
        self.functions_at(config, &self.sdk).await
    }

    pub async fn functions_at(
        &self,
        config: &FleetConfig,
        sdk: &aws_config::SdkConfig,
    ) -> Functions {
        let fast = RetryPolicy {
            max_retries: 3,
            min_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(50),
        };
        Functions::with_retry(config, sdk, fast).await.unwrap()
    }

    /// GitLab's record of a job (what teardown confirms a finished hook with): its status and
    /// the runner that ran it.
    pub fn gitlab_job(&self, job: &JobEvent, status: JobStatus, runner: Option<u64>) {
        self.gitlab.state().jobs.insert(
            (job.project_id, job.job_id),
            (status.as_str().to_owned(), runner),
        );
    }

    /// The teardown input for a job that finished in GitLab too (GitLab agrees with the hook).
    pub fn finished(
        &self,
        job: &JobEvent,
        status: JobStatus,
        runner: Option<u64>,
    ) -> TeardownInput {
        self.gitlab_job(job, status.clone(), runner);
        finished(job, status, runner)
    }

    /// The job's item as the router leaves it when it starts the provision workflow.
    pub async fn job_is_provisioning(&self, job: &JobEvent) {
        aws_sdk_dynamodb::Client::new(&self.sdk)
            .put_item()
            .table_name(&self.jobs_table)
            .item("job_key", AttributeValue::S(JobKey::of(job).table_key()))
            .item("phase", AttributeValue::S("provisioning".into()))
            .item("phase_rank", AttributeValue::N("2".into()))
            .send()
            .await
            .unwrap();
    }

    /// The reconciler's claim of the job's next provision attempt, as it leaves the item
    /// (`attempt`; the router's start has none: attempt 1).
    pub async fn job_attempt_is(&self, job: &JobEvent, attempt: u32) {
        aws_sdk_dynamodb::Client::new(&self.sdk)
            .update_item()
            .table_name(&self.jobs_table)
            .key("job_key", AttributeValue::S(JobKey::of(job).table_key()))
            .update_expression("SET attempt = :attempt")
            .expression_attribute_values(":attempt", AttributeValue::N(attempt.to_string()))
            .send()
            .await
            .unwrap();
    }

    pub async fn job_item(
        &self,
        job: &JobEvent,
    ) -> std::collections::HashMap<String, AttributeValue> {
        self.jobs_table_item(&JobKey::of(job).table_key()).await
    }

    /// Any item of the jobs table by its key (a job's, a control item, a pool claim).
    pub async fn jobs_table_item(
        &self,
        key: &str,
    ) -> std::collections::HashMap<String, AttributeValue> {
        aws_sdk_dynamodb::Client::new(&self.sdk)
            .get_item()
            .table_name(&self.jobs_table)
            .key("job_key", AttributeValue::S(key.to_owned()))
            .consistent_read(true)
            .send()
            .await
            .unwrap()
            .item
            .unwrap_or_default()
    }

    /// Per job (its table key, from the instance's tags): how many instances the stack ever
    /// gave a runner (the `runner-id` tag, the step's commit mark), in any state; and how many
    /// instances were launched but never got one (a step that failed midway and removed what
    /// it made). EC2's own record, whatever the functions answered.
    pub async fn runner_instances_per_job(&self) -> (std::collections::BTreeMap<String, u32>, u32) {
        let mut per_job = std::collections::BTreeMap::new();
        let mut without_runner = 0;
        let mut pages = self
            .ec2
            .describe_instances()
            .filters(
                Filter::builder()
                    .name("tag:ephemeral-runners:managed-by")
                    .values(&self.name)
                    .build(),
            )
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            for instance in page
                .unwrap()
                .reservations()
                .iter()
                .flat_map(|r| r.instances())
            {
                if tag(instance, "ephemeral-runners:runner-id").is_none() {
                    without_runner += 1;
                    continue;
                }
                let id = |key| tag(instance, key).and_then(|v| v.parse().ok()).unwrap_or(0);
                let key = JobKey {
                    project_id: id("ephemeral-runners:project-id"),
                    job_id: id("ephemeral-runners:job-id"),
                };
                *per_job.entry(key.table_key()).or_default() += 1;
            }
        }
        (per_job, without_runner)
    }

    /// The stack's instances that still run (or are starting).
    pub async fn live_instances(&self) -> Vec<aws_sdk_ec2::types::Instance> {
        self.instances_in(&["pending", "running"]).await
    }

    /// The stack's instances in any of `states` (EC2's names: `stopped`, `terminated`, ...).
    pub async fn instances_in(&self, states: &[&str]) -> Vec<aws_sdk_ec2::types::Instance> {
        let out = self
            .ec2
            .describe_instances()
            .filters(
                Filter::builder()
                    .name("tag:ephemeral-runners:managed-by")
                    .values(&self.name)
                    .build(),
            )
            .filters(
                Filter::builder()
                    .name("instance-state-name")
                    .set_values(Some(states.iter().map(|s| s.to_string()).collect()))
                    .build(),
            )
            .send()
            .await
            .unwrap();
        out.reservations()
            .iter()
            .flat_map(|r| r.instances().to_vec())
            .collect()
    }

    pub async fn token_parameters(&self) -> Vec<String> {
        let out = self
            .ssm
            .get_parameters_by_path()
            .path(&self.prefix)
            .send()
            .await
            .unwrap();
        out.parameters()
            .iter()
            .filter_map(|p| p.name().map(str::to_owned))
            .collect()
    }

    pub async fn user_data(&self, instance_id: &str) -> String {
        let out = self
            .ec2
            .describe_instance_attribute()
            .instance_id(instance_id)
            .attribute(aws_sdk_ec2::types::InstanceAttributeName::UserData)
            .send()
            .await
            .unwrap();
        let encoded = out.user_data().and_then(|u| u.value()).unwrap_or_default();
        String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .unwrap(),
        )
        .unwrap()
    }

    /// A counter of the slots table (`global`, `project#<id>`): 0 when absent.
    pub async fn slots_used(&self, counter: &str) -> u64 {
        aws_sdk_dynamodb::Client::new(&self.sdk)
            .get_item()
            .table_name(&self.slots_table)
            .key("slot_key", AttributeValue::S(counter.into()))
            .consistent_read(true)
            .send()
            .await
            .unwrap()
            .item
            .and_then(|i| i.get("used").cloned())
            .map_or(0, |used| used.as_n().unwrap().parse().unwrap())
    }

    /// The slot items (one per job that holds a slot): their keys.
    pub async fn slot_items(&self) -> Vec<String> {
        let mut keys: Vec<String> = crate::scan_items(&self.sdk, &self.slots_table)
            .await
            .into_iter()
            .filter_map(|i| i.get("slot_key")?.as_s().ok().cloned())
            .filter(|k| k.starts_with("slot#"))
            .collect();
        keys.sort();
        keys
    }

    pub fn assert_no_token_in(&self, what: &str, text: &str) {
        let state = self.gitlab.state();
        assert!(!state.issued_tokens.is_empty(), "no token was issued");
        for token in &state.issued_tokens {
            assert!(
                !text.contains(token.as_str()),
                "a runner token leaked into {what}"
            );
        }
        assert!(
            !text.contains(API_TOKEN),
            "the GitLab API token leaked into {what}"
        );
    }
}

/// An invocation of its own (a fresh request id) with the reaper's template timeout (300 s).
pub fn invocation() -> Invocation {
    Invocation {
        request_id: unique("request"),
        deadline_ms: fleet::now_ms() + 300_000,
    }
}

pub fn tag<'a>(instance: &'a aws_sdk_ec2::types::Instance, key: &str) -> Option<&'a str> {
    instance
        .tags()
        .iter()
        .find(|t| t.key() == Some(key))
        .and_then(|t| t.value())
}

/// The provision workflow's state at the EC2 step, as JSON the way Step Functions passes it.
pub fn provision_input(job: &JobEvent, decision: serde_json::Value) -> (ProvisionInput, String) {
    let json = serde_json::json!({
        "job_key": JobKey::of(job).table_key(),
        "job": job,
        "mapped": {"decision": decision},
    })
    .to_string();
    (serde_json::from_str(&json).unwrap(), json)
}

pub fn ec2_route() -> serde_json::Value {
    serde_json::json!({"type": "EC2", "matched": "default", "reason": "test", "tags": ["docker"]})
}

pub fn finished(job: &JobEvent, status: JobStatus, runner: Option<u64>) -> TeardownInput {
    let mut event = job.clone();
    event.status = status;
    event.runner = runner.map(|id| RunnerRef {
        id,
        description: None,
        tags: vec![],
    });
    TeardownInput {
        job_key: JobKey::of(job).table_key(),
        job: event,
    }
}

pub fn launched(outcome: &Provisioned) -> (String, u64) {
    match outcome {
        Provisioned::Launched {
            instance_id,
            runner_id,
            ..
        } => (instance_id.clone(), *runner_id),
        other => panic!("expected a launch, got {other:?}"),
    }
}
