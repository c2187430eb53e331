//! The reconciler against moto (jobs and runners tables, Step Functions) and a wiremock
//! GitLab that lists pending jobs: each kind of gap a hook path can leave is closed by one
//! new attempt, a job with a live runner of its own is left alone, a second pass starts
//! nothing, and the router's late hook for a reconciled job joins the same execution.

use std::collections::HashMap;

use aws_lambda_events::eventbridge::EventBridgeEvent;
use aws_sdk_dynamodb::types::AttributeValue;
use e2e_tests::*;
use ephemeral_core::fleet::{RunnerEntry, RunnerLedger};
use ephemeral_core::hook::JobStatus;
use ephemeral_core::jobs::{JobKey, ProvisionOn};
use ephemeral_core::reconcile::{Reason, ReconcileSettings};
use ephemeral_core::slots::{Capped, SlotCaps, SlotStore};
use ephemeral_core::testing::job_event;
use ephemeral_gitlab::{GitLabClient, RetryPolicy, Secret};
use reconciler::aws::{JobsTable, ProvisionWorkflow, TeardownWorkflow};
use reconciler::gitlab::GitLabPending;
use reconciler::{Reconciler, RunnerLife, Scopes};
use router::aws::{DynamoJobStore, StepFunctions};
use serde_json::json;
use wiremock::matchers::{method, path, query_param};
use wiremock::{Mock, MockServer, ResponseTemplate};

const PASS: &str = r#"{"StartAt":"Done","States":{"Done":{"Type":"Pass","End":true}}}"#;
const PROJECT: u64 = 7;
const MIN: u64 = 60_000;

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn key(job_id: u64) -> JobKey {
    JobKey {
        project_id: PROJECT,
        job_id,
    }
}

/// GitLab lists these jobs of project 7 as pending: (id, seconds pending).
async fn gitlab_with_pending(jobs: &[(u64, f64)]) -> MockServer {
    let server = MockServer::start().await;
    let body: Vec<_> = jobs
        .iter()
        .map(|(id, waited)| {
            json!({
                "id": id, "name": format!("build {id}"), "status": "pending", "stage": "build",
                "tag_list": [], "ref": "main", "pipeline": {"id": 900, "project_id": PROJECT},
                "queued_duration": waited, "runner": null
            })
        })
        .collect();
    Mock::given(method("GET"))
        .and(path(format!("/api/v4/projects/{PROJECT}/jobs")))
        .and(query_param("scope[]", "pending"))
        .respond_with(ResponseTemplate::new(200).set_body_json(body))
        .mount(&server)
        .await;
    server
}

struct Stack {
    sdk: aws_config::SdkConfig,
    jobs_table: String,
    provision_arn: String,
    teardown_arn: String,
    ledger: fleet::aws::DynamoRunnerLedger,
    slots: Option<Capped<fleet::slots::DynamoSlots>>,
}

async fn stack() -> Stack {
    let sdk = sdk_config();
    let jobs_table = create_table(&sdk, "jobs", "job_key", None).await;
    let runners_table = create_table(&sdk, "runners", "runner_id", None).await;
    let provision_arn = create_state_machine(&sdk, "provision", PASS).await;
    let teardown_arn = create_state_machine(&sdk, "teardown", PASS).await;
    let ledger = fleet::aws::DynamoRunnerLedger {
        client: aws_sdk_dynamodb::Client::new(&sdk),
        jobs_table: jobs_table.clone(),
        runners_table,
    };
    Stack {
        sdk,
        jobs_table,
        provision_arn,
        teardown_arn,
        ledger,
        slots: None,
    }
}

