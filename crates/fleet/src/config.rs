//! The three functions' configuration, from the environment the template sets. Every
//! problem names the variable and what to put in it.

use ephemeral_core::ec2::{Ec2Defaults, ReaperSettings};
use ephemeral_core::fleet::FleetSettings;
use ephemeral_core::mapping::{AmiRef, Market, RunnerExecutor};
use ephemeral_gitlab::RunnerScope;

/// The user-data template, compiled in: the function needs no file at run time, and the
/// template is tested (rendered and `bash -n`) in the core crate.
pub const USER_DATA_TEMPLATE: &str = include_str!("../../../templates/runner-user-data.sh");

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScopeSetting {
    Instance,
    Group(u64),
    /// The job's own project (the narrowest: the runner can take only that project's jobs).
    JobProject,
}

impl ScopeSetting {
    pub fn for_project(&self, project_id: u64) -> RunnerScope {
        match self {
            Self::Instance => RunnerScope::Instance,
            Self::Group(id) => RunnerScope::Group(*id),
            Self::JobProject => RunnerScope::Project(project_id),
        }
    }
}

#[derive(Debug, Clone)]
pub struct FleetConfig {
    pub settings: FleetSettings,
    pub jobs_table_name: String,
    pub runners_table_name: String,
    pub gitlab_api_token_parameter: String,
    /// Set: runners are created the legacy way (`POST /runners`) with this registration token.
    pub registration_token_parameter: Option<String>,
    pub runner_scope: ScopeSetting,
    pub security_group_ids: Vec<String>,
    pub instance_profile_arn: Option<String>,
    /// `arn:<partition>:ec2:<region>:<account>:instance/`: the token parameter is tagged with
    /// the instance's ARN, which the instance role's policy compares with
    /// `${ec2:SourceInstanceARN}`.
    pub instance_arn_prefix: String,
    pub max_job_timeout_seconds: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(pub String);

impl FleetConfig {
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let value = |name: &str| {
            get(name)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let required = |name: &str, what: &str| {
            value(name).ok_or_else(|| ConfigError(format!("{name} is not set ({what})")))
        };
        let seconds = |name: &str, default: u64| -> Result<u64, ConfigError> {
            match value(name) {
                None => Ok(default),
                Some(v) => v.parse().map_err(|_| {
                    ConfigError(format!("{name}=`{v}` is not a whole number of seconds"))
                }),
            }
        };
        let list = |name: &str| -> Vec<String> {
            value(name)
                .map(|v| {
                    v.split(',')
                        .map(|s| s.trim().to_owned())
                        .filter(|s| !s.is_empty())
                        .collect()
                })
                .unwrap_or_default()
        };
        let ami = AmiRef::parse(&value("DEFAULT_AMI").unwrap_or_else(|| {
            "ssm:/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-arm64".into()
        }))
        .map_err(|e| ConfigError(format!("DEFAULT_AMI: {e}")))?;
        let market = match value("DEFAULT_MARKET").as_deref().unwrap_or("spot") {
            "spot" => Market::Spot,
            "on-demand" => Market::OnDemand,
            other => {
                return Err(ConfigError(format!(
                    "DEFAULT_MARKET=`{other}`: use spot or on-demand"
                )));
            }
        };
        let executor = match value("DEFAULT_RUNNER_EXECUTOR")
            .as_deref()
            .unwrap_or("docker")
        {
            "docker" => RunnerExecutor::Docker,
            "shell" => RunnerExecutor::Shell,
            other => {
                return Err(ConfigError(format!(
                    "DEFAULT_RUNNER_EXECUTOR=`{other}`: use docker or shell"
                )));
            }
        };
        let mut cost_tags = Vec::new();
        for pair in list("COST_TAGS") {
            let (k, v) = pair.split_once('=').ok_or_else(|| {
                ConfigError(format!(
                    "COST_TAGS: `{pair}` is not key=value (comma-separated)"
                ))
            })?;
            cost_tags.push((k.trim().to_owned(), v.trim().to_owned()));
        }
        let runner_scope = match value("RUNNER_SCOPE").as_deref().unwrap_or("project") {
            "project" => ScopeSetting::JobProject,
            "instance" => ScopeSetting::Instance,
            other => match other.strip_prefix("group:").map(str::parse) {
                Some(Ok(id)) => ScopeSetting::Group(id),
                _ => {
                    return Err(ConfigError(format!(
                        "RUNNER_SCOPE=`{other}`: use project (the job's project), instance, or group:<group id>"
                    )));
                }
            },
        };
        let wait_timeout_seconds = seconds("RUNNER_WAIT_TIMEOUT_SECONDS", 600)?;
        let max_lifetime_seconds = seconds("MAX_INSTANCE_LIFETIME_SECONDS", 4 * 3600)?;
        let max_job_timeout = seconds("MAX_JOB_TIMEOUT_SECONDS", 0)?;
        let gitlab_url = required(
            "GITLAB_URL",
            "the GitLab base URL, e.g. https://gitlab.example.com",
        )?
        .trim_end_matches('/')
        .to_owned();
        Ok(Self {
            settings: FleetSettings {
                defaults: Ec2Defaults {
                    instance_type: value("DEFAULT_INSTANCE_TYPE").unwrap_or_else(|| "t4g.medium".into()),
                    ami,
                    market,
                    subnets: list("SUBNET_IDS"),
                    executor,
                    stack: required("STACK_NAME", "the stack's name: the managed-by tag value")?,
                    cost_tags,
                },
                user_data_template: USER_DATA_TEMPLATE.to_owned(),
                gitlab_url,
                token_parameter_prefix: required(
                    "TOKEN_PARAMETER_PREFIX",
                    "the SSM path under which runner tokens are put, e.g. /ephemeral-runners/<stack>/runner-tokens",
                )?
                .trim_end_matches('/')
                .to_owned(),
                wait_timeout_seconds,
                region: required("AWS_REGION", "set by Lambda")?,
                reaper: ReaperSettings {
                    max_lifetime_ms: max_lifetime_seconds * 1000,
                    // Boot, token pick-up and the runner's own wait for a job.
                    idle_grace_ms: (wait_timeout_seconds
                        + seconds("RUNNER_BOOT_GRACE_SECONDS", 300)?)
                        * 1000,
                },
                orphan_grace_ms: seconds("ORPHAN_GRACE_SECONDS", 600)? * 1000,
            },
            jobs_table_name: required("JOBS_TABLE_NAME", "the jobs table")?,
            runners_table_name: required("RUNNERS_TABLE_NAME", "the runner registry table")?,
            gitlab_api_token_parameter: required(
                "GITLAB_RUNNER_TOKEN_PARAMETER",
                "the SSM SecureString holding a GitLab token with the create_runner and manage_runner scopes (or api)",
            )?,
            registration_token_parameter: value("GITLAB_REGISTRATION_TOKEN_PARAMETER"),
            runner_scope,
            security_group_ids: list("SECURITY_GROUP_IDS"),
            instance_profile_arn: value("INSTANCE_PROFILE_ARN"),
            instance_arn_prefix: required(
                "INSTANCE_ARN_PREFIX",
                "arn:<partition>:ec2:<region>:<account>:instance/",
            )?,
            max_job_timeout_seconds: (max_job_timeout > 0).then_some(max_job_timeout),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(extra: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let mut vars: std::collections::HashMap<String, String> = [
            ("GITLAB_URL", "https://gitlab.example.com/"),
            ("STACK_NAME", "ci"),
            ("TOKEN_PARAMETER_PREFIX", "/er/ci/runner-tokens/"),
            ("AWS_REGION", "eu-west-1"),
            ("JOBS_TABLE_NAME", "jobs"),
            ("RUNNERS_TABLE_NAME", "runners"),
            ("GITLAB_RUNNER_TOKEN_PARAMETER", "/er/ci/gitlab-token"),
            (
                "INSTANCE_ARN_PREFIX",
                "arn:aws:ec2:eu-west-1:123456789012:instance/",
            ),
            ("SUBNET_IDS", "subnet-1, subnet-2"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        for (k, v) in extra {
            vars.insert((*k).to_owned(), (*v).to_owned());
        }
        move |k| vars.get(k).cloned()
    }

    #[test]
    fn defaults_and_lists_are_read() {
        let c = FleetConfig::from_lookup(env(&[("COST_TAGS", "team=ci, cost-center=42")])).unwrap();
        assert_eq!(c.settings.gitlab_url, "https://gitlab.example.com");
        assert_eq!(c.settings.token_parameter_prefix, "/er/ci/runner-tokens");
        assert_eq!(c.settings.defaults.subnets, ["subnet-1", "subnet-2"]);
        assert_eq!(c.settings.defaults.market, Market::Spot);
        assert_eq!(
            c.settings.defaults.cost_tags,
            [
                ("team".into(), "ci".into()),
                ("cost-center".into(), "42".into())
            ]
        );
        assert_eq!(c.runner_scope, ScopeSetting::JobProject);
        assert_eq!(c.settings.reaper.idle_grace_ms, 900_000);
    }

    #[test]
    fn mistakes_name_the_variable() {
        let e = FleetConfig::from_lookup(env(&[("DEFAULT_MARKET", "cheap")])).unwrap_err();
        assert!(e.to_string().contains("DEFAULT_MARKET=`cheap`"), "{e}");
        let e = FleetConfig::from_lookup(env(&[("RUNNER_SCOPE", "group:x")])).unwrap_err();
        assert!(e.to_string().contains("RUNNER_SCOPE"), "{e}");
        let e = FleetConfig::from_lookup(env(&[("COST_TAGS", "team")])).unwrap_err();
        assert!(e.to_string().contains("key=value"), "{e}");
        let e = FleetConfig::from_lookup(env(&[("STACK_NAME", " ")])).unwrap_err();
        assert!(e.to_string().contains("STACK_NAME is not set"), "{e}");
    }
}
