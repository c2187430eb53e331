//! EC2, SSM Parameter Store and DynamoDB behind the core's fleet ports.

use std::collections::{BTreeMap, HashMap};

use aws_sdk_dynamodb::types::{AttributeValue, ReturnValuesOnConditionCheckFailure};
use aws_sdk_ec2::error::ProvideErrorMetadata as _;
use aws_sdk_ec2::types::{
    Filter, HttpTokensState, IamInstanceProfileSpecification, InstanceInterruptionBehavior,
    InstanceMarketOptionsRequest, InstanceMetadataEndpointState, InstanceMetadataOptionsRequest,
    InstanceStateName, InstanceType, MarketType, ResourceType, ShutdownBehavior, SpotInstanceType,
    SpotMarketOptions, Tag, TagSpecification,
};
use aws_sdk_ssm::types::{ParameterStringFilter, ParameterType};
use base64::Engine as _;
use ephemeral_aws::port_error;
use ephemeral_core::ec2::{TAG_JOB_ID, TAG_MANAGED_BY, TAG_PROJECT_ID, TAG_RUNNER_ID};
use ephemeral_core::fleet::{
    Fleet, Instance, InstanceQuery, InstanceState, JobRecord, LaunchError, LaunchRequest,
    RunnerEntry, RunnerLedger, TokenVault,
};
use ephemeral_core::jobs::{JobKey, JobPhase};
use ephemeral_core::jobs_table::{self, ADVANCE_CONDITION, WAITING_CONDITION, attr};
use ephemeral_core::mapping::{AmiRef, Market};
use ephemeral_core::secrets::Secret;
use ephemeral_core::webhook::PortError;

/// EC2, scoped to instances tagged `managed-by` = `stack`.
#[derive(Debug, Clone)]
pub struct Ec2Fleet {
    pub ec2: aws_sdk_ec2::Client,
    pub ssm: aws_sdk_ssm::Client,
    pub stack: String,
    pub security_group_ids: Vec<String>,
    pub instance_profile_arn: Option<String>,
}

fn tag_filter(key: &str, value: impl Into<String>) -> Filter {
    Filter::builder()
        .name(format!("tag:{key}"))
        .values(value)
        .build()
}

fn state_of(name: Option<&InstanceStateName>) -> InstanceState {
    match name {
        Some(InstanceStateName::Pending) => InstanceState::Pending,
        Some(InstanceStateName::Running) => InstanceState::Running,
        Some(InstanceStateName::Stopping) => InstanceState::Stopping,
        Some(InstanceStateName::Stopped) => InstanceState::Stopped,
        Some(InstanceStateName::ShuttingDown) => InstanceState::ShuttingDown,
        // Terminated, or a state this SDK does not know: nothing to act on.
        _ => InstanceState::Terminated,
    }
}

/// EC2's name for a state (the inverse of [`state_of`]).
fn ec2_state_name(state: InstanceState) -> InstanceStateName {
    match state {
        InstanceState::Pending => InstanceStateName::Pending,
        InstanceState::Running => InstanceStateName::Running,
        InstanceState::Stopping => InstanceStateName::Stopping,
        InstanceState::Stopped => InstanceStateName::Stopped,
        InstanceState::ShuttingDown => InstanceStateName::ShuttingDown,
        InstanceState::Terminated => InstanceStateName::Terminated,
    }
}

fn instance_of(instance: &aws_sdk_ec2::types::Instance) -> Option<Instance> {
    let tags: BTreeMap<String, String> = instance
        .tags()
        .iter()
        .filter_map(|t| Some((t.key()?.to_owned(), t.value()?.to_owned())))
        .collect();
    Some(Instance {
        id: instance.instance_id()?.to_owned(),
        state: state_of(instance.state().and_then(|s| s.name())),
        launched_at_ms: instance
            .launch_time()
            .and_then(|t| t.to_millis().ok())
            .and_then(|ms| u64::try_from(ms).ok())
            .unwrap_or(0),
        tags,
    })
}

