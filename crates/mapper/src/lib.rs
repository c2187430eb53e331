//! The mapper: first state of the provision workflow. Reads the mapping table (and, when an
//! API token is configured, the job's tags from GitLab) and answers the route; the core's
//! `ephemeral_core::mapping` decides.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use aws_sdk_dynamodb::types::AttributeValue;
use ephemeral_aws::{item_to_json, port_error};
use ephemeral_core::jobs::WorkflowInput;
use ephemeral_core::mapping::{
    ANY_JOB, Executor, InvalidItem, JobTags, MapperOutput, MappingRules, Rule, map_job,
    rule_from_item,
};
use ephemeral_core::webhook::PortError;
use ephemeral_gitlab::{GitLabClient, RetryPolicy, Secret};

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
        let default_route = match value("DEFAULT_EXECUTOR").as_deref().unwrap_or("EC2") {
            "EC2" => Executor::Ec2(Default::default()),
            "LAMBDA" => Executor::Lambda {
                arn: value("DEFAULT_LAMBDA_ARN").ok_or_else(|| {
                    ConfigError("DEFAULT_EXECUTOR=LAMBDA needs DEFAULT_LAMBDA_ARN (the shell-runner function ARN)".into())
                })?,
            },
            other => return Err(ConfigError(format!("DEFAULT_EXECUTOR=`{other}`: use LAMBDA or EC2"))),
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

/// The job's `tag_list` from GitLab's jobs API, with a `read_api` token from SSM (read once per
/// cold start). Answers are cached per job: Step Functions retries call the mapper again.
pub struct GitLabJobTags {
    pub gitlab: Option<GitLabClient>,
    pub token: Option<TokenSource>,
    cache: Mutex<HashMap<(u64, u64), Vec<String>>>,
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

/// Keeps the cache from growing without bound in a long-lived warm environment.
const TAG_CACHE_ENTRIES: usize = 4096;

impl GitLabJobTags {
    pub fn new(base_url: Option<String>, token: Option<TokenSource>) -> Self {
        // One quick retry: the mapper runs inside a workflow step, and without tags it still
        // routes (by job name), so a slow or failing GitLab must not hold the job.
        let retry = RetryPolicy {
            max_retries: 1,
            min_delay: Duration::from_millis(200),
            max_delay: Duration::from_millis(500),
        };
        Self {
            gitlab: base_url.map(|u| GitLabClient::new(&u, retry)),
            token,
            cache: Mutex::new(HashMap::new()),
        }
    }
}

impl JobTags for GitLabJobTags {
    async fn tags(&self, project_id: u64, job_id: u64) -> Result<Option<Vec<String>>, PortError> {
        let (Some(gitlab), Some(token)) = (&self.gitlab, &self.token) else {
            return Ok(None);
        };
        if let Some(hit) = self
            .cache
            .lock()
            .expect("tag cache")
            .get(&(project_id, job_id))
        {
            return Ok(Some(hit.clone()));
        }
        let tags = gitlab
            .job_tags(token.get().await?, project_id, job_id)
            .await
            .map_err(|e| PortError(e.to_string()))?;
        let mut cache = self.cache.lock().expect("tag cache");
        if cache.len() >= TAG_CACHE_ENTRIES {
            cache.clear();
        }
        cache.insert((project_id, job_id), tags.clone());
        Ok(Some(tags))
    }
}

pub struct Mapper<R, T> {
    pub rules: R,
    pub tags: T,
    pub default_route: Executor,
}

impl<R: MappingRules, T: JobTags> Mapper<R, T> {
    /// Handles the provision workflow's input; the output goes to the state machine's Choice.
    pub async fn handle(&self, input: &WorkflowInput) -> Result<MapperOutput, PortError> {
        let job = &input.job;
        let (output, tags_error) =
            map_job(job, &self.rules, &self.tags, &self.default_route).await?;
        if let Some(e) = tags_error {
            tracing::warn!(error = %e, project_id = job.project_id, job_id = job.job_id,
                "could not read the job's tags from GitLab; routing by job name only");
        }
        for item in &output.invalid_items {
            tracing::error!(item = %item, "invalid mapping item skipped: fix it with runner-mappings");
        }
        tracing::info!(
            decision = output.decision.executor.kind(), matched = %output.decision.matched,
            reason = %output.decision.reason, project_id = job.project_id, pipeline_id = job.pipeline_id,
            job_id = job.job_id, job_name = %job.job_name, delivery_id = %job.delivery_id, "job mapped"
        );
        let metric = match output.decision.executor.kind() {
            "LAMBDA" => "RoutedToLambda",
            _ => "RoutedToEc2",
        };
        println!(
            "{}",
            ephemeral_core::metrics::emf_count("mapper", metric, 1, job.received_at_ms)
        );
        Ok(output)
    }
}
