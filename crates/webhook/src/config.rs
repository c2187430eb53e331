//! Configuration read once at cold start from the function's environment (set by the SAM
//! template). Every error names the variable and what to put in it. The variables are named
//! once, in [`var`]; the webhook and the intake drainer read the ones they share by the same
//! names, and a test checks that the template sets exactly these.

use ephemeral_core::auth::AuthMode;
use ephemeral_core::env::{Env, EnvError};
use ephemeral_core::webhook::{DedupSettings, WebhookPolicy};

/// The environment variables the template sets on the webhook and the intake drainer.
pub mod var {
    pub const EVENT_BUS_NAME: &str = "EVENT_BUS_NAME";
    pub const DEDUP_TABLE_NAME: &str = "DEDUP_TABLE_NAME";
    pub const DEDUP_TTL_SECONDS: &str = "DEDUP_TTL_SECONDS";
    pub const FALLBACK_QUEUE_URL: &str = "FALLBACK_QUEUE_URL";
    pub const SECRET_TOKEN_PARAMETER: &str = "SECRET_TOKEN_PARAMETER";
    pub const SIGNING_TOKEN_PARAMETER: &str = "SIGNING_TOKEN_PARAMETER";
    pub const AUTH_MODE: &str = "AUTH_MODE";
    pub const MAX_BODY_BYTES: &str = "MAX_BODY_BYTES";
    pub const DEAD_LETTER_BODY_BYTES: &str = "DEAD_LETTER_BODY_BYTES";
    pub const SIGNATURE_TOLERANCE_SECONDS: &str = "SIGNATURE_TOLERANCE_SECONDS";
    pub const SECRETS_TTL_SECONDS: &str = "SECRETS_TTL_SECONDS";
}

#[derive(Debug, Clone)]
pub struct WebhookConfig {
    pub event_bus_name: String,
    pub dedup_table_name: String,
    /// Where authentic hooks go when the table or the bus fails.
    pub fallback_queue_url: String,
    pub secret_token_parameter: Option<String>,
    pub signing_token_parameter: Option<String>,
    pub secrets_ttl_seconds: u64,
    pub policy: WebhookPolicy,
    pub dedup: DedupSettings,
}

/// The intake drainer's: the same table and bus as the webhook's, under the same names.
#[derive(Debug, Clone)]
pub struct DrainerConfig {
    pub event_bus_name: String,
    pub dedup_table_name: String,
    pub dedup: DedupSettings,
}

#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(String);

impl From<EnvError> for ConfigError {
    fn from(e: EnvError) -> Self {
        Self(e.0)
    }
}

/// What the webhook and the intake drainer both read, under the same names.
trait SharedVars {
    fn bus(&self) -> Result<String, ConfigError>;
    fn table(&self) -> Result<String, ConfigError>;
    fn dedup(&self) -> Result<DedupSettings, ConfigError>;
}

impl<G: Fn(&str) -> Option<String>> SharedVars for Env<G> {
    fn bus(&self) -> Result<String, ConfigError> {
        Ok(self.required(var::EVENT_BUS_NAME, "the EventBridge bus job events go to")?)
    }

    fn table(&self) -> Result<String, ConfigError> {
        Ok(self.required(var::DEDUP_TABLE_NAME, "the DynamoDB table of deliveries")?)
    }

    fn dedup(&self) -> Result<DedupSettings, ConfigError> {
        let defaults = DedupSettings::default();
        Ok(DedupSettings {
            ttl_seconds: self.number(var::DEDUP_TTL_SECONDS, defaults.ttl_seconds)?,
            lease_ms: defaults.lease_ms,
        })
    }
}