fn launch_error<E, R>(e: aws_sdk_ec2::error::SdkError<E, R>) -> LaunchError
where
    E: aws_sdk_ec2::error::ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    match (e.code(), e.message()) {
        (Some(code), message) => LaunchError {
            code: code.to_owned(),
            message: message.unwrap_or_default().to_owned(),
        },
        // No answer from EC2 (timeout, connection): worth another try later.
        _ => LaunchError {
            code: "Unavailable".into(),
            message: aws_sdk_ec2::error::DisplayErrorContext(e).to_string(),
        },
    }
}

impl Fleet for Ec2Fleet {
    async fn instances(&self, query: InstanceQuery) -> Result<Vec<Instance>, PortError> {
        // The state filter first: it is the cheapest to apply, and moto applies filters in
        // order (its tag filters scan every tag it holds).
        let live = Filter::builder()
            .name("instance-state-name")
            .set_values(Some(
                InstanceState::LIVE
                    .map(|s| ec2_state_name(s).as_str().to_owned())
                    .to_vec(),
            ))
            .build();
        let mut filters = vec![tag_filter(TAG_MANAGED_BY, &self.stack)];
        match query {
            InstanceQuery::Job(key) | InstanceQuery::LiveForJob(key) => {
                filters.push(tag_filter(TAG_PROJECT_ID, key.project_id.to_string()));
                filters.push(tag_filter(TAG_JOB_ID, key.job_id.to_string()));
            }
            InstanceQuery::Runner(id) => filters.push(tag_filter(TAG_RUNNER_ID, id.to_string())),
            InstanceQuery::Pooled => filters.push(
                Filter::builder()
                    .name("tag-key")
                    .values(ephemeral_core::pool::TAG_POOL)
                    .build(),
            ),
            InstanceQuery::All | InstanceQuery::Live => {}
        }
        let live_only = matches!(
            query,
            InstanceQuery::LiveForJob(_) | InstanceQuery::Live | InstanceQuery::Pooled
        );
        if live_only {
            filters.insert(0, live);
        }
        let mut pages = self
            .ec2
            .describe_instances()
            .set_filters(Some(filters))
            .into_paginator()
            .send();
        let mut out = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| port_error("EC2 DescribeInstances", e))?;
            let found = page.reservations().iter().flat_map(|r| r.instances());
            out.extend(found.filter_map(instance_of));
        }
        Ok(out)
    }

    async fn resolve_image(&self, ami: &AmiRef) -> Result<String, PortError> {
        match ami {
            AmiRef::Id(id) => Ok(id.clone()),
            AmiRef::SsmParameter(name) => self
                .ssm
                .get_parameter()
                .name(name)
                .send()
                .await
                .map_err(|e| port_error(&format!("SSM GetParameter {name} (the AMI)"), e))?
                .parameter()
                .and_then(|p| p.value())
                .map(str::to_owned)
                .ok_or_else(|| PortError(format!("SSM parameter {name} has no value"))),
        }
    }

    async fn launch(&self, request: &LaunchRequest) -> Result<String, LaunchError> {
        let tags: Vec<Tag> = request
            .tags
            .iter()
            .map(|(k, v)| Tag::builder().key(k).value(v).build())
            .collect();
        let tagged = |resource| {
            TagSpecification::builder()
                .resource_type(resource)
                .set_tags(Some(tags.clone()))
                .build()
        };
        let mut call = self
            .ec2
            .run_instances()
            .image_id(&request.image_id)
            .instance_type(InstanceType::from(request.instance_type.as_str()))
            .min_count(1)
            .max_count(1)
            .subnet_id(&request.subnet)
            .client_token(&request.client_token)
            .user_data(base64::engine::general_purpose::STANDARD.encode(&request.user_data))
            // Tags at launch: IAM allows RunInstances only with this stack's managed-by tag.
            .tag_specifications(tagged(ResourceType::Instance))
            .tag_specifications(tagged(ResourceType::Volume))
            // IMDSv2 only, hop limit 1: job containers cannot reach the instance role
            // (ephemeral_core::ec2::IMDS_HOP_LIMIT; IAM refuses a launch without both).
            .metadata_options(
                InstanceMetadataOptionsRequest::builder()
                    .http_tokens(HttpTokensState::Required)
                    .http_put_response_hop_limit(ephemeral_core::ec2::IMDS_HOP_LIMIT)
                    .http_endpoint(InstanceMetadataEndpointState::Enabled)
                    .build(),
            )
            // `shutdown -h now` at the end of user-data removes the instance; a warm pool
            // instance's stops it after its first boot (its teardown terminates it later).
            .instance_initiated_shutdown_behavior(if request.stop_on_shutdown {
                ShutdownBehavior::Stop
            } else {
                ShutdownBehavior::Terminate
            })
            .set_security_group_ids(
                (!self.security_group_ids.is_empty()).then(|| self.security_group_ids.clone()),
            );
        if let Some(arn) = &self.instance_profile_arn {
            call = call
                .iam_instance_profile(IamInstanceProfileSpecification::builder().arn(arn).build());
        }
        if request.market == Market::Spot {
            call = call.instance_market_options(
                InstanceMarketOptionsRequest::builder()
                    .market_type(MarketType::Spot)
                    .spot_options(
                        SpotMarketOptions::builder()
                            .spot_instance_type(SpotInstanceType::OneTime)
                            .instance_interruption_behavior(InstanceInterruptionBehavior::Terminate)
                            .build(),
                    )
                    .build(),
            );
        }
        let out = call.send().await.map_err(launch_error)?;
        out.instances()
            .first()
            .and_then(|i| i.instance_id())
            .map(str::to_owned)
            .ok_or_else(|| LaunchError {
                code: "NoInstance".into(),
                message: "RunInstances answered without an instance".into(),
            })
    }

    async fn tag(&self, instance_id: &str, tags: &[(String, String)]) -> Result<(), PortError> {
        self.ec2
            .create_tags()
            .resources(instance_id)
            .set_tags(Some(
                tags.iter()
                    .map(|(k, v)| Tag::builder().key(k).value(v).build())
                    .collect(),
            ))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| port_error(&format!("EC2 CreateTags on {instance_id}"), e))
    }

    async fn terminate(&self, instance_id: &str) -> Result<(), PortError> {
        match self
            .ec2
            .terminate_instances()
            .instance_ids(instance_id)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some("InvalidInstanceID.NotFound") => Ok(()),
            Err(e) => Err(port_error(
                &format!("EC2 TerminateInstances {instance_id}"),
                e,
            )),
        }
    }

    async fn start(&self, instance_id: &str) -> Result<(), LaunchError> {
        // From now on it is a job's instance: its `shutdown` at the end of the job must
        // remove it, as a launched one's does, whether or not a teardown comes.
        self.ec2
            .modify_instance_attribute()
            .instance_id(instance_id)
            // The `Attribute` + `Value` form, which EC2 documents for this attribute.
            .attribute(aws_sdk_ec2::types::InstanceAttributeName::InstanceInitiatedShutdownBehavior)
            .value(ShutdownBehavior::Terminate.as_str())
            .send()
            .await
            .map_err(launch_error)?;
        self.ec2
            .start_instances()
            .instance_ids(instance_id)
            .send()
            .await
            .map(|_| ())
            .map_err(launch_error)
    }
}

