//! Webhook secrets read once per cold start and refreshed on a TTL, so that no request pays
//! for a Parameter Store call, and an SSM outage after the first load does not lock GitLab out.

use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};

use crate::auth::WebhookSecrets;
use crate::webhook::PortError;

/// Where the secrets come from (SSM Parameter Store in production).
pub trait SecretSource {
    fn load(&self) -> impl Future<Output = Result<WebhookSecrets, PortError>> + Send;
}

/// The secrets to use for one request, and whether they are past their TTL because a refresh
/// failed (the adapter logs that, once per failed refresh).
#[derive(Debug, Clone)]
pub struct SecretsLookup {
    pub secrets: Arc<WebhookSecrets>,
    pub refresh_error: Option<PortError>,
}

#[derive(Debug)]
struct Loaded {
    secrets: Arc<WebhookSecrets>,
    loaded_at_ms: u64,
    /// After a failed refresh, the next attempt waits until then instead of calling the source
    /// on every request while it is down.
    retry_at_ms: u64,
}

#[derive(Debug)]
pub struct SecretCache<S> {
    source: S,
    ttl_ms: u64,
    retry_ms: u64,
    state: Mutex<Option<Loaded>>,
}

impl<S: SecretSource> SecretCache<S> {
    pub fn new(source: S, ttl_ms: u64) -> Self {
        Self {
            source,
            ttl_ms,
            retry_ms: ttl_ms.clamp(1_000, 30_000),
            state: Mutex::new(None),
        }
    }

    pub fn source(&self) -> &S {
        &self.source
    }

    /// Cached secrets while fresh; otherwise a reload. A failed reload falls back to the last
    /// good secrets (reported in `refresh_error`); with none, it is an error (a 5xx: nothing can be
    /// authenticated, so nothing is kept).
    pub async fn get(&self, now_ms: u64) -> Result<SecretsLookup, PortError> {
        let stale = {
            let state = self.state.lock().expect("secret cache lock");
            match state.as_ref() {
                Some(l) if now_ms.saturating_sub(l.loaded_at_ms) < self.ttl_ms => {
                    return Ok(SecretsLookup {
                        secrets: l.secrets.clone(),
                        refresh_error: None,
                    });
                }
                Some(l) if now_ms < l.retry_at_ms => {
                    return Ok(SecretsLookup {
                        secrets: l.secrets.clone(),
                        refresh_error: None,
                    });
                }
                Some(l) => Some(l.secrets.clone()),
                None => None,
            }
        };
        // Loaded outside the lock: Lambda runs one request at a time per environment, and a
        // rare double load elsewhere is harmless.
        match self.source.load().await {
            Ok(fresh) => {
                let fresh = Arc::new(fresh);
                *self.state.lock().expect("secret cache lock") = Some(Loaded {
                    secrets: fresh.clone(),
                    loaded_at_ms: now_ms,
                    retry_at_ms: 0,
                });
                Ok(SecretsLookup {
                    secrets: fresh,
                    refresh_error: None,
                })
            }
            Err(e) => match stale {
                Some(secrets) => {
                    if let Some(l) = self.state.lock().expect("secret cache lock").as_mut() {
                        l.retry_at_ms = now_ms + self.retry_ms;
                    }
                    Ok(SecretsLookup {
                        secrets,
                        refresh_error: Some(e),
                    })
                }
                None => Err(e),
            },
        }
    }
}

/// A token: GitLab personal/project access token, registration token or runner token. Its
/// `Debug` prints nothing of it, so a token inside a logged struct or error stays hidden.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The clear value, for the one place that must send or store it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::block_on;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    #[derive(Default)]
    struct Flaky {
        calls: AtomicUsize,
        down: AtomicBool,
    }

    impl SecretSource for Flaky {
        async fn load(&self) -> Result<WebhookSecrets, PortError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.down.load(Ordering::SeqCst) {
                return Err(PortError("ssm down".into()));
            }
            Ok(WebhookSecrets {
                tokens: WebhookSecrets::parse_tokens("t").unwrap(),
                signing_keys: vec![],
            })
        }
    }

    #[test]
    fn loads_once_per_ttl_and_survives_an_outage() {
        let cache = SecretCache::new(Flaky::default(), 60_000);
        let calls = || cache.source().calls.load(Ordering::SeqCst);
        block_on(cache.get(0)).unwrap();
        block_on(cache.get(59_999)).unwrap();
        assert_eq!(calls(), 1);

        cache.source().down.store(true, Ordering::SeqCst);
        let stale = block_on(cache.get(60_000)).unwrap();
        assert!(stale.refresh_error.is_some());
        assert_eq!(stale.secrets.tokens.len(), 1);
        // While the source is down, it is not called on every request.
        block_on(cache.get(61_000)).unwrap();
        assert_eq!(calls(), 2);

        cache.source().down.store(false, Ordering::SeqCst);
        let fresh = block_on(cache.get(90_001)).unwrap();
        assert!(fresh.refresh_error.is_none());
        assert_eq!(calls(), 3);
    }

    #[test]
    fn no_secrets_ever_loaded_is_an_error() {
        let cache = SecretCache::new(Flaky::default(), 60_000);
        cache.source().down.store(true, Ordering::SeqCst);
        assert!(block_on(cache.get(0)).is_err());
    }
}
