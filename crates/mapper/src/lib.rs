//! The mapper: first state of the provision workflow. Reads the job from GitLab (status and
//! tags, with the `read_api` token) and the mapping table, and answers the route, or SKIP when
//! GitLab does not have the job waiting for a runner; the core's `ephemeral_core::mapping`
//! decides.

// reqwest's nested futures inside the Lambda runtime's service exceed the default depth
// when the compiler lays out `function::serve`'s future.
#![recursion_limit = "256"]

pub mod function;
use std::time::Duration;

use aws_sdk_dynamodb::types::AttributeValue;
use ephemeral_aws::{item_to_json, port_error};
use ephemeral_core::jobs::WorkflowInput;
use ephemeral_core::mapping::{
    ANY_JOB, Executor, ExecutorKind, GitLabJobView, InvalidItem, JobLookup, LookedUp, LookupError,
    MapError, MapperOutput, MappingRules, Rule, map_job, rule_from_item,
};
use ephemeral_core::metrics::charted;
use ephemeral_core::webhook::PortError;
use ephemeral_gitlab::{GitLabClient, GitLabError, RetryPolicy, Secret};

#[derive(Debug, Clone)]
pub struct MapperConfig {
    pub mapping_table_name: String,
    pub default_route: Executor,
    pub gitlab_url: Option<String>,
    pub gitlab_api_token_parameter: Option<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(String);

impl MapperConfig {
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let value = |name: &str| {
            get(name)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let mapping_table_name = value("MAPPING_TABLE_NAME")
            .ok_or_else(|| ConfigError("MAPPING_TABLE_NAME is not set".into()))?;
        let default_kind = match value("DEFAULT_EXECUTOR") {
            None => ExecutorKind::Ec2,
            Some(text) => ExecutorKind::parse_route(&text)
                .map_err(|e| ConfigError(format!("DEFAULT_EXECUTOR={e}")))?,
        };
        let default_route = match default_kind {
            ExecutorKind::Ec2 => Executor::Ec2(Default::default()),
            ExecutorKind::Lambda => Executor::Lambda {
                arn: value("DEFAULT_LAMBDA_ARN").ok_or_else(|| {
                    ConfigError(format!("DEFAULT_EXECUTOR={default_kind} needs DEFAULT_LAMBDA_ARN (the shell-runner function ARN)"))
                })?,
            },
            ExecutorKind::Skip => unreachable!("parse_route answers route kinds only"),
        };
        let gitlab_url = value("GITLAB_URL").map(|u| u.trim_end_matches('/').to_owned());
        let gitlab_api_token_parameter = value("GITLAB_API_TOKEN_PARAMETER");
        if gitlab_api_token_parameter.is_some() && gitlab_url.is_none() {
            return Err(ConfigError(
                "GITLAB_API_TOKEN_PARAMETER is set but GITLAB_URL is not".into(),
            ));
        }
        Ok(Self {
            mapping_table_name,
            default_route,
            gitlab_url,
            gitlab_api_token_parameter,
        })
    }

    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }
}

/// The mapping table: two Queries (`job#<name>`, `job#*`), paginated.
#[derive(Debug, Clone)]
pub struct DynamoMappingRules {
    pub client: aws_sdk_dynamodb::Client,
    pub table: String,
}

impl MappingRules for DynamoMappingRules {
    async fn candidates(&self, job_name: &str) -> Result<(Vec<Rule>, Vec<InvalidItem>), PortError> {
        let mut rules = Vec::new();
        let mut invalid = Vec::new();
        let mut partitions = vec![format!("job#{job_name}")];
        if job_name != ANY_JOB {
            partitions.push(format!("job#{ANY_JOB}"));
        }
        for pk in partitions {
            let mut pages = self
                .client
                .query()
                .table_name(&self.table)
                .key_condition_expression("pk = :pk")
                .expression_attribute_values(":pk", AttributeValue::S(pk))
                .into_paginator()
                .items()
                .send();
            while let Some(item) = pages.next().await {
                let item = item.map_err(|e| port_error("reading the mapping table", e))?;
                let json = item_to_json(&item);
                match rule_from_item(&json) {
                    Ok(rule) => rules.push(rule),
                    Err(error) => invalid.push(InvalidItem {
                        pk: json
                            .get("pk")
                            .and_then(|v| v.as_str())
                            .unwrap_or("?")
                            .to_owned(),
                        sk: json
                            .get("sk")
                            .and_then(|v| v.as_str())
                            .unwrap_or("?")
                            .to_owned(),
                        error,
                    }),
                }
            }
        }
        Ok((rules, invalid))
    }
}

