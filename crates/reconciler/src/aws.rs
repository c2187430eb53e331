//! The jobs table, the runner registry and the provision workflow behind the reconciler's
//! ports. Attribute names and conditions come from `ephemeral_core::jobs_table`.

use std::collections::{BTreeSet, HashMap};

use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::types::{AttributeValue, KeysAndAttributes};
use aws_sdk_sfn::operation::start_execution::StartExecutionError;
use ephemeral_aws::{item_to_json, port_error};
use ephemeral_core::jobs::{JobKey, JobPhase, Started, WorkflowInput};
use ephemeral_core::jobs_table::{self, ADVANCE_CONDITION, CLAIM_ATTEMPT_CONDITION, attr};
use ephemeral_core::reconcile::{
    GitLabJobState, JobRecord, PendingJob, Reason, provision_execution_name,
    teardown_execution_name,
};
use ephemeral_core::webhook::PortError;
use serde_json::Value;

fn s(v: &str) -> AttributeValue {
    AttributeValue::S(v.to_owned())
}
fn n(v: u64) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

/// BatchGetItem takes at most 100 keys per request.
const BATCH_GET_KEYS: usize = 100;
/// Unprocessed keys (throttling) are asked for again this many times before the pass fails.
const BATCH_GET_ROUNDS: usize = 5;

#[derive(Debug, Clone)]
pub struct JobsTable {
    pub client: aws_sdk_dynamodb::Client,
    pub table: String,
    pub ttl_seconds: u64,
}

impl JobsTable {
    /// The items of `keys` that exist, read consistently.
    pub async fn records(&self, keys: &[JobKey]) -> Result<HashMap<JobKey, JobRecord>, PortError> {
        let mut records = HashMap::new();
        for chunk in keys.chunks(BATCH_GET_KEYS) {
            let mut wanted = Some(self.keys_and_attributes(chunk)?);
            for _ in 0..BATCH_GET_ROUNDS {
                let Some(ask) = wanted.take() else { break };
                let out = self
                    .client
                    .batch_get_item()
                    .request_items(&self.table, ask)
                    .send()
                    .await
                    .map_err(|e| port_error("DynamoDB BatchGetItem (jobs)", e))?;
                for item in out
                    .responses()
                    .and_then(|r| r.get(&self.table))
                    .into_iter()
                    .flatten()
                {
                    let json = Value::Object(item_to_json(item));
                    if let Some(key) = json
                        .get(jobs_table::KEY)
                        .and_then(Value::as_str)
                        .and_then(jobs_table::key_of)
                    {
                        records.insert(key, jobs_table::record_of(&json));
                    }
                }
                wanted = out
                    .unprocessed_keys()
                    .and_then(|u| u.get(&self.table))
                    .filter(|k| !k.keys().is_empty())
                    .cloned();
            }
            if wanted.is_some() {
                return Err(PortError("DynamoDB BatchGetItem (jobs): keys left unprocessed after 5 rounds (throttled)".into()));
            }
        }
        Ok(records)
    }

    fn keys_and_attributes(&self, keys: &[JobKey]) -> Result<KeysAndAttributes, PortError> {
        let mut builder = KeysAndAttributes::builder().consistent_read(true);
        for key in keys {
            builder = builder.keys(HashMap::from([(
                jobs_table::KEY.to_owned(),
                s(&key.table_key()),
            )]));
        }
        builder
            .build()
            .map_err(|e| PortError(format!("building BatchGetItem keys: {e}")))
    }

