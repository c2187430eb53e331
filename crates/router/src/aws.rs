//! The jobs table (DynamoDB) and the workflows (Step Functions) behind the core's ports.

use std::collections::HashMap;

use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::types::{AttributeValue, ReturnValue, ReturnValuesOnConditionCheckFailure};
use aws_sdk_sfn::operation::start_execution::StartExecutionError;
use ephemeral_aws::port_error;
use ephemeral_core::hook::JobEvent;
use ephemeral_core::jobs::{
    Advance, JobKey, JobPhase, JobStore, PickupRecord, RecordedRoute, Started, Workflow,
    WorkflowInput, Workflows,
};
use ephemeral_core::jobs_table::{self, ADVANCE_CONDITION, PICKUP_CONDITION, attr};
use ephemeral_core::webhook::PortError;

/// One item per job, keyed `job_key`; `phase`/`phase_rank` only move up.
#[derive(Debug, Clone)]
pub struct DynamoJobStore {
    pub client: aws_sdk_dynamodb::Client,
    pub table: String,
    pub ttl_seconds: u64,
}

fn n(v: u64) -> AttributeValue {
    AttributeValue::N(v.to_string())
}
fn s(v: &str) -> AttributeValue {
    AttributeValue::S(v.to_owned())
}

fn phase_of(item: &HashMap<String, AttributeValue>) -> Option<JobPhase> {
    match item.get(attr::PHASE_RANK) {
        Some(AttributeValue::N(rank)) => rank.parse().ok().and_then(JobPhase::from_rank),
        _ => None,
    }
}

fn text_of(item: &HashMap<String, AttributeValue>, name: &str) -> Option<String> {
    match item.get(name) {
        Some(AttributeValue::S(v)) if !v.is_empty() => Some(v.clone()),
        _ => None,
    }
}

impl JobStore for DynamoJobStore {
    async fn advance(
        &self,
        key: JobKey,
        to: JobPhase,
        event: &JobEvent,
        now_ms: u64,
    ) -> Result<Advance, PortError> {
        let table_key = key.table_key();
        let mut update = format!(
            "SET {} = :phase, {} = :rank, {} = :status, {} = :project, {} = :job, {} = :name, \
             {} = :now, {} = :expires",
            attr::PHASE,
            attr::PHASE_RANK,
            attr::LAST_STATUS,
            attr::PROJECT_ID,
            attr::JOB_ID,
            attr::JOB_NAME,
            attr::UPDATED_AT_MS,
            attr::EXPIRES_AT,
        );
        let mut request = self
            .client
            .update_item()
            .table_name(&self.table)
            .key(jobs_table::KEY, s(&table_key))
            // A lower phase may be overwritten; an equal or higher one never.
            .condition_expression(ADVANCE_CONDITION)
            .expression_attribute_values(":phase", s(to.as_str()))
            .expression_attribute_values(":rank", n(u64::from(to.rank())))
            .expression_attribute_values(":status", s(event.status.as_str()))
            .expression_attribute_values(":project", n(event.project_id))
            .expression_attribute_values(":job", n(event.job_id))
            .expression_attribute_values(":name", s(&event.job_name))
            .expression_attribute_values(":now", n(now_ms))
            .expression_attribute_values(":expires", n(now_ms / 1000 + self.ttl_seconds))
            .return_values(ReturnValue::UpdatedOld)
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
        if let Some(runner) = &event.runner {
            // The runner that ran the job: teardown follows it, not the job's own launch.
            update.push_str(&format!(", {} = :runner", attr::RUNNER_ID));
            request = request.expression_attribute_values(":runner", n(runner.id));
        }
        if let Some(path) = &event.project_path {
            update.push_str(&format!(", {} = :path", attr::PROJECT_PATH));
            request = request.expression_attribute_values(":path", s(path));
        }
        match request.update_expression(update).send().await {
            Ok(out) => Ok(Advance::Moved {
                from: out.attributes().and_then(phase_of),
            }),
            Err(e) => match e.into_service_error() {
                UpdateItemError::ConditionalCheckFailedException(failed) => {
                    if let Some(phase) = failed.item().and_then(phase_of) {
                        return Ok(Advance::AlreadyAt(phase));
                    }
                    // Not every DynamoDB implementation returns the old item: read it.
                    let current = self
                        .client
                        .get_item()
                        .table_name(&self.table)
                        .key(jobs_table::KEY, s(&table_key))
                        .consistent_read(true)
                        .send()
                        .await
                        .map_err(|e| port_error("reading the job", e))?;
                    current
                        .item()
                        .and_then(phase_of)
                        .map(Advance::AlreadyAt)
                        .ok_or_else(|| {
                            PortError(format!(
                                "job {table_key}: condition failed but no phase on the item"
                            ))
                        })
                }
                other => Err(port_error("moving the job forward", other)),
            },
        }
    }

