//! The EC2 runner functions (provision, teardown, reaper) through their real handlers, the
//! real AWS SDK and moto (EC2, SSM, DynamoDB), with a stand-in for GitLab's runner API on
//! loopback that keeps state and records every call.

use std::io::Write as _;

use aws_sdk_dynamodb::types::AttributeValue;
use e2e_tests::fleet_stack::*;
use e2e_tests::loopback::{FaultProxy, ec2_error};
use e2e_tests::{moto_endpoint, scan_items};
use ephemeral_core::fleet::Provisioned;
use ephemeral_core::hook::JobStatus;
use ephemeral_core::task_error::TaskError;
use ephemeral_core::testing::job_event;

fn now_ms() -> u64 {
    fleet::now_ms()
}

#[tokio::test]
async fn provision_then_teardown_leaves_nothing_and_no_token_leaks() {
    let (logs, _guard) = capture_logs();
    let stack = fleet_stack().await;
    let functions = stack.functions(&stack.config(&[])).await;
    let job = job_event(41, 4101, "docker-build", JobStatus::Pending);
    stack.job_is_provisioning(&job).await;
    let (input, input_json) = provision_input(&job, ec2_route());

    let outcome = functions.provision(&input, now_ms()).await.unwrap();
    let (instance_id, runner_id) = launched(&outcome);

    // The instance: tagged for this stack, job and runner, IMDSv2 only, spot by default.
    let live = stack.live_instances().await;
    assert_eq!(live.len(), 1);
    let instance = &live[0];
    assert_eq!(instance.instance_id(), Some(instance_id.as_str()));
    assert_eq!(tag(instance, "ephemeral-runners:job-id"), Some("4101"));
    assert_eq!(tag(instance, "ephemeral-runners:project-id"), Some("41"));
    assert_eq!(
        tag(instance, "ephemeral-runners:runner-id"),
        Some(runner_id.to_string().as_str())
    );
    assert_eq!(tag(instance, "team"), Some("ci"));
    assert_eq!(
        instance
            .metadata_options()
            .and_then(|m| m.http_tokens())
            .map(|t| t.as_str()),
        Some("required")
    );
    assert_eq!(
        instance.instance_lifecycle().map(|l| l.as_str()),
        Some("spot")
    );
    assert!(
        stack
            .subnets
            .contains(&instance.subnet_id().unwrap().to_owned())
    );

    // The runner: created with the job's tags, its token only in the instance's parameter.
    let token = {
        let state = stack.gitlab.state();
        assert_eq!(state.runners.len(), 1);
        let create = state
            .calls
            .iter()
            .find(|c| c.method == "POST")
            .unwrap()
            .body_text();
        assert!(create.contains("tag_list=docker"), "{create}");
        assert!(create.contains("runner_type=project_type"), "{create}");
        assert!(create.contains("project_id=41"), "{create}");
        state.runners[&runner_id].clone()
    };
    let parameter = format!("{}/{instance_id}", stack.prefix);
    let stored = stack
        .ssm
        .get_parameter()
        .name(&parameter)
        .with_decryption(true)
        .send()
        .await
        .unwrap()
        .parameter
        .unwrap();
    assert_eq!(stored.value(), Some(token.as_str()));
    assert_eq!(stored.r#type().map(|t| t.as_str()), Some("SecureString"));
    let tags = stack
        .ssm
        .list_tags_for_resource()
        .resource_type(aws_sdk_ssm::types::ResourceTypeForTagging::Parameter)
        .resource_id(&parameter)
        .send()
        .await
        .unwrap();
    assert!(
        tags.tag_list()
            .iter()
            .any(|t| t.key() == "ephemeral-runners:instance-arn"
                && t.value()
                    == format!("arn:aws:ec2:us-east-1:123456789012:instance/{instance_id}"))
    );

    // The job's item: job -> runner -> instance.
    let item = stack.job_item(&job).await;
    assert_eq!(item["phase"], AttributeValue::S("running".into()));
    assert_eq!(
        item["launched_runner_id"],
        AttributeValue::N(runner_id.to_string())
    );
    assert_eq!(item["instance_id"], AttributeValue::S(instance_id.clone()));
    assert_eq!(scan_items(&stack.sdk, &stack.runners_table).await.len(), 1);

    // A repeat of the step (Step Functions retry, second start), a minute later, launches
    // nothing more.
    let again = functions
        .provision(&input, now_ms() + 60_000)
        .await
        .unwrap();
    assert_eq!(
        again,
        Provisioned::AlreadyProvisioned {
            instance_id: instance_id.clone(),
            runner_id
        }
    );
    assert_eq!(stack.live_instances().await.len(), 1);
    assert_eq!(stack.gitlab.state().runners.len(), 1);
    // When the runner was first ready (the router's ReadyToRunning starts there): the repeat
    // kept the first step's time.
    let ready = |item: &std::collections::HashMap<String, AttributeValue>| match &item["runner_ready_at_ms"]
    {
        AttributeValue::N(ms) => ms.parse::<u64>().unwrap(),
        other => panic!("{other:?}"),
    };
    assert_eq!(ready(&stack.job_item(&job).await), ready(&item));

    // No token in user-data, the workflow's input and output, or any log line.
    let user_data = stack.user_data(&instance_id).await;
    assert!(user_data.contains("run-single") && user_data.contains(&stack.prefix));
    stack.assert_no_token_in("user-data", &user_data);
    stack.assert_no_token_in("the provision input", &input_json);
    stack.assert_no_token_in(
        "the provision output",
        &serde_json::to_string(&outcome).unwrap(),
    );

    // The job finishes on its runner: teardown removes everything.
    let done = stack.finished(&job, JobStatus::Success, Some(runner_id));
    let torn = functions.teardown(&done).await.unwrap();
    assert_eq!(torn.removed.len(), 1);
    assert_eq!(
        torn.removed[0].instance_id.as_deref(),
        Some(instance_id.as_str())
    );
    assert!(
        stack.live_instances().await.is_empty(),
        "instance left running"
    );
    assert!(
        stack.token_parameters().await.is_empty(),
        "token parameter left"
    );
    assert!(
        stack.gitlab.state().runners.is_empty(),
        "runner left in GitLab"
    );
    assert!(
        scan_items(&stack.sdk, &stack.runners_table)
            .await
            .is_empty()
    );
    // ...and a repeated teardown is a no-op that succeeds.
    functions.teardown(&done).await.unwrap();
    assert!(stack.gitlab.state().runners.is_empty());

    let log_text = logs.text();
    assert!(log_text.contains("\"provisioned\"") && log_text.contains("\"torn down\""));
    stack.assert_no_token_in("the log", &log_text);
    std::io::stdout().flush().unwrap();
}

#[tokio::test]
async fn a_step_that_launched_and_then_failed_is_retried_to_already_provisioned() {
    // Recording the runner on the job's item is throttled on all three of the SDK's
    // attempts: the step fails after the instance, the runner and the token exist. The
    // workflow's retry must find them, record them, and launch nothing more.
    let stack = fleet_stack().await;
    let refused = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let counter = refused.clone();
    let proxy = FaultProxy::start(
        moto_endpoint(),
        Box::new(move |request| {
            // record_running's update (note_runner's sets launched_runner_id too, not phase).
            let record = request
                .body_text()
                .contains("SET phase = :phase, phase_rank = :rank, launched_runner_id");
            (record && counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 3).then(|| {
                (
                    400,
                    r#"{"__type":"ThrottlingException","message":"Rate exceeded (fault proxy)"}"#
                        .to_owned(),
                )
            })
        }),
    );
    let sdk = stack.sdk.to_builder().endpoint_url(&proxy.url).build();
    let functions = stack.functions_at(&stack.config(&[]), &sdk).await;
    let job = job_event(42, 4301, "build", JobStatus::Pending);
    stack.job_is_provisioning(&job).await;
    let input = provision_input(&job, ec2_route()).0;

    let failed = functions.provision(&input, now_ms()).await.unwrap_err();
    assert_eq!(refused.load(std::sync::atomic::Ordering::SeqCst), 3);
    assert!(
        matches!(
            failed.error_type(),
            TaskError::ProvisionStepFailed | TaskError::DependencyFailed
        ),
        "{}: {failed}: the workflow must retry it",
        failed.error_type()
    );
    let retried = functions.provision(&input, now_ms()).await.unwrap();
    let Provisioned::AlreadyProvisioned {
        instance_id,
        runner_id,
    } = &retried
    else {
        panic!("expected already_provisioned, got {retried:?}");
    };
    assert_eq!(stack.live_instances().await.len(), 1);
    assert_eq!(stack.gitlab.state().runners.len(), 1);
    let item = stack.job_item(&job).await;
    assert_eq!(item["phase"], AttributeValue::S("running".into()));
    assert_eq!(
        item["launched_runner_id"],
        AttributeValue::N(runner_id.to_string())
    );
    assert_eq!(item["instance_id"], AttributeValue::S(instance_id.clone()));
}

#[tokio::test]
async fn spot_capacity_error_falls_back_to_on_demand() {
    let stack = fleet_stack().await;
    // EC2 answers InsufficientInstanceCapacity to every spot launch. (Real EC2 sends it as a
    // 500, which the SDK retries first; 400 here keeps the test fast with the same outcome.)
    let proxy = FaultProxy::start(
        moto_endpoint(),
        Box::new(|request| {
            let body = request.body_text();
            (body.contains("Action=RunInstances")
                && body.contains("InstanceMarketOptions.MarketType=spot"))
            .then(|| {
                (
                    400,
                    ec2_error("InsufficientInstanceCapacity", "no spot capacity"),
                )
            })
        }),
    );
    let sdk = stack.sdk.to_builder().endpoint_url(&proxy.url).build();
    let functions = stack.functions_at(&stack.config(&[]), &sdk).await;
    let job = job_event(42, 4201, "build", JobStatus::Pending);
    stack.job_is_provisioning(&job).await;

    let outcome = functions
        .provision(&provision_input(&job, ec2_route()).0, now_ms())
        .await
        .unwrap();
    match &outcome {
        Provisioned::Launched {
            market,
            failed_attempts,
            ..
        } => {
            assert_eq!(*market, ephemeral_core::mapping::Market::OnDemand);
            assert_eq!(failed_attempts.len(), 2, "each subnet tried on spot first");
            assert!(failed_attempts[0].contains("spot: InsufficientInstanceCapacity"));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(proxy.fault_count(), 2);
    let live = stack.live_instances().await;
    assert_eq!(live.len(), 1);
    assert_eq!(
        live[0].instance_lifecycle(),
        None,
        "on-demand has no lifecycle"
    );
}

#[tokio::test]
async fn finished_job_that_ran_on_another_runner_removes_that_runner_not_its_own() {
    let stack = fleet_stack().await;
    let functions = stack.functions(&stack.config(&[])).await;
    let a = job_event(43, 4301, "a", JobStatus::Pending);
    let b = job_event(43, 4302, "b", JobStatus::Pending);
    let mut launched_for = Vec::new();
    for job in [&a, &b] {
        stack.job_is_provisioning(job).await;
        let outcome = functions
            .provision(&provision_input(job, ec2_route()).0, now_ms())
            .await
            .unwrap();
        launched_for.push(launched(&outcome));
    }
    let ((instance_a, runner_a), (instance_b, runner_b)) =
        (launched_for[0].clone(), launched_for[1].clone());
    // B's runner took A; A's runner took B and is still running it.
    stack.gitlab.state().busy.insert(runner_a);

    let torn = functions
        .teardown(&stack.finished(&a, JobStatus::Success, Some(runner_b)))
        .await
        .unwrap();
    assert_eq!(torn.removed.len(), 1);
    assert_eq!(torn.removed[0].runner_id, runner_b);
    assert_eq!(torn.kept.len(), 1, "{torn:?}");
    assert_eq!(torn.kept[0].runner_id, runner_a);
    let live: Vec<_> = stack
        .live_instances()
        .await
        .iter()
        .filter_map(|i| i.instance_id().map(str::to_owned))
        .collect();
    assert_eq!(
        live,
        std::slice::from_ref(&instance_a),
        "B's instance is the one to go"
    );
    assert!(!live.contains(&instance_b));

    // B finishes on A's runner: now A's runner goes too.
    stack.gitlab.state().busy.clear();
    functions
        .teardown(&stack.finished(&b, JobStatus::Failed, Some(runner_a)))
        .await
        .unwrap();
    assert!(stack.live_instances().await.is_empty());
    assert!(stack.gitlab.state().runners.is_empty());
    assert!(stack.token_parameters().await.is_empty());
}

#[tokio::test]
async fn canceled_job_whose_runner_never_got_it_is_cleaned_up() {
    let stack = fleet_stack().await;
    let functions = stack.functions(&stack.config(&[])).await;
    let job = job_event(44, 4401, "deploy", JobStatus::Pending);
    stack.job_is_provisioning(&job).await;
    let (instance_id, runner_id) = launched(
        &functions
            .provision(&provision_input(&job, ec2_route()).0, now_ms())
            .await
            .unwrap(),
    );
    let torn = functions
        .teardown(&stack.finished(&job, JobStatus::Canceled, None))
        .await
        .unwrap();
    assert_eq!(torn.removed.len(), 1);
    assert_eq!(torn.removed[0].runner_id, runner_id);
    assert_eq!(
        torn.removed[0].instance_id.as_deref(),
        Some(instance_id.as_str())
    );
    assert!(stack.live_instances().await.is_empty());
    assert!(stack.gitlab.state().runners.is_empty());
}

#[tokio::test]
async fn reaper_removes_what_a_lost_finished_event_left_and_is_two_phase() {
    let stack = fleet_stack().await;
    let provisioner = stack.functions(&stack.config(&[])).await;
    let job = job_event(45, 4501, "test", JobStatus::Pending);
    stack.job_is_provisioning(&job).await;
    let (instance_id, _) = launched(
        &provisioner
            .provision(&provision_input(&job, ec2_route()).0, now_ms())
            .await
            .unwrap(),
    );
    // A stale token parameter of an instance that no longer exists, and a registered runner
    // whose instance is gone.
    stack
        .ssm
        .put_parameter()
        .name(format!("{}/i-0000000000dead", stack.prefix))
        .value("glrt-stale")
        .r#type(aws_sdk_ssm::types::ParameterType::SecureString)
        .send()
        .await
        .unwrap();
    let orphan = {
        let mut state = stack.gitlab.state();
        state.runners.insert(777_000_001, "glrt-orphan".into());
        777_000_001u64
    };
    aws_sdk_dynamodb::Client::new(&stack.sdk)
        .put_item()
        .table_name(&stack.runners_table)
        .item("runner_id", AttributeValue::S(orphan.to_string()))
        .item("instance_id", AttributeValue::S("i-0000000000dead".into()))
        .item("created_at_ms", AttributeValue::N("0".into()))
        .send()
        .await
        .unwrap();

    // Within its lifetime and grace: the reaper keeps it, but removes the orphans.
    let reaper = stack
        .functions(&stack.config(&[("ORPHAN_GRACE_SECONDS", "0")]))
        .await;
    let report = reaper.reap(now_ms(), &invocation()).await.unwrap();
    assert!(
        report.killed.is_empty() && report.marked.is_empty(),
        "{report:?}"
    );
    assert_eq!(report.stale_parameters, ["i-0000000000dead"]);
    assert_eq!(report.orphan_runners, [orphan]);
    assert!(!stack.gitlab.state().runners.contains_key(&orphan));
    assert_eq!(stack.live_instances().await.len(), 1);

    // The finished event was lost, and its runner is idle: marked on one pass, killed on the
    // next.
    let idle_config = stack.config(&[
        ("RUNNER_WAIT_TIMEOUT_SECONDS", "0"),
        ("RUNNER_BOOT_GRACE_SECONDS", "0"),
    ]);
    let idle_reaper = stack.functions(&idle_config).await;
    let report = idle_reaper.reap(now_ms(), &invocation()).await.unwrap();
    assert_eq!(report.marked.len(), 1, "{report:?}");
    assert!(report.killed.is_empty());
    assert_eq!(stack.live_instances().await.len(), 1, "marked, not killed");
    let report = idle_reaper.reap(now_ms(), &invocation()).await.unwrap();
    assert_eq!(report.killed.len(), 1, "{report:?}");
    assert!(stack.live_instances().await.is_empty());

    // Past the maximum lifetime, even a busy runner goes at once.
    let job = job_event(45, 4502, "long", JobStatus::Pending);
    stack.job_is_provisioning(&job).await;
    let (_, runner_id) = launched(
        &provisioner
            .provision(&provision_input(&job, ec2_route()).0, now_ms())
            .await
            .unwrap(),
    );
    stack.gitlab.state().busy.insert(runner_id);
    let old_reaper = stack
        .functions(&stack.config(&[("MAX_INSTANCE_LIFETIME_SECONDS", "0")]))
        .await;
    let report = old_reaper.reap(now_ms(), &invocation()).await.unwrap();
    assert_eq!(report.killed.len(), 1, "{report:?}");
    assert!(stack.live_instances().await.is_empty());
    assert!(stack.token_parameters().await.is_empty());
    assert!(stack.gitlab.state().runners.is_empty());
    assert!(
        scan_items(&stack.sdk, &stack.runners_table)
            .await
            .is_empty()
    );
    let _ = instance_id;
}

#[tokio::test]
async fn reaper_bypass_tag_keeps_an_instance() {
    let stack = fleet_stack().await;
    let functions = stack
        .functions(&stack.config(&[("MAX_INSTANCE_LIFETIME_SECONDS", "0")]))
        .await;
    let job = job_event(46, 4601, "keep", JobStatus::Pending);
    stack.job_is_provisioning(&job).await;
    let (instance_id, _) = launched(
        &functions
            .provision(&provision_input(&job, ec2_route()).0, now_ms())
            .await
            .unwrap(),
    );
    stack
        .ec2
        .create_tags()
        .resources(&instance_id)
        .tags(
            aws_sdk_ec2::types::Tag::builder()
                .key("ephemeral-runners:keep")
                .value("debugging")
                .build(),
        )
        .send()
        .await
        .unwrap();
    let report = functions.reap(now_ms(), &invocation()).await.unwrap();
    assert!(report.killed.is_empty(), "{report:?}");
    assert_eq!(stack.live_instances().await.len(), 1);
}

#[tokio::test]
async fn a_runner_whose_creation_answer_was_lost_is_found_and_removed() {
    let stack = fleet_stack().await;
    let functions = stack.functions(&stack.config(&[])).await;
    // GitLab makes the runner, but its answer is lost: the client retries and GitLab makes
    // a second one. The first one's token is known to nobody.
    stack.gitlab.state().lost_create_answers = 1;
    let job = job_event(48, 4801, "build", JobStatus::Pending);
    stack.job_is_provisioning(&job).await;
    let (_, runner_id) = launched(
        &functions
            .provision(&provision_input(&job, ec2_route()).0, now_ms())
            .await
            .unwrap(),
    );
    let gitlab = stack.gitlab.state();
    assert_eq!(
        gitlab.issued_tokens.len(),
        2,
        "the fault happened: two runners made"
    );
    assert_eq!(
        gitlab.runners.keys().copied().collect::<Vec<_>>(),
        [runner_id],
        "only the runner we registered is left"
    );
    // The mark that told them apart: both had it, no other runner does.
    let description = &gitlab.descriptions[&runner_id];
    assert!(
        description.contains("job 4801") && description.contains(" #"),
        "{description}"
    );
    assert_eq!(
        gitlab
            .descriptions
            .values()
            .filter(|d| *d == description)
            .count(),
        2
    );
}

#[tokio::test]
async fn gitlab_failures_are_retried_then_fail_clearly_leaving_nothing() {
    let (logs, _guard) = capture_logs();
    let stack = fleet_stack().await;
    let functions = stack.functions(&stack.config(&[])).await;

    // Two 502s, then GitLab answers: the runner is created on the third call.
    stack.gitlab.state().failing_creates = 2;
    let job = job_event(47, 4701, "build", JobStatus::Pending);
    stack.job_is_provisioning(&job).await;
    let (_, runner_id) = launched(
        &functions
            .provision(&provision_input(&job, ec2_route()).0, now_ms())
            .await
            .unwrap(),
    );
    let creates = |stack: &FleetStack| {
        stack
            .gitlab
            .state()
            .calls
            .iter()
            .filter(|c| c.method == "POST")
            .count()
    };
    assert_eq!(creates(&stack), 3);

    // GitLab keeps failing: a clear error, and the launched instance is terminated.
    stack.gitlab.state().failing_creates = u32::MAX;
    let other = job_event(47, 4702, "build", JobStatus::Pending);
    stack.job_is_provisioning(&other).await;
    let error = functions
        .provision(&provision_input(&other, ec2_route()).0, now_ms())
        .await
        .unwrap_err();
    let message = error.to_string();
    assert_eq!(error.error_type(), TaskError::GitLabRunnerNotCreated);
    assert!(message.contains("POST /user/runners"), "{message}");
    assert!(message.contains("502"), "{message}");
    assert!(message.contains("4 attempts"), "{message}");
    assert!(
        message.contains("cleaned up: terminating the instance"),
        "{message}"
    );
    assert_eq!(creates(&stack), 3 + 4);
    assert_eq!(
        stack.live_instances().await.len(),
        1,
        "only the first job's"
    );

    // Deleting fails at teardown: a clear failure that names the runner; nothing forgotten.
    stack.gitlab.state().failing_deletes = u32::MAX;
    let error = functions
        .teardown(&stack.finished(&job, JobStatus::Success, Some(runner_id)))
        .await
        .unwrap_err();
    let message = error.to_string();
    assert!(message.contains("DELETE /runners/"), "{message}");
    assert!(
        message.contains(&format!("runner {runner_id}")),
        "{message}"
    );
    assert_eq!(scan_items(&stack.sdk, &stack.runners_table).await.len(), 1);
    // GitLab recovers: the retried step finishes the job.
    stack.gitlab.state().failing_deletes = 0;
    functions
        .teardown(&stack.finished(&job, JobStatus::Success, Some(runner_id)))
        .await
        .unwrap();
    assert!(stack.gitlab.state().runners.is_empty());
    assert!(
        scan_items(&stack.sdk, &stack.runners_table)
            .await
            .is_empty()
    );
    stack.assert_no_token_in("the log", &logs.text());
}

#[tokio::test]
async fn spot_refused_for_the_account_falls_back_to_on_demand_with_a_warning() {
    let (logs, _guard) = capture_logs();
    let stack = fleet_stack().await;
    // A fresh account: no AWSServiceRoleForEC2Spot, and the caller may not create it. EC2
    // refuses every spot launch in every subnet with this code.
    let proxy = FaultProxy::start(
        moto_endpoint(),
        Box::new(|request| {
            let body = request.body_text();
            (body.contains("Action=RunInstances")
                && body.contains("InstanceMarketOptions.MarketType=spot"))
            .then(|| {
                (
                    400,
                    ec2_error(
                        "AuthFailure.ServiceLinkedRoleCreationNotPermitted",
                        "The provided credentials do not have permission to create the service-linked role for EC2 Spot Instances.",
                    ),
                )
            })
        }),
    );
    let sdk = stack.sdk.to_builder().endpoint_url(&proxy.url).build();
    let functions = stack.functions_at(&stack.config(&[]), &sdk).await;
    let job = job_event(48, 4801, "build", JobStatus::Pending);
    stack.job_is_provisioning(&job).await;

    let outcome = functions
        .provision(&provision_input(&job, ec2_route()).0, now_ms())
        .await
        .expect("spot refused must fall back to on demand, not fail with LaunchRefused");
    let Provisioned::Launched {
        market,
        subnet,
        failed_attempts,
        ..
    } = &outcome
    else {
        panic!("{outcome:?}");
    };
    assert_eq!(*market, ephemeral_core::mapping::Market::OnDemand);
    assert_eq!(subnet, &stack.subnets[0], "on demand in the first subnet");
    assert_eq!(failed_attempts.len(), 1, "{failed_attempts:?}");
    assert!(
        failed_attempts[0].contains("spot: AuthFailure.ServiceLinkedRoleCreationNotPermitted"),
        "{failed_attempts:?}"
    );
    // One refusal: the second subnet is not asked for spot (the refusal is the account's).
    assert_eq!(proxy.fault_count(), 1);
    let live = stack.live_instances().await;
    assert_eq!(live.len(), 1);
    assert_eq!(live[0].instance_lifecycle(), None, "on demand");
    // The operator is told how to fix it, at WARN.
    let warning = logs
        .text()
        .lines()
        .find(|l| l.contains("create-service-linked-role"))
        .map(str::to_owned)
        .expect("no warning with the fix");
    assert!(warning.contains("\"level\":\"WARN\""), "{warning}");
    assert!(
        warning.contains("--aws-service-name spot.amazonaws.com"),
        "{warning}"
    );
}

#[tokio::test]
async fn a_stack_without_ec2_settings_starts_without_ssm_and_its_teardown_and_reaper_touch_nothing()
{
    let stack = fleet_stack().await;
    // Something of ours exists in EC2 (as if the stack had EC2 runners once): an instance past
    // any lifetime, with its runner. Unconfigured functions must leave it alone.
    let configured = stack.functions(&stack.config(&[])).await;
    let job = job_event(49, 4901, "build", JobStatus::Pending);
    stack.job_is_provisioning(&job).await;
    let (_, runner_id) = launched(
        &configured
            .provision(&provision_input(&job, ec2_route()).0, now_ms())
            .await
            .unwrap(),
    );
    let gitlab_calls = stack.gitlab.state().calls.len();

    // Every AWS call of the unconfigured functions goes through this proxy, which counts.
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = calls.clone();
    let proxy = FaultProxy::start(
        moto_endpoint(),
        Box::new(move |_| {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            None
        }),
    );
    let sdk = stack.sdk.to_builder().endpoint_url(&proxy.url).build();
    let mut env = stack.lambda_only_env();
    env.push(("MAX_INSTANCE_LIFETIME_SECONDS".into(), "0".into()));
    let setup = FleetStack::setup_of(&env);
    assert!(
        matches!(setup, fleet::FleetSetup::NotConfigured),
        "{setup:?}"
    );
    let (logs, guard) = capture_logs();
    let functions = fleet::Functions::start(&setup, &sdk).await.unwrap();

    let torn = functions
        .teardown(&finished(&job, JobStatus::Success, Some(runner_id)))
        .await
        .unwrap();
    assert!(torn.removed.is_empty() && torn.kept.is_empty(), "{torn:?}");
    assert!(torn.skipped.as_deref().unwrap().contains("not configured"));
    for _ in 0..2 {
        let report = functions.reap(now_ms(), &invocation()).await.unwrap();
        assert!(report.killed.is_empty() && report.errors.is_empty());
        assert!(
            report
                .skipped
                .as_deref()
                .unwrap()
                .contains("not configured")
        );
    }
    let passes: Vec<_> = logs
        .text()
        .lines()
        .filter(|l| l.contains("\"reaper pass\""))
        .map(str::to_owned)
        .collect();
    assert_eq!(passes.len(), 2, "one line per pass: {passes:?}");
    assert!(passes.iter().all(|l| l.contains("\"level\":\"INFO\"")));
    assert!(
        !logs.text().contains("\"level\":\"ERROR\""),
        "{}",
        logs.text()
    );
    drop(guard);

    // A job routed to EC2 anyway fails clearly, and the workflow records it (not retried).
    let error = functions
        .provision(&provision_input(&job, ec2_route()).0, now_ms())
        .await
        .unwrap_err();
    assert_eq!(error.error_type(), TaskError::Ec2NotConfigured);
    assert!(!error.error_type().is_retried());
    assert!(
        error.to_string().contains("RunnerApiTokenParameterName"),
        "{error}"
    );

    assert_eq!(
        calls.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "no AWS call"
    );
    assert_eq!(
        stack.gitlab.state().calls.len(),
        gitlab_calls,
        "no GitLab call"
    );
    assert_eq!(
        stack.live_instances().await.len(),
        1,
        "the instance is untouched"
    );
    assert!(stack.gitlab.state().runners.contains_key(&runner_id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reaper_passes_act_once_under_the_lease() {
    let stack = fleet_stack().await;
    let provisioner = stack.functions(&stack.config(&[])).await;
    let job = job_event(50, 5001, "long", JobStatus::Pending);
    stack.job_is_provisioning(&job).await;
    launched(
        &provisioner
            .provision(&provision_input(&job, ec2_route()).0, now_ms())
            .await
            .unwrap(),
    );
    // Four schedules fire at once (EventBridge delivers at least once; a slow pass meets the
    // next): each with its own invocation. Past the maximum lifetime, whoever acts kills.
    let config = stack.config(&[("MAX_INSTANCE_LIFETIME_SECONDS", "0")]);
    let mut reapers = Vec::new();
    for _ in 0..4 {
        reapers.push(stack.functions(&config).await);
    }
    let now = now_ms();
    let reports = futures_util::future::join_all(
        reapers
            .iter()
            .map(|r| async move { r.reap(now, &invocation()).await.unwrap() }),
    )
    .await;
    let acted: Vec<_> = reports.iter().filter(|r| r.skipped.is_none()).collect();
    let held = reports
        .iter()
        .filter(|r| {
            r.skipped
                .as_deref()
                .is_some_and(|s| s.contains("another reaper pass holds the lease"))
        })
        .count();
    assert_eq!((acted.len(), held), (1, 3), "{reports:?}");
    assert_eq!(acted[0].killed.len(), 1, "{reports:?}");
    assert!(stack.live_instances().await.is_empty());
    // The acting pass gave the lease back: the next pass acts (nothing left to kill).
    assert!(scan_items(&stack.sdk, &stack.leases_table).await.is_empty());
    let next = reapers[0].reap(now_ms(), &invocation()).await.unwrap();
    assert_eq!(next.skipped, None, "{next:?}");
}

#[tokio::test]
async fn a_pass_waits_for_a_held_lease_and_takes_over_an_expired_one() {
    use ephemeral_core::lease::{Lease, Leases, REAPER_LEASE};
    let stack = fleet_stack().await;
    let provisioner = stack.functions(&stack.config(&[])).await;
    let job = job_event(51, 5101, "long", JobStatus::Pending);
    stack.job_is_provisioning(&job).await;
    launched(
        &provisioner
            .provision(&provision_input(&job, ec2_route()).0, now_ms())
            .await
            .unwrap(),
    );
    let leases = fleet::lease::DynamoLeases {
        client: aws_sdk_dynamodb::Client::new(&stack.sdk),
        table: stack.leases_table.clone(),
    };
    let now = now_ms();
    let other = |until| Lease {
        name: REAPER_LEASE.into(),
        holder: "request-of-a-running-pass".into(),
        expires_at_ms: until,
    };
    assert_eq!(leases.take(&other(now + 60_000), now).await.unwrap(), None);
    let reaper = stack
        .functions(&stack.config(&[("MAX_INSTANCE_LIFETIME_SECONDS", "0")]))
        .await;
    let report = reaper.reap(now, &invocation()).await.unwrap();
    assert!(
        report
            .skipped
            .unwrap()
            .contains("request-of-a-running-pass")
    );
    assert_eq!(
        stack.live_instances().await.len(),
        1,
        "kept while the lease is held"
    );

    // That pass died: its lease ran out. The next pass takes over and acts.
    leases
        .release(REAPER_LEASE, "request-of-a-running-pass")
        .await
        .unwrap();
    assert_eq!(
        leases.take(&other(now - 1), now - 60_000).await.unwrap(),
        None
    );
    // A stranger's release leaves someone else's hold alone.
    leases.release(REAPER_LEASE, "a-stranger").await.unwrap();
    assert_eq!(scan_items(&stack.sdk, &stack.leases_table).await.len(), 1);
    let report = reaper.reap(now_ms(), &invocation()).await.unwrap();
    assert_eq!(report.skipped, None, "{report:?}");
    assert_eq!(report.killed.len(), 1);
    assert!(stack.live_instances().await.is_empty());
    assert!(
        scan_items(&stack.sdk, &stack.leases_table).await.is_empty(),
        "released"
    );
}

/// Functions whose every AWS call goes through a proxy that counts `TerminateInstances`.
async fn counting_terminations(
    stack: &FleetStack,
    extra: &[(&str, &str)],
) -> (
    fleet::Functions,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    FaultProxy,
) {
    let terminations = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = terminations.clone();
    let proxy = FaultProxy::start(
        moto_endpoint(),
        Box::new(move |request| {
            if request.body_text().contains("Action=TerminateInstances") {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            None
        }),
    );
    let sdk = stack.sdk.to_builder().endpoint_url(&proxy.url).build();
    let functions = stack.functions_at(&stack.config(extra), &sdk).await;
    (functions, terminations, proxy)
}

/// Three jobs running on their own runners (GitLab says so), provisioned through the step.
async fn three_running_jobs(
    stack: &FleetStack,
    functions: &fleet::Functions,
) -> Vec<(ephemeral_core::hook::JobEvent, String, u64)> {
    let mut running = Vec::new();
    for job_id in 1..=3 {
        let job = job_event(61, 6100 + job_id, "docker-build", JobStatus::Pending);
        stack.job_is_provisioning(&job).await;
        let outcome = functions
            .provision(&provision_input(&job, ec2_route()).0, now_ms())
            .await
            .unwrap();
        let (instance_id, runner_id) = launched(&outcome);
        stack.gitlab_job(&job, JobStatus::Running, Some(runner_id));
        stack.gitlab.state().busy.insert(runner_id);
        running.push((job, instance_id, runner_id));
    }
    running
}

/// Issue 12 item 2: anyone with one hook secret sends `success` hooks with new job ids and
/// swept runner ids (and for the real jobs too). GitLab does not confirm any of them: every
/// instance keeps running, every runner stays registered, nothing is terminated.
#[tokio::test]
async fn forged_success_hooks_with_swept_runner_ids_destroy_nothing() {
    let stack = fleet_stack().await;
    let (functions, terminations, _proxy) = counting_terminations(&stack, &[]).await;
    let running = three_running_jobs(&stack, &functions).await;
    let lowest = running.iter().map(|(_, _, r)| *r).min().unwrap();
    let (logs, guard) = capture_logs();
    let mut unconfirmed = Vec::new();
    // 20 runner ids around ours (all three included); the first three hooks name the real
    // jobs (GitLab: running), the rest new job ids GitLab never heard of.
    for (n, runner_id) in (lowest.saturating_sub(5)..lowest + 15).enumerate() {
        let job = match running.get(n) {
            Some((real, _, _)) => real.clone(),
            None => job_event(61, 990_000 + n as u64, "forged", JobStatus::Pending),
        };
        let torn = functions
            .teardown(&finished(&job, JobStatus::Success, Some(runner_id)))
            .await
            .unwrap();
        assert!(torn.removed.is_empty(), "{torn:?}");
        unconfirmed.push(torn.unconfirmed.expect("unconfirmed").code());
    }
    drop(guard);
    assert_eq!(unconfirmed.len(), 20);
    assert_eq!(
        unconfirmed.iter().filter(|c| **c == "not_finished").count(),
        3
    );
    assert_eq!(
        unconfirmed
            .iter()
            .filter(|c| **c == "job_not_found")
            .count(),
        17
    );
    assert_eq!(terminations.load(std::sync::atomic::Ordering::SeqCst), 0);
    assert_eq!(stack.live_instances().await.len(), 3);
    let registered = scan_items(&stack.sdk, &stack.runners_table).await;
    assert_eq!(registered.len(), 3);
    for (_, _, runner_id) in &running {
        assert!(stack.gitlab.state().runners.contains_key(runner_id));
    }
    assert_eq!(stack.token_parameters().await.len(), 3);
    let text = logs.text();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("\"message\":\"unconfirmed"))
        .collect();
    assert_eq!(lines.len(), 20, "{text}");
    for key in ["project_id", "pipeline_id", "job_id", "\"reason\""] {
        assert!(lines.iter().all(|l| l.contains(key)), "{key}: {lines:?}");
    }
    assert_eq!(
        text.matches("\"TeardownsUnconfirmed\"").count(),
        0,
        "metrics go to stdout, not the log"
    );

    // The first job really finishes: GitLab agrees with its hook, and it goes as before.
    let (job, instance_id, runner_id) = &running[0];
    stack.gitlab.state().busy.remove(runner_id);
    let torn = functions
        .teardown(&stack.finished(job, JobStatus::Success, Some(*runner_id)))
        .await
        .unwrap();
    assert_eq!(torn.unconfirmed, None);
    assert_eq!(torn.removed.len(), 1, "{torn:?}");
    assert_eq!(
        torn.removed[0].instance_id.as_deref(),
        Some(instance_id.as_str())
    );
    assert_eq!(terminations.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(stack.live_instances().await.len(), 2);
    assert!(!stack.gitlab.state().runners.contains_key(runner_id));
}

/// GitLab cannot be reached (502 after the client's retries), or no read_api token is
/// configured: even a true finished hook destroys nothing; the reaper and the reconciler
/// finish the job later.
#[tokio::test]
async fn without_gitlab_word_a_finished_hook_destroys_nothing() {
    let stack = fleet_stack().await;
    let (functions, terminations, _proxy) = counting_terminations(&stack, &[]).await;
    let running = three_running_jobs(&stack, &functions).await;
    let (job, _, runner_id) = &running[0];
    stack.gitlab_job(job, JobStatus::Success, Some(*runner_id));
    stack.gitlab.state().busy.clear();

    stack.gitlab.state().jobs_unavailable = true;
    let torn = functions
        .teardown(&finished(job, JobStatus::Success, Some(*runner_id)))
        .await
        .unwrap();
    assert_eq!(
        torn.unconfirmed.as_ref().map(|u| u.code()),
        Some("gitlab_unavailable")
    );
    assert!(torn.removed.is_empty());

    // No read_api token: the hook alone is never trusted.
    let (blind, blind_terminations, _blind_proxy) =
        counting_terminations(&stack, &[("GITLAB_API_TOKEN_PARAMETER", "")]).await;
    stack.gitlab.state().jobs_unavailable = false;
    let torn = blind
        .teardown(&finished(job, JobStatus::Success, Some(*runner_id)))
        .await
        .unwrap();
    let why = torn.unconfirmed.expect("unconfirmed");
    assert_eq!(why.code(), "no_read_api_token");
    assert!(why.to_string().contains("GitLabApiTokenParameterName"));
    assert!(torn.removed.is_empty());

    assert_eq!(terminations.load(std::sync::atomic::Ordering::SeqCst), 0);
    assert_eq!(
        blind_terminations.load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    assert_eq!(stack.live_instances().await.len(), 3);
    assert_eq!(scan_items(&stack.sdk, &stack.runners_table).await.len(), 3);
}

/// Issue 12, finding 4: launched instances answer IMDS only with a session token and only
/// one hop away (hop limit 1), so a job's container cannot reach the instance role.
#[tokio::test]
async fn launched_instances_require_imdsv2_with_hop_limit_one() {
    let stack = fleet_stack().await;
    let functions = stack.functions(&stack.config(&[])).await;
    let job = job_event(43, 4301, "docker-build", JobStatus::Pending);
    stack.job_is_provisioning(&job).await;
    let (input, _) = provision_input(&job, ec2_route());
    let outcome = functions.provision(&input, now_ms()).await.unwrap();
    let (instance_id, _) = launched(&outcome);

    let live = stack.live_instances().await;
    let instance = live
        .iter()
        .find(|i| i.instance_id() == Some(instance_id.as_str()))
        .expect("the launched instance");
    let metadata = instance.metadata_options().expect("metadata options");
    assert_eq!(metadata.http_tokens().map(|t| t.as_str()), Some("required"));
    assert_eq!(
        metadata.http_put_response_hop_limit(),
        Some(ephemeral_core::ec2::IMDS_HOP_LIMIT)
    );
    assert_eq!(ephemeral_core::ec2::IMDS_HOP_LIMIT, 1);
}

#[tokio::test]
async fn a_new_attempt_launches_its_own_runner_while_another_job_runs_on_the_first() {
    let stack = fleet_stack().await;
    let functions = stack.functions(&stack.config(&[])).await;
    let (a, b) = (
        job_event(47, 4701, "build", JobStatus::Pending),
        job_event(47, 4702, "build", JobStatus::Pending),
    );
    stack.job_is_provisioning(&a).await;
    let (input, _) = provision_input(&a, ec2_route());
    let (first, r1) = launched(&functions.provision(&input, now_ms()).await.unwrap());
    // GitLab hands A's runner the older job B; the reconciler claims A's attempt 2.
    stack.gitlab.state().busy.insert(r1);
    stack.job_attempt_is(&a, 2).await;
    let (second, r2) = launched(&functions.provision(&input, now_ms()).await.unwrap());
    assert_ne!(second, first);
    assert_ne!(r2, r1);
    let live = stack.live_instances().await;
    assert_eq!(live.len(), 2);
    let attempt_of = |id: &str| {
        let instance = live.iter().find(|i| i.instance_id() == Some(id)).unwrap();
        tag(instance, "ephemeral-runners:attempt").map(str::to_owned)
    };
    assert_eq!(attempt_of(&first).as_deref(), Some("1"));
    assert_eq!(attempt_of(&second).as_deref(), Some("2"));
    // The first runner, busy with B, is left alone; the job's item names the new one.
    assert!(stack.gitlab.state().runners.contains_key(&r1));
    let item = stack.job_item(&a).await;
    assert_eq!(
        item["launched_runner_id"],
        AttributeValue::N(r2.to_string())
    );
    assert_eq!(item["instance_id"], AttributeValue::S(second.clone()));
    // A retried step of attempt 2 finds attempt 2's runner.
    assert_eq!(
        functions.provision(&input, now_ms()).await.unwrap(),
        Provisioned::AlreadyProvisioned {
            instance_id: second.clone(),
            runner_id: r2
        }
    );
    assert_eq!(stack.live_instances().await.len(), 2);

    // B finishes on A's first runner: that instance goes; A's second stays for A.
    let torn = functions
        .teardown(&stack.finished(&b, JobStatus::Success, Some(r1)))
        .await
        .unwrap();
    assert_eq!(torn.removed.len(), 1, "{torn:?}");
    let live = stack.live_instances().await;
    assert_eq!(live.len(), 1);
    assert_eq!(live[0].instance_id(), Some(second.as_str()));
    functions
        .teardown(&stack.finished(&a, JobStatus::Success, Some(r2)))
        .await
        .unwrap();
    assert!(stack.live_instances().await.is_empty());
    assert!(stack.gitlab.state().runners.is_empty());
}

/// Issue 12, finding 5: the reaper asks GitLab whether a runner is busy before it destroys
/// anything, and an unanswered question is not "idle". A job marked finished in the jobs
/// table (a finished hook, maybe forged) and an idle-looking runner, while GitLab's runner
/// API answers only 502: the reaper neither marks nor kills; once GitLab answers "idle" it
/// marks, then kills.
#[tokio::test]
async fn the_reaper_destroys_nothing_while_gitlab_cannot_say_whether_the_runner_is_busy() {
    let stack = fleet_stack().await;
    let provisioner = stack.functions(&stack.config(&[])).await;
    let job = job_event(46, 4601, "test", JobStatus::Pending);
    stack.job_is_provisioning(&job).await;
    launched(
        &provisioner
            .provision(&provision_input(&job, ec2_route()).0, now_ms())
            .await
            .unwrap(),
    );
    aws_sdk_dynamodb::Client::new(&stack.sdk)
        .update_item()
        .table_name(&stack.jobs_table)
        .key(
            "job_key",
            AttributeValue::S(ephemeral_core::jobs::JobKey::of(&job).table_key()),
        )
        .update_expression("SET phase = :f, phase_rank = :r")
        .expression_attribute_values(":f", AttributeValue::S("finished".into()))
        .expression_attribute_values(":r", AttributeValue::N("4".into()))
        .send()
        .await
        .unwrap();
    let reaper = stack
        .functions(&stack.config(&[
            ("RUNNER_WAIT_TIMEOUT_SECONDS", "0"),
            ("RUNNER_BOOT_GRACE_SECONDS", "0"),
        ]))
        .await;
    stack.gitlab.state().failure_percent = 100;
    for _ in 0..2 {
        let report = reaper.reap(now_ms(), &invocation()).await.unwrap();
        assert!(
            report.marked.is_empty() && report.killed.is_empty(),
            "destroyed on a guess: {report:?}"
        );
    }
    assert!(
        stack.gitlab.state().random_failures >= 2,
        "GitLab was asked and failed"
    );
    assert_eq!(stack.live_instances().await.len(), 1);

    stack.gitlab.state().failure_percent = 0;
    let report = reaper.reap(now_ms(), &invocation()).await.unwrap();
    assert_eq!(report.marked.len(), 1, "{report:?}");
    let report = reaper.reap(now_ms(), &invocation()).await.unwrap();
    assert_eq!(report.killed.len(), 1, "{report:?}");
    assert!(stack.live_instances().await.is_empty());
}

/// The EC2 adapter's queries against moto: a terminated instance is listed for the job and
/// the runner (its tags say which slot to give back) and left out of the live queries that
/// provisioning and the reaper use (EC2 keeps terminated instances listed for about an hour).
#[tokio::test]
async fn live_queries_leave_out_terminated_instances() {
    use ephemeral_core::fleet::{Fleet as _, InstanceQuery, InstanceState};
    use ephemeral_core::jobs::JobKey;
    let stack = fleet_stack().await;
    let launch = |job: &str, runner: &str| {
        let tags = aws_sdk_ec2::types::TagSpecification::builder()
            .resource_type(aws_sdk_ec2::types::ResourceType::Instance)
            .set_tags(Some(
                [
                    ("ephemeral-runners:managed-by", stack.name.as_str()),
                    ("ephemeral-runners:project-id", "43"),
                    ("ephemeral-runners:job-id", job),
                    ("ephemeral-runners:runner-id", runner),
                ]
                .map(|(k, v)| aws_sdk_ec2::types::Tag::builder().key(k).value(v).build())
                .to_vec(),
            ))
            .build();
        stack
            .ec2
            .run_instances()
            .image_id("ami-12c6146b")
            .min_count(1)
            .max_count(1)
            .tag_specifications(tags)
            .send()
    };
    let id = |out: aws_sdk_ec2::operation::run_instances::RunInstancesOutput| {
        out.instances()[0].instance_id().unwrap().to_owned()
    };
    let old = id(launch("4301", "71").await.unwrap());
    let new = id(launch("4301", "72").await.unwrap());
    let other = id(launch("4302", "73").await.unwrap());
    stack
        .ec2
        .terminate_instances()
        .instance_ids(&old)
        .send()
        .await
        .unwrap();
    let fleet = fleet::aws::Ec2Fleet {
        ec2: stack.ec2.clone(),
        ssm: stack.ssm.clone(),
        stack: stack.name.clone(),
        security_group_ids: Vec::new(),
        instance_profile_arn: None,
    };
    let ids = |query| {
        let fleet = fleet.clone();
        async move {
            let mut found: Vec<(String, InstanceState)> = fleet
                .instances(query)
                .await
                .unwrap()
                .into_iter()
                .map(|i| (i.id, i.state))
                .collect();
            found.sort_by(|a, b| a.0.cmp(&b.0));
            found
        }
    };
    let (terminated, running) = (InstanceState::Terminated, InstanceState::Running);
    let mut both = vec![(old.clone(), terminated), (new.clone(), running)];
    both.sort_by(|a, b| a.0.cmp(&b.0));
    let job = JobKey {
        project_id: 43,
        job_id: 4301,
    };
    assert_eq!(ids(InstanceQuery::Job(job)).await, both);
    assert_eq!(
        ids(InstanceQuery::LiveForJob(job)).await,
        [(new.clone(), running)]
    );
    assert_eq!(ids(InstanceQuery::Runner(71)).await, [(old, terminated)]);
    let mut live = vec![(new, running), (other, running)];
    live.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(ids(InstanceQuery::Live).await, live);
    assert_eq!(ids(InstanceQuery::All).await.len(), 3);
}