    /// Records attempt `attempt` if nobody did (see [`CLAIM_ATTEMPT_CONDITION`]), clears the
    /// last attempt's error, and moves a job that never reached provisioning there.
    pub async fn claim_attempt(
        &self,
        key: JobKey,
        attempt: u32,
        reason: Reason,
        now_ms: u64,
    ) -> Result<bool, PortError> {
        // A start from the slot queue is counted apart: it does not use up an attempt.
        let slot_start = if reason == Reason::WaitingForSlot {
            format!(" ADD {} :one", attr::SLOT_STARTS)
        } else {
            String::new()
        };
        // An operator's retry of a job given up on: the reconciler watches it again (and
        // gives it up again if this attempt fails too, the limit being reached).
        let revive = if reason == Reason::OperatorRetry {
            format!(", {}", attr::GAVE_UP_AT_MS)
        } else {
            String::new()
        };
        let update = format!(
            "SET {} = :attempt, {} = :now, {} = :reason, {} = :project, {} = :job, {} = :now, {} = :expires REMOVE {}, {}{revive}{slot_start}",
            attr::ATTEMPT,
            attr::ATTEMPT_STARTED_AT_MS,
            attr::RECONCILE_REASON,
            attr::PROJECT_ID,
            attr::JOB_ID,
            attr::UPDATED_AT_MS,
            attr::EXPIRES_AT,
            attr::PROVISION_ERROR,
            attr::PROVISION_CAUSE,
        );
        let claimed = self
            .client
            .update_item()
            .table_name(&self.table)
            .key(jobs_table::KEY, s(&key.table_key()))
            .update_expression(update)
            .condition_expression(CLAIM_ATTEMPT_CONDITION)
            .expression_attribute_values(":attempt", n(u64::from(attempt)))
            .expression_attribute_values(":one", n(1))
            .expression_attribute_values(
                ":provisioning",
                n(u64::from(JobPhase::Provisioning.rank())),
            )
            .expression_attribute_values(":now", n(now_ms))
            .expression_attribute_values(":reason", s(reason.as_str()))
            .expression_attribute_values(":project", n(key.project_id))
            .expression_attribute_values(":job", n(key.job_id))
            .expression_attribute_values(":expires", n(now_ms / 1000 + self.ttl_seconds))
            .send()
            .await;
        match claimed {
            Ok(_) => {}
            Err(e) => match e.into_service_error() {
                UpdateItemError::ConditionalCheckFailedException(_) => return Ok(false),
                other => return Err(port_error("claiming the attempt (jobs)", other)),
            },
        }
        self.to_provisioning(key, reason == Reason::MarkedFinished)
            .await?;
        Ok(true)
    }

    /// The claimed job moves to provisioning. A job the hook path never routed gets there as
    /// the router would have moved it (never backwards). `from_finished`: a job we hold as
    /// finished that GitLab lists pending: the finish was a claim (a forged `canceled` hook,
    /// say) and GitLab is the truth, so it moves back, the one move against the phase order,
    /// and only on GitLab's word; without it the provision step would see the tombstone and
    /// launch nothing. Choosing this over a GitLab call in the router keeps the hook path fast
    /// and free of GitLab's availability, and the attacker cannot defeat it: a hook can write
    /// a tombstone, not make GitLab list a job as not pending.
    async fn to_provisioning(&self, key: JobKey, from_finished: bool) -> Result<(), PortError> {
        let provisioning = JobPhase::Provisioning;
        let mut request = self
            .client
            .update_item()
            .table_name(&self.table)
            .key(jobs_table::KEY, s(&key.table_key()))
            .update_expression(format!(
                "SET {} = :phase, {} = :rank",
                attr::PHASE,
                attr::PHASE_RANK
            ))
            .expression_attribute_values(":phase", s(provisioning.as_str()))
            .expression_attribute_values(":rank", n(u64::from(provisioning.rank())));
        request = if from_finished {
            request
                .condition_expression(format!("{} >= :finished", attr::PHASE_RANK))
                .expression_attribute_values(":finished", n(u64::from(JobPhase::Finished.rank())))
        } else {
            request.condition_expression(ADVANCE_CONDITION)
        };
        match request.send().await {
            Ok(_) => Ok(()),
            Err(e) => match e.into_service_error() {
                // Already there or further, or no longer finished (another pass revived it):
                // nothing to do.
                UpdateItemError::ConditionalCheckFailedException(_) => Ok(()),
                other => Err(port_error("moving the job to provisioning (jobs)", other)),
            },
        }
    }

    /// Notes why a pass started the job's teardown (`reconcile_reason`).
    pub async fn record_teardown(
        &self,
        key: JobKey,
        reason: Reason,
        now_ms: u64,
    ) -> Result<(), PortError> {
        self.note_reason(key, reason, attr::UPDATED_AT_MS, now_ms)
            .await
            .map_err(|e| port_error("recording the teardown's reason (jobs)", e))
    }

