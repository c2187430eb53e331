//! `runner-ops`, the real binary, against moto: its exit codes and output, with the state made
//! by the real functions (the webhook, the intake drainer, the router, the provision step and
//! the reconciler) the way the platform runs them. A drained provision waits and undrain lets
//! the reconciler start it; retry starts exactly one attempt; a dead-lettered hook is replayed
//! and reaches the router once; bad input says what to fix.

use std::collections::HashMap;
use std::io::Write as _;
use std::net::TcpListener;
use std::process::Command as Process;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use aws_config::SdkConfig;
use aws_lambda_events::eventbridge::EventBridgeEvent;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType,
    ScalarAttributeType,
};
use e2e_tests::fleet_stack::{FleetStack, ec2_route, fleet_stack, provision_input};
use e2e_tests::*;
use ephemeral_core::fleet::Provisioned;
use ephemeral_core::hook::{JobEvent, JobStatus};
use ephemeral_core::jobs::{JobKey, ProvisionOn};
use ephemeral_core::lambda_runner::RunnerGrant;
use ephemeral_core::reconcile::{
    GitLabJobState, Reason, ReconcileSettings, teardown_execution_name,
};
use ephemeral_core::slots::CapReached;
use ephemeral_core::testing::job_event;
use ephemeral_gitlab::{GitLabClient, RetryPolicy, Secret};
use fleet::ProvisionOutput;
use reconciler::aws::{JobsTable, ProvisionWorkflow, TeardownWorkflow};
use reconciler::gitlab::GitLabPending;
use reconciler::{Reconciler, RunnerLife, Scopes};
use router::aws::{DynamoJobStore, StepFunctions};
use serde_json::{Value, json};
use wiremock::matchers::{method, path, query_param};
use wiremock::{Mock, MockServer, ResponseTemplate};

const PASS: &str = r#"{"StartAt":"Done","States":{"Done":{"Type":"Pass","End":true}}}"#;
const MIN: u64 = 60_000;

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// `runner-ops ARGS` against moto: (exit code, stdout, stderr). `env`: more variables (a
/// service's own endpoint, say).
fn ops(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut process = Process::new(env!("CARGO_BIN_EXE_runner-ops"));
    process
        .args(args)
        .env("AWS_ENDPOINT_URL", moto_endpoint())
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", "/nonexistent/aws-config")
        .env(
            "AWS_SHARED_CREDENTIALS_FILE",
            "/nonexistent/aws-credentials",
        )
        .env("USER", "ops-test")
        .env_remove("AWS_PROFILE");
    for (k, v) in env {
        process.env(k, v);
    }
    let o = process.output().unwrap();
    let result = (
        o.status.code().unwrap(),
        String::from_utf8(o.stdout).unwrap(),
        String::from_utf8(o.stderr).unwrap(),
    );
    // What a person would see, in the test's log.
    println!("$ runner-ops {}\n{}{}", args.join(" "), result.1, result.2);
    result
}

fn json_of(stdout: &str) -> Value {
    serde_json::from_str(stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// A stack in moto whose outputs name what the test made (a template with one queue).
async fn stack_with_outputs(sdk: &SdkConfig, outputs: &[(&str, &str)]) -> String {
    let name = unique("ops");
    let outputs: serde_json::Map<String, Value> = outputs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), json!({ "Value": v })))
        .collect();
    aws_sdk_cloudformation::Client::new(sdk)
        .create_stack()
        .stack_name(&name)
        .template_body(
            json!({
                "Resources": {"Marker": {"Type": "AWS::SQS::Queue",
                               "Properties": {"QueueName": unique("marker")}}},
                "Outputs": outputs,
            })
            .to_string(),
        )
        .send()
        .await
        .unwrap();
    name
}

fn envelope(job: &JobEvent) -> EventBridgeEvent<Value> {
    serde_json::from_value(json!({
        "version": "0", "id": unique("event"), "detail-type": "GitLab Job Event",
        "source": "ephemeral-runners.webhook", "account": "123456789012",
        "time": "2026-12-01T10:00:00Z", "region": "us-east-1", "resources": [], "detail": job,
    }))
    .unwrap()
}

fn router(
    sdk: &SdkConfig,
    jobs_table: &str,
    provision: &str,
    teardown: &str,
) -> router::Router<DynamoJobStore, StepFunctions> {
    router::Router {
        store: DynamoJobStore {
            client: aws_sdk_dynamodb::Client::new(sdk),
            table: jobs_table.to_owned(),
            ttl_seconds: 3600,
        },
        workflows: StepFunctions {
            client: aws_sdk_sfn::Client::new(sdk),
            provision_arn: provision.to_owned(),
            teardown_arn: teardown.to_owned(),
        },
        provision_on: ProvisionOn::Pending,
    }
}

/// GitLab lists these jobs of `project` as pending for 10 minutes.
async fn gitlab_with_pending(project: u64, jobs: &[u64]) -> MockServer {
    let server = MockServer::start().await;
    let body: Vec<_> = jobs
        .iter()
        .map(|id| {
            json!({"id": id, "name": format!("build {id}"), "status": "pending", "stage": "build",
                   "tag_list": [], "ref": "main", "pipeline": {"id": 900, "project_id": project},
                   "queued_duration": 600.0, "runner": null})
        })
        .collect();
    Mock::given(method("GET"))
        .and(path(format!("/api/v4/projects/{project}/jobs")))
        .and(query_param("scope[]", "pending"))
        .respond_with(ResponseTemplate::new(200).set_body_json(body))
        .mount(&server)
        .await;
    server
}