impl Stack {
    fn reconciler(&self, gitlab: &MockServer) -> Reconciler<fleet::aws::DynamoRunnerLedger> {
        Reconciler::new(
            GitLabPending {
                client: GitLabClient::new(&gitlab.uri(), RetryPolicy::default()),
                token: Secret::new("glpat-read-api".to_owned()),
            },
            self.jobs(),
            self.ledger.clone(),
            ProvisionWorkflow {
                client: aws_sdk_sfn::Client::new(&self.sdk),
                arn: self.provision_arn.clone(),
            },
            TeardownWorkflow {
                client: aws_sdk_sfn::Client::new(&self.sdk),
                arn: self.teardown_arn.clone(),
            },
            Scopes {
                project_ids: vec![PROJECT],
                group_ids: vec![],
            },
            50,
            RunnerLife {
                waits_ms: 15 * MIN,
                project_scoped: true,
            },
            self.slots.clone(),
        )
    }

    fn jobs(&self) -> JobsTable {
        JobsTable {
            client: aws_sdk_dynamodb::Client::new(&self.sdk),
            table: self.jobs_table.clone(),
            ttl_seconds: 3600,
        }
    }

    fn router(&self) -> router::Router<DynamoJobStore, StepFunctions> {
        router::Router {
            store: DynamoJobStore {
                client: aws_sdk_dynamodb::Client::new(&self.sdk),
                table: self.jobs_table.clone(),
                ttl_seconds: 3600,
            },
            workflows: StepFunctions {
                client: aws_sdk_sfn::Client::new(&self.sdk),
                provision_arn: self.provision_arn.clone(),
                teardown_arn: self.provision_arn.clone(),
            },
            provision_on: ProvisionOn::Pending,
        }
    }

    /// An item as the router and the provision workflow leave it.
    async fn put_job(&self, job_id: u64, attributes: &[(&str, AttributeValue)]) {
        let mut item: HashMap<String, AttributeValue> = attributes
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect();
        item.insert("job_key".into(), AttributeValue::S(key(job_id).table_key()));
        item.insert("project_id".into(), AttributeValue::N(PROJECT.to_string()));
        aws_sdk_dynamodb::Client::new(&self.sdk)
            .put_item()
            .table_name(&self.jobs_table)
            .set_item(Some(item))
            .send()
            .await
            .unwrap();
    }

    async fn item(&self, job_id: u64) -> HashMap<String, AttributeValue> {
        aws_sdk_dynamodb::Client::new(&self.sdk)
            .get_item()
            .table_name(&self.jobs_table)
            .key("job_key", AttributeValue::S(key(job_id).table_key()))
            .consistent_read(true)
            .send()
            .await
            .unwrap()
            .item
            .unwrap_or_default()
    }
}

fn n(v: u64) -> AttributeValue {
    AttributeValue::N(v.to_string())
}
fn s(v: &str) -> AttributeValue {
    AttributeValue::S(v.to_owned())
}

