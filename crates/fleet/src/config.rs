//! The three functions' configuration, from the environment the template sets. Every
//! problem names the variable and what to put in it.

use ephemeral_core::ec2::{
    DEFAULT_RUNNER_VERSION, Ec2Defaults, ReaperSettings, RunnerRelease, RunnerReleaseError,
    check_ami_readable, default_ami_parameter_prefix,
};
use ephemeral_core::env::{Env, EnvError};
use ephemeral_core::fleet::FleetSettings;
use ephemeral_core::lambda_runner::ShellRunnerMode;
use ephemeral_core::mapping::{AmiRef, Market, RunnerExecutor};
use ephemeral_core::slots::SlotCaps;
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

/// The three functions' configuration: EC2 runners set up, or not at all.
#[derive(Debug, Clone)]
pub enum FleetSetup {
    Ec2(Box<FleetConfig>),
    /// No runner token parameter (`RunnerApiTokenParameterName` empty): a stack that runs
    /// jobs in Lambda only. The functions start without reading SSM; teardown and the reaper
    /// have nothing to do, and provisioning fails with `Ec2NotConfigured`.
    NotConfigured,
}

/// What to do when a job reaches EC2 in a stack without EC2 runners.
pub const NOT_CONFIGURED: &str = "EC2 runners are not configured in this stack (the stack parameter RunnerApiTokenParameterName, env GITLAB_RUNNER_TOKEN_PARAMETER, is empty): to run jobs on EC2 set RunnerApiTokenParameterName (an SSM SecureString with a GitLab token with the create_runner and manage_runner scopes), GitLabUrl and SubnetIds; otherwise route the job to LAMBDA (a mapping item, or DefaultExecutor LAMBDA)";

/// How LAMBDA jobs get their runner token: `per-job` (default) or `shared-token` (the stack
/// parameter ShellRunnerMode).
pub const SHELL_RUNNER_MODE: &str = "SHELL_RUNNER_MODE";

pub fn shell_runner_mode(
    get: impl Fn(&str) -> Option<String>,
) -> Result<ShellRunnerMode, ConfigError> {
    let Some(text) = Env(get).value(SHELL_RUNNER_MODE) else {
        return Ok(ShellRunnerMode::default());
    };
    // The stack parameter's third value: the stack has no shell runner of its own; a LAMBDA
    // route to another function still gets a runner of its own.
    if text == "off" {
        return Ok(ShellRunnerMode::PerJob);
    }
    serde_json::from_value(serde_json::Value::String(text.clone())).map_err(|_| {
        ConfigError(format!(
            "{SHELL_RUNNER_MODE}=`{text}`: use per-job or shared-token (the stack parameter ShellRunnerMode)"
        ))
    })
}

pub fn shell_runner_mode_from_env() -> Result<ShellRunnerMode, ConfigError> {
    shell_runner_mode(|k| std::env::var(k).ok())
}

#[derive(Debug, Clone)]
pub struct FleetConfig {
    pub settings: FleetSettings,
    pub jobs_table_name: String,
    pub runners_table_name: String,
    /// The reaper's lease (one pass at a time); only the reaper needs it.
    pub leases_table_name: Option<String>,
    pub gitlab_api_token_parameter: String,
    /// The `read_api` token (`GitLabApiTokenParameterName`, env `GITLAB_API_TOKEN_PARAMETER`):
    /// the teardown step reads the job from GitLab with it before it destroys anything. The
    /// runner-management token above cannot read jobs. `None`: no finished hook is trusted,
    /// nothing is torn down on a hook's word (the reaper removes runners whose job is over).
    pub gitlab_read_token_parameter: Option<String>,
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
    /// `None`: no cap on runner instances (both caps unset or 0).
    pub slots: Option<SlotsConfig>,
}

/// The caps on runner instances and the table that counts them (`MAX_RUNNER_INSTANCES`,
/// `MAX_RUNNER_INSTANCES_PER_PROJECT`, `SLOTS_TABLE_NAME`). Public for the reconciler, which
/// counts free slots in the same table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotsConfig {
    pub table: String,
    pub caps: SlotCaps,
}