    /// One conditional write, which also answers the item's route (`ALL_NEW`): no read.
    /// An item the router has not written yet (the running event came first) is created
    /// without a phase, as a later pending or finished event would create it.
    async fn record_pickup(
        &self,
        key: JobKey,
        event: &JobEvent,
        now_ms: u64,
    ) -> Result<PickupRecord, PortError> {
        let mut update = format!(
            "SET {} = :now, {} = :project, {} = :job, {expires} = if_not_exists({expires}, :expires)",
            attr::PICKED_UP_AT_MS,
            attr::PROJECT_ID,
            attr::JOB_ID,
            expires = attr::EXPIRES_AT,
        );
        let mut request = self
            .client
            .update_item()
            .table_name(&self.table)
            .key(jobs_table::KEY, s(&key.table_key()))
            .condition_expression(PICKUP_CONDITION)
            .expression_attribute_values(":now", n(now_ms))
            .expression_attribute_values(":project", n(event.project_id))
            .expression_attribute_values(":job", n(event.job_id))
            .expression_attribute_values(":expires", n(now_ms / 1000 + self.ttl_seconds))
            .return_values(ReturnValue::AllNew);
        if let Some(queued_ms) = ephemeral_core::jobs::queued_ms(event) {
            update.push_str(&format!(", {} = :queued", attr::QUEUED_DURATION_MS));
            request = request.expression_attribute_values(":queued", n(queued_ms));
        }
        match request.update_expression(update).send().await {
            Ok(out) => {
                let text = |name| out.attributes().and_then(|item| text_of(item, name));
                Ok(PickupRecord::First(RecordedRoute {
                    // Written by the provision workflow from the mapper's `type`.
                    executor: text(attr::ROUTE_TYPE).and_then(|kind| kind.parse().ok()),
                    matched: text(attr::ROUTE_MATCHED),
                    runner_ready_at_ms: out.attributes().and_then(|item| {
                        match item.get(attr::RUNNER_READY_AT_MS) {
                            Some(AttributeValue::N(v)) => v.parse().ok(),
                            _ => None,
                        }
                    }),
                }))
            }
            Err(e) => match e.into_service_error() {
                UpdateItemError::ConditionalCheckFailedException(_) => Ok(PickupRecord::Again),
                other => Err(port_error("recording the job's pickup", other)),
            },
        }
    }
}

/// Starts executions of the two Standard state machines.
#[derive(Debug, Clone)]
pub struct StepFunctions {
    pub client: aws_sdk_sfn::Client,
    pub provision_arn: String,
    pub teardown_arn: String,
}

impl Workflows for StepFunctions {
    async fn start(
        &self,
        workflow: Workflow,
        execution_name: &str,
        input: &WorkflowInput,
    ) -> Result<Started, PortError> {
        let arn = match workflow {
            Workflow::Provision => &self.provision_arn,
            Workflow::Teardown => &self.teardown_arn,
        };
        let input = serde_json::to_string(input)
            .map_err(|e| PortError(format!("serializing the workflow input: {e}")))?;
        match self
            .client
            .start_execution()
            .state_machine_arn(arn)
            .name(execution_name)
            .input(input)
            .send()
            .await
        {
            // Also what Step Functions answers for the same name and input while it runs.
            Ok(_) => Ok(Started::New),
            Err(e) => match e.into_service_error() {
                // Same name, other input (another delivery of the same status): one execution.
                StartExecutionError::ExecutionAlreadyExists(_) => Ok(Started::AlreadyExists),
                other => Err(port_error("starting the workflow", other)),
            },
        }
    }
}
