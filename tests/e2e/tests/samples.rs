//! The samples in events/ are what Lambda hands the functions: each parses as the function's
//! payload type and yields the outcome events/README.md promises.

use aws_lambda_events::eventbridge::EventBridgeEvent;
use e2e_tests::workspace_root;
use ephemeral_core::jobs::{ProvisionOn, RouterOutcome, Workflow, WorkflowInput};
use ephemeral_core::mapping::{
    Executor, ExecutorKind, GitLabJobView, JobLookup, LookedUp, LookupError, MappingRules, Rule,
    rule_from_item,
};
use ephemeral_core::testing::{InMemoryJobs, RecordingWorkflows};
use ephemeral_core::webhook::PortError;
use router::{Router, RouterError};

fn sample<T: serde::de::DeserializeOwned>(path: &str) -> T {
    let text = std::fs::read_to_string(workspace_root().join("events").join(path)).unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("events/{path}: {e}"))
}

#[tokio::test]
async fn router_samples_yield_their_documented_outcomes() {
    let router = Router {
        store: InMemoryJobs::default(),
        workflows: RecordingWorkflows::default(),
        provision_on: ProvisionOn::Pending,
    };
    let outcome = |o: Result<RouterOutcome, RouterError>| o.unwrap();
    let pending: EventBridgeEvent<serde_json::Value> = sample("router/pending.json");
    assert!(matches!(
        outcome(router.handle(&pending, 1).await),
        RouterOutcome::Started {
            workflow: Workflow::Provision,
            ..
        }
    ));
    let finished: EventBridgeEvent<serde_json::Value> = sample("router/finished.json");
    assert!(matches!(
        outcome(router.handle(&finished, 1).await),
        RouterOutcome::Started {
            workflow: Workflow::Teardown,
            ..
        }
    ));
    let running: EventBridgeEvent<serde_json::Value> = sample("router/running.json");
    let picked_up = outcome(router.handle(&running, 1).await);
    let line: serde_json::Value =
        serde_json::from_str(&router::metric_line(&picked_up).expect("a pickup metric")).unwrap();
    assert_eq!(line["PickupLatency"], 11_800);
    assert_eq!(
        outcome(router.handle(&running, 1).await),
        RouterOutcome::Skipped("running hook already recorded")
    );
    let malformed: EventBridgeEvent<serde_json::Value> = sample("router/malformed-detail.json");
    assert!(matches!(
        router.handle(&malformed, 1).await,
        Err(RouterError::Malformed(_))
    ));
    let foreign: EventBridgeEvent<serde_json::Value> = sample("router/not-a-job-event.json");
    assert_eq!(
        outcome(router.handle(&foreign, 1).await),
        RouterOutcome::Skipped("not a job event")
    );
}

struct OneRule(Rule);
impl MappingRules for OneRule {
    async fn candidates(
        &self,
        _: &str,
    ) -> Result<(Vec<Rule>, Vec<ephemeral_core::mapping::InvalidItem>), PortError> {
        Ok((vec![self.0.clone()], vec![]))
    }
}
/// GitLab has every job pending, without tags.
struct AllPending;
impl JobLookup for AllPending {
    async fn job(&self, _: u64, _: u64) -> Result<LookedUp, LookupError> {
        Ok(LookedUp::Found(GitLabJobView {
            status: ephemeral_core::JobStatus::Pending,
            tags: vec![],
        }))
    }
}

#[tokio::test]
async fn mapper_samples_are_workflow_inputs() {
    let rule = rule_from_item(
        serde_json::json!({"pk": "job#unit-test", "sk": "tags#", "type": "LAMBDA",
        "arn": "arn:aws:lambda:us-east-1:123456789012:function:runner"})
        .as_object()
        .unwrap(),
    )
    .unwrap();
    let mapper = mapper::Mapper {
        rules: OneRule(rule),
        gitlab: AllPending,
        default_route: Executor::Ec2(Default::default()),
    };
    let unit: WorkflowInput = sample("mapper/unit-test.json");
    assert_eq!(
        mapper.handle(&unit).await.unwrap().decision.executor.kind(),
        ExecutorKind::Lambda
    );
    let docker: WorkflowInput = sample("mapper/docker-build.json");
    assert_eq!(
        mapper.handle(&docker).await.unwrap().decision.matched,
        "default"
    );
}

#[test]
fn fleet_samples_parse_as_the_functions_payloads() {
    let provision: fleet::ProvisionInput = sample("ec2-provision/docker-build.json");
    assert!(matches!(
        provision.mapped.decision.decision.executor,
        Executor::Ec2(ref s) if s.instance_type.as_deref() == Some("c7g.large")
    ));
    assert_eq!(
        provision.mapped.decision.tags.as_deref(),
        Some(&["docker".to_owned()][..])
    );
    let ran: fleet::TeardownInput = sample("ec2-teardown/success.json");
    assert_eq!(ran.job.runner.map(|r| r.id), Some(48151));
    let canceled: fleet::TeardownInput = sample("ec2-teardown/canceled-never-picked.json");
    assert!(canceled.job.runner.is_none());
    assert_eq!(canceled.job.status, ephemeral_core::JobStatus::Canceled);
    let _: serde_json::Value = sample("reaper/scheduled.json");
}
