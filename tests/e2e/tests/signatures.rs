//! Our Standard Webhooks verification against the reference implementation (Python
//! `standardwebhooks`), in both directions, over the cases GitLab and attackers produce.

use std::time::{SystemTime, UNIX_EPOCH};

use e2e_tests::reference_webhooks;
use ephemeral_core::auth::{
    AuthFailure, Credentials, SigningKey, WebhookSecrets, verify_signature,
};
use serde_json::json;

const OLD: &str = "whsec_MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
const NEW: &str = "whsec_QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWY=";
const OTHER: &str = "whsec_enl4d3Z1dHNycXBvbm1sa2ppaGdmZWRjYmEwMTIzNDU=";

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn keys(tokens: &str) -> Vec<SigningKey> {
    WebhookSecrets::parse_signing_keys(tokens).unwrap()
}

fn check(
    keys: &[SigningKey],
    id: &str,
    ts: &str,
    sig: &str,
    body: &str,
    now: i64,
) -> Result<(), AuthFailure> {
    let c = Credentials {
        gitlab_token: None,
        webhook_id: Some(id),
        webhook_timestamp: Some(ts),
        webhook_signature: Some(sig),
    };
    // Which projects the key admits is tested with the scopes; here: whether it verifies.
    verify_signature(&c, body.as_bytes(), keys, now, 300).map(|_| ())
}

#[test]
fn reference_signatures_verify_and_every_tampering_fails() {
    let now = now();
    let body = r#"{"object_kind":"build","build_id":1,"build_name":"tëst ✓","build_status":"pending","project_id":2}"#;
    let sign = |key: &str, id: &str, ts: i64, body: &str| json!({"op": "sign", "key": key, "id": id, "ts": ts, "body": body});
    let sigs = reference_webhooks(&[
        sign(OLD, "msg_1", now, body),
        sign(NEW, "msg_1", now, body),
        sign(OTHER, "msg_1", now, body),
        sign(OLD, "msg_1", now - 301, body),
        sign(OLD, "msg_1", now + 301, body),
        sign(OLD, "msg_1", now - 299, body),
    ]);
    let [by_old, by_new, by_other, expired, future, nearly_expired] =
        <[String; 6]>::try_from(sigs).unwrap();
    let old = keys(OLD);
    let ts = now.to_string();

    assert_eq!(check(&old, "msg_1", &ts, &by_old, body, now), Ok(()));
    assert_eq!(
        check(
            &old,
            "msg_1",
            &(now - 299).to_string(),
            &nearly_expired,
            body,
            now
        ),
        Ok(())
    );
    // Tampered body, id or timestamp; wrong key.
    let tampered = body.replace("pending", "success");
    assert_eq!(
        check(&old, "msg_1", &ts, &by_old, &tampered, now),
        Err(AuthFailure::SignatureMismatch)
    );
    assert_eq!(
        check(&old, "msg_2", &ts, &by_old, body, now),
        Err(AuthFailure::SignatureMismatch)
    );
    assert_eq!(
        check(&old, "msg_1", &(now - 1).to_string(), &by_old, body, now),
        Err(AuthFailure::SignatureMismatch)
    );
    assert_eq!(
        check(&old, "msg_1", &ts, &by_other, body, now),
        Err(AuthFailure::SignatureMismatch)
    );
    // Expired and future timestamps, even with a valid signature over them.
    assert!(matches!(
        check(&old, "msg_1", &(now - 301).to_string(), &expired, body, now),
        Err(AuthFailure::TimestampOutOfTolerance {
            skew_seconds: 301,
            ..
        })
    ));
    assert!(matches!(
        check(&old, "msg_1", &(now + 301).to_string(), &future, body, now),
        Err(AuthFailure::TimestampOutOfTolerance {
            skew_seconds: -301,
            ..
        })
    ));
    // Malformed headers.
    let b64 = by_old.trim_start_matches("v1,");
    for bad in [
        "",
        "v1",
        "v1,",
        "v1,***",
        &format!("v2,{b64}"),
        &format!("v1;{b64}"),
        &b64[..20],
    ] {
        assert_eq!(
            check(&old, "msg_1", &ts, bad, body, now),
            Err(AuthFailure::SignatureMalformed),
            "{bad:?}"
        );
    }
    assert_eq!(
        check(&old, "msg_1", "soon", &by_old, body, now),
        Err(AuthFailure::TimestampMalformed)
    );
    // Missing headers.
    for missing in 0..3 {
        let mut c = Credentials {
            gitlab_token: None,
            webhook_id: Some("msg_1"),
            webhook_timestamp: Some(&ts),
            webhook_signature: Some(&by_old),
        };
        match missing {
            0 => c.webhook_id = None,
            1 => c.webhook_timestamp = None,
            _ => c.webhook_signature = None,
        }
        assert!(matches!(
            verify_signature(&c, body.as_bytes(), &old, now, 300),
            Err(AuthFailure::SignatureHeadersMissing(_))
        ));
    }

    // Rotation: GitLab (or a proxy) sends two signatures; either configured key accepts.
    let both_sigs = format!("{by_old} {by_new}");
    assert_eq!(check(&old, "msg_1", &ts, &both_sigs, body, now), Ok(()));
    assert_eq!(
        check(&keys(NEW), "msg_1", &ts, &both_sigs, body, now),
        Ok(())
    );
    assert_eq!(
        check(
            &keys(&format!("{NEW}\n{OLD}")),
            "msg_1",
            &ts,
            &by_old,
            body,
            now
        ),
        Ok(())
    );
    assert_eq!(
        check(&keys(OTHER), "msg_1", &ts, &both_sigs, body, now),
        Err(AuthFailure::SignatureMismatch)
    );
}

#[test]
fn reference_implementation_accepts_our_signatures() {
    let now = now();
    let body = r#"{"object_kind":"build","build_id":99}"#;
    let ours = keys(OLD)[0].signature_header("msg_ours", &now.to_string(), body.as_bytes());
    let verdicts = reference_webhooks(&[
        json!({"op": "verify", "key": OLD, "id": "msg_ours", "ts": now, "body": body, "signature": ours}),
        json!({"op": "verify", "key": NEW, "id": "msg_ours", "ts": now, "body": body, "signature": ours}),
    ]);
    assert_eq!(verdicts, ["ok", "WebhookVerificationError"]);
}