impl WebhookConfig {
    /// Every variable the webhook reads.
    pub const VARIABLES: &[&str] = &[
        var::EVENT_BUS_NAME,
        var::DEDUP_TABLE_NAME,
        var::FALLBACK_QUEUE_URL,
        var::SECRET_TOKEN_PARAMETER,
        var::SIGNING_TOKEN_PARAMETER,
        var::AUTH_MODE,
        var::MAX_BODY_BYTES,
        var::DEAD_LETTER_BODY_BYTES,
        var::SIGNATURE_TOLERANCE_SECONDS,
        var::SECRETS_TTL_SECONDS,
        var::DEDUP_TTL_SECONDS,
    ];

    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Same as [`Self::from_env`] over any lookup, so tests need not touch the process env.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let env = Env(get);
        let defaults = WebhookPolicy::default();
        let auth_mode: AuthMode = match env.value(var::AUTH_MODE) {
            None => defaults.auth_mode,
            Some(v) => v
                .parse()
                .map_err(|e| ConfigError(format!("{}: {e}", var::AUTH_MODE)))?,
        };
        let secret_token_parameter = env.value(var::SECRET_TOKEN_PARAMETER);
        let signing_token_parameter = env.value(var::SIGNING_TOKEN_PARAMETER);
        check_secret_parameters(
            auth_mode,
            secret_token_parameter.is_some(),
            signing_token_parameter.is_some(),
        )?;
        let size = |name: &str, default: usize| -> Result<usize, ConfigError> {
            let n = env.number(name, default as u64)?;
            Ok(usize::try_from(n).unwrap_or(usize::MAX))
        };
        Ok(Self {
            event_bus_name: env.bus()?,
            dedup_table_name: env.table()?,
            fallback_queue_url: env.required(
                var::FALLBACK_QUEUE_URL,
                "the URL of the SQS queue that keeps hooks while the table or the bus fails",
            )?,
            secret_token_parameter,
            signing_token_parameter,
            secrets_ttl_seconds: env.number(var::SECRETS_TTL_SECONDS, 300)?,
            policy: WebhookPolicy {
                auth_mode,
                signature_tolerance_seconds: env.number(
                    var::SIGNATURE_TOLERANCE_SECONDS,
                    defaults.signature_tolerance_seconds,
                )?,
                max_body_bytes: size(var::MAX_BODY_BYTES, defaults.max_body_bytes)?,
                dead_letter_body_bytes: size(
                    var::DEAD_LETTER_BODY_BYTES,
                    defaults.dead_letter_body_bytes,
                )?,
            },
            dedup: env.dedup()?,
        })
    }
}

fn check_secret_parameters(
    auth_mode: AuthMode,
    has_token: bool,
    has_signing: bool,
) -> Result<(), ConfigError> {
    if auth_mode.needs_tokens() && !has_token {
        return Err(ConfigError(format!(
            "AUTH_MODE={auth_mode:?} needs {} (the SSM parameter holding the X-Gitlab-Token secret)",
            var::SECRET_TOKEN_PARAMETER
        )));
    }
    if auth_mode.needs_signing_keys() && !has_signing {
        return Err(ConfigError(format!(
            "AUTH_MODE={auth_mode:?} needs {} (the SSM parameter holding the whsec_ signing token)",
            var::SIGNING_TOKEN_PARAMETER
        )));
    }
    if !has_token && !has_signing {
        return Err(ConfigError(format!(
            "set {}, {}, or both",
            var::SECRET_TOKEN_PARAMETER,
            var::SIGNING_TOKEN_PARAMETER
        )));
    }
    Ok(())
}

