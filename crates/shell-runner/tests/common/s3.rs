//! The cache bucket in moto's S3 (`MOTO_ENDPOINT`, as for tests/e2e; `.ci/run` starts one).

use ephemeral_core::secrets::Secret;
use shell_runner::cache::{CacheSettings, S3Credentials};

pub fn moto() -> String {
    std::env::var("MOTO_ENDPOINT").expect(
        "MOTO_ENDPOINT: start `moto_server -H 127.0.0.1 -p 5102` and set MOTO_ENDPOINT=http://127.0.0.1:5102",
    )
}

/// The runner's cache settings for `bucket` in moto.
pub fn settings(bucket: &str) -> CacheSettings {
    CacheSettings {
        bucket: bucket.to_owned(),
        region: "us-east-1".into(),
        endpoint: Some(moto().parse().unwrap()),
        credentials: S3Credentials {
            access_key_id: "testing".into(),
            secret_access_key: Secret::new("testing"),
            session_token: None,
        },
    }
}

/// A new, empty bucket of this test's own; its name.
pub async fn new_bucket() -> String {
    let bucket = format!(
        "cache-test-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let made = reqwest::Client::new()
        .put(format!("{}/{bucket}", moto()))
        .send()
        .await
        .unwrap();
    assert!(made.status().is_success(), "{}", made.status());
    bucket
}