/// Runner tokens as SecureString parameters `<prefix>/<instance id>`, tagged with the
/// instance's ARN: the instance role may read and delete only the parameter whose tag equals
/// `${ec2:SourceInstanceARN}`.
#[derive(Debug, Clone)]
pub struct SsmTokenVault {
    pub ssm: aws_sdk_ssm::Client,
    pub prefix: String,
    pub instance_arn_prefix: String,
}

pub const TAG_INSTANCE_ARN: &str = "ephemeral-runners:instance-arn";

impl SsmTokenVault {
    fn name(&self, instance_id: &str) -> String {
        ephemeral_core::lambda_runner::token_parameter_name(&self.prefix, instance_id)
    }
}

impl TokenVault for SsmTokenVault {
    async fn put(&self, instance_id: &str, token: &Secret) -> Result<(), PortError> {
        let name = self.name(instance_id);
        let first = self
            .ssm
            .put_parameter()
            .name(&name)
            .value(token.expose())
            .r#type(ParameterType::SecureString)
            .description(
                "GitLab runner token for one ephemeral runner instance; it deletes it once read",
            )
            .tags(
                aws_sdk_ssm::types::Tag::builder()
                    .key(TAG_INSTANCE_ARN)
                    .value(format!("{}{instance_id}", self.instance_arn_prefix))
                    .build()
                    .map_err(|e| port_error("SSM tag", e))?,
            )
            .send()
            .await;
        match first {
            Ok(_) => Ok(()),
            // A retried step: SSM refuses Overwrite together with Tags, and the tags are
            // already there from the first put.
            Err(e) if e.code() == Some("ParameterAlreadyExists") => self
                .ssm
                .put_parameter()
                .name(&name)
                .value(token.expose())
                .r#type(ParameterType::SecureString)
                .overwrite(true)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| port_error(&format!("SSM PutParameter {name} (overwrite)"), e)),
            Err(e) => Err(port_error(&format!("SSM PutParameter {name}"), e)),
        }
    }

    async fn delete(&self, instance_id: &str) -> Result<(), PortError> {
        let name = self.name(instance_id);
        match self.ssm.delete_parameter().name(&name).send().await {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some("ParameterNotFound") => Ok(()),
            Err(e) => Err(port_error(&format!("SSM DeleteParameter {name}"), e)),
        }
    }

    async fn list(&self) -> Result<Vec<(String, u64)>, PortError> {
        // DescribeParameters: names and dates only, never a value.
        let one_level = ParameterStringFilter::builder()
            .key("Path")
            .option("OneLevel")
            .values(&self.prefix)
            .build()
            .map_err(|e| port_error("SSM filter", e))?;
        let mut pages = self
            .ssm
            .describe_parameters()
            .parameter_filters(one_level)
            .into_paginator()
            .send();
        let prefix = format!("{}/", self.prefix);
        let mut out = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| port_error("SSM DescribeParameters", e))?;
            out.extend(page.parameters().iter().filter_map(|p| {
                let instance_id = p.name()?.strip_prefix(&prefix)?;
                let modified = p
                    .last_modified_date()
                    .and_then(|t| t.to_millis().ok())
                    .and_then(|ms| u64::try_from(ms).ok())
                    .unwrap_or(0);
                Some((instance_id.to_owned(), modified))
            }));
        }
        Ok(out)
    }
}