impl SlotsConfig {
    /// `None` when neither cap is set (absent, empty or 0): instances are not counted.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Option<Self>, ConfigError> {
        Self::read(&Env(get))
    }

    fn read<G: Fn(&str) -> Option<String>>(env: &Env<G>) -> Result<Option<Self>, ConfigError> {
        let cap = |name: &str, parameter: &str| -> Result<u32, ConfigError> {
            match env.value(name) {
                None => Ok(0),
                Some(v) => v.parse().map_err(|_| {
                    ConfigError(format!(
                        "{name}=`{v}` is not a whole number of instances (the stack parameter {parameter}; 0 is no cap)"
                    ))
                }),
            }
        };
        let caps = SlotCaps::from_values(
            cap("MAX_RUNNER_INSTANCES", "MaxRunnerInstances")?,
            cap(
                "MAX_RUNNER_INSTANCES_PER_PROJECT",
                "MaxRunnerInstancesPerProject",
            )?,
        );
        if !caps.is_capped() {
            return Ok(None);
        }
        let table = env.required(
            "SLOTS_TABLE_NAME",
            "the table that counts runner instances against MAX_RUNNER_INSTANCES and MAX_RUNNER_INSTANCES_PER_PROJECT: the template's SlotsTable",
        )?;
        Ok(Some(Self { table, caps }))
    }
}

#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(pub String);

impl From<EnvError> for ConfigError {
    fn from(e: EnvError) -> Self {
        Self(e.0)
    }
}

impl FleetSetup {
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// EC2 runners are configured when the runner token parameter is set; from then on every
    /// other EC2 setting they need is required, and a missing one is an error that names it.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let env = Env(get);
        if env.value("GITLAB_RUNNER_TOKEN_PARAMETER").is_some() {
            return Ok(Self::Ec2(Box::new(FleetConfig::read(&env)?)));
        }
        if env.value("GITLAB_REGISTRATION_TOKEN_PARAMETER").is_some() {
            return Err(ConfigError(
                "GITLAB_REGISTRATION_TOKEN_PARAMETER (RegistrationTokenParameterName) is set but GITLAB_RUNNER_TOKEN_PARAMETER (RunnerApiTokenParameterName) is not: EC2 runners also need the runner API token, to delete runners and ask whether they are busy; set RunnerApiTokenParameterName, or clear RegistrationTokenParameterName for a stack without EC2 runners".into(),
            ));
        }
        Ok(Self::NotConfigured)
    }
}

impl FleetConfig {
    /// The configuration of a stack with EC2 runners; without them (no runner token
    /// parameter) an error that says what to set. See [`FleetSetup`] for both.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        match FleetSetup::from_lookup(get)? {
            FleetSetup::Ec2(config) => Ok(*config),
            FleetSetup::NotConfigured => Err(ConfigError(NOT_CONFIGURED.into())),
        }
    }

    /// The reaper's lease table, which the reaper cannot run without.
    pub fn leases_table(&self) -> Result<&str, ConfigError> {
        self.leases_table_name.as_deref().ok_or_else(|| {
            ConfigError(
                "LEASES_TABLE_NAME is not set (the table of the reaper's lease, which keeps its passes from overlapping: the template's LeasesTable)".into(),
            )
        })
    }

    fn read<G: Fn(&str) -> Option<String>>(env: &Env<G>) -> Result<Self, ConfigError> {
        let max_job_timeout = env.seconds("MAX_JOB_TIMEOUT_SECONDS", 0)?;
        Ok(Self {
            settings: settings(env)?,
            jobs_table_name: env.required("JOBS_TABLE_NAME", "the jobs table")?,
            runners_table_name: env.required("RUNNERS_TABLE_NAME", "the runner registry table")?,
            leases_table_name: env.value("LEASES_TABLE_NAME"),
            gitlab_api_token_parameter: env.required(
                "GITLAB_RUNNER_TOKEN_PARAMETER",
                "the SSM SecureString holding a GitLab token with the create_runner and manage_runner scopes (or api)",
            )?,
            gitlab_read_token_parameter: env.value("GITLAB_API_TOKEN_PARAMETER"),
            registration_token_parameter: env.value("GITLAB_REGISTRATION_TOKEN_PARAMETER"),
            runner_scope: runner_scope(env)?,
            security_group_ids: env.list("SECURITY_GROUP_IDS"),
            instance_profile_arn: env.value("INSTANCE_PROFILE_ARN"),
            instance_arn_prefix: env.required(
                "INSTANCE_ARN_PREFIX",
                "arn:<partition>:ec2:<region>:<account>:instance/",
            )?,
            max_job_timeout_seconds: (max_job_timeout > 0).then_some(max_job_timeout),
            slots: SlotsConfig::read(env)?,
        })
    }
}

