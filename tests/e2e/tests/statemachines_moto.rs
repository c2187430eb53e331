//! The real provision and teardown definitions (statemachine/*.asl.json), executed by moto's
//! Step Functions interpreter against moto's DynamoDB. The mapper's answers are computed by
//! the real mapper (against a seed-format mapping table) and handed to moto's Lambda
//! stand-in, which replies to the workflow's `lambda:invoke` tasks in order. The mapper reads
//! each job from a GitLab stand-in first: jobs GitLab reports running or finished take the
//! SKIP branch. moto's Lambda stand-in cannot answer a function error, so for the mapper's
//! errors the test retries as MapJob's Retry says and runs the definition's own RecordFailure
//! state with the error its Catch hands over.
//!
//! One test on purpose: moto's execution mode and its reply queue are server-wide.

use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_sfn::types::{ExecutionStatus, HistoryEventType};
use e2e_tests::*;
use ephemeral_core::fleet::{Provisioned, TornDown};
use ephemeral_core::hook::JobStatus;
use ephemeral_core::jobs::{JobKey, JobPhase, JobStore, WorkflowInput};
use ephemeral_core::lambda_runner::RunnerGrant;
use ephemeral_core::mapping::{Executor, ExecutorKind, Market};
use ephemeral_core::task_error::{RetryRules, TaskError};
use ephemeral_core::testing::job_event;
use mapper::{DynamoMappingRules, GitLabJobs, Mapper, TokenSource};
use router::aws::DynamoJobStore;

const MAPPER_ARN: &str = "arn:aws:lambda:us-east-1:123456789012:function:mapper";
const RUNNER_ARN: &str = "arn:aws:lambda:us-east-1:123456789012:function:shell-runner";
const EC2_PROVISION_ARN: &str = "arn:aws:lambda:us-east-1:123456789012:function:ec2-provision";
const EC2_TEARDOWN_ARN: &str = "arn:aws:lambda:us-east-1:123456789012:function:ec2-teardown";

/// The output of a finished execution, by state machine and execution name.
async fn execution_output(
    sdk: &aws_config::SdkConfig,
    state_machine: &str,
    name: &str,
) -> serde_json::Value {
    let arn = format!(
        "{}:{name}",
        state_machine.replace(":stateMachine:", ":execution:")
    );
    let out = aws_sdk_sfn::Client::new(sdk)
        .describe_execution()
        .execution_arn(arn)
        .send()
        .await
        .unwrap();
    serde_json::from_str(out.output().unwrap_or("null")).unwrap()
}

async fn moto_api(path: &str, body: serde_json::Value) {
    let response = reqwest::Client::new()
        .post(format!("{}{path}", moto_endpoint()))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert!(
        response.status().is_success(),
        "{path}: {}",
        response.status()
    );
}

async fn create_from_file(
    sdk: &aws_config::SdkConfig,
    file: &str,
    substitutions: &[(&str, &str)],
) -> String {
    let definition =
        std::fs::read_to_string(workspace_root().join("statemachine").join(file)).unwrap();
    create_from_text(
        sdk,
        file.trim_end_matches(".asl.json"),
        &definition,
        substitutions,
    )
    .await
}

/// How many times MapJob's Retry retries an error the mapper answers with (0: not retried).
fn map_job_retries(definition: &serde_json::Value, error_type: TaskError) -> u32 {
    let rules = RetryRules::of_state(&definition["States"]["MapJob"]).unwrap();
    rules.attempts(&error_type.name()) - 1
}

async fn create_from_text(
    sdk: &aws_config::SdkConfig,
    file: &str,
    definition: &str,
    substitutions: &[(&str, &str)],
) -> String {
    let mut definition = definition.to_owned();
    for (name, value) in substitutions {
        definition = definition.replace(&format!("${{{name}}}"), value);
    }
    assert!(
        !definition.contains("${"),
        "unsubstituted placeholder in {file}"
    );
    create_state_machine(sdk, file, &definition).await
}

/// Runs one execution to its end; returns its status and the states it entered, in order.
async fn run(
    sdk: &aws_config::SdkConfig,
    state_machine: &str,
    name: &str,
    input: &WorkflowInput,
) -> (ExecutionStatus, Vec<String>) {
    run_json(
        sdk,
        state_machine,
        name,
        &serde_json::to_value(input).unwrap(),
    )
    .await
}