/// The jobs table (attributes `launched_runner_id`, `instance_id`; `runner_id` is the
/// router's: the runner that ran the job) and the runner registry table (key `runner_id`).
#[derive(Debug, Clone)]
pub struct DynamoRunnerLedger {
    pub client: aws_sdk_dynamodb::Client,
    pub jobs_table: String,
    pub runners_table: String,
}

fn s(v: &str) -> AttributeValue {
    AttributeValue::S(v.to_owned())
}
fn n(v: u64) -> AttributeValue {
    AttributeValue::N(v.to_string())
}
fn num(item: &HashMap<String, AttributeValue>, key: &str) -> Option<u64> {
    match item.get(key)? {
        AttributeValue::N(v) | AttributeValue::S(v) => v.parse().ok(),
        _ => None,
    }
}
fn text(item: &HashMap<String, AttributeValue>, key: &str) -> Option<String> {
    match item.get(key)? {
        AttributeValue::S(v) => Some(v.clone()),
        _ => None,
    }
}

fn entry_of(item: &HashMap<String, AttributeValue>) -> Option<RunnerEntry> {
    Some(RunnerEntry {
        runner_id: num(item, "runner_id")?,
        project_id: num(item, "project_id").unwrap_or(0),
        job_id: num(item, "job_id").unwrap_or(0),
        // Registered before attempts were kept: attempt 1.
        attempt: num(item, "attempt")
            .and_then(|a| u32::try_from(a).ok())
            .filter(|a| *a >= 1)
            .unwrap_or(1),
        instance_id: text(item, "instance_id")?,
        created_at_ms: num(item, "created_at_ms").unwrap_or(0),
    })
}