fn runner_scope<G: Fn(&str) -> Option<String>>(env: &Env<G>) -> Result<ScopeSetting, ConfigError> {
    Ok(
        match env.value("RUNNER_SCOPE").as_deref().unwrap_or("project") {
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
        },
    )
}

fn settings<G: Fn(&str) -> Option<String>>(env: &Env<G>) -> Result<FleetSettings, ConfigError> {
    let wait_timeout_seconds = env.seconds("RUNNER_WAIT_TIMEOUT_SECONDS", 600)?;
    let max_lifetime_seconds = env.seconds("MAX_INSTANCE_LIFETIME_SECONDS", 4 * 3600)?;
    let gitlab_url = env.required(
        "GITLAB_URL",
        "EC2 runners are configured (GITLAB_RUNNER_TOKEN_PARAMETER is set) and register with GitLab: set the stack parameter GitLabUrl to the GitLab base URL, e.g. https://gitlab.example.com",
    )?;
    Ok(FleetSettings {
        defaults: defaults(env)?,
        user_data_template: USER_DATA_TEMPLATE.to_owned(),
        gitlab_url: gitlab_url.trim_end_matches('/').to_owned(),
        token_parameter_prefix: env
            .required(
                "TOKEN_PARAMETER_PREFIX",
                "the SSM path under which runner tokens are put, e.g. /ephemeral-runners/<stack>/runner-tokens",
            )?
            .trim_end_matches('/')
            .to_owned(),
        wait_timeout_seconds,
        region: env.required("AWS_REGION", "set by Lambda")?,
        runner: runner_release(env)?,
        cache_bucket: env.value(ephemeral_core::cache::BUCKET_ENV),
        reaper: ReaperSettings {
            max_lifetime_ms: max_lifetime_seconds * 1000,
            // Boot, token pick-up and the runner's own wait for a job.
            idle_grace_ms: (wait_timeout_seconds + env.seconds("RUNNER_BOOT_GRACE_SECONDS", 300)?)
                * 1000,
        },
        orphan_grace_ms: env.seconds("ORPHAN_GRACE_SECONDS", 600)? * 1000,
    })
}

fn defaults<G: Fn(&str) -> Option<String>>(env: &Env<G>) -> Result<Ec2Defaults, ConfigError> {
    let stack = env.required("STACK_NAME", "the stack's name: the managed-by tag value")?;
    let ami_parameter_prefix = ami_parameter_prefix(env, &stack)?;
    let ami = AmiRef::parse(&env.value("DEFAULT_AMI").unwrap_or_else(|| {
        "ssm:/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-arm64".into()
    }))
    .map_err(|e| ConfigError(format!("DEFAULT_AMI: {e}")))?;
    check_ami_readable(
        &ami,
        &ami_parameter_prefix,
        "the stack parameter DefaultAmi (DEFAULT_AMI)",
    )
    .map_err(|e| ConfigError(e.to_string()))?;
    let mut cost_tags = Vec::new();
    for pair in env.list("COST_TAGS") {
        let (k, v) = pair.split_once('=').ok_or_else(|| {
            ConfigError(format!(
                "COST_TAGS: `{pair}` is not key=value (comma-separated)"
            ))
        })?;
        cost_tags.push((k.trim().to_owned(), v.trim().to_owned()));
    }
    Ok(Ec2Defaults {
        instance_type: env
            .value("DEFAULT_INSTANCE_TYPE")
            .unwrap_or_else(|| "t4g.medium".into()),
        ami,
        market: env.choice(
            "DEFAULT_MARKET",
            "spot",
            &[("spot", Market::Spot), ("on-demand", Market::OnDemand)],
        )?,
        subnets: env.list("SUBNET_IDS"),
        executor: env.choice(
            "DEFAULT_RUNNER_EXECUTOR",
            "docker",
            &[
                ("docker", RunnerExecutor::Docker),
                ("shell", RunnerExecutor::Shell),
            ],
        )?,
        docker_image: docker_image(env)?,
        stack,
        cost_tags,
        ami_parameter_prefix,
    })
}

