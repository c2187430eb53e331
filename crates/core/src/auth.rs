//! Webhook authentication: GitLab's shared secret token (`X-Gitlab-Token`) and GitLab's
//! signing token (the Standard Webhooks scheme: `webhook-id`, `webhook-timestamp`,
//! `webhook-signature: v1,<base64 HMAC-SHA256>`).
//!
//! Every comparison of caller-supplied bytes with a secret runs in constant time, and no error
//! or `Debug` output of this module carries secret material: failures name *what* was wrong,
//! never the values involved.

use std::fmt;

use base64::Engine as _;
use base64::alphabet;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::secret_scope::{
    Admits, ScopedListError, SecretScope, is_scoped_list, parse_scoped_list,
};

type HmacSha256 = Hmac<Sha256>;

/// Standard base64 that encodes with padding and decodes with or without it: operators paste
/// keys by hand, and the Standard Webhooks reference implementation is lenient the same way.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// A shared secret compared against `X-Gitlab-Token`.
///
/// Only the SHA-256 digest is kept: comparing digests makes the comparison independent of the
/// secret's length, and the clear secret never sits in memory longer than parsing takes.
#[derive(Clone)]
pub struct SecretToken {
    digest: [u8; 32],
    /// The projects it may speak for; `None`: any.
    scope: Option<SecretScope>,
}

impl SecretToken {
    pub fn new(secret: &str) -> Self {
        Self {
            digest: Sha256::digest(secret.as_bytes()).into(),
            scope: None,
        }
    }

    pub fn scoped(secret: &str, scope: Option<SecretScope>) -> Self {
        Self {
            scope,
            ..Self::new(secret)
        }
    }

    fn matches(&self, presented: &[u8]) -> subtle::Choice {
        let presented: [u8; 32] = Sha256::digest(presented).into();
        self.digest.ct_eq(&presented)
    }
}

impl fmt::Debug for SecretToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretToken(<redacted>)")
    }
}

/// A GitLab signing token (`whsec_<base64 key>`), ready to compute HMACs with.
#[derive(Clone)]
pub struct SigningKey {
    key: Vec<u8>,
    /// The projects it may speak for; `None`: any.
    scope: Option<SecretScope>,
}

/// Keys shorter than this cannot be what GitLab generates (32 bytes) and are most likely a
/// truncated copy-paste; refusing them gives the operator a clear error at load time.
const MIN_SIGNING_KEY_BYTES: usize = 16;

impl SigningKey {
    /// Parses `whsec_<base64>`; the prefix is required so that a plain secret token pasted into
    /// the signing-token parameter by mistake is caught at load time, not as a stream of 401s.
    pub fn parse(text: &str) -> Result<Self, SecretsError> {
        let encoded = text
            .strip_prefix("whsec_")
            .ok_or(SecretsError::SigningTokenPrefix)?;
        let key = BASE64
            .decode(encoded)
            .map_err(|_| SecretsError::SigningTokenBase64)?;
        if key.len() < MIN_SIGNING_KEY_BYTES {
            return Err(SecretsError::SigningTokenTooShort { bytes: key.len() });
        }
        Ok(Self { key, scope: None })
    }

    /// As [`SigningKey::parse`], bound to `scope`.
    pub fn parse_scoped(text: &str, scope: Option<SecretScope>) -> Result<Self, SecretsError> {
        Ok(Self {
            scope,
            ..Self::parse(text)?
        })
    }

    fn mac(&self) -> HmacSha256 {
        // HMAC accepts keys of any length; this cannot fail.
        HmacSha256::new_from_slice(&self.key).expect("HMAC takes keys of any length")
    }

    /// The Standard Webhooks signature over `{id}.{timestamp}.{body}`, as raw bytes.
    pub fn sign(&self, webhook_id: &str, timestamp: &str, body: &[u8]) -> [u8; 32] {
        let mut mac = self.mac();
        mac.update(webhook_id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.as_bytes());
        mac.update(b".");
        mac.update(body);
        mac.finalize().into_bytes().into()
    }