#[tokio::test]
async fn every_kind_of_gap_gets_one_new_attempt_and_a_covered_job_none() {
    let st = stack().await;
    let now = now_ms();
    // 1: its pending hook was lost (no item). 2: provisioning failed (NoCapacity).
    // 3: its runner is alive and waiting. 4: pending for 10 s only. 5: its runner expired.
    st.put_job(
        2,
        &[
            ("phase", s("provisioning")),
            ("phase_rank", n(2)),
            ("updated_at_ms", n(now - 10 * MIN)),
            ("provision_error", s("NoCapacity")),
            ("provision_cause", s("no spot or on-demand capacity")),
        ],
    )
    .await;
    st.put_job(
        3,
        &[
            ("phase", s("running")),
            ("phase_rank", n(3)),
            ("updated_at_ms", n(now - 4 * MIN)),
        ],
    )
    .await;
    st.put_job(
        5,
        &[
            ("phase", s("running")),
            ("phase_rank", n(3)),
            ("updated_at_ms", n(now - 60 * MIN)),
        ],
    )
    .await;
    for (runner_id, job_id, created) in [(33, 3, now - 4 * MIN), (55, 5, now - 60 * MIN)] {
        st.ledger
            .note_runner(&RunnerEntry {
                runner_id,
                project_id: PROJECT,
                job_id,
                attempt: 1,
                instance_id: format!("i-{job_id}"),
                created_at_ms: created,
            })
            .await
            .unwrap();
    }
    let gitlab =
        gitlab_with_pending(&[(1, 300.0), (2, 600.0), (3, 240.0), (4, 10.0), (5, 3600.0)]).await;
    let reconciler = st.reconciler(&gitlab);
    let settings = ReconcileSettings::default();

    let first = reconciler.run(&settings, now).await.unwrap();
    assert_eq!(first.pending, 5);
    assert!(first.listing_complete);
    assert_eq!((first.covered, first.too_young), (1, 1), "{first:?}");
    assert_eq!(
        first
            .reconciled
            .iter()
            .map(|(r, n)| (*r, *n))
            .collect::<Vec<_>>(),
        [
            (Reason::LostHook, 1),
            (Reason::ProvisionFailed, 1),
            (Reason::RunnerGone, 1)
        ]
    );
    assert!(first.errors.is_empty(), "{:?}", first.errors);
    assert_eq!(first.oldest_pending_ms, 3_600_000);
    assert_eq!(
        execution_names(&st.sdk, &st.provision_arn).await,
        [
            "p7-j1-provision",
            "p7-j2-provision-a2",
            "p7-j5-provision-a2"
        ]
    );
    // The attempt, its reason, and a cleared error are on the items.
    let two = st.item(2).await;
    assert_eq!(two.get("attempt"), Some(&n(2)));
    assert_eq!(two.get("reconcile_reason"), Some(&s("provision_failed")));
    assert!(!two.contains_key("provision_error"));
    let one = st.item(1).await;
    assert_eq!(
        one.get("phase_rank"),
        Some(&n(2)),
        "a lost hook's job reaches provisioning"
    );

    // A second pass at once: every attempt is in flight, nothing new starts.
    let second = reconciler.run(&settings, now + 1000).await.unwrap();
    assert_eq!(second.reconciled_total(), 0, "{second:?}");
    assert_eq!(execution_names(&st.sdk, &st.provision_arn).await.len(), 3);

    // The lost hook arrives after all: the router joins the reconciler's execution.
    let late = job_event(PROJECT, 1, "build 1", JobStatus::Pending);
    let envelope: EventBridgeEvent<serde_json::Value> = serde_json::from_value(json!({
        "version": "0", "id": "e", "detail-type": "GitLab Job Event", "source": "ephemeral-runners.webhook",
        "account": "123456789012", "time": "2026-12-01T10:00:00Z", "region": "us-east-1", "resources": [],
        "detail": late,
    }))
    .unwrap();
    st.router().handle(&envelope, now + 2000).await.unwrap();
    assert_eq!(execution_names(&st.sdk, &st.provision_arn).await.len(), 3);
}

