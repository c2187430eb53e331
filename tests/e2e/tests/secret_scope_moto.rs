//! Issue 12, finding 3: a secret bound to some projects cannot speak for another. The attack:
//! a maintainer of one project, who knows that project's hook secret, sends hooks that name
//! other projects. Through the real webhook handler, secrets read from SSM in moto, and the
//! real bus: each such hook is answered 401 and nothing of it reaches the bus or the dedup
//! table, while the same secret still works for its own project and unbound secrets for any.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use e2e_tests::*;
use webhook::AwsWebhook;

const SIGNING_KEY: &str = "whsec_MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
/// The zulip fixture's project.
const OWN_PROJECT: u64 = 77_624_161;
const OWN_PATH: &str = "HydrallHarsh/test-1";

/// The fixture hook as if for project `project_id` at `path`, with its own job id.
fn hook_for(project_id: u64, path: &str, job_id: u64) -> String {
    let mut hook: serde_json::Value =
        serde_json::from_str(&fixture("zulip-job-hook-build-failed-2026.json")).unwrap();
    hook["project_id"] = project_id.into();
    hook["project"]["id"] = project_id.into();
    hook["project"]["path_with_namespace"] = path.into();
    hook["build_id"] = job_id.into();
    hook.to_string()
}

fn token_request(
    token: &str,
    body: &str,
    key: &str,
) -> aws_lambda_events::apigw::ApiGatewayV2httpRequest {
    api_request(
        &[
            ("X-Gitlab-Token", token),
            ("X-Gitlab-Event", "Job Hook"),
            ("Idempotency-Key", key),
        ],
        body,
    )
}

async fn dedup_items(sdk: &aws_config::SdkConfig, table: &str) -> usize {
    aws_sdk_dynamodb::Client::new(sdk)
        .scan()
        .table_name(table)
        .send()
        .await
        .unwrap()
        .count as usize
}

#[tokio::test]
async fn a_secret_bound_to_one_project_is_refused_for_every_other() {
    let sdk = sdk_config();
    let tokens = format!(
        r#"[{{"token": "web-secret", "projects": [{OWN_PROJECT}]}},
            {{"token": "path-secret", "namespaces": ["hydrallharsh"]}},
            {{"token": "ops-secret"}}]"#
    );
    let stack = create_webhook_stack(&sdk, &tokens, SIGNING_KEY).await;
    let webhook = AwsWebhook::from_config(webhook_config(&stack, "token"), &sdk);

    // The attack: the web project's secret, swept over other projects' ids and paths.
    let mut refused = 0;
    for (n, victim) in (1..=20u64).map(|n| (n, 1_000 + n)) {
        let body = hook_for(victim, &format!("victims/project-{n}"), 10_000 + n);
        let r = webhook
            .handle(token_request("web-secret", &body, &format!("attack-{n}")))
            .await;
        assert_eq!(r.status_code, 401, "a hook for project {victim}");
        refused += 1;
        // A namespace-bound secret outside its namespace, and a path that only looks alike.
        for (path, key) in [("victims/app", "p"), ("hydrallharsh-not/app", "q")] {
            let body = hook_for(victim, path, 20_000 + n);
            let r = webhook
                .handle(token_request("path-secret", &body, &format!("{key}-{n}")))
                .await;
            assert_eq!(r.status_code, 401, "path-secret for {path}");
            refused += 1;
        }
    }
    assert_eq!(refused, 60, "every forged hook was sent and refused");
    assert_eq!(
        dedup_items(&sdk, &stack.table).await,
        0,
        "nothing of them was kept"
    );

    // The same secrets still work within their scopes; the unbound one works anywhere.
    for (token, project, path, key) in [
        ("web-secret", OWN_PROJECT, OWN_PATH, "own"),
        ("path-secret", 5, "HydrallHarsh/other", "own-path"),
        ("ops-secret", 1_001, "victims/project-1", "unbound"),
    ] {
        let body = hook_for(project, path, 30_000 + project);
        let r = webhook.handle(token_request(token, &body, key)).await;
        assert_eq!(r.status_code, 202, "{token} for {path}");
    }
    let events = bus_events(&sdk, &stack, 3, Duration::from_secs(10)).await;
    assert_eq!(
        events.len(),
        3,
        "only the three admitted hooks: {events:#?}"
    );
}

#[tokio::test]
async fn a_signing_key_bound_to_a_namespace_is_refused_outside_it() {
    let sdk = sdk_config();
    let keys = format!(r#"[{{"key": "{SIGNING_KEY}", "namespaces": ["hydrallharsh"]}}]"#);
    let stack = create_webhook_stack(&sdk, "unused-token", &keys).await;
    let webhook = AwsWebhook::from_config(webhook_config(&stack, "signature"), &sdk);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let send = |body: String, id: &'static str| {
        let ts = now.to_string();
        let signature = reference_signature(SIGNING_KEY, id, now, &body);
        let webhook = &webhook;
        async move {
            let headers = [
                ("X-Gitlab-Event", "Job Hook"),
                ("webhook-id", id),
                ("webhook-timestamp", ts.as_str()),
                ("webhook-signature", signature.as_str()),
            ];
            webhook
                .handle(api_request(&headers, &body))
                .await
                .status_code
        }
    };
    assert_eq!(send(hook_for(9, "victims/app", 1), "msg_attack").await, 401);
    assert_eq!(
        send(hook_for(OWN_PROJECT, OWN_PATH, 2), "msg_own").await,
        202
    );
    let events = bus_events(&sdk, &stack, 1, Duration::from_secs(10)).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["detail"]["project_id"], OWN_PROJECT);
}