impl DrainerConfig {
    /// Every variable the intake drainer reads.
    pub const VARIABLES: &[&str] = &[
        var::EVENT_BUS_NAME,
        var::DEDUP_TABLE_NAME,
        var::DEDUP_TTL_SECONDS,
    ];

    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let env = Env(get);
        Ok(Self {
            event_bus_name: env.bus()?,
            dedup_table_name: env.table()?,
            dedup: env.dedup()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeSet, HashMap};

    fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    fn config(pairs: &[(&str, &str)]) -> Result<WebhookConfig, ConfigError> {
        WebhookConfig::from_lookup(lookup(pairs))
    }

    const BASE: [(&str, &str); 3] = [
        ("EVENT_BUS_NAME", "bus"),
        ("DEDUP_TABLE_NAME", "t"),
        (
            "FALLBACK_QUEUE_URL",
            "https://sqs.us-east-1.amazonaws.com/1/q",
        ),
    ];

    #[test]
    fn errors_name_the_variable() {
        let err = config(&[("EVENT_BUS_NAME", "bus")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("SECRET_TOKEN_PARAMETER"), "{err}");
        let mut pairs = BASE.to_vec();
        pairs.extend([("AUTH_MODE", "both"), ("SECRET_TOKEN_PARAMETER", "/p")]);
        let err = config(&pairs).unwrap_err().to_string();
        assert!(err.contains("SIGNING_TOKEN_PARAMETER"), "{err}");
        pairs.push(("MAX_BODY_BYTES", "1MB"));
        pairs.push(("SIGNING_TOKEN_PARAMETER", "/s"));
        let err = config(&pairs).unwrap_err().to_string();
        assert!(err.contains("MAX_BODY_BYTES=`1MB`"), "{err}");
    }

    #[test]
    fn the_fallback_queue_is_required() {
        let err = config(&[
            ("EVENT_BUS_NAME", "bus"),
            ("DEDUP_TABLE_NAME", "t"),
            ("SECRET_TOKEN_PARAMETER", "/p"),
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("FALLBACK_QUEUE_URL is not set"), "{err}");
    }

    #[test]
    fn defaults_apply() {
        let mut pairs = BASE.to_vec();
        pairs.push(("SECRET_TOKEN_PARAMETER", "/p"));
        let c = config(&pairs).unwrap();
        assert_eq!(c.policy.auth_mode, AuthMode::Either);
        assert_eq!(c.policy.max_body_bytes, 1024 * 1024);
        assert_eq!(c.secrets_ttl_seconds, 300);
        assert_eq!(c.fallback_queue_url, BASE[2].1);
    }

    #[test]
    fn the_drainer_reads_the_webhooks_names() {
        let c = DrainerConfig::from_lookup(lookup(&[
            ("EVENT_BUS_NAME", "bus"),
            ("DEDUP_TABLE_NAME", "t"),
            ("DEDUP_TTL_SECONDS", "60"),
        ]))
        .unwrap();
        assert_eq!(
            (c.event_bus_name.as_str(), c.dedup.ttl_seconds),
            ("bus", 60)
        );
        let err = DrainerConfig::from_lookup(lookup(&[("EVENT_BUS_NAME", "bus")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("DEDUP_TABLE_NAME is not set"), "{err}");
        for name in DrainerConfig::VARIABLES {
            assert!(WebhookConfig::VARIABLES.contains(name), "{name}");
        }
    }

    /// The environment template.yaml gives a function: its variable names.
    fn template_variables(function: &str) -> BTreeSet<String> {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../template.yaml");
        let text = std::fs::read_to_string(path).unwrap();
        let template: serde_norway::Value = serde_norway::from_str(&text).unwrap();
        let variables = &template["Resources"][function]["Properties"]["Environment"]["Variables"];
        variables
            .as_mapping()
            .unwrap_or_else(|| panic!("{function} has no Environment.Variables in template.yaml"))
            .keys()
            .map(|k| k.as_str().unwrap().to_owned())
            .collect()
    }

    /// A variable the template sets that no config reads is a setting that does nothing; one
    /// a config reads that the template does not set is a default nobody chose.
    #[test]
    fn template_sets_exactly_the_variables_read() {
        for (function, read) in [
            ("WebhookFunction", WebhookConfig::VARIABLES),
            ("IntakeDrainerFunction", DrainerConfig::VARIABLES),
        ] {
            let read: BTreeSet<String> = read.iter().map(|v| v.to_string()).collect();
            assert_eq!(template_variables(function), read, "{function}");
        }
    }
}