    /// The `webhook-signature` header value a sender would put on this message.
    pub fn signature_header(&self, webhook_id: &str, timestamp: &str, body: &[u8]) -> String {
        format!(
            "v1,{}",
            BASE64.encode(self.sign(webhook_id, timestamp, body))
        )
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningKey(<redacted>)")
    }
}

/// Why a secret read from configuration cannot be used. Never contains the secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretsError {
    #[error("the signing token must start with `whsec_` (copy it from the GitLab webhook page)")]
    SigningTokenPrefix,
    #[error("the signing token after `whsec_` is not valid base64")]
    SigningTokenBase64,
    #[error("the signing token key is {bytes} bytes long; GitLab generates 32-byte keys")]
    SigningTokenTooShort { bytes: usize },
    #[error("the {parameter} parameter holds no secret (it is empty or only whitespace)")]
    Empty { parameter: &'static str },
    #[error("the {parameter} parameter: {error}")]
    ScopedList {
        parameter: &'static str,
        error: ScopedListError,
    },
}

/// Every secret the webhook accepts. During a rotation each list holds the old and the new one.
#[derive(Debug, Clone, Default)]
pub struct WebhookSecrets {
    pub tokens: Vec<SecretToken>,
    pub signing_keys: Vec<SigningKey>,
}

impl WebhookSecrets {
    /// Secret tokens: one per line (two lines during a rotation). Lines are trimmed and empty
    /// lines ignored. Tokens may contain spaces or commas, so only newlines separate them.
    /// Or a JSON list that binds tokens to projects (see [`crate::secret_scope`]).
    pub fn parse_tokens(text: &str) -> Result<Vec<SecretToken>, SecretsError> {
        let tokens: Vec<_> = if is_scoped_list(text) {
            parse_scoped_list(text, "token")
                .map_err(|error| SecretsError::ScopedList {
                    parameter: "secret token",
                    error,
                })?
                .into_iter()
                .filter(|(token, _)| !token.trim().is_empty())
                .map(|(token, scope)| SecretToken::scoped(token.trim(), scope))
                .collect()
        } else {
            text.lines()
                .map(str::trim)
                .filter(|line| !line.is_empty())
                .map(SecretToken::new)
                .collect()
        };
        if tokens.is_empty() {
            return Err(SecretsError::Empty {
                parameter: "secret token",
            });
        }
        Ok(tokens)
    }

    /// Signing tokens: whitespace-separated `whsec_...` values (two during a rotation), or a
    /// JSON list that binds them to projects (see [`crate::secret_scope`]).
    pub fn parse_signing_keys(text: &str) -> Result<Vec<SigningKey>, SecretsError> {
        let keys = if is_scoped_list(text) {
            parse_scoped_list(text, "key")
                .map_err(|error| SecretsError::ScopedList {
                    parameter: "signing token",
                    error,
                })?
                .into_iter()
                .map(|(key, scope)| SigningKey::parse_scoped(key.trim(), scope))
                .collect::<Result<Vec<_>, _>>()?
        } else {
            text.split_whitespace()
                .map(SigningKey::parse)
                .collect::<Result<Vec<_>, _>>()?
        };
        if keys.is_empty() {
            return Err(SecretsError::Empty {
                parameter: "signing token",
            });
        }
        Ok(keys)
    }
}

/// Which authentication methods a request must pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// `X-Gitlab-Token` only.
    Token,
    /// `webhook-signature` only.
    Signature,
    /// Either one suffices (useful while moving a hook from token to signing).
    Either,
    /// Both must pass.
    Both,
}

impl AuthMode {
    pub fn needs_tokens(self) -> bool {
        matches!(self, Self::Token | Self::Both)
    }
    pub fn needs_signing_keys(self) -> bool {
        matches!(self, Self::Signature | Self::Both)
    }
}