/// The job as GitLab has it now (`GET /projects/:id/jobs/:job_id`: status and `tag_list`),
/// with a `read_api` token from SSM (read once per cold start). Never cached: the status is
/// what a retry or a later attempt must see afresh.
pub struct GitLabJobs {
    pub gitlab: Option<GitLabClient>,
    pub token: Option<TokenSource>,
}

pub struct TokenSource {
    pub ssm: aws_sdk_ssm::Client,
    pub parameter: String,
    value: tokio::sync::OnceCell<Secret>,
}

impl TokenSource {
    pub fn new(ssm: aws_sdk_ssm::Client, parameter: String) -> Self {
        Self {
            ssm,
            parameter,
            value: tokio::sync::OnceCell::new(),
        }
    }

    async fn get(&self) -> Result<&Secret, PortError> {
        self.value
            .get_or_try_init(|| ephemeral_aws::read_secret(&self.ssm, &self.parameter))
            .await
    }
}

impl GitLabJobs {
    pub fn new(base_url: Option<String>, token: Option<TokenSource>) -> Self {
        // One quick retry: the workflow retries GitLabUnavailable itself (MapJob's Retry), and
        // the mapper's 30 s timeout must hold two 10 s attempts.
        let retry = RetryPolicy {
            max_retries: 1,
            min_delay: Duration::from_millis(200),
            max_delay: Duration::from_millis(500),
        };
        Self {
            gitlab: base_url.map(|u| GitLabClient::new(&u, retry)),
            token,
        }
    }
}

impl JobLookup for GitLabJobs {
    async fn job(&self, project_id: u64, job_id: u64) -> Result<LookedUp, LookupError> {
        let (Some(gitlab), Some(token)) = (&self.gitlab, &self.token) else {
            return Ok(LookedUp::NotConfigured);
        };
        let token = token.get().await.map_err(LookupError::Token)?;
        match gitlab.job(token, project_id, job_id).await {
            Ok(job) => Ok(LookedUp::Found(GitLabJobView {
                status: job.status,
                tags: job.tag_list,
            })),
            Err(GitLabError::Status { status: 404, .. }) => Ok(LookedUp::Gone),
            Err(e @ GitLabError::Unauthorized { .. }) => Err(LookupError::Refused(e.to_string())),
            // 5xx, 429 and timeouts after the client's retry, and answers that are not a job.
            Err(e) => Err(LookupError::Unavailable(e.to_string())),
        }
    }
}

pub struct Mapper<R, J> {
    pub rules: R,
    pub gitlab: J,
    pub default_route: Executor,
}

impl<R: MappingRules, J: JobLookup> Mapper<R, J> {
    /// Handles the provision workflow's input; the output goes to the state machine's Choice,
    /// an error (with its [`MapError::error_type`]) to MapJob's Retry and Catch.
    pub async fn handle(&self, input: &WorkflowInput) -> Result<MapperOutput, MapError> {
        let job = &input.job;
        let mapped = match map_job(job, &self.rules, &self.gitlab, &self.default_route).await {
            Ok(mapped) => mapped,
            Err(e) => {
                tracing::error!(error = %e, error_type = %e.error_type(), project_id = job.project_id,
                    pipeline_id = job.pipeline_id, job_id = job.job_id, job_name = %job.job_name,
                    delivery_id = %job.delivery_id, "job not mapped");
                return Err(e);
            }
        };
        let output = mapped.output;
        if !mapped.confirmed {
            tracing::warn!(
                project_id = job.project_id,
                pipeline_id = job.pipeline_id,
                job_id = job.job_id,
                "no GitLab API token (GitLabApiTokenParameterName): the job could not be confirmed with GitLab and is routed by name only; the shell runner's own tags decide in GitLab which job it takes"
            );
        }
        for item in &output.invalid_items {
            tracing::error!(item = %item, "invalid mapping item skipped: fix it with runner-mappings");
        }
        tracing::info!(
            decision = %output.decision.executor.kind(), matched = %output.decision.matched,
            reason = %output.decision.reason, project_id = job.project_id, pipeline_id = job.pipeline_id,
            job_id = job.job_id, job_name = %job.job_name, delivery_id = %job.delivery_id, "job mapped"
        );
        let metric = match output.decision.executor {
            Executor::Lambda { .. } => charted::ROUTED_TO_LAMBDA,
            Executor::Ec2(_) => charted::ROUTED_TO_EC2,
            Executor::Skip => charted::SKIPPED_NOT_PENDING,
        };
        println!("{}", metric.count(1, job.received_at_ms));
        Ok(output)
    }
}

/// What Step Functions sees of a mapper error: the stable `errorType` and the message.
pub fn diagnostic(e: &MapError) -> lambda_runtime::Diagnostic {
    lambda_runtime::Diagnostic {
        error_type: e.error_type().name(),
        error_message: e.to_string(),
    }
}