async fn run_json(
    sdk: &aws_config::SdkConfig,
    state_machine: &str,
    name: &str,
    input: &serde_json::Value,
) -> (ExecutionStatus, Vec<String>) {
    let sfn = aws_sdk_sfn::Client::new(sdk);
    let arn = sfn
        .start_execution()
        .state_machine_arn(state_machine)
        .name(name)
        .input(input.to_string())
        .send()
        .await
        .unwrap()
        .execution_arn;
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        let status = sfn
            .describe_execution()
            .execution_arn(&arn)
            .send()
            .await
            .unwrap()
            .status;
        if status != ExecutionStatus::Running {
            break status;
        }
        assert!(Instant::now() < deadline, "{name} still running after 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let history = sfn
        .get_execution_history()
        .execution_arn(&arn)
        .max_results(1000)
        .send()
        .await
        .unwrap();
    let entered = history
        .events
        .iter()
        .filter(|e| {
            matches!(
                e.r#type,
                HistoryEventType::TaskStateEntered
                    | HistoryEventType::ChoiceStateEntered
                    | HistoryEventType::PassStateEntered
                    | HistoryEventType::SucceedStateEntered
                    | HistoryEventType::FailStateEntered
            )
        })
        .filter_map(|e| {
            e.state_entered_event_details
                .as_ref()
                .map(|d| d.name.clone())
        })
        .collect();
    (status, entered)
}

async fn attribute(
    sdk: &aws_config::SdkConfig,
    table: &str,
    key: &str,
    name: &str,
) -> Option<String> {
    let item = aws_sdk_dynamodb::Client::new(sdk)
        .get_item()
        .table_name(table)
        .key("job_key", AttributeValue::S(key.into()))
        .consistent_read(true)
        .send()
        .await
        .unwrap()
        .item?;
    item.get(name).map(|v| match v {
        AttributeValue::S(s) | AttributeValue::N(s) => s.clone(),
        other => format!("{other:?}"),
    })
}

#[tokio::test]
async fn pending_jobs_end_in_the_branch_their_mapping_chooses_and_teardown_follows() {
    let sdk = sdk_config();
    moto_api(
        "/moto-api/config",
        serde_json::json!({
            "stepfunctions": {"execute_state_machine": true}, "lambda": {"use_docker": false}
        }),
    )
    .await;

    let jobs = create_table(&sdk, "jobs", "job_key", None).await;
    let mappings = create_table(&sdk, "mappings", "pk", Some("sk")).await;
    let dynamo = aws_sdk_dynamodb::Client::new(&sdk);
    for (pk, kind, arn) in [
        ("job#unit-test", "LAMBDA", Some(RUNNER_ARN)),
        ("job#docker-build", "EC2", None),
    ] {
        let mut put = dynamo
            .put_item()
            .table_name(&mappings)
            .item("pk", AttributeValue::S(pk.into()))
            .item("sk", AttributeValue::S("tags#".into()))
            .item("type", AttributeValue::S(kind.into()));
        if let Some(arn) = arn {
            put = put.item("arn", AttributeValue::S(arn.into()));
        }
        put.send().await.unwrap();
    }
    let provision = create_from_file(
        &sdk,
        "provision.asl.json",
        &[
            ("MapperFunctionArn", MAPPER_ARN),
            ("Ec2ProvisionFunctionArn", EC2_PROVISION_ARN),
            ("JobsTableName", &jobs),
        ],
    )
    .await;
    let teardown = create_from_file(
        &sdk,
        "teardown.asl.json",
        &[
            ("Ec2TeardownFunctionArn", EC2_TEARDOWN_ARN),
            ("JobsTableName", &jobs),
        ],
    )
    .await;

    let store = DynamoJobStore {
        client: dynamo.clone(),
        table: jobs.clone(),
        ttl_seconds: 3600,
    };
    let ssm = aws_sdk_ssm::Client::new(&sdk);
    let token_parameter = format!("/{}/gitlab-api-token", unique("sfn"));
    ssm.put_parameter()
        .name(&token_parameter)
        .value("glpat-read-api")
        .r#type(aws_sdk_ssm::types::ParameterType::SecureString)
        .send()
        .await
        .unwrap();
    // Jobs 1-3 pending; 5-7 docker-build jobs whose pending hook came late or was forged: GitLab
    // has them running or finished. Job 8 makes GitLab answer 500.
    let gitlab = GitLabStandIn::start(
        "glpat-read-api",
        vec![
            (1, vec![]),
            (2, vec![]),
            (3, vec![]),
            (5, vec!["docker"]),
            (6, vec!["docker"]),
            (7, vec!["docker"]),
        ],
        vec![8],
    )
    .await;
    for (job_id, status) in [(5, "running"), (6, "success"), (7, "canceled")] {
        gitlab.set_status(job_id, status);
    }
    let mapper = Mapper {
        rules: DynamoMappingRules {
            client: dynamo.clone(),
            table: mappings.clone(),
        },
        gitlab: GitLabJobs::new(
            Some(gitlab.url.clone()),
            Some(TokenSource::new(ssm.clone(), token_parameter.clone())),
        ),
        default_route: Executor::Ec2(Default::default()),
    };

    let cases = [
        (
            1,
            "unit-test",
            ExecutionStatus::Succeeded,
            "StartShellRunner",
            "LAMBDA",
        ),
        (
            2,
            "docker-build",
            ExecutionStatus::Succeeded,
            "ProvisionEc2Runner",
            "EC2",
        ),
        (
            3,
            "no-mapping",
            ExecutionStatus::Succeeded,
            "ProvisionEc2Runner",
            "EC2",
        ),
        (
            5,
            "docker-build",
            ExecutionStatus::Succeeded,
            "RecordSkip",
            "SKIP",
        ),
        (
            6,
            "docker-build",
            ExecutionStatus::Succeeded,
            "RecordSkip",
            "SKIP",
        ),
        (
            7,
            "docker-build",
            ExecutionStatus::Succeeded,
            "RecordSkip",
            "SKIP",
        ),
    ];
    for (job_id, name, want_status, want_state, want_route) in cases {
        let event = job_event(9, job_id, name, JobStatus::Pending);
        let key = JobKey::of(&event);
        // What the router does before it starts the workflow.
        store
            .advance(key, JobPhase::Provisioning, &event, 1)
            .await
            .unwrap();
        let input = WorkflowInput {
            job_key: key.table_key(),
            job: event,
        };
        // The real mapper's answer is what moto's Lambda gives the MapJob task; a LAMBDA
        // route takes the ec2-provision function's per-job runner (ProvisionLambdaRunner),
        // then one more (empty) reply for the asynchronous shell-runner invoke; an EC2
        // route's provision step the ec2-provision function's output (its handler runs
        // against moto in fleet_moto.rs).
        let output = mapper.handle(&input).await.unwrap();
        let mut replies = vec![serde_json::to_string(&output).unwrap()];
        if output.decision.executor.kind() == ExecutorKind::Lambda {
            replies.push(
                serde_json::to_string(&RunnerGrant::PerJob {
                    runner_id: 700 + job_id,
                    token_parameter: format!("/er/test/runner-tokens/lambda-9-{job_id}-1"),
                })
                .unwrap(),
            );
            replies.push("{}".into());
        } else if output.decision.executor.kind() == ExecutorKind::Ec2 {
            replies.push(
                serde_json::to_string(&Provisioned::Launched {
                    instance_id: format!("i-00000000000000{job_id:03}"),
                    runner_id: 500 + job_id,
                    subnet: "subnet-0123456789abcdef0".into(),
                    market: Market::Spot,
                    failed_attempts: vec![],
                    warm_pool: None,
                })
                .unwrap(),
            );
        }
        moto_api(
            "/moto-api/static/lambda-simple/response",
            serde_json::json!({"results": replies}),
        )
        .await;

        let (status, states) =
            run(&sdk, &provision, &format!("p9-j{job_id}-provision"), &input).await;
        assert_eq!(status, want_status, "{name}: {states:?}");
        assert!(
            states.contains(&want_state.to_owned()),
            "{name}: {states:?}"
        );
        assert_eq!(states[0], "MapJob");
        if want_route == "LAMBDA" {
            // The job's own runner is made before the shell runner is invoked.
            let at = |name: &str| states.iter().position(|s| s == name);
            assert!(
                at("ProvisionLambdaRunner") < at("StartShellRunner"),
                "{states:?}"
            );
        }
        assert_eq!(
            attribute(&sdk, &jobs, &key.table_key(), "route_type")
                .await
                .as_deref(),
            Some(want_route),
            "{name}"
        );
        if want_route == "SKIP" {
            // Nothing launched: the workflow never reaches the EC2 step (nor the shell runner).
            assert_eq!(states.last().map(String::as_str), Some("Skipped"), "{name}");
            assert!(
                !states
                    .iter()
                    .any(|s| s == "ProvisionEc2Runner" || s == "StartShellRunner"),
                "{states:?}"
            );
            let skipped = attribute(&sdk, &jobs, &key.table_key(), "provision_skipped")
                .await
                .unwrap_or_default();
            assert!(skipped.starts_with("GitLab reports the job "), "{skipped}");
            assert!(
                ["running", "success", "canceled"]
                    .iter()
                    .any(|s| skipped.contains(&format!("job {s}, not pending"))),
                "{skipped}"
            );
            assert_eq!(
                attribute(&sdk, &jobs, &key.table_key(), "provision_error").await,
                None
            );
        }
        if want_route == "EC2" {
            assert_eq!(
                states.last().map(String::as_str),
                Some("Ec2RunnerProvisioned")
            );
            let outcome =
                execution_output(&sdk, &provision, &format!("p9-j{job_id}-provision")).await;
            assert_eq!(
                outcome["ec2"]["outcome"]["outcome"], "launched",
                "{outcome}"
            );
            assert_eq!(outcome["ec2"]["outcome"]["runner_id"], 500 + job_id);
        }
    }

    // The mapper's errors: retried as MapJob's Retry says, then the definition's own
    // RecordFailure state (started with what the Catch hands it) records them; nothing after
    // MapJob runs, so nothing is launched.
    let definition: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(workspace_root().join("statemachine/provision.asl.json")).unwrap(),
    )
    .unwrap();
    let mut from_catch = definition.clone();
    from_catch["StartAt"] = "RecordFailure".into();
    let from_catch = create_from_text(
        &sdk,
        "provision-from-catch",
        &from_catch.to_string(),
        &[
            ("MapperFunctionArn", MAPPER_ARN),
            ("Ec2ProvisionFunctionArn", EC2_PROVISION_ARN),
            ("JobsTableName", &jobs),
        ],
    )
    .await;
    let no_token = Mapper {
        rules: DynamoMappingRules {
            client: dynamo.clone(),
            table: mappings.clone(),
        },
        gitlab: GitLabJobs::new(None, None),
        default_route: Executor::Ec2(Default::default()),
    };
    for (job_id, name, want_error, want_calls) in [
        // EC2 route (the docker-build item), no token: not retried.
        (9, "docker-build", TaskError::GitLabApiTokenMissing, 1),
        // GitLab 500: 1 call + MapJob's retries.
        (
            8,
            "docker-build",
            TaskError::GitLabUnavailable,
            1 + map_job_retries(&definition, TaskError::GitLabUnavailable),
        ),
    ] {
        let event = job_event(9, job_id, name, JobStatus::Pending);
        let key = JobKey::of(&event);
        store
            .advance(key, JobPhase::Provisioning, &event, 1)
            .await
            .unwrap();
        let input = WorkflowInput {
            job_key: key.table_key(),
            job: event,
        };
        let which = if want_error == TaskError::GitLabApiTokenMissing {
            &no_token
        } else {
            &mapper
        };
        let before = gitlab.requests.load(std::sync::atomic::Ordering::SeqCst);
        let mut calls = 0;
        let error = loop {
            calls += 1;
            let e = which.handle(&input).await.unwrap_err();
            assert_eq!(e.error_type(), want_error, "{e}");
            // The first call, then one per retry MapJob's Retry allows.
            if calls > map_job_retries(&definition, e.error_type()) {
                break e;
            }
        };
        assert_eq!(calls, want_calls, "{want_error}");
        if want_error == TaskError::GitLabUnavailable {
            // Each call: the client's first try and its one retry.
            assert_eq!(
                gitlab.requests.load(std::sync::atomic::Ordering::SeqCst) - before,
                2 * calls
            );
        }
        let diagnostic = mapper::diagnostic(&error);
        let mut state = serde_json::to_value(&input).unwrap();
        state["error"] = serde_json::json!({
            "Error": diagnostic.error_type,
            "Cause": serde_json::json!({"errorType": diagnostic.error_type,
                                        "errorMessage": diagnostic.error_message}).to_string(),
        });
        let (status, states) =
            run_json(&sdk, &from_catch, &format!("p9-j{job_id}-failed"), &state).await;
        assert_eq!(status, ExecutionStatus::Failed, "{states:?}");
        assert_eq!(states, ["RecordFailure", "ProvisionFailed"]);
        assert_eq!(
            attribute(&sdk, &jobs, &key.table_key(), "provision_error")
                .await
                .as_deref(),
            Some(want_error.name().as_str())
        );
        let cause = attribute(&sdk, &jobs, &key.table_key(), "provision_cause")
            .await
            .unwrap_or_default();
        if want_error == TaskError::GitLabApiTokenMissing {
            assert!(cause.contains("GitLabApiTokenParameterName"), "{cause}");
        }
        assert_eq!(
            attribute(&sdk, &jobs, &key.table_key(), "route_type").await,
            None
        );
    }

    // Teardown: the LAMBDA job that no runner took has nothing on EC2: cleaned at once. The
    // EC2 job goes through the ec2-teardown function first; so does a LAMBDA-routed job
    // that a runner ran (it may be one of ours, launched for another job).
    for (job_id, runner, want_states) in [
        (
            1,
            None,
            &["LookUpJob", "WasRoutedToEc2", "MarkCleaned", "Cleaned"][..],
        ),
        (
            2,
            None,
            &[
                "LookUpJob",
                "WasRoutedToEc2",
                "TearDownRunners",
                "MarkCleaned",
                "Cleaned",
            ][..],
        ),
        (
            4,
            Some(901),
            &[
                "LookUpJob",
                "WasRoutedToEc2",
                "TearDownRunners",
                "MarkCleaned",
                "Cleaned",
            ][..],
        ),
    ] {
        let mut event = job_event(9, job_id, "x", JobStatus::Success);
        event.runner = runner.map(|id| ephemeral_core::RunnerRef {
            id,
            description: None,
            tags: vec![],
        });
        let key = JobKey::of(&event);
        store
            .advance(key, JobPhase::Finished, &event, 2)
            .await
            .unwrap();
        if want_states.contains(&"TearDownRunners") {
            moto_api(
                "/moto-api/static/lambda-simple/response",
                serde_json::json!({"results": [serde_json::to_string(&TornDown::default()).unwrap()]}),
            )
            .await;
        }
        let input = WorkflowInput {
            job_key: key.table_key(),
            job: event,
        };
        let (status, states) =
            run(&sdk, &teardown, &format!("p9-j{job_id}-teardown"), &input).await;
        assert_eq!(
            status,
            ExecutionStatus::Succeeded,
            "job {job_id}: {states:?}"
        );
        let entered: Vec<&str> = states
            .iter()
            .map(String::as_str)
            .filter(|s| want_states.contains(s) || *s == "TearDownRunners")
            .collect();
        assert_eq!(entered, want_states, "job {job_id}: {states:?}");
        assert_eq!(
            attribute(&sdk, &jobs, &key.table_key(), "phase")
                .await
                .as_deref(),
            Some("cleaned")
        );
    }

    // A second teardown of a cleaned job changes nothing and succeeds.
    let event = job_event(9, 1, "x", JobStatus::Success);
    let input = WorkflowInput {
        job_key: JobKey::of(&event).table_key(),
        job: event,
    };
    let (status, states) = run(&sdk, &teardown, "p9-j1-teardown-again", &input).await;
    assert_eq!(status, ExecutionStatus::Succeeded, "{states:?}");
    assert!(states.contains(&"AlreadyCleaned".to_owned()), "{states:?}");
}