impl std::str::FromStr for AuthMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "token" => Ok(Self::Token),
            "signature" => Ok(Self::Signature),
            "either" => Ok(Self::Either),
            "both" => Ok(Self::Both),
            other => Err(format!(
                "unknown authentication mode `{other}`: use token, signature, either or both"
            )),
        }
    }
}

/// The authentication-relevant headers of a request, as presented.
#[derive(Debug, Clone, Copy, Default)]
pub struct Credentials<'a> {
    pub gitlab_token: Option<&'a [u8]>,
    pub webhook_id: Option<&'a str>,
    pub webhook_timestamp: Option<&'a str>,
    pub webhook_signature: Option<&'a str>,
}

/// Why a request was not authenticated. Safe to log: it names no secret and no presented value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthFailure {
    #[error("no X-Gitlab-Token header")]
    TokenMissing,
    #[error("X-Gitlab-Token does not match any configured secret token")]
    TokenMismatch,
    #[error("no secret token is configured")]
    NoTokenConfigured,
    #[error("missing signature header(s): {0}")]
    SignatureHeadersMissing(&'static str),
    #[error("webhook-timestamp is not a whole number of seconds")]
    TimestampMalformed,
    #[error(
        "webhook-timestamp is {skew_seconds} s away from now (tolerance {tolerance_seconds} s)"
    )]
    TimestampOutOfTolerance {
        skew_seconds: i64,
        tolerance_seconds: u64,
    },
    #[error("webhook-signature holds no well-formed v1 signature")]
    SignatureMalformed,
    #[error("no signature in webhook-signature matches any configured signing token")]
    SignatureMismatch,
    #[error("no signing token is configured")]
    NoSigningKeyConfigured,
    #[error(
        "the secret(s) that authenticated this hook are bound to other projects than project {project_id}"
    )]
    OutsideSecretScope { project_id: u64 },
    #[error("token check failed ({token}) and signature check failed ({signature})")]
    Neither {
        token: Box<AuthFailure>,
        signature: Box<AuthFailure>,
    },
}

/// Which method(s) admitted a request, for the log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    Token,
    Signature,
    TokenAndSignature,
}

impl AuthMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Token => "token",
            Self::Signature => "signature",
            Self::TokenAndSignature => "token+signature",
        }
    }
}

/// Checks `X-Gitlab-Token` against every configured secret without short-circuiting, so the
/// time taken does not reveal which (or whether any) secret matched. Answers what the matched
/// secrets admit.
pub fn verify_token(
    presented: Option<&[u8]>,
    tokens: &[SecretToken],
) -> Result<Admits, AuthFailure> {
    if tokens.is_empty() {
        return Err(AuthFailure::NoTokenConfigured);
    }
    let presented = presented.ok_or(AuthFailure::TokenMissing)?;
    let matches: Vec<subtle::Choice> = tokens.iter().map(|t| t.matches(presented)).collect();
    admits_of(tokens.iter().map(|t| t.scope.as_ref()), &matches).ok_or(AuthFailure::TokenMismatch)
}

/// What the matched secrets admit, or `None` when none matched. Every comparison is done
/// before this runs; which secret matched is not secret from the sender who holds it.
fn admits_of<'a>(
    scopes: impl Iterator<Item = Option<&'a SecretScope>>,
    matches: &[subtle::Choice],
) -> Option<Admits> {
    let matched: Vec<Option<&SecretScope>> = scopes
        .zip(matches)
        .filter(|(_, m)| bool::from(**m))
        .map(|(scope, _)| scope)
        .collect();
    (!matched.is_empty()).then(|| Admits::of_matched(matched))
}

/// The largest `webhook-signature` header worth looking at; GitLab sends one or two.
const MAX_SIGNATURES: usize = 16;