    pub async fn record_gave_up(
        &self,
        key: JobKey,
        reason: Reason,
        now_ms: u64,
    ) -> Result<(), PortError> {
        self.note_reason(key, reason, attr::GAVE_UP_AT_MS, now_ms)
            .await
            .map_err(|e| port_error("recording that the job was given up (jobs)", e))
    }

    /// `reconcile_reason` = `reason` and `at` = now on the job's item.
    async fn note_reason(
        &self,
        key: JobKey,
        reason: Reason,
        at: &str,
        now_ms: u64,
    ) -> Result<(), aws_sdk_dynamodb::error::SdkError<UpdateItemError>> {
        self.client
            .update_item()
            .table_name(&self.table)
            .key(jobs_table::KEY, s(&key.table_key()))
            .update_expression(format!(
                "SET {} = :reason, {at} = :now",
                attr::RECONCILE_REASON
            ))
            .expression_attribute_values(":reason", s(reason.as_str()))
            .expression_attribute_values(":now", n(now_ms))
            .send()
            .await
            .map(|_| ())
    }

    /// The projects of every job the table still holds (items expire after their TTL): the
    /// scopes when the stack names none.
    pub async fn seen_projects(&self) -> Result<BTreeSet<u64>, PortError> {
        let mut pages = self
            .client
            .scan()
            .table_name(&self.table)
            .projection_expression("#project")
            .expression_attribute_names("#project", attr::PROJECT_ID)
            .into_paginator()
            .items()
            .send();
        let mut projects = BTreeSet::new();
        while let Some(item) = pages.next().await {
            let item = item.map_err(|e| port_error("DynamoDB Scan (jobs)", e))?;
            if let Some(AttributeValue::N(id)) = item.get(attr::PROJECT_ID)
                && let Ok(id) = id.parse()
            {
                projects.insert(id);
            }
        }
        Ok(projects)
    }
}

/// Starts attempts of the provision workflow.
#[derive(Debug, Clone)]
pub struct ProvisionWorkflow {
    pub client: aws_sdk_sfn::Client,
    pub arn: String,
}

impl ProvisionWorkflow {
    pub async fn start(
        &self,
        job: &PendingJob,
        attempt: u32,
        now_ms: u64,
    ) -> Result<Started, PortError> {
        let input = WorkflowInput {
            job_key: job.key.table_key(),
            job: job.to_event(attempt, now_ms),
        };
        let input = serde_json::to_string(&input)
            .map_err(|e| PortError(format!("serializing the workflow input: {e}")))?;
        match self
            .client
            .start_execution()
            .state_machine_arn(&self.arn)
            .name(provision_execution_name(job.key, attempt))
            .input(input)
            .send()
            .await
        {
            Ok(_) => Ok(Started::New),
            Err(e) => match e.into_service_error() {
                StartExecutionError::ExecutionAlreadyExists(_) => Ok(Started::AlreadyExists),
                other => Err(port_error("starting the provision workflow", other)),
            },
        }
    }
}

/// Starts the teardown workflow for jobs whose finished hook was lost.
#[derive(Debug, Clone)]
pub struct TeardownWorkflow {
    pub client: aws_sdk_sfn::Client,
    pub arn: String,
}

impl TeardownWorkflow {
    /// Input and name from GitLab's answer only ([`teardown_execution_name`]).
    pub async fn start(&self, job: &GitLabJobState, now_ms: u64) -> Result<Started, PortError> {
        let input = WorkflowInput {
            job_key: job.key.table_key(),
            job: job.to_event(now_ms),
        };
        let input = serde_json::to_string(&input)
            .map_err(|e| PortError(format!("serializing the workflow input: {e}")))?;
        match self
            .client
            .start_execution()
            .state_machine_arn(&self.arn)
            .name(teardown_execution_name(job))
            .input(input)
            .send()
            .await
        {
            Ok(_) => Ok(Started::New),
            Err(e) => match e.into_service_error() {
                StartExecutionError::ExecutionAlreadyExists(_) => Ok(Started::AlreadyExists),
                other => Err(port_error("starting the teardown workflow", other)),
            },
        }
    }
}