/// `GITLAB_RUNNER_VERSION` and `GITLAB_RUNNER_SHA256`: the gitlab-runner release instances
/// run. The template sets both for the provision function; the teardown and reaper functions
/// render no user-data and get [`DEFAULT_RUNNER_VERSION`].
fn runner_release<G: Fn(&str) -> Option<String>>(
    env: &Env<G>,
) -> Result<RunnerRelease, ConfigError> {
    let version = env
        .value("GITLAB_RUNNER_VERSION")
        .unwrap_or_else(|| DEFAULT_RUNNER_VERSION.into());
    let pins = env.value("GITLAB_RUNNER_SHA256").unwrap_or_default();
    RunnerRelease::new(&version, &pins).map_err(|e| {
        let (name, parameter) = match e {
            RunnerReleaseError::Version(_) => ("GITLAB_RUNNER_VERSION", "GitLabRunnerVersion"),
            RunnerReleaseError::Sha256(_) => ("GITLAB_RUNNER_SHA256", "GitLabRunnerSha256"),
        };
        ConfigError(format!("{name}: {e} (the stack parameter {parameter})"))
    })
}

/// `DEFAULT_DOCKER_IMAGE` (the stack parameter DefaultDockerImage), checked as a mapping
/// item's `image` is.
fn docker_image<G: Fn(&str) -> Option<String>>(env: &Env<G>) -> Result<String, ConfigError> {
    let image = env
        .value("DEFAULT_DOCKER_IMAGE")
        .unwrap_or_else(|| ephemeral_core::ec2::DEFAULT_DOCKER_IMAGE.to_owned());
    ephemeral_core::mapping::check_image(&image).map_err(|e| {
        ConfigError(format!(
            "DEFAULT_DOCKER_IMAGE: {} (the stack parameter DefaultDockerImage)",
            e.problem
        ))
    })?;
    Ok(image)
}

