//! Requests carry a GitLab token (`PRIVATE-TOKEN`), which reqwest does not strip on a
//! redirect to another host: the client follows no redirect, so a GitLab (or anyone in the
//! path) answering 302 to another host never gets the token sent there. And a plain-http
//! GitLab URL to a host that is not loopback is refused before anything is sent.

use std::time::Duration;

use ephemeral_gitlab::*;
use wiremock::matchers::{any, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const TOKEN: &str = "glpat-must-stay-home";

fn fast() -> RetryPolicy {
    RetryPolicy {
        max_retries: 2,
        min_delay: Duration::from_millis(1),
        max_delay: Duration::from_millis(5),
    }
}

/// GitLab at `gitlab` answers every request with a 302 to `elsewhere`, which answers 200 to
/// anything (what a follower would then get).
async fn redirecting_pair() -> (MockServer, MockServer) {
    let gitlab = MockServer::start().await;
    // Another host: 127.0.0.1 and localhost are different hosts to reqwest's redirect code.
    let elsewhere = MockServer::start().await;
    let target = elsewhere.uri().replace("127.0.0.1", "localhost");
    Mock::given(any())
        .respond_with(
            ResponseTemplate::new(302)
                .insert_header("Location", format!("{target}/collect?from=gitlab").as_str()),
        )
        .mount(&gitlab)
        .await;
    Mock::given(any())
        .respond_with(ResponseTemplate::new(200).set_body_string(r#"{"tag_list":["stolen"]}"#))
        .mount(&elsewhere)
        .await;
    (gitlab, elsewhere)
}

#[tokio::test]
async fn a_redirect_to_another_host_is_not_followed_and_the_token_is_not_sent_there() {
    let (gitlab, elsewhere) = redirecting_pair().await;
    let client = GitLabClient::with_url_policy(&gitlab.uri(), fast(), UrlPolicy::HttpsOrLoopback);
    let token = Secret::new(TOKEN);

    let e = client.job_tags(&token, 7, 99).await.unwrap_err();
    assert!(
        matches!(&e, GitLabError::Redirected { status: 302, location, .. } if location.starts_with("http://localhost:")),
        "{e:?}"
    );
    let text = e.to_string();
    assert!(
        text.contains("follow no redirect") && !text.contains("collect"),
        "{text}"
    );
    assert!(
        !e.is_transient(),
        "a redirect is configuration: not retried"
    );

    // The other calls that carry the token: same answer, nothing reaches the other host.
    assert!(matches!(
        client.delete_runner(&token, 5).await,
        Err(GitLabError::Redirected { .. })
    ));
    assert!(matches!(
        client.runner_busy(&token, 5).await,
        Err(GitLabError::Redirected { .. })
    ));
    let runner = NewRunner {
        description: "ephemeral job 99".into(),
        tags: vec![],
        run_untagged: true,
        scope: RunnerScope::Project(7),
        maximum_timeout_seconds: None,
    };
    assert!(matches!(
        client
            .create_runner(&Registration::CreateRunnerToken(token.clone()), &runner)
            .await,
        Err(GitLabError::Redirected { .. })
    ));
    assert!(matches!(
        client
            .create_runner(
                &Registration::RegistrationToken(Secret::new("GR1348941reg")),
                &runner
            )
            .await,
        Err(GitLabError::Redirected { .. })
    ));

    let received = elsewhere.received_requests().await.unwrap();
    assert!(
        received.is_empty(),
        "the other host got {} requests",
        received.len()
    );
    // GitLab itself was asked once per call (no retry of a redirect).
    assert_eq!(gitlab.received_requests().await.unwrap().len(), 5);
}

#[tokio::test]
async fn plain_http_to_a_remote_host_is_refused_before_anything_is_sent() {
    let client = GitLabClient::with_url_policy(
        "http://gitlab.example.invalid",
        fast(),
        UrlPolicy::HttpsOrLoopback,
    );
    assert!(client.url_refusal().is_some());
    let e = client
        .job_tags(&Secret::new(TOKEN), 7, 99)
        .await
        .unwrap_err();
    assert!(matches!(e, GitLabError::InsecureUrl { .. }), "{e:?}");
    let text = e.to_string();
    assert!(
        text.contains("plain http") && text.contains("AllowInsecureGitLabUrl"),
        "{text}"
    );
    assert!(!e.is_transient());

    // Allowed explicitly: the request goes out (and fails on the unresolvable name instead).
    let allowed = GitLabClient::with_url_policy(
        "http://gitlab.example.invalid",
        fast(),
        UrlPolicy::AllowInsecureHttp,
    );
    assert_eq!(allowed.url_refusal(), None);
    let e = allowed
        .job_tags(&Secret::new(TOKEN), 7, 99)
        .await
        .unwrap_err();
    assert!(matches!(e, GitLabError::Transport { .. }), "{e:?}");
}

#[tokio::test]
async fn loopback_http_still_works_for_the_stand_ins() {
    let gitlab = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/api/v4/projects/7/jobs/99"))
        .respond_with(ResponseTemplate::new(200).set_body_string(r#"{"tag_list":["docker"]}"#))
        .mount(&gitlab)
        .await;
    let client = GitLabClient::new(&gitlab.uri(), fast());
    assert_eq!(
        client.job_tags(&Secret::new(TOKEN), 7, 99).await.unwrap(),
        ["docker"]
    );
}
