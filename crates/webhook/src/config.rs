//! Configuration read once at cold start from the function's environment (set by the SAM
//! template). Every error names the variable and what to put in it.

use ephemeral_core::auth::AuthMode;
use ephemeral_core::webhook::{DedupSettings, WebhookPolicy};

#[derive(Debug, Clone)]
pub struct WebhookConfig {
    pub event_bus_name: String,
    pub dedup_table_name: String,
    pub secret_token_parameter: Option<String>,
    pub signing_token_parameter: Option<String>,
    pub secrets_ttl_seconds: u64,
    pub policy: WebhookPolicy,
    pub dedup: DedupSettings,
}

#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(String);

impl WebhookConfig {
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Same as [`Self::from_env`] over any lookup, so tests need not touch the process env.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let non_empty = |name: &str| {
            get(name)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let required =
            |name: &str| non_empty(name).ok_or_else(|| ConfigError(format!("{name} is not set")));
        let number = |name: &str, default: u64| -> Result<u64, ConfigError> {
            match non_empty(name) {
                None => Ok(default),
                Some(v) => v
                    .parse()
                    .map_err(|_| ConfigError(format!("{name}=`{v}` is not a whole number"))),
            }
        };

        let defaults = WebhookPolicy::default();
        let auth_mode: AuthMode = match non_empty("AUTH_MODE") {
            None => defaults.auth_mode,
            Some(v) => v
                .parse()
                .map_err(|e| ConfigError(format!("AUTH_MODE: {e}")))?,
        };
        let secret_token_parameter = non_empty("SECRET_TOKEN_PARAMETER");
        let signing_token_parameter = non_empty("SIGNING_TOKEN_PARAMETER");
        if auth_mode.needs_tokens() && secret_token_parameter.is_none() {
            return Err(ConfigError(format!(
                "AUTH_MODE={auth_mode:?} needs SECRET_TOKEN_PARAMETER (the SSM parameter holding the X-Gitlab-Token secret)"
            )));
        }
        if auth_mode.needs_signing_keys() && signing_token_parameter.is_none() {
            return Err(ConfigError(format!(
                "AUTH_MODE={auth_mode:?} needs SIGNING_TOKEN_PARAMETER (the SSM parameter holding the whsec_ signing token)"
            )));
        }
        if secret_token_parameter.is_none() && signing_token_parameter.is_none() {
            return Err(ConfigError(
                "set SECRET_TOKEN_PARAMETER, SIGNING_TOKEN_PARAMETER, or both".into(),
            ));
        }

        let dedup_defaults = DedupSettings::default();
        let max_body_bytes = number("MAX_BODY_BYTES", defaults.max_body_bytes as u64)?;
        let dead_letter_body_bytes = number(
            "DEAD_LETTER_BODY_BYTES",
            defaults.dead_letter_body_bytes as u64,
        )?;
        Ok(Self {
            event_bus_name: required("EVENT_BUS_NAME")?,
            dedup_table_name: required("DEDUP_TABLE_NAME")?,
            secret_token_parameter,
            signing_token_parameter,
            secrets_ttl_seconds: number("SECRETS_TTL_SECONDS", 300)?,
            policy: WebhookPolicy {
                auth_mode,
                signature_tolerance_seconds: number(
                    "SIGNATURE_TOLERANCE_SECONDS",
                    defaults.signature_tolerance_seconds,
                )?,
                max_body_bytes: usize::try_from(max_body_bytes).unwrap_or(usize::MAX),
                dead_letter_body_bytes: usize::try_from(dead_letter_body_bytes)
                    .unwrap_or(usize::MAX),
            },
            dedup: DedupSettings {
                ttl_seconds: number("DEDUP_TTL_SECONDS", dedup_defaults.ttl_seconds)?,
                lease_ms: dedup_defaults.lease_ms,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn config(pairs: &[(&str, &str)]) -> Result<WebhookConfig, ConfigError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        WebhookConfig::from_lookup(|k| map.get(k).cloned())
    }

    const BASE: [(&str, &str); 2] = [("EVENT_BUS_NAME", "bus"), ("DEDUP_TABLE_NAME", "t")];

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
    fn defaults_apply() {
        let mut pairs = BASE.to_vec();
        pairs.push(("SECRET_TOKEN_PARAMETER", "/p"));
        let c = config(&pairs).unwrap();
        assert_eq!(c.policy.auth_mode, AuthMode::Either);
        assert_eq!(c.policy.max_body_bytes, 1024 * 1024);
        assert_eq!(c.secrets_ttl_seconds, 300);
    }
}