#[tokio::test]
async fn an_attempt_is_claimed_once_against_dynamodb() {
    let st = stack().await;
    let jobs = st.jobs();
    let now = now_ms();
    // No item: attempt 1 may be claimed, once.
    assert!(
        jobs.claim_attempt(key(1), 1, Reason::LostHook, now)
            .await
            .unwrap()
    );
    assert!(
        !jobs
            .claim_attempt(key(1), 1, Reason::LostHook, now)
            .await
            .unwrap()
    );
    // The router's item (its start was attempt 1): only attempt 2 on.
    st.put_job(2, &[("phase", s("provisioning")), ("phase_rank", n(2))])
        .await;
    assert!(
        !jobs
            .claim_attempt(key(2), 1, Reason::AttemptStalled, now)
            .await
            .unwrap()
    );
    assert!(
        jobs.claim_attempt(key(2), 2, Reason::AttemptStalled, now)
            .await
            .unwrap()
    );
    assert!(
        !jobs
            .claim_attempt(key(2), 2, Reason::AttemptStalled, now)
            .await
            .unwrap()
    );
    assert!(
        jobs.claim_attempt(key(2), 3, Reason::AttemptStalled, now)
            .await
            .unwrap()
    );
    // Seen (a created hook, say): no attempt yet, so attempt 1.
    st.put_job(3, &[("phase", s("seen")), ("phase_rank", n(1))])
        .await;
    assert!(
        jobs.claim_attempt(key(3), 1, Reason::LostHook, now)
            .await
            .unwrap()
    );
    assert_eq!(st.item(3).await.get("phase_rank"), Some(&n(2)));
    // A finished job GitLab lists pending (a forged finish) moves back to provisioning, on
    // GitLab's word only: any other reason never moves a phase back.
    st.put_job(4, &[("phase", s("finished")), ("phase_rank", n(4))])
        .await;
    assert!(
        jobs.claim_attempt(key(4), 2, Reason::MarkedFinished, now)
            .await
            .unwrap()
    );
    assert_eq!(st.item(4).await.get("phase_rank"), Some(&n(2)));
    st.put_job(5, &[("phase", s("finished")), ("phase_rank", n(4))])
        .await;
    assert!(
        jobs.claim_attempt(key(5), 2, Reason::AttemptStalled, now)
            .await
            .unwrap()
    );
    assert_eq!(st.item(5).await.get("phase_rank"), Some(&n(4)));
}

#[tokio::test]
async fn jobs_waiting_for_a_slot_start_oldest_first_when_one_frees() {
    let mut st = stack().await;
    let slots = Capped {
        store: fleet::slots::DynamoSlots {
            client: aws_sdk_dynamodb::Client::new(&st.sdk),
            table: create_table(&st.sdk, "slots", "slot_key", None).await,
        },
        caps: SlotCaps::from_values(2, 0),
    };
    let now = now_ms();
    // Two running jobs hold both slots; three jobs wait, 11 the longest.
    for job in [20, 21] {
        slots
            .store
            .take(key(job), 1, &slots.caps, now - 20 * MIN)
            .await
            .unwrap();
    }
    for (job, since) in [(11, 5 * MIN), (12, 4 * MIN), (13, 3 * MIN)] {
        st.put_job(
            job,
            &[
                ("phase", s("provisioning")),
                ("phase_rank", n(2)),
                ("updated_at_ms", n(now - since)),
                ("waiting_for_slot_since_ms", n(now - since)),
                ("waiting_for_slot_cap", s("global")),
            ],
        )
        .await;
    }
    st.slots = Some(slots.clone());
    let gitlab = gitlab_with_pending(&[(11, 360.0), (12, 300.0), (13, 240.0)]).await;
    let reconciler = st.reconciler(&gitlab);
    let settings = ReconcileSettings::default();

    let full = reconciler.run(&settings, now).await.unwrap();
    assert_eq!(full.waiting_for_slot, 3, "{full:?}");
    assert_eq!(full.reconciled_total(), 0);
    assert!(execution_names(&st.sdk, &st.provision_arn).await.is_empty());

    // Job 20's instance goes: one slot frees, and the job that waited longest takes it.
    assert!(slots.store.give_back(key(20), 1, None).await.unwrap());
    let freed = reconciler.run(&settings, now + MIN).await.unwrap();
    assert_eq!(
        freed.reconciled.get(&Reason::WaitingForSlot),
        Some(&1),
        "{freed:?}"
    );
    assert_eq!(freed.waiting_for_slot, 2);
    assert_eq!(
        execution_names(&st.sdk, &st.provision_arn).await,
        ["p7-j11-provision-a2"]
    );
    let started = st.item(11).await;
    assert_eq!(
        started.get("slot_starts"),
        Some(&n(1)),
        "a start from the queue is not a failed attempt"
    );
    assert_eq!(started.get("attempt"), Some(&n(2)));
}

/// A pass's clock after `now`: past the grace and the first backoff.
const LATER: u64 = 2 * MIN;