/// Verifies a Standard Webhooks signature as GitLab sends it.
pub fn verify_signature(
    credentials: &Credentials<'_>,
    body: &[u8],
    keys: &[SigningKey],
    now_unix: i64,
    tolerance_seconds: u64,
) -> Result<Admits, AuthFailure> {
    if keys.is_empty() {
        return Err(AuthFailure::NoSigningKeyConfigured);
    }
    let (id, timestamp, signatures) = match (
        credentials.webhook_id,
        credentials.webhook_timestamp,
        credentials.webhook_signature,
    ) {
        (Some(i), Some(t), Some(s)) => (i, t, s),
        (None, _, _) => return Err(AuthFailure::SignatureHeadersMissing("webhook-id")),
        (_, None, _) => return Err(AuthFailure::SignatureHeadersMissing("webhook-timestamp")),
        (_, _, None) => return Err(AuthFailure::SignatureHeadersMissing("webhook-signature")),
    };

    let sent_at: i64 = timestamp
        .trim()
        .parse()
        .map_err(|_| AuthFailure::TimestampMalformed)?;
    let skew = now_unix.saturating_sub(sent_at);
    if skew.unsigned_abs() > tolerance_seconds {
        return Err(AuthFailure::TimestampOutOfTolerance {
            skew_seconds: skew,
            tolerance_seconds,
        });
    }

    // Decode every v1 candidate first; other versions (e.g. v1a, asymmetric) are ignored as
    // the Standard Webhooks spec asks.
    let candidates: Vec<[u8; 32]> = signatures
        .split_whitespace()
        .take(MAX_SIGNATURES)
        .filter_map(|part| part.strip_prefix("v1,"))
        .filter_map(|b64| BASE64.decode(b64).ok())
        .filter_map(|raw| <[u8; 32]>::try_from(raw.as_slice()).ok())
        .collect();
    if candidates.is_empty() {
        return Err(AuthFailure::SignatureMalformed);
    }

    let matches: Vec<subtle::Choice> = keys
        .iter()
        .map(|key| {
            let expected = key.sign(id, timestamp, body);
            candidates
                .iter()
                .fold(subtle::Choice::from(0), |acc, c| acc | expected.ct_eq(c))
        })
        .collect();
    admits_of(keys.iter().map(|k| k.scope.as_ref()), &matches).ok_or(AuthFailure::SignatureMismatch)
}