fn reconciler(
    sdk: &SdkConfig,
    gitlab: &MockServer,
    project: u64,
    jobs_table: &str,
    runners_table: &str,
    provision: &str,
    teardown: &str,
) -> Reconciler<fleet::aws::DynamoRunnerLedger> {
    Reconciler::new(
        GitLabPending {
            client: GitLabClient::new(&gitlab.uri(), RetryPolicy::default()),
            token: Secret::new("glpat-read-api".to_owned()),
        },
        JobsTable {
            client: aws_sdk_dynamodb::Client::new(sdk),
            table: jobs_table.to_owned(),
            ttl_seconds: 3600,
        },
        fleet::aws::DynamoRunnerLedger {
            client: aws_sdk_dynamodb::Client::new(sdk),
            jobs_table: jobs_table.to_owned(),
            runners_table: runners_table.to_owned(),
        },
        ProvisionWorkflow {
            client: aws_sdk_sfn::Client::new(sdk),
            arn: provision.to_owned(),
        },
        TeardownWorkflow {
            client: aws_sdk_sfn::Client::new(sdk),
            arn: teardown.to_owned(),
        },
        Scopes {
            project_ids: vec![project],
            group_ids: vec![],
        },
        50,
        RunnerLife {
            waits_ms: 15 * MIN,
            project_scoped: true,
        },
        None,
    )
}

fn s(item: &HashMap<String, AttributeValue>, k: &str) -> Option<String> {
    match item.get(k)? {
        AttributeValue::S(v) | AttributeValue::N(v) => Some(v.clone()),
        _ => None,
    }
}

/// The mapper's answer for a LAMBDA job.
fn lambda_route() -> Value {
    json!({"type": "LAMBDA", "matched": "default", "reason": "test",
           "arn": "arn:aws:lambda:us-east-1:123456789012:function:shell-runner", "tags": []})
}

async fn step(functions: &fleet::Functions, job: &JobEvent, route: Value) -> ProvisionOutput {
    functions
        .provision_step(&provision_input(job, route).0, now_ms())
        .await
        .unwrap()
}

/// Issue 14: `drain` makes the real provision step wait (EC2 and the LAMBDA job's runner), in
/// a stack without caps, visible in `status`; the reconciler starts nothing while drained;
/// after `undrain` its next pass starts both jobs, oldest first, and their provisions launch.
#[tokio::test]
async fn drain_makes_provisions_wait_and_undrain_lets_the_reconciler_start_them() {
    let fleet = fleet_stack().await;
    let sdk = fleet.sdk.clone();
    let provision = create_state_machine(&sdk, "provision", PASS).await;
    let teardown = create_state_machine(&sdk, "teardown", PASS).await;
    let stack = stack_with_outputs(
        &sdk,
        &[
            ("JobsTableName", &fleet.jobs_table),
            ("RunnersTableName", &fleet.runners_table),
            ("ProvisionStateMachineArn", &provision),
            ("TeardownStateMachineArn", &teardown),
        ],
    )
    .await;
    // No MAX_RUNNER_INSTANCES: drain must hold without caps.
    let functions = fleet.functions(&fleet.config(&[])).await;
    let project = 81;
    let (ec2_job, lambda_job) = (
        job_event(project, 8101, "build 8101", JobStatus::Pending),
        job_event(project, 8102, "build 8102", JobStatus::Pending),
    );
    let router = router(&sdk, &fleet.jobs_table, &provision, &teardown);
    for job in [&ec2_job, &lambda_job] {
        router.handle(&envelope(job), now_ms()).await.unwrap();
    }

    let (code, out, err) = ops(&["--stack", &stack, "drain", "--reason", "AMI change"], &[]);
    assert_eq!((code, err.as_str()), (0, ""), "{out}");
    assert!(out.starts_with("drained: no new runner starts"), "{out}");
    let (code, again, _) = ops(&["--stack", &stack, "drain"], &[]);
    assert_eq!(code, 0);
    assert!(
        again.contains("already drained since") && again.contains("by ops-test: AMI change"),
        "{again}"
    );

    // The real provision step, as the workflow calls it: nothing starts, both wait.
    let ProvisionOutput::Ec2(outcome) = step(&functions, &ec2_job, ec2_route()).await else {
        panic!("an EC2 route answers an EC2 outcome")
    };
    assert_eq!(
        outcome,
        Provisioned::WaitingForSlot {
            waiting_for: CapReached::Drained
        }
    );
    let ProvisionOutput::Lambda(grant) = step(&functions, &lambda_job, lambda_route()).await else {
        panic!("a LAMBDA route answers a grant")
    };
    assert_eq!(
        grant,
        RunnerGrant::WaitingForSlot {
            waiting_for: CapReached::Drained
        }
    );
    assert!(fleet.live_instances().await.is_empty());
    assert!(
        fleet.gitlab.state().runners.is_empty(),
        "no GitLab runner made"
    );
    assert!(fleet.token_parameters().await.is_empty());
    for job in [&ec2_job, &lambda_job] {
        let item = fleet.job_item(job).await;
        assert_eq!(s(&item, "waiting_for_slot_cap").as_deref(), Some("drained"));
        assert_eq!(s(&item, "phase").as_deref(), Some("provisioning"));
        assert!(!item.contains_key("provision_error"), "waiting, not failed");
    }

    let (code, status, _) = ops(&["--stack", &stack, "status"], &[]);
    assert_eq!(code, 0, "{status}");
    assert!(status.contains("fleet: drained since"), "{status}");
    assert!(
        status.contains("waiting for a runner slot, oldest first: 2"),
        "{status}"
    );
    let (_, status_json, _) = ops(&["--stack", &stack, "status", "--json"], &[]);
    let v = json_of(&status_json);
    assert_eq!(v["drained"]["reason"], "AMI change");
    assert_eq!(v["waiting"].as_array().unwrap().len(), 2);
    assert_eq!(v["waiting"][0]["waiting_for"], "drained");
    assert_eq!(v["by_phase"]["provisioning"], 2);

    // The real reconciler pass: GitLab lists both pending for 10 minutes. Drained: nothing.
    let gitlab = gitlab_with_pending(project, &[8101, 8102]).await;
    let pass = reconciler(
        &sdk,
        &gitlab,
        project,
        &fleet.jobs_table,
        &fleet.runners_table,
        &provision,
        &teardown,
    );
    let settings = ReconcileSettings::default();
    let drained = pass.run(&settings, now_ms()).await.unwrap();
    assert_eq!(drained.waiting_for_slot, 2, "{drained:?}");
    assert_eq!(drained.reconciled_total(), 0);
    assert!(drained.drained.is_some());
    assert_eq!(execution_names(&sdk, &provision).await.len(), 2);

    let (code, out, _) = ops(&["--stack", &stack, "undrain"], &[]);
    assert_eq!(code, 0);
    assert!(out.starts_with("undrained (was drained since"), "{out}");
    assert!(out.contains("2 jobs wait for a runner slot"), "{out}");
    let (code, out, _) = ops(&["--stack", &stack, "undrain"], &[]);
    assert_eq!(
        (code, out.lines().next()),
        (0, Some("not drained: nothing changed"))
    );

    let undrained = pass.run(&settings, now_ms()).await.unwrap();
    assert_eq!(
        undrained.reconciled.get(&Reason::WaitingForSlot),
        Some(&2),
        "{undrained:?}"
    );
    assert_eq!(
        execution_names(&sdk, &provision).await,
        [
            "p81-j8101-provision",
            "p81-j8101-provision-a2",
            "p81-j8102-provision",
            "p81-j8102-provision-a2"
        ]
    );
    // Attempt 2's provision steps, as the workflows started by the pass run them: both start.
    let ProvisionOutput::Ec2(outcome) = step(&functions, &ec2_job, ec2_route()).await else {
        panic!()
    };
    assert!(
        matches!(outcome, Provisioned::Launched { .. }),
        "{outcome:?}"
    );
    let ProvisionOutput::Lambda(grant) = step(&functions, &lambda_job, lambda_route()).await else {
        panic!()
    };
    assert!(matches!(grant, RunnerGrant::PerJob { .. }), "{grant:?}");
    assert_eq!(fleet.live_instances().await.len(), 1);
    let item = fleet.job_item(&ec2_job).await;
    assert!(!item.contains_key("waiting_for_slot_cap"), "{item:?}");
    assert_eq!(s(&item, "attempt").as_deref(), Some("2"));

    let (code, status, _) = ops(&["--stack", &stack, "status"], &[]);
    assert_eq!(code, 0);
    assert!(status.contains("fleet: not drained"), "{status}");
    assert!(
        status.contains("waiting for a runner slot, oldest first: 0"),
        "{status}"
    );
    assert!(status.contains("runners we own"), "{status}");
}

