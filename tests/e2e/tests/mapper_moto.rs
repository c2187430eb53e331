//! The mapper against moto (mapping table, token parameter) and a GitLab stand-in on loopback
//! (the job's status and tags).

use std::sync::atomic::Ordering;

use aws_sdk_dynamodb::types::AttributeValue;
use e2e_tests::*;
use ephemeral_core::hook::JobStatus;
use ephemeral_core::jobs::{JobKey, WorkflowInput};
use ephemeral_core::mapping::Executor;
use ephemeral_core::task_error::TaskError;
use ephemeral_core::testing::job_event;
use mapper::{DynamoMappingRules, GitLabJobs, Mapper, TokenSource};

const RUNNER_ARN: &str = "arn:aws:lambda:us-east-1:123456789012:function:shell-runner";
const DEFAULT_ARN: &str = "arn:aws:lambda:us-east-1:123456789012:function:default-runner";

/// Writes an item the way the seed's loader did: `put_item` with S attributes only.
async fn seed_item(dynamo: &aws_sdk_dynamodb::Client, table: &str, attrs: &[(&str, &str)]) {
    let mut put = dynamo.put_item().table_name(table);
    for (k, v) in attrs {
        put = put.item(*k, AttributeValue::S((*v).to_owned()));
    }
    put.send().await.unwrap();
}

fn input(project: u64, job: u64, name: &str) -> WorkflowInput {
    let event = job_event(project, job, name, JobStatus::Pending);
    WorkflowInput {
        job_key: JobKey::of(&event).table_key(),
        job: event,
    }
}

async fn table_with_seed_items() -> String {
    let sdk = sdk_config();
    let table = create_table(&sdk, "mappings", "pk", Some("sk")).await;
    let dynamo = aws_sdk_dynamodb::Client::new(&sdk);
    seed_item(
        &dynamo,
        &table,
        &[
            ("pk", "job#unit-test"),
            ("sk", "tags#"),
            ("type", "LAMBDA"),
            ("arn", RUNNER_ARN),
        ],
    )
    .await;
    seed_item(
        &dynamo,
        &table,
        &[
            ("pk", "job#docker-build"),
            ("sk", "tags#docker#large"),
            ("type", "EC2"),
        ],
    )
    .await;
    seed_item(
        &dynamo,
        &table,
        &[
            ("pk", "job#*"),
            ("sk", "tags#gpu"),
            ("type", "EC2"),
            ("instance_type", "g5.xlarge"),
        ],
    )
    .await;
    // Broken by hand: must be skipped and reported, not fatal.
    seed_item(
        &dynamo,
        &table,
        &[
            ("pk", "job#unit-test"),
            ("sk", "tags#zzz"),
            ("type", "FARGATE"),
        ],
    )
    .await;
    table
}

/// An SSM SecureString holding `token`, as the operator stores the read_api token.
async fn token_parameter(sdk: &aws_config::SdkConfig, token: &str) -> TokenSource {
    let ssm = aws_sdk_ssm::Client::new(sdk);
    let parameter = format!("/{}/gitlab-api-token", unique("mapper"));
    ssm.put_parameter()
        .name(&parameter)
        .value(token)
        .r#type(aws_sdk_ssm::types::ParameterType::SecureString)
        .send()
        .await
        .unwrap();
    TokenSource::new(ssm, parameter)
}

#[tokio::test]
async fn without_a_token_seed_items_route_by_name_and_an_ec2_route_fails_naming_the_parameter() {
    let sdk = sdk_config();
    let table = table_with_seed_items().await;
    let mapper = Mapper {
        rules: DynamoMappingRules {
            client: aws_sdk_dynamodb::Client::new(&sdk),
            table,
        },
        gitlab: GitLabJobs::new(None, None),
        default_route: Executor::Lambda {
            arn: DEFAULT_ARN.into(),
        },
    };
    let out = mapper.handle(&input(1, 10, "unit-test")).await.unwrap();
    let json = serde_json::to_value(&out).unwrap();
    assert_eq!(json["type"], "LAMBDA");
    assert_eq!(json["arn"], RUNNER_ARN, "ARN as a string: {json}");
    assert_eq!(json["matched"], "job#unit-test/tags#");
    assert_eq!(json["tags"], serde_json::Value::Null);
    assert_eq!(out.invalid_items.len(), 1, "{:?}", out.invalid_items);
    assert!(
        out.invalid_items[0].contains("job#unit-test/tags#zzz: type: `FARGATE`"),
        "{:?}",
        out.invalid_items
    );

    // The docker item routes to EC2: its runner would carry no tags. Not retried (the
    // workflow's Catch records it).
    let e = mapper
        .handle(&input(1, 11, "docker-build"))
        .await
        .unwrap_err();
    let diagnostic = mapper::diagnostic(&e);
    assert_eq!(
        diagnostic.error_type,
        TaskError::GitLabApiTokenMissing.name()
    );
    assert!(
        diagnostic
            .error_message
            .contains("set the stack parameter GitLabApiTokenParameterName"),
        "{}",
        diagnostic.error_message
    );
    assert!(!e.error_type().is_retried());
    let out = mapper.handle(&input(1, 12, "lint")).await.unwrap();
    assert_eq!(out.decision.matched, "default");
    assert_eq!(serde_json::to_value(&out).unwrap()["arn"], DEFAULT_ARN);
}

