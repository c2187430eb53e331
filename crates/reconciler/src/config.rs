//! The reconciler's configuration, from the environment the template sets. Every problem
//! names the variable and what to put in it.

use ephemeral_core::env::{Env, EnvError};
use ephemeral_core::reconcile::ReconcileSettings;

/// Which jobs the stack serves: the projects and groups whose pending jobs are listed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scopes {
    pub project_ids: Vec<u64>,
    pub group_ids: Vec<u64>,
}

impl Scopes {
    pub fn is_empty(&self) -> bool {
        self.project_ids.is_empty() && self.group_ids.is_empty()
    }
}

#[derive(Debug, Clone)]
pub struct ReconcilerConfig {
    pub gitlab_url: String,
    pub gitlab_api_token_parameter: String,
    /// The runner-management token (create_runner + manage_runner): with it a pass asks
    /// whether a runner whose job still waits is running another job. `None`: not asked.
    pub runner_api_token_parameter: Option<String>,
    pub jobs_table_name: String,
    pub runners_table_name: String,
    /// The table of the `reconciler` lease: one pass at a time.
    pub leases_table_name: String,
    pub provision_state_machine_arn: String,
    /// The teardown workflow: started for jobs GitLab reports finished whose hook was lost.
    pub teardown_state_machine_arn: String,
    /// How long a runner of ours waits for a job after it is created: boot grace plus the
    /// runner's own wait (as the reaper counts it).
    pub runner_waits_ms: u64,
    /// Project runners (RUNNER_SCOPE project) take only their job's project's jobs.
    pub runner_project_scoped: bool,
    /// Empty: the projects the jobs table has seen (within its TTL).
    pub scopes: Scopes,
    pub settings: ReconcileSettings,
    /// GitLab requests one pass may make.
    pub request_budget: u32,
    pub job_ttl_seconds: u64,
    /// The instance caps (the EC2 functions' own variables): `None` without caps.
    pub slots: Option<fleet::SlotsConfig>,
}

#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(pub String);

impl From<EnvError> for ConfigError {
    fn from(e: EnvError) -> Self {
        Self(e.0)
    }
}