/// A stack with the shared token and no EC2 runners reads the switch from the jobs table too.
#[tokio::test]
async fn a_lambda_only_stack_with_the_shared_token_waits_while_drained() {
    let fleet = fleet_stack().await;
    let env = fleet.lambda_only_env();
    let functions = match FleetStack::setup_of(&env) {
        fleet::FleetSetup::NotConfigured => fleet::Functions::not_configured(),
        fleet::FleetSetup::Ec2(_) => panic!("no EC2 settings"),
    }
    .with_shell_mode(ephemeral_core::lambda_runner::ShellRunnerMode::SharedToken)
    .with_jobs_ledger(fleet::aws::DynamoRunnerLedger {
        client: aws_sdk_dynamodb::Client::new(&fleet.sdk),
        jobs_table: fleet.jobs_table.clone(),
        runners_table: fleet.runners_table.clone(),
    });
    let job = job_event(82, 8201, "unit", JobStatus::Pending);
    fleet.job_is_provisioning(&job).await;
    let (code, _, err) = ops(&["--jobs-table", &fleet.jobs_table, "drain"], &[]);
    assert_eq!((code, err.as_str()), (0, ""));
    let ProvisionOutput::Lambda(grant) = step(&functions, &job, lambda_route()).await else {
        panic!()
    };
    assert_eq!(
        grant,
        RunnerGrant::WaitingForSlot {
            waiting_for: CapReached::Drained
        }
    );
    let (code, _, _) = ops(&["--jobs-table", &fleet.jobs_table, "undrain"], &[]);
    assert_eq!(code, 0);
    let ProvisionOutput::Lambda(grant) = step(&functions, &job, lambda_route()).await else {
        panic!()
    };
    assert_eq!(grant, RunnerGrant::SharedToken);
}