#[tokio::test]
async fn gitlabs_status_and_tags_decide_and_a_gitlab_failure_fails_the_step() {
    let sdk = sdk_config();
    let table = table_with_seed_items().await;
    let gitlab = GitLabStandIn::start(
        "glpat-test-token",
        vec![
            (20, vec!["docker", "large", "linux"]),
            (21, vec!["gpu"]),
            (22, vec!["linux"]),
            (24, vec!["docker", "large"]),
        ],
        vec![23],
    )
    .await;
    let mapper = Mapper {
        rules: DynamoMappingRules {
            client: aws_sdk_dynamodb::Client::new(&sdk),
            table,
        },
        gitlab: GitLabJobs::new(
            Some(gitlab.url.clone()),
            Some(token_parameter(&sdk, "glpat-test-token").await),
        ),
        default_route: Executor::Ec2(Default::default()),
    };
    // The job has the item's tags: matched by name and tags.
    let out = mapper.handle(&input(1, 20, "docker-build")).await.unwrap();
    assert_eq!(out.decision.matched, "job#docker-build/tags#docker#large");
    assert_eq!(
        out.tags.as_deref(),
        Some(&["docker".to_owned(), "large".into(), "linux".into()][..])
    );
    // Any job name with the gpu tag.
    let out = mapper.handle(&input(1, 21, "train")).await.unwrap();
    assert_eq!(out.decision.matched, "job#*/tags#gpu");
    // Tags known and lacking docker: the docker item does not apply: default.
    let out = mapper.handle(&input(1, 22, "docker-build")).await.unwrap();
    assert_eq!(out.decision.matched, "default");

    // GitLab answers 500 (twice: the client's one retry): a retried error, no route.
    let before = gitlab.requests.load(Ordering::SeqCst);
    let e = mapper
        .handle(&input(1, 23, "docker-build"))
        .await
        .unwrap_err();
    assert_eq!(e.error_type(), TaskError::GitLabUnavailable, "{e}");
    assert!(e.error_type().is_retried());
    assert_eq!(gitlab.requests.load(Ordering::SeqCst) - before, 2);

    // The hook said pending; GitLab says otherwise: SKIP, naming GitLab's status. Each call
    // reads GitLab afresh (a status is never cached).
    for status in ["running", "success", "canceled"] {
        gitlab.set_status(24, status);
        let out = mapper.handle(&input(1, 24, "docker-build")).await.unwrap();
        let json = serde_json::to_value(&out).unwrap();
        assert_eq!(json["type"], "SKIP", "{json}");
        assert_eq!(json["matched"], "gitlab");
        assert!(
            json["reason"]
                .as_str()
                .unwrap()
                .starts_with(&format!("GitLab reports the job {status}, not pending")),
            "{json}"
        );
    }
    gitlab.set_status(24, "pending");
    let out = mapper.handle(&input(1, 24, "docker-build")).await.unwrap();
    assert_eq!(out.decision.matched, "job#docker-build/tags#docker#large");
    // A job GitLab does not know (404): gone, nothing to provision.
    let out = mapper.handle(&input(1, 99, "docker-build")).await.unwrap();
    assert_eq!(out.decision.executor, Executor::Skip);
    assert!(
        out.decision.reason.contains("404"),
        "{}",
        out.decision.reason
    );
}

#[tokio::test]
async fn a_token_gitlab_refuses_fails_the_step_at_once_telling_what_to_fix() {
    let sdk = sdk_config();
    let table = table_with_seed_items().await;
    let gitlab = GitLabStandIn::start("glpat-right", vec![(30, vec![])], vec![]).await;
    let mapper = Mapper {
        rules: DynamoMappingRules {
            client: aws_sdk_dynamodb::Client::new(&sdk),
            table,
        },
        gitlab: GitLabJobs::new(
            Some(gitlab.url.clone()),
            Some(token_parameter(&sdk, "glpat-expired").await),
        ),
        default_route: Executor::Lambda {
            arn: DEFAULT_ARN.into(),
        },
    };
    let e = mapper.handle(&input(1, 30, "lint")).await.unwrap_err();
    assert_eq!(e.error_type(), TaskError::GitLabTokenRejected);
    assert!(!e.error_type().is_retried());
    let text = e.to_string();
    assert!(
        text.contains("GitLabApiTokenParameterName") && text.contains("read_api"),
        "{text}"
    );
    assert!(!text.contains("glpat-expired"), "the token leaked: {text}");
    // Not retried by the client either: one request.
    assert_eq!(gitlab.requests.load(Ordering::SeqCst), 1);
}
