//! Finding the stack's resources: an explicit flag, else the stack's output (read once per
//! run), else an error that names both ways.

use std::collections::BTreeMap;

use aws_config::SdkConfig;
use mapping_cli::table::StackError;
use tokio::sync::OnceCell;

use crate::cli::{Failure, Target};

/// A resource a command needs, with the stack output that names it and the flag that
/// overrides the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    JobsTable,
    RunnersTable,
    ProvisionStateMachine,
    TeardownStateMachine,
    RouterDeadLetters,
    IntakeDeadLetters,
    WebhookDeadLetters,
    IntakeQueue,
    RouterFunction,
    SlotsTable,
    InstanceCap,
    InstanceCapPerProject,
}

impl Resource {
    /// The template's output (template.yaml, `Outputs`).
    pub fn output(self) -> &'static str {
        match self {
            Self::JobsTable => "JobsTableName",
            Self::RunnersTable => "RunnersTableName",
            Self::ProvisionStateMachine => "ProvisionStateMachineArn",
            Self::TeardownStateMachine => "TeardownStateMachineArn",
            Self::RouterDeadLetters => "RouterDeadLetterQueueUrl",
            Self::IntakeDeadLetters => "IntakeFallbackDeadLetterQueueUrl",
            Self::WebhookDeadLetters => "DeadLetterQueueUrl",
            Self::IntakeQueue => "IntakeFallbackQueueUrl",
            Self::RouterFunction => "RouterFunctionName",
            Self::SlotsTable => "SlotsTableName",
            Self::InstanceCap => "InstanceCap",
            Self::InstanceCapPerProject => "InstanceCapPerProject",
        }
    }

    pub fn flag(self) -> &'static str {
        match self {
            Self::JobsTable => "--jobs-table NAME",
            Self::RunnersTable => "--runners-table NAME",
            Self::ProvisionStateMachine => "--provision-state-machine ARN",
            Self::TeardownStateMachine => "--teardown-state-machine ARN",
            Self::RouterDeadLetters => "--router-dlq URL",
            Self::IntakeDeadLetters => "--intake-dlq URL",
            Self::WebhookDeadLetters => "--webhook-dlq URL",
            Self::IntakeQueue => "--intake-queue URL",
            Self::RouterFunction => "--router-function NAME",
            Self::SlotsTable => "--slots-table NAME",
            Self::InstanceCap => "--instance-cap N",
            Self::InstanceCapPerProject => "--instance-cap-per-project N",
        }
    }

    pub fn what(self) -> &'static str {
        match self {
            Self::JobsTable => "the jobs table",
            Self::RunnersTable => "the runner registry table",
            Self::ProvisionStateMachine => "the provision workflow",
            Self::TeardownStateMachine => "the teardown workflow",
            Self::RouterDeadLetters => "the router's dead-letter queue",
            Self::IntakeDeadLetters => "the intake drainer's dead-letter queue",
            Self::WebhookDeadLetters => "the webhook's dead-letter queue",
            Self::IntakeQueue => "the intake fallback queue",
            Self::RouterFunction => "the router function",
            Self::SlotsTable => "the runner slots table",
            Self::InstanceCap => "the stack's instance cap (0: none)",
            Self::InstanceCapPerProject => "the per-project instance cap (0: none)",
        }
    }
}

/// The flags that name resources directly.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub stack: Option<String>,
    pub managed_by: Option<String>,
    values: BTreeMap<&'static str, String>,
}

impl From<&Target> for Overrides {
    fn from(t: &Target) -> Self {
        let pairs = [
            (Resource::JobsTable, &t.jobs_table),
            (Resource::RunnersTable, &t.runners_table),
            (Resource::ProvisionStateMachine, &t.provision_state_machine),
            (Resource::TeardownStateMachine, &t.teardown_state_machine),
            (Resource::RouterDeadLetters, &t.router_dlq),
            (Resource::IntakeDeadLetters, &t.intake_dlq),
            (Resource::WebhookDeadLetters, &t.webhook_dlq),
            (Resource::IntakeQueue, &t.intake_queue),
            (Resource::RouterFunction, &t.router_function),
            (Resource::SlotsTable, &t.slots_table),
            (Resource::InstanceCap, &t.instance_cap),
            (Resource::InstanceCapPerProject, &t.instance_cap_per_project),
        ];
        Self {
            stack: t.stack.clone(),
            managed_by: t.managed_by.clone().or_else(|| t.stack.clone()),
            values: pairs
                .into_iter()
                .filter_map(|(r, v)| Some((r.output(), v.clone().filter(|v| !v.is_empty())?)))
                .collect(),
        }
    }
}

/// Resolves resources for one run.
pub struct Resolver {
    sdk: SdkConfig,
    overrides: Overrides,
    outputs: OnceCell<BTreeMap<String, String>>,
}

impl Resolver {
    pub fn new(sdk: &SdkConfig, overrides: Overrides) -> Self {
        Self {
            sdk: sdk.clone(),
            overrides,
            outputs: OnceCell::new(),
        }
    }

    /// The stack name instances are tagged with, if known.
    pub fn managed_by(&self) -> Option<&str> {
        self.overrides.managed_by.as_deref()
    }

    /// The resource's name (or ARN, or URL): the flag, else the stack's output. An error
    /// names both when neither is there.
    pub async fn get(&self, resource: Resource) -> Result<String, Failure> {
        match self.find(resource).await? {
            Some(value) => Ok(value),
            None => Err(Failure::usage(format!(
                "name {}: --stack STACK (its output {}) or {}",
                resource.what(),
                resource.output(),
                resource.flag()
            ))),
        }
    }

    /// The same, `None` when neither the flag nor a stack was given (a part a command can do
    /// without). A stack without the output is an error all the same.
    pub async fn find(&self, resource: Resource) -> Result<Option<String>, Failure> {
        self.lookup(resource, false).await
    }

    /// The same, `None` also when the stack has no such output: for a part a stack deployed
    /// before the output existed can do without.
    pub async fn find_if_output(&self, resource: Resource) -> Result<Option<String>, Failure> {
        self.lookup(resource, true).await
    }

    async fn lookup(&self, resource: Resource, absent_ok: bool) -> Result<Option<String>, Failure> {
        if let Some(value) = self.overrides.values.get(resource.output()) {
            return Ok(Some(value.clone()));
        }
        let Some(stack) = &self.overrides.stack else {
            return Ok(None);
        };
        let outputs = self
            .outputs
            .get_or_try_init(|| outputs_of(&self.sdk, stack))
            .await?;
        match outputs.get(resource.output()).filter(|v| !v.is_empty()) {
            Some(value) => Ok(Some(value.clone())),
            None if absent_ok => Ok(None),
            None => Err(Failure::usage(format!(
                "stack `{stack}` has no output {} (its outputs: {}): deploy the current template.yaml, or name {} with {}",
                resource.output(),
                if outputs.is_empty() {
                    "none".to_owned()
                } else {
                    outputs.keys().cloned().collect::<Vec<_>>().join(", ")
                },
                resource.what(),
                resource.flag()
            ))),
        }
    }
}

async fn outputs_of(sdk: &SdkConfig, stack: &str) -> Result<BTreeMap<String, String>, Failure> {
    let hint = ": check --stack and AWS_REGION";
    mapping_cli::table::stack_outputs(sdk, stack)
        .await
        .map_err(|e| match e {
            StackError::NotFound(m) => Failure::not_found(format!("{m}{hint}")),
            StackError::Failed(m) => Failure::aws(m),
        })
}