/// `retry` claims the next attempt the reconciler's way and starts exactly one execution; a
/// second retry while that attempt is young starts nothing, and neither does the reconciler.
#[tokio::test]
async fn retry_starts_exactly_one_new_attempt() {
    let sdk = sdk_config();
    let jobs_table = create_table(&sdk, "jobs", "job_key", None).await;
    let runners_table = create_table(&sdk, "runners", "runner_id", None).await;
    let provision = create_state_machine(&sdk, "provision", PASS).await;
    let teardown = create_state_machine(&sdk, "teardown", PASS).await;
    let stack = stack_with_outputs(
        &sdk,
        &[
            ("JobsTableName", &jobs_table),
            ("RunnersTableName", &runners_table),
            ("ProvisionStateMachineArn", &provision),
            ("TeardownStateMachineArn", &teardown),
        ],
    )
    .await;
    let project = 83;
    let job = job_event(project, 8301, "build 8301", JobStatus::Pending);
    let key = JobKey::of(&job);
    // The hook path: the router starts attempt 1; the workflow's RecordFailure notes why it
    // failed (as the definition writes it).
    router(&sdk, &jobs_table, &provision, &teardown)
        .handle(&envelope(&job), now_ms())
        .await
        .unwrap();
    let dynamo = aws_sdk_dynamodb::Client::new(&sdk);
    dynamo
        .update_item()
        .table_name(&jobs_table)
        .key("job_key", AttributeValue::S(key.table_key()))
        .update_expression("SET provision_error = :e, provision_cause = :c")
        .expression_attribute_values(":e", AttributeValue::S("NoCapacity".into()))
        .expression_attribute_values(
            ":c",
            AttributeValue::S("no capacity for t3.micro in any subnet or market".into()),
        )
        .send()
        .await
        .unwrap();
    let (code, status, _) = ops(&["--stack", &stack, "status"], &[]);
    assert_eq!(code, 0);
    assert!(
        status.contains("failed provisions (the reconciler retries them): 1"),
        "{status}"
    );
    assert!(status.contains("NoCapacity"), "{status}");
    // A stack from before the SlotsTableName output: status works, without the slots.
    assert!(status.contains("runner slots: not read"), "{status}");

    let (code, out, err) = ops(&["--stack", &stack, "retry", "83", "8301"], &[]);
    assert_eq!((code, err.as_str()), (0, ""), "{out}");
    assert_eq!(
        out,
        "started attempt 2 of project 83 job 8301: execution p83-j8301-provision-a2\n"
    );
    let names = execution_names(&sdk, &provision).await;
    assert_eq!(names, ["p83-j8301-provision", "p83-j8301-provision-a2"]);
    let item = dynamo
        .get_item()
        .table_name(&jobs_table)
        .key("job_key", AttributeValue::S(key.table_key()))
        .consistent_read(true)
        .send()
        .await
        .unwrap()
        .item
        .unwrap();
    assert_eq!(s(&item, "attempt").as_deref(), Some("2"));
    assert_eq!(
        s(&item, "reconcile_reason").as_deref(),
        Some("operator_retry")
    );
    assert!(!item.contains_key("provision_error"), "the claim clears it");

    // A second retry at once: the attempt is young and has not failed. Nothing starts.
    let (code, out, _) = ops(&["--stack", &stack, "retry", "83", "8301"], &[]);
    assert_eq!(code, 0);
    assert!(
        out.starts_with(
            "not started: project 83 job 8301's attempt 2 (p83-j8301-provision-a2) is in flight"
        ),
        "{out}"
    );
    let (code, out, _) = ops(&["--stack", &stack, "retry", "83", "8301", "--json"], &[]);
    assert_eq!(code, 0);
    assert_eq!(json_of(&out)["started"], false);
    // Nor does the reconciler's pass (GitLab lists the job pending for 10 minutes).
    let gitlab = gitlab_with_pending(project, &[8301]).await;
    let pass = reconciler(
        &sdk,
        &gitlab,
        project,
        &jobs_table,
        &runners_table,
        &provision,
        &teardown,
    )
    .run(&ReconcileSettings::default(), now_ms())
    .await
    .unwrap();
    assert_eq!(pass.reconciled_total(), 0, "{pass:?}");
    assert_eq!(
        execution_names(&sdk, &provision).await.len(),
        2,
        "exactly one new attempt"
    );

    // Once the attempt is over (its workflow ended) and not young (here: --young 0), the
    // next retry starts attempt 3. moto runs a definition only when told to (another test
    // may have): the execution is stopped here, whichever way it went.
    let _ = aws_sdk_sfn::Client::new(&sdk)
        .stop_execution()
        .execution_arn(format!(
            "{}:p83-j8301-provision-a2",
            provision.replacen(":stateMachine:", ":execution:", 1)
        ))
        .send()
        .await;
    let (code, out, _) = ops(
        &["--stack", &stack, "retry", "83", "8301", "--young", "0"],
        &[],
    );
    assert_eq!(code, 0);
    assert!(out.starts_with("started attempt 3"), "{out}");
    assert_eq!(execution_names(&sdk, &provision).await.len(), 3);

    // The job's history: its item and every attempt's execution.
    let (code, history, _) = ops(&["--stack", &stack, "job", "83", "8301"], &[]);
    assert_eq!(code, 0, "{history}");
    for expected in [
        "reconcile_reason",
        "operator_retry",
        "p83-j8301-provision-a2",
        "provision  p83-j8301-provision-a2",
        "provision  p83-j8301-provision-a3",
    ] {
        assert!(history.contains(expected), "{expected}: {history}");
    }
    let (_, history_json, _) = ops(&["--stack", &stack, "job", "83", "8301", "--json"], &[]);
    let v = json_of(&history_json);
    assert_eq!(v["item"]["attempt"], 3);
    assert_eq!(v["executions"].as_array().unwrap().len(), 3);

    // Bad input says what to fix.
    let (code, _, err) = ops(&["--stack", &stack, "job", "83", "999999"], &[]);
    assert_eq!(code, 3);
    assert!(
        err.contains("error: no record of project 83 job 999999"),
        "{err}"
    );
    let (code, _, err) = ops(&["--stack", &stack, "retry", "83", "999999"], &[]);
    assert_eq!(code, 3);
    assert!(err.contains("no item for project 83 job 999999"), "{err}");
    let (code, _, err) = ops(&["--stack", &stack, "job", "group/app", "1"], &[]);
    assert_eq!(code, 2);
    assert!(
        err.contains("invalid value 'group/app' for '<PROJECT>'"),
        "{err}"
    );
    let (code, _, err) = ops(&["status"], &[]);
    assert_eq!(code, 2);
    assert!(
        err.contains(
            "name the jobs table: --stack STACK (its output JobsTableName) or --jobs-table NAME"
        ),
        "{err}"
    );
    let other = stack_with_outputs(&sdk, &[("SomethingElse", "x")]).await;
    let (code, _, err) = ops(&["--stack", &other, "status"], &[]);
    assert_eq!(code, 2);
    assert!(
        err.contains(&format!(
            "stack `{other}` has no output JobsTableName (its outputs: SomethingElse)"
        )) && err.contains("--jobs-table NAME"),
        "{err}"
    );
    let (code, _, err) = ops(&["--stack", "no-such-stack", "status"], &[]);
    assert_eq!(code, 3);
    assert!(err.contains("stack `no-such-stack` not found"), "{err}");
    // A finished job has nothing to provision.
    let done = job_event(project, 8302, "build 8302", JobStatus::Success);
    router(&sdk, &jobs_table, &provision, &teardown)
        .handle(&envelope(&done), now_ms())
        .await
        .unwrap();
    let (code, _, err) = ops(&["--stack", &stack, "retry", "83", "8302"], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("is finished in the jobs table"), "{err}");
}