/// The fleet stack (jobs and runners tables, EC2 in moto, the runner API stand-in) with a
/// reconciler over its tables: GitLab's listing and job API from `gitlab` (wiremock), both
/// workflows in moto (Pass definitions: their steps are run here by hand).
struct FleetWorld {
    fleet: e2e_tests::fleet_stack::FleetStack,
    functions: fleet::Functions,
    provision_arn: String,
    teardown_arn: String,
}

async fn fleet_world() -> FleetWorld {
    let fleet = e2e_tests::fleet_stack::fleet_stack().await;
    let functions = fleet.functions(&fleet.config(&[])).await;
    let provision_arn = create_state_machine(&fleet.sdk, "provision", PASS).await;
    let teardown_arn = create_state_machine(&fleet.sdk, "teardown", PASS).await;
    FleetWorld {
        fleet,
        functions,
        provision_arn,
        teardown_arn,
    }
}

impl FleetWorld {
    fn reconciler(&self, gitlab: &MockServer) -> Reconciler<fleet::aws::DynamoRunnerLedger> {
        let dynamo = aws_sdk_dynamodb::Client::new(&self.fleet.sdk);
        let sfn = aws_sdk_sfn::Client::new(&self.fleet.sdk);
        Reconciler::new(
            GitLabPending {
                client: GitLabClient::new(&gitlab.uri(), RetryPolicy::default()),
                token: Secret::new("glpat-read-api".to_owned()),
            },
            JobsTable {
                client: dynamo.clone(),
                table: self.fleet.jobs_table.clone(),
                ttl_seconds: 3600,
            },
            fleet::aws::DynamoRunnerLedger {
                client: dynamo,
                jobs_table: self.fleet.jobs_table.clone(),
                runners_table: self.fleet.runners_table.clone(),
            },
            ProvisionWorkflow {
                client: sfn.clone(),
                arn: self.provision_arn.clone(),
            },
            TeardownWorkflow {
                client: sfn,
                arn: self.teardown_arn.clone(),
            },
            Scopes {
                project_ids: vec![PROJECT],
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

    fn router(&self) -> router::Router<DynamoJobStore, StepFunctions> {
        router::Router {
            store: DynamoJobStore {
                client: aws_sdk_dynamodb::Client::new(&self.fleet.sdk),
                table: self.fleet.jobs_table.clone(),
                ttl_seconds: 3600,
            },
            workflows: StepFunctions {
                client: aws_sdk_sfn::Client::new(&self.fleet.sdk),
                provision_arn: self.provision_arn.clone(),
                teardown_arn: self.teardown_arn.clone(),
            },
            provision_on: ProvisionOn::Pending,
        }
    }

    /// The inputs of the executions of `arn`, by name.
    async fn inputs(&self, arn: &str) -> Vec<(String, ephemeral_core::jobs::WorkflowInput)> {
        let sfn = aws_sdk_sfn::Client::new(&self.fleet.sdk);
        let mut out = Vec::new();
        for name in execution_names(&self.fleet.sdk, arn).await {
            let arn = format!("{}:{name}", arn.replace(":stateMachine:", ":execution:"));
            let described = sfn
                .describe_execution()
                .execution_arn(arn)
                .send()
                .await
                .unwrap();
            out.push((
                name,
                serde_json::from_str(described.input().unwrap()).unwrap(),
            ));
        }
        out
    }
}

fn hook(job: &ephemeral_core::hook::JobEvent) -> EventBridgeEvent<serde_json::Value> {
    serde_json::from_value(json!({
        "version": "0", "id": "e", "detail-type": "GitLab Job Event", "source": "ephemeral-runners.webhook",
        "account": "123456789012", "time": "2026-12-01T10:00:00Z", "region": "us-east-1", "resources": [],
        "detail": job,
    }))
    .unwrap()
}

/// Issue 12 item 2: a forged `canceled` hook for a real pending job arrives first and leaves
/// a tombstone; the real pending hook then does nothing. The reconciler (GitLab lists the job
/// pending) moves the job back and starts a new attempt, and its provision step launches.
#[tokio::test]
async fn a_forged_canceled_hook_does_not_keep_a_pending_job_from_its_runner() {
    let world = fleet_world().await;
    let now = now_ms();
    let job = job_event(PROJECT, 71, "build 71", JobStatus::Pending);
    let mut forged = job.clone();
    forged.status = JobStatus::Canceled;
    forged.delivery_id = "forged".into();
    world.router().handle(&hook(&forged), now).await.unwrap();
    world.router().handle(&hook(&job), now + 10).await.unwrap();
    assert!(
        execution_names(&world.fleet.sdk, &world.provision_arn)
            .await
            .is_empty(),
        "the tombstone held the real pending hook back"
    );
    // The forged hook's teardown: GitLab says pending, so nothing is destroyed.
    world.fleet.gitlab_job(&job, JobStatus::Pending, None);
    for (_, input) in world.inputs(&world.teardown_arn).await {
        let torn = world
            .functions
            .teardown(&fleet::TeardownInput {
                job_key: input.job_key,
                job: input.job,
            })
            .await
            .unwrap();
        assert_eq!(torn.unconfirmed.map(|u| u.code()), Some("not_finished"));
    }

    let gitlab = gitlab_with_pending(&[(71, 150.0)]).await;
    let pass = world
        .reconciler(&gitlab)
        .run(&ReconcileSettings::default(), now + LATER)
        .await
        .unwrap();
    assert_eq!(
        pass.reconciled.get(&Reason::MarkedFinished),
        Some(&1),
        "{pass:?}"
    );
    let started = world.inputs(&world.provision_arn).await;
    assert_eq!(started.len(), 1);
    assert_eq!(started[0].0, "p7-j71-provision-a2");
    // The provision workflow's EC2 step, with the mapper's answer: a runner for the job.
    let (input, _) = e2e_tests::fleet_stack::provision_input(
        &started[0].1.job,
        e2e_tests::fleet_stack::ec2_route(),
    );
    let outcome = world
        .functions
        .provision(&input, now + LATER)
        .await
        .unwrap();
    e2e_tests::fleet_stack::launched(&outcome);
    assert_eq!(world.fleet.live_instances().await.len(), 1);
}

/// Issue 11 item 2: a job we provisioned finished in GitLab, and its finished hook never
/// came. The reconciler asks GitLab, starts the teardown built from GitLab's answer, and the
/// teardown step removes the instance.
#[tokio::test]
async fn a_lost_finished_hook_is_torn_down_from_gitlab_answer() {
    let world = fleet_world().await;
    let now = now_ms();
    let job = job_event(PROJECT, 72, "build 72", JobStatus::Pending);
    world.fleet.job_is_provisioning(&job).await;
    let outcome = world
        .functions
        .provision(
            &e2e_tests::fleet_stack::provision_input(&job, e2e_tests::fleet_stack::ec2_route()).0,
            now,
        )
        .await
        .unwrap();
    let (_, runner_id) = e2e_tests::fleet_stack::launched(&outcome);
    assert_eq!(world.fleet.live_instances().await.len(), 1);

    // GitLab: nothing pending; job 72 succeeded on our runner. Its hook was lost.
    let gitlab = gitlab_with_pending(&[]).await;
    Mock::given(method("GET"))
        .and(path(format!("/api/v4/projects/{PROJECT}/jobs/72")))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "id": 72, "name": "build 72", "status": "success", "stage": "build",
            "tag_list": [], "pipeline": {"id": 900, "project_id": PROJECT},
            "runner": {"id": runner_id}
        })))
        .mount(&gitlab)
        .await;
    world
        .fleet
        .gitlab_job(&job, JobStatus::Success, Some(runner_id));
    let reconciler = world.reconciler(&gitlab);
    let settings = ReconcileSettings::default();
    // Within the grace the runner is left alone.
    let early = reconciler.run(&settings, now + 1000).await.unwrap();
    assert_eq!(early.reconciled_total(), 0, "{early:?}");
    let pass = reconciler.run(&settings, now + LATER).await.unwrap();
    assert_eq!(
        pass.reconciled.get(&Reason::FinishedHookLost),
        Some(&1),
        "{pass:?}"
    );
    let name = format!("p7-j72-teardown-success-r{runner_id}");
    let started = world.inputs(&world.teardown_arn).await;
    assert_eq!(
        started.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>(),
        [name]
    );
    let item = world.fleet.job_item(&job).await;
    assert_eq!(item.get("reconcile_reason"), Some(&s("finished_hook_lost")));
    // The teardown step with the reconciler's input: GitLab agrees, the instance goes.
    let input = started[0].1.clone();
    assert_eq!(input.job.runner.as_ref().map(|r| r.id), Some(runner_id));
    let torn = world
        .functions
        .teardown(&fleet::TeardownInput {
            job_key: input.job_key,
            job: input.job,
        })
        .await
        .unwrap();
    assert_eq!(torn.removed.len(), 1, "{torn:?}");
    assert!(world.fleet.live_instances().await.is_empty());
    // A second pass: the runner is gone from the registry, nothing more is asked or started.
    let again = reconciler.run(&settings, now + LATER + MIN).await.unwrap();
    assert_eq!(again.reconciled_total(), 0, "{again:?}");
    assert!(again.teardown_checks.is_empty());
}