/// `AMI_PARAMETER_PREFIX` (the template resolves an empty `AmiParameterPrefix` to the stack's
/// default), always ending with `/` so that `/amis/` never admits `/amis-old/`.
fn ami_parameter_prefix<G: Fn(&str) -> Option<String>>(
    env: &Env<G>,
    stack: &str,
) -> Result<String, ConfigError> {
    let Some(prefix) = env.value("AMI_PARAMETER_PREFIX") else {
        return Ok(default_ami_parameter_prefix(stack));
    };
    if !prefix.starts_with('/') || prefix == "/" {
        return Err(ConfigError(format!(
            "AMI_PARAMETER_PREFIX=`{prefix}`: an SSM path such as /ephemeral-runners/{stack}/amis/ (the stack parameter AmiParameterPrefix)"
        )));
    }
    Ok(format!("{}/", prefix.trim_end_matches('/')))
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

    /// What the template gives the functions of a stack without EC2 settings
    /// (RunnerApiTokenParameterName, GitLabUrl, SubnetIds empty: `!Ref` of "" is "").
    fn lambda_only<'a>(extra: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        const EMPTY: [&str; 4] = [
            "GITLAB_URL",
            "GITLAB_RUNNER_TOKEN_PARAMETER",
            "GITLAB_REGISTRATION_TOKEN_PARAMETER",
            "SUBNET_IDS",
        ];
        let vars = env(extra);
        move |k| {
            let overridden = extra.iter().any(|(e, _)| *e == k);
            if EMPTY.contains(&k) && !overridden {
                Some(String::new())
            } else {
                vars(k)
            }
        }
    }

    #[test]
    fn no_runner_token_parameter_means_ec2_is_not_configured() {
        assert!(matches!(
            FleetSetup::from_lookup(lambda_only(&[])).unwrap(),
            FleetSetup::NotConfigured
        ));
        // Unconfigured, the other EC2 settings are not read: nothing in them can fail a start.
        let odd = lambda_only(&[("DEFAULT_MARKET", "cheap"), ("STACK_NAME", "")]);
        assert!(matches!(
            FleetSetup::from_lookup(odd).unwrap(),
            FleetSetup::NotConfigured
        ));
        // Callers that need EC2 hear what to set.
        let e = FleetConfig::from_lookup(lambda_only(&[]))
            .unwrap_err()
            .to_string();
        for name in ["RunnerApiTokenParameterName", "GitLabUrl", "SubnetIds"] {
            assert!(e.contains(name), "{e}");
        }
        // A configured stack is one.
        assert!(matches!(
            FleetSetup::from_lookup(env(&[])).unwrap(),
            FleetSetup::Ec2(_)
        ));
    }

    #[test]
    fn a_partial_ec2_configuration_is_an_error_that_names_what_is_missing() {
        let e = FleetSetup::from_lookup(env(&[("GITLAB_URL", "")])).unwrap_err();
        assert!(e.to_string().contains("GITLAB_URL is not set"), "{e}");
        assert!(e.to_string().contains("GitLabUrl"), "{e}");
        let e = FleetSetup::from_lookup(lambda_only(&[(
            "GITLAB_REGISTRATION_TOKEN_PARAMETER",
            "/er/ci/registration-token",
        )]))
        .unwrap_err();
        assert!(e.to_string().contains("RunnerApiTokenParameterName"), "{e}");
    }

    #[test]
    fn the_default_ami_must_be_readable_by_the_provision_role() {
        // Default prefix: /ephemeral-runners/<stack>/amis/.
        let c = FleetConfig::from_lookup(env(&[(
            "DEFAULT_AMI",
            "ssm:/ephemeral-runners/ci/amis/builder",
        )]))
        .unwrap();
        assert_eq!(
            c.settings.defaults.ami_parameter_prefix,
            "/ephemeral-runners/ci/amis/"
        );
        let e = FleetConfig::from_lookup(env(&[("DEFAULT_AMI", "ssm:/golden/ami")]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("DefaultAmi (DEFAULT_AMI) names the AMI parameter `/golden/ami`"),
            "{e}"
        );
        assert!(e.contains("under `/ephemeral-runners/ci/amis/`"), "{e}");
        // An own prefix (AmiParameterPrefix), with or without the trailing slash.
        for prefix in ["/golden", "/golden/"] {
            let c = FleetConfig::from_lookup(env(&[
                ("DEFAULT_AMI", "ssm:/golden/ami"),
                ("AMI_PARAMETER_PREFIX", prefix),
            ]))
            .unwrap();
            assert_eq!(c.settings.defaults.ami_parameter_prefix, "/golden/");
        }
        let e = FleetConfig::from_lookup(env(&[("AMI_PARAMETER_PREFIX", "golden")])).unwrap_err();
        assert!(
            e.to_string().contains("AMI_PARAMETER_PREFIX=`golden`"),
            "{e}"
        );
        // An AMI id needs no parameter.
        FleetConfig::from_lookup(env(&[("DEFAULT_AMI", "ami-0123abcd")])).unwrap();
    }

    #[test]
    fn caps_are_off_unless_set_and_then_need_their_table() {
        let c = FleetConfig::from_lookup(env(&[])).unwrap();
        assert_eq!(
            c.slots, None,
            "no variable: no cap (what older tests and stacks set)"
        );
        let c = FleetConfig::from_lookup(env(&[
            ("MAX_RUNNER_INSTANCES", "0"),
            ("MAX_RUNNER_INSTANCES_PER_PROJECT", ""),
        ]))
        .unwrap();
        assert_eq!(c.slots, None, "0 is no cap");
        let c = FleetConfig::from_lookup(env(&[
            ("MAX_RUNNER_INSTANCES", "20"),
            ("MAX_RUNNER_INSTANCES_PER_PROJECT", "3"),
            ("SLOTS_TABLE_NAME", "slots"),
        ]))
        .unwrap();
        let slots = c.slots.unwrap();
        assert_eq!(slots.table, "slots");
        assert_eq!(slots.caps, SlotCaps::from_values(20, 3));
        let e = FleetConfig::from_lookup(env(&[("MAX_RUNNER_INSTANCES", "5")])).unwrap_err();
        assert!(e.to_string().contains("SLOTS_TABLE_NAME is not set"), "{e}");
        let e = FleetConfig::from_lookup(env(&[("MAX_RUNNER_INSTANCES", "many")])).unwrap_err();
        assert!(e.to_string().contains("MaxRunnerInstances"), "{e}");
    }

    #[test]
    fn the_shell_runner_mode_is_per_job_unless_the_shared_token_is_asked_for() {
        let mode = |v: Option<&str>| {
            shell_runner_mode(|k| {
                (k == SHELL_RUNNER_MODE)
                    .then(|| v.map(str::to_owned))
                    .flatten()
            })
        };
        assert_eq!(mode(None).unwrap(), ShellRunnerMode::PerJob);
        assert_eq!(mode(Some("per-job")).unwrap(), ShellRunnerMode::PerJob);
        assert_eq!(mode(Some("off")).unwrap(), ShellRunnerMode::PerJob);
        assert_eq!(
            mode(Some("shared-token")).unwrap(),
            ShellRunnerMode::SharedToken
        );
        let wrong = mode(Some("shared")).unwrap_err().to_string();
        assert!(
            wrong.contains("SHELL_RUNNER_MODE=`shared`") && wrong.contains("ShellRunnerMode"),
            "{wrong}"
        );
    }

    #[test]
    fn the_runner_release_is_read_and_a_malformed_one_names_its_parameter() {
        let c = FleetConfig::from_lookup(env(&[])).unwrap();
        assert_eq!(c.settings.runner, RunnerRelease::default());
        let sha = "ab".repeat(32);
        let c = FleetConfig::from_lookup(env(&[
            ("GITLAB_RUNNER_VERSION", "v17.11.3"),
            ("GITLAB_RUNNER_SHA256", &format!("arm64={sha}")),
        ]))
        .unwrap();
        assert_eq!(c.settings.runner.version(), "v17.11.3");
        assert_eq!(c.settings.runner.sha256("arm64"), Some(sha.as_str()));
        assert_eq!(c.settings.runner.sha256("amd64"), None);
        let e = FleetConfig::from_lookup(env(&[("GITLAB_RUNNER_VERSION", "latest")]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("GITLAB_RUNNER_VERSION: `latest`") && e.contains("GitLabRunnerVersion"),
            "{e}"
        );
        let e = FleetConfig::from_lookup(env(&[("GITLAB_RUNNER_SHA256", "abc")]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("GITLAB_RUNNER_SHA256: `abc`") && e.contains("GitLabRunnerSha256"),
            "{e}"
        );
    }

    /// The provision function renders the user-data: the template gives it the release, and
    /// the parameter's default is the one the other functions fall back to.
    #[test]
    fn the_template_gives_the_provision_function_the_runner_release() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../template.yaml");
        let template = std::fs::read_to_string(path).unwrap();
        // The lines of a parameter or resource, up to the next one.
        let section = |start: &str| -> String {
            let at = template
                .find(start)
                .unwrap_or_else(|| panic!("{start:?} in template.yaml"));
            template[at + start.len()..]
                .lines()
                .take_while(|l| l.is_empty() || l.starts_with("   "))
                .map(|l| format!("{l}\n"))
                .collect()
        };
        let provision = section("\n  Ec2ProvisionFunction:\n");
        assert!(
            provision.contains("GITLAB_RUNNER_VERSION: !Ref GitLabRunnerVersion\n")
                && provision.contains("GITLAB_RUNNER_SHA256: !Ref GitLabRunnerSha256\n"),
            "{provision}"
        );
        // The job cache's bucket, empty when the stack has none (RunnerCache off).
        assert!(
            provision.contains(&format!(
                "{}: !If [HasCache, !Ref CacheBucket, \"\"]\n",
                ephemeral_core::cache::BUCKET_ENV
            )),
            "{provision}"
        );
        let c =
            FleetConfig::from_lookup(env(&[(ephemeral_core::cache::BUCKET_ENV, "b-1")])).unwrap();
        assert_eq!(c.settings.cache_bucket.as_deref(), Some("b-1"));
        let c = FleetConfig::from_lookup(env(&[(ephemeral_core::cache::BUCKET_ENV, "")])).unwrap();
        assert_eq!(c.settings.cache_bucket, None);
        let version = section("\n  GitLabRunnerVersion:\n");
        assert!(
            version.contains(&format!("Default: {DEFAULT_RUNNER_VERSION}\n")),
            "{version}"
        );
        assert!(
            section("\n  GitLabRunnerSha256:\n").contains("Default: \"\"\n"),
            "GitLabRunnerSha256 defaults to empty (not pinned)"
        );
    }

    #[test]
    fn the_reaper_needs_its_lease_table() {
        let c = FleetConfig::from_lookup(env(&[])).unwrap();
        let e = c.leases_table().unwrap_err();
        assert!(e.to_string().contains("LEASES_TABLE_NAME"), "{e}");
        let c = FleetConfig::from_lookup(env(&[("LEASES_TABLE_NAME", "leases")])).unwrap();
        assert_eq!(c.leases_table().unwrap(), "leases");
    }

    /// The teardown step confirms finished hooks with a `read_api` token: the template gives
    /// the teardown function that parameter's name and the right to read it (and only it).
    #[test]
    fn the_template_gives_the_teardown_function_the_read_api_token() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../template.yaml");
        let template = std::fs::read_to_string(path).unwrap();
        let start = template
            .find("\n  Ec2TeardownFunction:\n")
            .expect("Ec2TeardownFunction in template.yaml");
        let rest = &template[start + 1..];
        let end = rest[2..]
            .find("\n  Ec2TeardownFunctionLogGroup:")
            .or_else(|| rest[2..].find("\n  ReaperFunction:"))
            .expect("the resource after Ec2TeardownFunction");
        let teardown = &rest[..end + 2];
        assert!(
            teardown.contains("GITLAB_API_TOKEN_PARAMETER: !Ref GitLabApiTokenParameterName"),
            "{teardown}"
        );
        assert!(teardown.contains("Sid: ReadGitLabApiToken"), "{teardown}");
        assert!(
            teardown.contains("parameter${GitLabApiTokenParameterName}"),
            "{teardown}"
        );
        // Decrypting it (a customer KMS key) is DecryptTokensViaSsm's, for every token.
        assert!(teardown.contains("Sid: DecryptTokensViaSsm"), "{teardown}");
        let c = FleetConfig::from_lookup(env(&[("GITLAB_API_TOKEN_PARAMETER", "/er/read-api")]))
            .unwrap();
        assert_eq!(
            c.gitlab_read_token_parameter.as_deref(),
            Some("/er/read-api")
        );
        let c = FleetConfig::from_lookup(env(&[("GITLAB_API_TOKEN_PARAMETER", "")])).unwrap();
        assert_eq!(c.gitlab_read_token_parameter, None);
    }
}