impl RunnerLedger for DynamoRunnerLedger {
    async fn job(&self, key: JobKey) -> Result<Option<JobRecord>, PortError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.jobs_table)
            .key(jobs_table::KEY, s(&key.table_key()))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| port_error("DynamoDB GetItem (jobs)", e))?;
        Ok(out.item().map(|item| JobRecord {
            phase: num(item, attr::PHASE_RANK)
                .and_then(|r| u8::try_from(r).ok())
                .and_then(JobPhase::from_rank),
            runner_id: num(item, attr::LAUNCHED_RUNNER_ID),
            instance_id: text(item, attr::INSTANCE_ID),
            // The router's start (no `attempt` yet) is attempt 1.
            attempt: num(item, attr::ATTEMPT)
                .and_then(|a| u32::try_from(a).ok())
                .filter(|a| *a >= 1)
                .unwrap_or(1),
        }))
    }

    async fn note_runner(&self, entry: &RunnerEntry) -> Result<(), PortError> {
        let key = JobKey {
            project_id: entry.project_id,
            job_id: entry.job_id,
        };
        self.client
            .put_item()
            .table_name(&self.runners_table)
            .item("runner_id", s(&entry.runner_id.to_string()))
            .item("project_id", n(entry.project_id))
            .item("job_id", n(entry.job_id))
            .item("job_key", s(&key.table_key()))
            .item("attempt", n(u64::from(entry.attempt)))
            .item("instance_id", s(&entry.instance_id))
            .item("created_at_ms", n(entry.created_at_ms))
            .send()
            .await
            .map_err(|e| port_error("DynamoDB PutItem (runners)", e))?;
        self.client
            .update_item()
            .table_name(&self.jobs_table)
            .key(jobs_table::KEY, s(&key.table_key()))
            .update_expression(format!(
                "SET {} = :runner, {} = :instance",
                attr::LAUNCHED_RUNNER_ID,
                attr::INSTANCE_ID
            ))
            .expression_attribute_values(":runner", n(entry.runner_id))
            .expression_attribute_values(":instance", s(&entry.instance_id))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| port_error("DynamoDB UpdateItem (jobs)", e))
    }

    async fn record_running(
        &self,
        key: JobKey,
        runner_id: u64,
        instance_id: &str,
        now_ms: u64,
    ) -> Result<bool, PortError> {
        let running = JobPhase::Running;
        let result = self
            .client
            .update_item()
            .table_name(&self.jobs_table)
            .key(jobs_table::KEY, s(&key.table_key()))
            // No longer waiting for a slot, if it did.
            .update_expression(format!(
                "SET {} = :phase, {} = :rank, {} = :runner, {} = :instance, {ready} = if_not_exists({ready}, :ready) REMOVE {}, {}",
                attr::PHASE,
                attr::PHASE_RANK,
                attr::LAUNCHED_RUNNER_ID,
                attr::INSTANCE_ID,
                attr::WAITING_FOR_SLOT_SINCE_MS,
                attr::WAITING_FOR_SLOT_CAP,
                ready = attr::RUNNER_READY_AT_MS,
            ))
            .expression_attribute_values(":ready", n(now_ms))
            .condition_expression(ADVANCE_CONDITION)
            .expression_attribute_values(":phase", s(running.as_str()))
            .expression_attribute_values(":rank", n(u64::from(running.rank())))
            .expression_attribute_values(":runner", n(runner_id))
            .expression_attribute_values(":instance", s(instance_id))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .send()
            .await;
        match result {
            Ok(_) => Ok(true),
            Err(e) => match e.into_service_error() {
                aws_sdk_dynamodb::operation::update_item::UpdateItemError::ConditionalCheckFailedException(c) => {
                    // Already running (a repeat of this step) is fine; further is not.
                    let rank = c.item().and_then(|i| num(i, attr::PHASE_RANK));
                    Ok(rank == Some(u64::from(running.rank())))
                }
                other => Err(port_error("DynamoDB UpdateItem (jobs, running)", other)),
            },
        }
    }

    async fn record_waiting(&self, key: JobKey, cap: &str, now_ms: u64) -> Result<bool, PortError> {
        let result = self
            .client
            .update_item()
            .table_name(&self.jobs_table)
            .key(jobs_table::KEY, s(&key.table_key()))
            // The first wait counts: the reconciler starts the oldest waiting job first.
            .update_expression(format!(
                "SET {since} = if_not_exists({since}, :now), {cap} = :cap",
                since = attr::WAITING_FOR_SLOT_SINCE_MS,
                cap = attr::WAITING_FOR_SLOT_CAP,
            ))
            .condition_expression(WAITING_CONDITION)
            .expression_attribute_values(":now", n(now_ms))
            .expression_attribute_values(":cap", s(cap))
            .expression_attribute_values(":finished", n(u64::from(JobPhase::Finished.rank())))
            .send()
            .await;
        match result {
            Ok(_) => Ok(true),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
            {
                Ok(false)
            }
            Err(e) => Err(port_error(
                "DynamoDB UpdateItem (jobs, waiting for a slot)",
                e,
            )),
        }
    }

    async fn runner(&self, runner_id: u64) -> Result<Option<RunnerEntry>, PortError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.runners_table)
            .key("runner_id", s(&runner_id.to_string()))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| port_error("DynamoDB GetItem (runners)", e))?;
        Ok(out.item().and_then(entry_of))
    }

    async fn runners(&self) -> Result<Vec<RunnerEntry>, PortError> {
        let mut out = Vec::new();
        let mut pages = self
            .client
            .scan()
            .table_name(&self.runners_table)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| port_error("DynamoDB Scan (runners)", e))?;
            out.extend(page.items().iter().filter_map(entry_of));
        }
        Ok(out)
    }

    async fn forget_runner(&self, runner_id: u64) -> Result<(), PortError> {
        self.client
            .delete_item()
            .table_name(&self.runners_table)
            .key("runner_id", s(&runner_id.to_string()))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| port_error("DynamoDB DeleteItem (runners)", e))
    }

    async fn drained(&self) -> Result<Option<ephemeral_core::drain::Drain>, PortError> {
        ephemeral_aws::read_drain(&self.client, &self.jobs_table).await
    }

    async fn claim_pooled(
        &self,
        instance_id: &str,
        key: JobKey,
        attempt: u32,
        now_ms: u64,
    ) -> Result<bool, PortError> {
        let claimant = jobs_table::pool_claimant(key, attempt);
        let result = self
            .client
            .put_item()
            .table_name(&self.jobs_table)
            .item(jobs_table::KEY, s(&jobs_table::pool_claim_key(instance_id)))
            .item(jobs_table::CLAIMED_BY, s(&claimant))
            .item(
                attr::EXPIRES_AT,
                n(now_ms / 1000 + jobs_table::POOL_CLAIM_TTL_SECONDS),
            )
            .condition_expression(jobs_table::POOL_CLAIM_CONDITION)
            .expression_attribute_names("#key", jobs_table::KEY)
            .expression_attribute_names("#by", jobs_table::CLAIMED_BY)
            .expression_attribute_values(":me", s(&claimant))
            .send()
            .await;
        match result {
            Ok(_) => Ok(true),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
            {
                Ok(false)
            }
            Err(e) => Err(port_error("DynamoDB PutItem (jobs: warm pool claim)", e)),
        }
    }
}