/// Applies the configured [`AuthMode`]: which method(s) admitted the request, and which
/// projects the secrets that did may speak for.
pub fn authenticate(
    mode: AuthMode,
    credentials: &Credentials<'_>,
    body: &[u8],
    secrets: &WebhookSecrets,
    now_unix: i64,
    tolerance_seconds: u64,
) -> Result<(AuthMethod, Admits), AuthFailure> {
    let token = || verify_token(credentials.gitlab_token, &secrets.tokens);
    let signature = || {
        verify_signature(
            credentials,
            body,
            &secrets.signing_keys,
            now_unix,
            tolerance_seconds,
        )
    };
    match mode {
        AuthMode::Token => token().map(|a| (AuthMethod::Token, a)),
        AuthMode::Signature => signature().map(|a| (AuthMethod::Signature, a)),
        AuthMode::Both => {
            let by_token = token()?;
            let by_signature = signature()?;
            Ok((
                AuthMethod::TokenAndSignature,
                Admits::AllOf(vec![by_token, by_signature]),
            ))
        }
        AuthMode::Either => match (token(), signature()) {
            (Ok(t), Ok(s)) => Ok((AuthMethod::TokenAndSignature, Admits::AnyOf(vec![t, s]))),
            (Ok(t), Err(_)) => Ok((AuthMethod::Token, t)),
            (Err(_), Ok(s)) => Ok((AuthMethod::Signature, s)),
            (Err(t), Err(s)) => Err(AuthFailure::Neither {
                token: Box::new(t),
                signature: Box::new(s),
            }),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const NOW: i64 = 1_700_000_000;

    fn secrets() -> WebhookSecrets {
        WebhookSecrets {
            tokens: WebhookSecrets::parse_tokens("old-secret\nnew secret, with comma\n").unwrap(),
            signing_keys: WebhookSecrets::parse_signing_keys(KEY).unwrap(),
        }
    }

    fn signed<'a>(id: &'a str, ts: &'a str, sig: &'a str) -> Credentials<'a> {
        Credentials {
            gitlab_token: None,
            webhook_id: Some(id),
            webhook_timestamp: Some(ts),
            webhook_signature: Some(sig),
        }
    }

    #[test]
    fn both_rotation_tokens_are_accepted_and_others_are_not() {
        let s = secrets();
        assert_eq!(
            verify_token(Some(b"old-secret"), &s.tokens),
            Ok(Admits::Any)
        );
        assert_eq!(
            verify_token(Some(b"new secret, with comma"), &s.tokens),
            Ok(Admits::Any)
        );
        assert_eq!(
            verify_token(Some(b"old-secre"), &s.tokens),
            Err(AuthFailure::TokenMismatch)
        );
        assert_eq!(
            verify_token(None, &s.tokens),
            Err(AuthFailure::TokenMissing)
        );
        assert_eq!(
            verify_token(Some(b"x"), &[]),
            Err(AuthFailure::NoTokenConfigured)
        );
    }

    #[test]
    fn signature_roundtrip_and_tamper() {
        let s = secrets();
        let ts = NOW.to_string();
        let header = s.signing_keys[0].signature_header("msg_1", &ts, b"{}");
        let ok = signed("msg_1", &ts, &header);
        assert_eq!(
            verify_signature(&ok, b"{}", &s.signing_keys, NOW, 300),
            Ok(Admits::Any)
        );
        assert_eq!(
            verify_signature(&ok, b"{ }", &s.signing_keys, NOW, 300),
            Err(AuthFailure::SignatureMismatch)
        );
        let other_id = signed("msg_2", &ts, &header);
        assert_eq!(
            verify_signature(&other_id, b"{}", &s.signing_keys, NOW, 300),
            Err(AuthFailure::SignatureMismatch)
        );
    }

    #[test]
    fn timestamp_tolerance_is_symmetric() {
        let s = secrets();
        for (offset, ok) in [(-300, true), (300, true), (-301, false), (301, false)] {
            let ts = (NOW + offset).to_string();
            let header = s.signing_keys[0].signature_header("m", &ts, b"x");
            let result =
                verify_signature(&signed("m", &ts, &header), b"x", &s.signing_keys, NOW, 300);
            assert_eq!(result.is_ok(), ok, "offset {offset}: {result:?}");
        }
    }

    #[test]
    fn malformed_signature_headers() {
        let s = secrets();
        let ts = NOW.to_string();
        for bad in ["", "v1", "v1,", "v1,!!!", "v2,abcd", "v1,YWJj"] {
            assert_eq!(
                verify_signature(&signed("m", &ts, bad), b"x", &s.signing_keys, NOW, 300),
                Err(AuthFailure::SignatureMalformed),
                "{bad:?}"
            );
        }
        assert_eq!(
            verify_signature(&signed("m", "12a", "v1,x"), b"x", &s.signing_keys, NOW, 300),
            Err(AuthFailure::TimestampMalformed)
        );
    }

    #[test]
    fn signing_key_parse_errors_are_specific() {
        assert_eq!(
            SigningKey::parse("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap_err(),
            SecretsError::SigningTokenPrefix
        );
        assert_eq!(
            SigningKey::parse("whsec_not base64!").unwrap_err(),
            SecretsError::SigningTokenBase64
        );
        assert_eq!(
            SigningKey::parse("whsec_YWJj").unwrap_err(),
            SecretsError::SigningTokenTooShort { bytes: 3 }
        );
        assert!(WebhookSecrets::parse_tokens(" \n \n").is_err());
        // Padding is optional, as in the reference implementation.
        let padded = SigningKey::parse("whsec_MDEyMzQ1Njc4OWFiY2RlZg==").unwrap();
        let unpadded = SigningKey::parse("whsec_MDEyMzQ1Njc4OWFiY2RlZg").unwrap();
        assert_eq!(padded.sign("i", "1", b"b"), unpadded.sign("i", "1", b"b"));
    }

    #[test]
    fn modes_combine_as_documented() {
        let s = secrets();
        let ts = NOW.to_string();
        let header = s.signing_keys[0].signature_header("m", &ts, b"b");
        let mut both = signed("m", &ts, &header);
        both.gitlab_token = Some(b"old-secret");
        let token_only = Credentials {
            gitlab_token: Some(b"old-secret"),
            ..Default::default()
        };
        let sig_only = signed("m", &ts, &header);
        let auth = |mode, c: &Credentials<'_>| {
            authenticate(mode, c, b"b", &s, NOW, 300).map(|(method, _)| method)
        };

        assert_eq!(
            auth(AuthMode::Both, &both),
            Ok(AuthMethod::TokenAndSignature)
        );
        assert!(auth(AuthMode::Both, &token_only).is_err());
        assert!(auth(AuthMode::Both, &sig_only).is_err());
        assert_eq!(auth(AuthMode::Either, &token_only), Ok(AuthMethod::Token));
        assert_eq!(auth(AuthMode::Either, &sig_only), Ok(AuthMethod::Signature));
        assert!(matches!(
            auth(AuthMode::Either, &Credentials::default()),
            Err(AuthFailure::Neither { .. })
        ));
        assert_eq!(auth(AuthMode::Token, &token_only), Ok(AuthMethod::Token));
        assert!(auth(AuthMode::Token, &sig_only).is_err());
        assert!(auth(AuthMode::Signature, &token_only).is_err());
    }

    #[test]
    fn a_bound_secret_admits_only_its_projects_and_an_unbound_one_any() {
        let tokens = WebhookSecrets::parse_tokens(
            r#"[{"token": "web-secret", "projects": [12]}, {"token": "ops-secret"}]"#,
        )
        .unwrap();
        let web = verify_token(Some(b"web-secret"), &tokens).unwrap();
        assert!(web.admits(12, None));
        assert!(!web.admits(13, None));
        assert_eq!(verify_token(Some(b"ops-secret"), &tokens), Ok(Admits::Any));
        let keys = WebhookSecrets::parse_signing_keys(&format!(
            r#"[{{"key": "{KEY}", "namespaces": ["acme"]}}]"#
        ))
        .unwrap();
        let ts = NOW.to_string();
        let header = keys[0].signature_header("m", &ts, b"b");
        let admits = verify_signature(&signed("m", &ts, &header), b"b", &keys, NOW, 300).unwrap();
        assert!(admits.admits(1, Some("acme/app")));
        assert!(!admits.admits(1, Some("other/app")));
        // Both: the token's binding and the key's must each admit the project.
        let secrets = WebhookSecrets {
            tokens,
            signing_keys: keys,
        };
        let mut both = signed("m", &ts, &header);
        both.gitlab_token = Some(b"web-secret");
        let (_, admits) = authenticate(AuthMode::Both, &both, b"b", &secrets, NOW, 300).unwrap();
        assert!(admits.admits(12, Some("acme/app")));
        assert!(!admits.admits(12, Some("other/app")));
        assert!(!admits.admits(13, Some("acme/app")));
    }

    #[test]
    fn a_broken_scoped_list_is_a_load_error_naming_the_parameter() {
        let e =
            WebhookSecrets::parse_tokens(r#"[{"token": "s3cret", "projects": [1]"#).unwrap_err();
        assert!(
            e.to_string().starts_with("the secret token parameter:"),
            "{e}"
        );
        assert!(!e.to_string().contains("s3cret"));
        let e = WebhookSecrets::parse_signing_keys(r#"[{"key": "not-whsec"}]"#).unwrap_err();
        assert_eq!(e, SecretsError::SigningTokenPrefix);
    }

    #[test]
    fn debug_output_never_shows_secrets() {
        let s = secrets();
        let text = format!("{s:?}");
        assert!(!text.contains("old-secret"));
        assert!(!text.contains("MfKQ9r8"));
        assert!(text.contains("redacted"));
    }
}