/// `status` shows the caps' counters, the slot items they count and a counter that disagrees
/// (a leak); `job` shows every teardown of the job, the router's and a reconciler pass's
/// (named after GitLab's answer), and no other job's.
#[tokio::test]
async fn status_shows_the_slot_counters_and_job_shows_every_teardown() {
    let fleet = fleet_stack().await;
    let sdk = fleet.sdk.clone();
    let provision = create_state_machine(&sdk, "provision", PASS).await;
    let teardown = create_state_machine(&sdk, "teardown", PASS).await;
    let stack = stack_with_outputs(
        &sdk,
        &[
            ("JobsTableName", &fleet.jobs_table),
            ("RunnersTableName", &fleet.runners_table),
            ("ProvisionStateMachineArn", &provision),
            ("TeardownStateMachineArn", &teardown),
            ("SlotsTableName", &fleet.slots_table),
            ("InstanceCap", "5"),
            ("InstanceCapPerProject", "3"),
        ],
    )
    .await;
    let functions = fleet
        .functions(&fleet.config(&[
            ("MAX_RUNNER_INSTANCES", "5"),
            ("MAX_RUNNER_INSTANCES_PER_PROJECT", "3"),
        ]))
        .await;
    let project = 84;
    let router = router(&sdk, &fleet.jobs_table, &provision, &teardown);
    for job_id in [8401, 8402] {
        let job = job_event(project, job_id, "build", JobStatus::Pending);
        router.handle(&envelope(&job), now_ms()).await.unwrap();
        let ProvisionOutput::Ec2(outcome) = step(&functions, &job, ec2_route()).await else {
            panic!("an EC2 route answers an EC2 outcome")
        };
        assert!(
            matches!(outcome, Provisioned::Launched { .. }),
            "{outcome:?}"
        );
    }
    let (code, status, _) = ops(&["--stack", &stack, "status"], &[]);
    assert_eq!(code, 0, "{status}");
    let slots_line = format!(
        "runner slots (table {}): 2 in use, cap 5",
        fleet.slots_table
    );
    assert!(status.contains(&slots_line), "{status}");
    assert!(
        status.contains("stack       2     5    2           -"),
        "{status}"
    );
    assert!(
        status.contains("project 84  2     3    2           -"),
        "{status}"
    );

    // A leak: the stack's counter counts one more than there are slot items.
    aws_sdk_dynamodb::Client::new(&sdk)
        .update_item()
        .table_name(&fleet.slots_table)
        .key("slot_key", AttributeValue::S("global".into()))
        .update_expression("ADD used :one")
        .expression_attribute_values(":one", AttributeValue::N("1".into()))
        .send()
        .await
        .unwrap();
    let (_, status, _) = ops(&["--stack", &stack, "status"], &[]);
    assert!(
        status.contains("stack       3     5    2           counter and items differ"),
        "{status}"
    );
    let (_, json_out, _) = ops(&["--stack", &stack, "status", "--json"], &[]);
    let v = json_of(&json_out);
    assert_eq!(v["slots"]["view"]["global"], json!({"used": 3, "items": 2}));
    assert_eq!(
        v["slots"]["view"]["caps"],
        json!({"global": 5, "per_project": 3})
    );
    assert_eq!(
        v["slots"]["view"]["projects"][0],
        json!([84, {"used": 2, "items": 2}])
    );
    assert_eq!(v["slots"]["caps_known"], true);
    // Named by flag without the caps: they are said to be unknown, not absent.
    let (code, status, _) = ops(
        &[
            "--jobs-table",
            &fleet.jobs_table,
            "--slots-table",
            &fleet.slots_table,
            "status",
        ],
        &[],
    );
    assert_eq!(code, 0);
    assert!(status.contains("3 in use, cap unknown"), "{status}");
    assert!(status.contains("the caps are not known"), "{status}");
    let (code, _, err) = ops(
        &["--stack", &stack, "--instance-cap", "five", "status"],
        &[],
    );
    assert_eq!(code, 2);
    assert!(
        err.contains("the stack's instance cap (0: none) is `five`, not a number"),
        "{err}"
    );

    // The router's teardown of job 8401, a reconciler pass's (its name from GitLab's answer),
    // and job 8402's, which is not 8401's history.
    let done = job_event(project, 8401, "build", JobStatus::Success);
    router.handle(&envelope(&done), now_ms()).await.unwrap();
    let lost_finish = |job_id, runner_id| GitLabJobState {
        key: JobKey {
            project_id: project,
            job_id,
        },
        name: "build".into(),
        status: JobStatus::Failed,
        runner_id: Some(runner_id),
        pipeline_id: Some(900),
    };
    let sfn = aws_sdk_sfn::Client::new(&sdk);
    for job in [lost_finish(8401, 77), lost_finish(8402, 78)] {
        sfn.start_execution()
            .state_machine_arn(&teardown)
            .name(teardown_execution_name(&job))
            .input(json!({"job": job.to_event(now_ms())}).to_string())
            .send()
            .await
            .unwrap();
    }
    let (code, history, _) = ops(&["--stack", &stack, "job", "84", "8401"], &[]);
    assert_eq!(code, 0, "{history}");
    for expected in [
        "teardown   p84-j8401-teardown ",
        "teardown   p84-j8401-teardown-failed-r77",
    ] {
        assert!(history.contains(expected), "{expected}: {history}");
    }
    assert!(!history.contains("p84-j8402"), "{history}");
    let (_, history_json, _) = ops(&["--stack", &stack, "job", "84", "8401", "--json"], &[]);
    let names: Vec<_> = json_of(&history_json)["executions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["workflow"] == "teardown")
        .map(|e| e["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        names,
        ["p84-j8401-teardown", "p84-j8401-teardown-failed-r77"]
    );
}

/// A queue; its URL.
async fn queue(sdk: &SdkConfig, prefix: &str) -> String {
    aws_sdk_sqs::Client::new(sdk)
        .create_queue()
        .queue_name(unique(prefix))
        .send()
        .await
        .unwrap()
        .queue_url
        .unwrap()
}

fn arn_of(url: &str) -> String {
    format!(
        "arn:aws:sqs:us-east-1:123456789012:{}",
        url.rsplit('/').next().unwrap()
    )
}

/// A jobs table under a name chosen before it exists (the router's "missing table").
async fn create_table_named(sdk: &SdkConfig, name: &str) {
    aws_sdk_dynamodb::Client::new(sdk)
        .create_table()
        .table_name(name)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(
            AttributeDefinition::builder()
                .attribute_name("job_key")
                .attribute_type(ScalarAttributeType::S)
                .build()
                .unwrap(),
        )
        .key_schema(
            KeySchemaElement::builder()
                .attribute_name("job_key")
                .key_type(KeyType::Hash)
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
}

/// Lambda's Invoke API for the router function on loopback, running the real router's
/// handler (moto's Lambda cannot run our code): counts invocations, answers the router's
/// outcome, or its error the way Lambda reports a function error.
fn router_function(
    sdk: SdkConfig,
    jobs_table: String,
    provision: String,
    teardown: String,
) -> (String, Arc<AtomicU32>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let count = Arc::new(AtomicU32::new(0));
    let counter = count.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let router = router(&sdk, &jobs_table, &provision, &teardown);
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let Some(request) = e2e_tests::loopback::read_request(&stream) else {
                continue;
            };
            assert!(
                request.path().ends_with("/invocations"),
                "{}",
                request.path()
            );
            counter.fetch_add(1, Ordering::SeqCst);
            let event: EventBridgeEvent<Value> = serde_json::from_slice(&request.body).unwrap();
            let (header, body) = match rt.block_on(router.handle(&event, now_ms())) {
                Ok(outcome) => ("", json!(format!("{outcome:?}")).to_string()),
                Err(e) => (
                    "X-Amz-Function-Error: Unhandled\r\n",
                    json!({"errorType": "RouterError", "errorMessage": e.to_string()}).to_string(),
                ),
            };
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n{header}X-Amz-Executed-Version: $LATEST\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (url, count)
}

/// The router's dead letter, made as the platform makes it: the real router fails an event
/// (its jobs table is missing), Lambda retries it twice, then its on-failure destination
/// files the invocation record. Once the table exists, `replay` hands the event to the router
/// (counted: once), which starts one provision; a second copy replayed is deduplicated by the
/// router; a replayed message is gone.
#[tokio::test]
async fn a_router_dead_letter_is_replayed_and_reaches_the_router_once() {
    let sdk = sdk_config();
    let jobs_table = unique("jobs-later");
    let provision = create_state_machine(&sdk, "provision", PASS).await;
    let teardown = create_state_machine(&sdk, "teardown", PASS).await;
    let (router_dlq, intake_dlq, webhook_dlq, intake) = (
        queue(&sdk, "router-dlq").await,
        queue(&sdk, "intake-dlq").await,
        queue(&sdk, "webhook-dlq").await,
        queue(&sdk, "intake").await,
    );
    let stack = stack_with_outputs(
        &sdk,
        &[
            ("JobsTableName", &jobs_table),
            ("ProvisionStateMachineArn", &provision),
            ("RouterDeadLetterQueueUrl", &router_dlq),
            ("IntakeFallbackDeadLetterQueueUrl", &intake_dlq),
            ("DeadLetterQueueUrl", &webhook_dlq),
            ("IntakeFallbackQueueUrl", &intake),
            ("RouterFunctionName", "router-fn"),
        ],
    )
    .await;
    let job = job_event(84, 8401, "build 8401", JobStatus::Pending);
    let event = envelope(&job);
    let router_now = router(&sdk, &jobs_table, &provision, &teardown);
    let mut error = String::new();
    for _ in 0..3 {
        error = router_now
            .handle(&event, now_ms())
            .await
            .unwrap_err()
            .to_string();
    }
    let record = json!({
        "version": "1.0", "timestamp": "2026-12-01T10:00:00.000Z",
        "requestContext": {"requestId": unique("req"), "functionArn": "arn:aws:lambda:us-east-1:123456789012:function:router-fn:$LATEST",
                           "condition": "RetriesExhausted", "approximateInvokeCount": 3},
        "requestPayload": event,
        "responseContext": {"statusCode": 200, "executedVersion": "$LATEST", "functionError": "Unhandled"},
        "responsePayload": {"errorType": "RouterError", "errorMessage": error},
    })
    .to_string();
    let sqs = aws_sdk_sqs::Client::new(&sdk);
    for _ in 0..2 {
        sqs.send_message()
            .queue_url(&router_dlq)
            .message_body(&record)
            .send()
            .await
            .unwrap();
    }

    let (code, list, err) = ops(&["--stack", &stack, "dead-letters", "list"], &[]);
    assert_eq!((code, err.as_str()), (0, ""), "{list}");
    assert!(list.contains("the router's dead-letter queue"), "{list}");
    assert!(list.contains(": 2 messages"), "{list}");
    assert!(
        list.contains("the intake drainer's dead-letter queue"),
        "{list}"
    );
    assert!(
        list.contains("the router failed it (RetriesExhausted, 3 invocations): RouterError:"),
        "{list}"
    );
    let (_, list_json, _) = ops(
        &[
            "--stack",
            &stack,
            "dead-letters",
            "list",
            "--queue",
            "router",
            "--json",
        ],
        &[],
    );
    let v = json_of(&list_json);
    let messages = v["queues"][0]["messages"].as_array().unwrap().clone();
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[0]["set_aside"]["job_id"], 8401);
    let ids: Vec<String> = messages
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect();
    let (code, shown, _) = ops(&["--stack", &stack, "dead-letters", "show", &ids[0]], &[]);
    assert_eq!(code, 0);
    assert!(shown.contains("set aside by: lambda"), "{shown}");
    assert!(
        shown.contains("replay: invoke the router with the event"),
        "{shown}"
    );
    assert!(shown.contains("\"requestPayload\""), "{shown}");

    // The cause is fixed (the table exists); the router function is the real router.
    create_table_named(&sdk, &jobs_table).await;
    let (lambda, invocations) = router_function(
        sdk.clone(),
        jobs_table.clone(),
        provision.clone(),
        teardown.clone(),
    );
    let lambda_env = [("AWS_ENDPOINT_URL_LAMBDA", lambda.as_str())];
    let (code, out, err) = ops(
        &["--stack", &stack, "dead-letters", "replay", &ids[0]],
        &lambda_env,
    );
    assert_eq!((code, err.as_str()), (0, ""), "{out}");
    assert!(
        out.contains("the router (router-fn) took it; deleted from the router's dead-letter queue"),
        "{out}"
    );
    assert_eq!(
        invocations.load(Ordering::SeqCst),
        1,
        "reached the router once"
    );
    assert_eq!(
        execution_names(&sdk, &provision).await,
        ["p84-j8401-provision"]
    );
    // Replayed and deleted: not there any more.
    let (code, _, err) = ops(
        &["--stack", &stack, "dead-letters", "replay", &ids[0]],
        &lambda_env,
    );
    assert_eq!(code, 3);
    assert!(err.contains(&format!("no message {}", ids[0])), "{err}");
    assert_eq!(invocations.load(Ordering::SeqCst), 1);
    // The second copy: the router takes it and starts nothing new (idempotent per job).
    let (code, _, _) = ops(
        &["--stack", &stack, "dead-letters", "replay", &ids[1]],
        &lambda_env,
    );
    assert_eq!(code, 0);
    assert_eq!(invocations.load(Ordering::SeqCst), 2);
    assert_eq!(execution_names(&sdk, &provision).await.len(), 1);
    let (_, list, _) = ops(
        &[
            "--stack",
            &stack,
            "dead-letters",
            "list",
            "--queue",
            "router",
        ],
        &[],
    );
    assert!(list.contains(": 0 messages"), "{list}");

    let (code, _, err) = ops(
        &["--stack", &stack, "dead-letters", "replay", "not-an-id"],
        &[],
    );
    assert_eq!(code, 2);
    assert!(err.contains("`not-an-id` is not a message id"), "{err}");
}

/// The intake's dead letter, made by the real webhook and drainer: the bus is missing, so the
/// webhook queues the hook (202), the drainer fails it ten times and SQS moves it to the
/// drainer's dead-letter queue. Once the bus exists, `replay` puts it back on the fallback
/// queue; the real drainer forwards it, and the router's rule sees it exactly once. A second
/// copy replayed is deduplicated by delivery id. A webhook dead letter is not replayable.
#[tokio::test]
async fn an_intake_dead_letter_is_replayed_through_the_drainer_once() {
    let sdk = sdk_config();
    let mut hooks = create_webhook_stack(
        &sdk,
        "hook-token",
        "whsec_MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
    )
    .await;
    // The bus the functions are told about does not exist yet.
    hooks.bus = unique("bus-later");
    let sqs = aws_sdk_sqs::Client::new(&sdk);
    let intake_dlq = queue(&sdk, "intake-dlq").await;
    sqs.set_queue_attributes()
        .queue_url(&hooks.fallback_queue_url)
        .attributes(
            aws_sdk_sqs::types::QueueAttributeName::RedrivePolicy,
            json!({"deadLetterTargetArn": arn_of(&intake_dlq), "maxReceiveCount": 10}).to_string(),
        )
        .send()
        .await
        .unwrap();
    let (router_dlq, webhook_dlq) = (
        queue(&sdk, "router-dlq").await,
        queue(&sdk, "webhook-dlq").await,
    );
    let stack = stack_with_outputs(
        &sdk,
        &[
            ("RouterDeadLetterQueueUrl", &router_dlq),
            ("IntakeFallbackDeadLetterQueueUrl", &intake_dlq),
            ("DeadLetterQueueUrl", &webhook_dlq),
            ("IntakeFallbackQueueUrl", &hooks.fallback_queue_url),
            ("RouterFunctionName", "router-fn"),
        ],
    )
    .await;

    let webhook = webhook::AwsWebhook::from_config(webhook_config(&hooks, "token"), &sdk);
    let delivery = unique("delivery");
    let headers = [
        ("X-Gitlab-Token", "hook-token"),
        ("X-Gitlab-Event", "Job Hook"),
        ("Idempotency-Key", delivery.as_str()),
    ];
    // A real Job Hook, pending (what the router's JobPending rule takes).
    let mut hook: Value = serde_json::from_str(&fixture("go-gitlab-job.json")).unwrap();
    hook["build_status"] = json!("pending");
    let reply = webhook
        .handle(api_request(&headers, &hook.to_string()))
        .await;
    assert_eq!(reply.status_code, 202);
    let drainer = {
        let env = [
            ("EVENT_BUS_NAME", hooks.bus.clone()),
            ("DEDUP_TABLE_NAME", hooks.table.clone()),
        ];
        webhook::drainer::AwsDrainer::from_config(
            webhook::config::DrainerConfig::from_lookup(|k| {
                env.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone())
            })
            .unwrap(),
            &sdk,
        )
    };
    // Lambda's event source mapping: receive, hand over, leave the failed ones (SQS retries).
    let drain = || async {
        let messages = e2e_tests::chain::receive_batch(&sqs, &hooks.fallback_queue_url, 0).await;
        let n = messages.len();
        let failed = drainer
            .handle(e2e_tests::chain::sqs_event(
                &hooks.fallback_queue_url,
                &messages,
            ))
            .await
            .batch_item_failures
            .len();
        for m in &messages {
            if failed == 0 {
                sqs.delete_message()
                    .queue_url(&hooks.fallback_queue_url)
                    .receipt_handle(m.receipt_handle().unwrap())
                    .send()
                    .await
                    .unwrap();
            }
        }
        (n, failed)
    };
    let mut tries = 0;
    loop {
        let (n, failed) = drain().await;
        if n == 0 {
            break;
        }
        assert_eq!(failed, n, "the bus is missing: every drain fails");
        tries += 1;
        assert!(tries <= 10, "SQS moves it after 10 receives");
    }
    assert_eq!(tries, 10);

    let (code, list, _) = ops(
        &[
            "--stack",
            &stack,
            "dead-letters",
            "list",
            "--queue",
            "intake",
        ],
        &[],
    );
    assert_eq!(code, 0);
    assert!(list.contains(": 1 message\n"), "{list}");
    assert!(
        list.contains("the intake drainer could not forward it"),
        "{list}"
    );
    let (_, list_json, _) = ops(
        &[
            "--stack",
            &stack,
            "dead-letters",
            "list",
            "--queue",
            "intake",
            "--json",
        ],
        &[],
    );
    let letter = json_of(&list_json)["queues"][0]["messages"][0].clone();
    assert_eq!(letter["set_aside"]["delivery_id"], delivery.as_str());
    let id = letter["id"].as_str().unwrap().to_owned();
    let (_, shown, _) = ops(
        &["--stack", &stack, "dead-letters", "show", &id, "--json"],
        &[],
    );
    let body = json_of(&shown)["body"].clone();

    // The cause is fixed: the bus exists, with the router's pending rule (its target observed
    // through a queue: moto delivers rules to SQS, not to Lambda) and the dead-letter rule.
    let events = aws_sdk_eventbridge::Client::new(&sdk);
    events
        .create_event_bus()
        .name(&hooks.bus)
        .send()
        .await
        .unwrap();
    let router_rule_queue = queue(&sdk, "router-rule").await;
    for (rule, pattern, target) in [
        (
            "JobPending",
            json!({"source": ["ephemeral-runners.webhook"], "detail-type": ["GitLab Job Event"],
                   "detail": {"status": ["pending"]}}),
            &router_rule_queue,
        ),
        (
            "DeadLetterRule",
            json!({"source": ["ephemeral-runners.webhook"], "detail-type": ["GitLab Hook Dead Letter"]}),
            &webhook_dlq,
        ),
    ] {
        events
            .put_rule()
            .name(rule)
            .event_bus_name(&hooks.bus)
            .event_pattern(pattern.to_string())
            .send()
            .await
            .unwrap();
        events
            .put_targets()
            .rule(rule)
            .event_bus_name(&hooks.bus)
            .targets(
                aws_sdk_eventbridge::types::Target::builder()
                    .id("target")
                    .arn(arn_of(target))
                    .build()
                    .unwrap(),
            )
            .send()
            .await
            .unwrap();
    }
    let at_the_router = e2e_tests::WebhookStack {
        bus: hooks.bus.clone(),
        table: hooks.table.clone(),
        token_parameter: hooks.token_parameter.clone(),
        signing_parameter: hooks.signing_parameter.clone(),
        observer_queue_url: router_rule_queue.clone(),
        fallback_queue_url: hooks.fallback_queue_url.clone(),
    };

    let (code, out, err) = ops(&["--stack", &stack, "dead-letters", "replay", &id], &[]);
    assert_eq!((code, err.as_str()), (0, ""), "{out}");
    assert!(out.contains("back on the intake fallback queue"), "{out}");
    assert_eq!(drain().await, (1, 0), "the drainer forwards it");
    let reached = bus_events(&sdk, &at_the_router, 1, Duration::from_secs(10)).await;
    assert_eq!(
        reached.len(),
        1,
        "the router's rule saw it once: {reached:#?}"
    );
    assert_eq!(reached[0]["detail"]["delivery_id"], delivery.as_str());

    // A second copy (set aside twice, say), replayed: the drainer's dedup drops it.
    sqs.send_message()
        .queue_url(&intake_dlq)
        .message_body(body.to_string())
        .send()
        .await
        .unwrap();
    let (_, list_json, _) = ops(
        &[
            "--stack",
            &stack,
            "dead-letters",
            "list",
            "--queue",
            "intake",
            "--json",
        ],
        &[],
    );
    let copy = json_of(&list_json)["queues"][0]["messages"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (code, _, _) = ops(&["--stack", &stack, "dead-letters", "replay", &copy], &[]);
    assert_eq!(code, 0);
    assert_eq!(drain().await, (1, 0));
    assert!(
        bus_events(&sdk, &at_the_router, 0, Duration::from_millis(500))
            .await
            .is_empty(),
        "deduplicated by delivery id"
    );

    // A hook the webhook could not use: listed with its reason, not replayable.
    let reply = webhook
        .handle(api_request(
            &[
                ("X-Gitlab-Token", "hook-token"),
                ("X-Gitlab-Event", "Job Hook"),
            ],
            r#"{"object_kind":"build","build_status":"pending"}"#,
        ))
        .await;
    assert_eq!(reply.status_code, 202);
    let mut listed = Value::Null;
    for _ in 0..50 {
        let (_, list_json, _) = ops(
            &[
                "--stack",
                &stack,
                "dead-letters",
                "list",
                "--queue",
                "webhook",
                "--json",
            ],
            &[],
        );
        listed = json_of(&list_json)["queues"][0]["messages"].clone();
        if !listed.as_array().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let letter = &listed[0];
    assert_eq!(letter["set_aside"]["by"], "webhook");
    assert!(
        letter["set_aside"]["why"]
            .as_str()
            .unwrap()
            .contains("missing field `build_id`"),
        "{letter}"
    );
    let (code, _, err) = ops(
        &[
            "--stack",
            &stack,
            "dead-letters",
            "replay",
            letter["id"].as_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 2);
    assert!(
        err.contains("not replayable, nothing was replayed"),
        "{err}"
    );
}