/// A runner of ours made for job 3 is alive, but GitLab says it is running a job while job 3
/// is still pending: another job took it. With the runner-management token the pass asks
/// GitLab, finds it taken, and provisions job 3 again at once instead of leaving it to wait
/// for a runner that will never come (until the instance's wait timeout).
#[tokio::test]
async fn a_runner_taken_by_another_job_is_found_by_its_gitlab_status() {
    let st = stack().await;
    let now = now_ms();
    st.put_job(
        3,
        &[
            ("phase", s("running")),
            ("phase_rank", n(3)),
            ("updated_at_ms", n(now - 4 * MIN)),
            ("attempt", n(1)),
            ("attempt_started_at_ms", n(now - 4 * MIN)),
            ("launched_runner_id", n(33)),
        ],
    )
    .await;
    st.ledger
        .note_runner(&RunnerEntry {
            runner_id: 33,
            project_id: PROJECT,
            job_id: 3,
            attempt: 1,
            instance_id: "i-3".into(),
            created_at_ms: now - 4 * MIN,
        })
        .await
        .unwrap();
    let gitlab = gitlab_with_pending(&[(3, 240.0)]).await;
    Mock::given(method("GET"))
        .and(path("/api/v4/runners/33/jobs"))
        .and(query_param("status", "running"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!([{"id": 99}])))
        .expect(1)
        .mount(&gitlab)
        .await;
    let settings = ReconcileSettings::default();

    // Without the runner-management token: the live runner is taken to cover job 3.
    let blind = st.reconciler(&gitlab).run(&settings, now).await.unwrap();
    assert_eq!(
        (blind.covered, blind.reconciled_total()),
        (1, 0),
        "{blind:?}"
    );

    let asking = st
        .reconciler(&gitlab)
        .with_runner_status(reconciler::gitlab::RunnerStatus {
            client: GitLabClient::new(&gitlab.uri(), RetryPolicy::default()),
            token: Secret::new("glpat-manage-runner".to_owned()),
        });
    let report = asking.run(&settings, now).await.unwrap();
    assert_eq!(report.covered, 0, "{report:?}");
    assert_eq!(
        report.reconciled.get(&Reason::RunnerTaken),
        Some(&1),
        "{report:?}"
    );
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(
        execution_names(&st.sdk, &st.provision_arn).await,
        ["p7-j3-provision-a2"]
    );
    assert_eq!(
        st.item(3).await.get("reconcile_reason"),
        Some(&s("runner_taken"))
    );
}