impl ReconcilerConfig {
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let env = Env(&get);
        let value = |name: &str| env.value(name);
        let required = |name: &str, what: &str| Ok::<_, ConfigError>(env.required(name, what)?);
        let number = |name: &str, default: u64| Ok::<_, ConfigError>(env.number(name, default)?);
        let ids = |name: &str| -> Result<Vec<u64>, ConfigError> {
            let Some(list) = value(name) else {
                return Ok(Vec::new());
            };
            list.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| {
                    s.parse().map_err(|_| {
                        ConfigError(format!(
                            "{name}: `{s}` is not a numeric GitLab id (comma-separated ids)"
                        ))
                    })
                })
                .collect()
        };
        let defaults = ReconcileSettings::default();
        let settings = ReconcileSettings {
            grace_ms: number("RECONCILE_GRACE_SECONDS", defaults.grace_ms / 1000)? * 1000,
            max_attempts: u32::try_from(number("RECONCILE_MAX_ATTEMPTS", 5)?)
                .ok()
                .filter(|n| *n >= 1)
                .ok_or_else(|| {
                    ConfigError("RECONCILE_MAX_ATTEMPTS must be between 1 and 2^32".into())
                })?,
            attempt_timeout_ms: number(
                "RECONCILE_ATTEMPT_TIMEOUT_SECONDS",
                defaults.attempt_timeout_ms / 1000,
            )? * 1000,
            ..defaults
        };
        Ok(Self {
            gitlab_url: required(
                "GITLAB_URL",
                "the GitLab base URL, e.g. https://gitlab.example.com",
            )?
            .trim_end_matches('/')
            .to_owned(),
            gitlab_api_token_parameter: required(
                "GITLAB_API_TOKEN_PARAMETER",
                "the SSM SecureString with a read_api token: the reconciler lists pending jobs with it",
            )?,
            runner_api_token_parameter: value("GITLAB_RUNNER_TOKEN_PARAMETER"),
            jobs_table_name: required("JOBS_TABLE_NAME", "the jobs table")?,
            runners_table_name: required("RUNNERS_TABLE_NAME", "the runner registry table")?,
            leases_table_name: required(
                "LEASES_TABLE_NAME",
                "the leases table: one reconciler pass at a time",
            )?,
            runner_waits_ms: (number("RUNNER_WAIT_TIMEOUT_SECONDS", 600)?
                + number("RUNNER_BOOT_GRACE_SECONDS", 300)?)
                * 1000,
            runner_project_scoped: value("RUNNER_SCOPE").as_deref().unwrap_or("project")
                == "project",
            provision_state_machine_arn: required(
                "PROVISION_STATE_MACHINE_ARN",
                "the provision workflow",
            )?,
            teardown_state_machine_arn: required(
                "TEARDOWN_STATE_MACHINE_ARN",
                "the teardown workflow: started for jobs GitLab reports finished whose finished hook was lost",
            )?,
            scopes: Scopes {
                project_ids: ids("RECONCILE_PROJECT_IDS")?,
                group_ids: ids("RECONCILE_GROUP_IDS")?,
            },
            settings,
            request_budget: u32::try_from(number("RECONCILE_REQUEST_BUDGET", 200)?)
                .unwrap_or(u32::MAX),
            job_ttl_seconds: number("JOB_TTL_SECONDS", 14 * 24 * 3600)?,
            slots: fleet::SlotsConfig::from_lookup(&get).map_err(|e| ConfigError(e.0))?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(extra: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let mut vars: std::collections::HashMap<String, String> = [
            ("GITLAB_URL", "https://gitlab.example.com/"),
            ("GITLAB_API_TOKEN_PARAMETER", "/er/gitlab/api-token"),
            ("JOBS_TABLE_NAME", "jobs"),
            ("RUNNERS_TABLE_NAME", "runners"),
            ("LEASES_TABLE_NAME", "leases"),
            ("SLOTS_TABLE_NAME", "slots"),
            ("MAX_RUNNER_INSTANCES", "20"),
            ("MAX_RUNNER_INSTANCES_PER_PROJECT", "0"),
            (
                "PROVISION_STATE_MACHINE_ARN",
                "arn:aws:states:us-east-1:123456789012:stateMachine:p",
            ),
            (
                "TEARDOWN_STATE_MACHINE_ARN",
                "arn:aws:states:us-east-1:123456789012:stateMachine:t",
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        for (k, v) in extra {
            vars.insert((*k).to_owned(), (*v).to_owned());
        }
        move |k| vars.get(k).cloned()
    }

    fn template() -> serde_norway::Value {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../template.yaml");
        serde_norway::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    /// The ReconcilerFunction's policy statements.
    fn statements() -> Vec<serde_norway::Value> {
        template()["Resources"]["ReconcilerFunction"]["Properties"]["Policies"][0]["Statement"]
            .as_sequence()
            .unwrap()
            .clone()
    }

    #[test]
    fn defaults_and_scopes_are_read() {
        let c = ReconcilerConfig::from_lookup(env(&[
            ("RECONCILE_PROJECT_IDS", "7, 8"),
            ("RECONCILE_GROUP_IDS", "12"),
            ("RECONCILE_GRACE_SECONDS", "90"),
        ]))
        .unwrap();
        assert_eq!(c.gitlab_url, "https://gitlab.example.com");
        assert_eq!(c.scopes.project_ids, [7, 8]);
        assert_eq!(c.scopes.group_ids, [12]);
        assert_eq!(c.settings.grace_ms, 90_000);
        assert_eq!(c.settings.max_attempts, 5);
        assert_eq!(c.request_budget, 200);
    }

    /// A variable the template sets that the config never asks for does nothing; one the
    /// config asks for that the template does not set is a default nobody chose.
    #[test]
    fn template_sets_exactly_the_variables_read() {
        let asked = std::sync::Mutex::new(std::collections::BTreeSet::new());
        let full = env(&[]);
        ReconcilerConfig::from_lookup(|name| {
            asked.lock().unwrap().insert(name.to_owned());
            full(name)
        })
        .unwrap();
        let template = template();
        let set: std::collections::BTreeSet<String> =
            template["Resources"]["ReconcilerFunction"]["Properties"]["Environment"]["Variables"]
                .as_mapping()
                .expect("ReconcilerFunction's Environment.Variables in template.yaml")
                .keys()
                .map(|k| k.as_str().unwrap().to_owned())
                .collect();
        let mut asked = asked.into_inner().unwrap();
        // Read from the runtime's own environment when present, never set by the template.
        asked.remove("RUNNER_BOOT_GRACE_SECONDS");
        asked.remove("RECONCILE_ATTEMPT_TIMEOUT_SECONDS");
        // Read by the GitLab client when it is built (https unless explicitly allowed).
        asked.insert(ephemeral_gitlab::ALLOW_INSECURE_URL_ENV.to_owned());
        assert_eq!(set, asked);
    }

    /// The template lets the function hold only its own lease.
    #[test]
    fn the_template_grants_exactly_this_lease() {
        let statements = statements();
        let lease = statements
            .iter()
            .find(|s| s["Sid"].as_str() == Some("HoldReconcilerLease"))
            .expect("HoldReconcilerLease statement");
        let keys = &lease["Condition"]["ForAllValues:StringEquals"]["dynamodb:LeadingKeys"];
        assert_eq!(keys[0].as_str(), Some(crate::LEASE_NAME));
        assert_eq!(keys.as_sequence().map(Vec::len), Some(1));
    }

    /// The reconciler reads the drain switch: the template lets it read that item only.
    #[test]
    fn the_template_lets_it_read_the_drain_switch_only() {
        let statements = statements();
        let drain = statements
            .iter()
            .find(|s| s["Sid"].as_str() == Some("ReadDrainSwitch"))
            .expect("ReadDrainSwitch statement");
        assert_eq!(drain["Action"].as_str(), Some("dynamodb:GetItem"));
        let keys = &drain["Condition"]["ForAllValues:StringEquals"]["dynamodb:LeadingKeys"];
        assert_eq!(
            keys[0].as_str(),
            Some(ephemeral_core::jobs_table::DRAIN_KEY)
        );
        assert_eq!(keys.as_sequence().map(Vec::len), Some(1));
    }

    /// The reconciler starts both workflows: the template lets it start exactly those two.
    #[test]
    fn the_template_lets_it_start_the_provision_and_teardown_workflows() {
        let statements = statements();
        let start = statements
            .iter()
            .find(|s| s["Action"].as_str() == Some("states:StartExecution"))
            .expect("a states:StartExecution statement");
        let resources: Vec<String> = start["Resource"]
            .as_sequence()
            .expect("a list of state machines")
            .iter()
            .map(|r| format!("{r:?}"))
            .collect();
        assert_eq!(resources.len(), 2, "{resources:?}");
        assert!(
            resources
                .iter()
                .any(|r| r.contains("ProvisionStateMachine"))
        );
        assert!(resources.iter().any(|r| r.contains("TeardownStateMachine")));
    }

    #[test]
    fn mistakes_name_the_variable() {
        let e = ReconcilerConfig::from_lookup(env(&[("RECONCILE_PROJECT_IDS", "7,mygroup/app")]))
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("RECONCILE_PROJECT_IDS: `mygroup/app`"),
            "{e}"
        );
        let e =
            ReconcilerConfig::from_lookup(env(&[("GITLAB_API_TOKEN_PARAMETER", "")])).unwrap_err();
        assert!(
            e.to_string()
                .contains("GITLAB_API_TOKEN_PARAMETER is not set"),
            "{e}"
        );
        let e = ReconcilerConfig::from_lookup(env(&[("RECONCILE_MAX_ATTEMPTS", "0")])).unwrap_err();
        assert!(e.to_string().contains("RECONCILE_MAX_ATTEMPTS"), "{e}");
    }
}
