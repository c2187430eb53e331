//! The mapper against moto (mapping table) and a GitLab stand-in on loopback (tags).

use std::sync::atomic::Ordering;

use aws_sdk_dynamodb::types::AttributeValue;
use e2e_tests::*;
use ephemeral_core::hook::JobStatus;
use ephemeral_core::jobs::{JobKey, WorkflowInput};
use ephemeral_core::mapping::Executor;
use ephemeral_core::testing::job_event;
use mapper::{DynamoMappingRules, GitLabJobTags, Mapper, TokenSource};

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

#[tokio::test]
async fn seed_items_route_by_name_without_a_gitlab_token() {
    let sdk = sdk_config();
    let table = table_with_seed_items().await;
    let mapper = Mapper {
        rules: DynamoMappingRules {
            client: aws_sdk_dynamodb::Client::new(&sdk),
            table,
        },
        tags: GitLabJobTags::new(None, None),
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

    let out = mapper.handle(&input(1, 11, "docker-build")).await.unwrap();
    assert_eq!(out.decision.executor.kind(), "EC2");
    let out = mapper.handle(&input(1, 12, "lint")).await.unwrap();
    assert_eq!(out.decision.matched, "default");
    assert_eq!(serde_json::to_value(&out).unwrap()["arn"], DEFAULT_ARN);
}

#[tokio::test]
async fn tags_from_gitlab_refine_the_route_and_a_gitlab_failure_falls_back_to_the_name() {
    let sdk = sdk_config();
    let table = table_with_seed_items().await;
    let ssm = aws_sdk_ssm::Client::new(&sdk);
    let parameter = format!("/{}/gitlab-api-token", unique("mapper"));
    ssm.put_parameter()
        .name(&parameter)
        .value("glpat-test-token")
        .r#type(aws_sdk_ssm::types::ParameterType::SecureString)
        .send()
        .await
        .unwrap();
    let gitlab = GitLabStandIn::start(
        "glpat-test-token",
        vec![
            (20, vec!["docker", "large", "linux"]),
            (21, vec!["gpu"]),
            (22, vec!["linux"]),
        ],
        vec![23],
    );
    let mapper = Mapper {
        rules: DynamoMappingRules {
            client: aws_sdk_dynamodb::Client::new(&sdk),
            table,
        },
        tags: GitLabJobTags::new(
            Some(gitlab.url.clone()),
            Some(TokenSource::new(ssm, parameter)),
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
    // GitLab answers 500: routed by name as if no token were configured.
    let out = mapper.handle(&input(1, 23, "docker-build")).await.unwrap();
    assert_eq!(out.decision.matched, "job#docker-build/tags#docker#large");
    assert_eq!(out.tags, None);
    // A retry of the same job is served from the cache.
    let before = gitlab.requests.load(Ordering::SeqCst);
    mapper.handle(&input(1, 20, "docker-build")).await.unwrap();
    assert_eq!(gitlab.requests.load(Ordering::SeqCst), before);
}
