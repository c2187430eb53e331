//! The runner API client against a stand-in for GitLab on loopback that answers from a script
//! and records every request.

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ephemeral_gitlab::*;

#[derive(Debug, Clone)]
struct Recorded {
    method: String,
    path: String,
    private_token: Option<String>,
    body: String,
}

/// Answers `METHOD /path` (query string ignored) from a queue of (status, body); an empty or
/// missing queue answers 599 so that a test notices a call it did not script.
struct StandIn {
    url: String,
    calls: Arc<Mutex<Vec<Recorded>>>,
}

impl StandIn {
    fn start(script: Vec<(&str, u16, &str)>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let calls = Arc::new(Mutex::new(Vec::new()));
        let mut queues: HashMap<String, VecDeque<(u16, String)>> = HashMap::new();
        for (route, status, body) in script {
            queues
                .entry(route.to_owned())
                .or_default()
                .push_back((status, body.to_owned()));
        }
        let recorded = calls.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                let mut parts = line.split_whitespace();
                let method = parts.next().unwrap_or_default().to_owned();
                let path = parts
                    .next()
                    .unwrap_or_default()
                    .split('?')
                    .next()
                    .unwrap()
                    .to_owned();
                let (mut length, mut token) = (0usize, None);
                loop {
                    let mut header = String::new();
                    reader.read_line(&mut header).unwrap();
                    if header == "\r\n" || header.is_empty() {
                        break;
                    }
                    let (name, value) = header.split_once(':').unwrap();
                    match name.to_ascii_lowercase().as_str() {
                        "content-length" => length = value.trim().parse().unwrap(),
                        "private-token" => token = Some(value.trim().to_owned()),
                        _ => {}
                    }
                }
                let mut body = vec![0; length];
                reader.read_exact(&mut body).unwrap();
                let route = format!("{method} {path}");
                recorded.lock().unwrap().push(Recorded {
                    method,
                    path,
                    private_token: token,
                    body: String::from_utf8_lossy(&body).into_owned(),
                });
                let (status, body) = queues
                    .get_mut(&route)
                    .and_then(VecDeque::pop_front)
                    .unwrap_or((599, format!("{{\"message\":\"unscripted {route}\"}}")));
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        Self { url, calls }
    }

    fn calls(&self) -> Vec<Recorded> {
        self.calls.lock().unwrap().clone()
    }
}

fn client(url: &str) -> GitLabClient {
    GitLabClient::new(
        url,
        RetryPolicy {
            max_retries: 3,
            min_delay: Duration::from_millis(5),
            max_delay: Duration::from_millis(20),
        },
    )
}

fn runner() -> NewRunner {
    NewRunner {
        description: "ephemeral group/app job 42 (build)".into(),
        tags: vec!["docker".into(), "large".into()],
        run_untagged: false,
        scope: RunnerScope::Group(7),
        maximum_timeout_seconds: Some(3600),
    }
}

const RUNNER_TOKEN: &str = "glrt-t3st_r5nn3r_t0k3n";

#[tokio::test]
async fn creates_a_runner_the_current_way_and_never_shows_its_token() {
    let gitlab = StandIn::start(vec![(
        "POST /api/v4/user/runners",
        201,
        r#"{"id": 9001, "token": "glrt-t3st_r5nn3r_t0k3n", "token_expires_at": null}"#,
    )]);
    let create = Registration::CreateRunnerToken(Secret::new("glpat-creator"));
    let created = client(&gitlab.url)
        .create_runner(&create, &runner())
        .await
        .unwrap();
    assert_eq!(created.id, 9001);
    assert_eq!(created.token.expose(), RUNNER_TOKEN);
    assert!(!format!("{created:?}").contains("glrt-"), "{created:?}");

    let calls = gitlab.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].private_token.as_deref(), Some("glpat-creator"));
    for field in [
        "runner_type=group_type",
        "group_id=7",
        "tag_list=docker%2Clarge",
        "run_untagged=false",
        "maximum_timeout=3600",
        "locked=true",
    ] {
        assert!(
            calls[0].body.contains(field),
            "{field} in {}",
            calls[0].body
        );
    }
}

#[tokio::test]
async fn legacy_registration_works_and_410_says_what_to_do() {
    let gitlab = StandIn::start(vec![
        (
            "POST /api/v4/runners",
            201,
            r#"{"id": 5, "token": "glrt-legacy"}"#,
        ),
        ("POST /api/v4/runners", 410, r#"{"message": "410 Gone"}"#),
    ]);
    let legacy = Registration::RegistrationToken(Secret::new("GR1348941registration"));
    let gl = client(&gitlab.url);
    assert_eq!(gl.create_runner(&legacy, &runner()).await.unwrap().id, 5);
    let err = gl.create_runner(&legacy, &runner()).await.unwrap_err();
    assert!(matches!(err, GitLabError::RegistrationDisabled { .. }));
    let text = err.to_string();
    assert!(text.contains("create_runner scope"), "{text}");
    assert!(!text.contains("GR1348941"), "{text}");
    // The registration token travels in the form, not in a header.
    assert!(
        gitlab.calls()[0]
            .body
            .contains("token=GR1348941registration")
    );
    assert_eq!(gitlab.calls()[0].private_token, None);
}

#[tokio::test]
async fn server_errors_are_retried_with_backoff_then_reported_clearly() {
    let gitlab = StandIn::start(vec![
        ("POST /api/v4/user/runners", 502, "<html>Bad Gateway</html>"),
        (
            "POST /api/v4/user/runners",
            503,
            r#"{"message": "try later"}"#,
        ),
        (
            "POST /api/v4/user/runners",
            201,
            r#"{"id": 77, "token": "glrt-x"}"#,
        ),
        ("DELETE /api/v4/runners/77", 500, r#"{"message": "boom"}"#),
        ("DELETE /api/v4/runners/77", 500, r#"{"message": "boom"}"#),
        ("DELETE /api/v4/runners/77", 500, r#"{"message": "boom"}"#),
        (
            "DELETE /api/v4/runners/77",
            500,
            r#"{"message": "still boom"}"#,
        ),
    ]);
    let gl = client(&gitlab.url);
    let token = Secret::new("glpat-admin");
    let created = gl
        .create_runner(&Registration::CreateRunnerToken(token.clone()), &runner())
        .await
        .unwrap();
    assert_eq!(created.id, 77);
    assert_eq!(gitlab.calls().len(), 3, "two failures, then success");

    let err = gl.delete_runner(&token, 77).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "DELETE /runners/77: GitLab answered 500: still boom (after 4 attempts)"
    );
    assert_eq!(gitlab.calls().len(), 7, "1 + 3 retries");
}

#[tokio::test]
async fn unreachable_gitlab_is_a_transport_error_after_retries() {
    // Nothing listens there once the listener is dropped.
    let url = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let err = client(&url)
        .runner_busy(&Secret::new("glpat-x"), 1)
        .await
        .unwrap_err();
    assert!(
        matches!(err, GitLabError::Transport { attempts: 4, .. }),
        "{err:?}"
    );
    assert!(!err.to_string().contains("glpat"));
}

#[tokio::test]
async fn delete_treats_404_as_done_and_busy_reads_running_jobs() {
    let gitlab = StandIn::start(vec![
        ("DELETE /api/v4/runners/1", 204, ""),
        (
            "DELETE /api/v4/runners/1",
            404,
            r#"{"message": "404 Runner Not Found"}"#,
        ),
        (
            "DELETE /api/v4/runners/2",
            403,
            r#"{"message": "403 Forbidden"}"#,
        ),
        (
            "GET /api/v4/runners/3/jobs",
            200,
            r#"[{"id": 10, "status": "running"}]"#,
        ),
        ("GET /api/v4/runners/4/jobs", 200, "[]"),
        (
            "GET /api/v4/runners/5/jobs",
            404,
            r#"{"message": "404 Runner Not Found"}"#,
        ),
    ]);
    let gl = client(&gitlab.url);
    let token = Secret::new("glpat-admin");
    assert_eq!(gl.delete_runner(&token, 1).await.unwrap(), Deleted::Removed);
    assert_eq!(
        gl.delete_runner(&token, 1).await.unwrap(),
        Deleted::AlreadyGone
    );
    let denied = gl.delete_runner(&token, 2).await.unwrap_err();
    assert!(
        matches!(denied, GitLabError::Unauthorized { status: 403, .. }),
        "{denied:?}"
    );
    assert!(gl.runner_busy(&token, 3).await.unwrap());
    assert!(!gl.runner_busy(&token, 4).await.unwrap());
    assert!(!gl.runner_busy(&token, 5).await.unwrap());
    assert!(
        gitlab
            .calls()
            .iter()
            .all(|c| c.private_token.as_deref() == Some("glpat-admin"))
    );
    assert!(
        gitlab
            .calls()
            .iter()
            .any(|c| c.method == "GET" && c.path == "/api/v4/runners/3/jobs")
    );
}

#[tokio::test]
async fn a_runner_deletes_itself_with_its_own_token_in_the_body_never_a_header() {
    let gitlab = StandIn::start(vec![
        ("DELETE /api/v4/runners", 204, ""),
        (
            "DELETE /api/v4/runners",
            403,
            r#"{"message": "403 Forbidden"}"#,
        ),
        ("DELETE /api/v4/runners", 500, "boom"),
    ]);
    let gl = client(&gitlab.url);
    let own = Secret::new("glrt-per-job");
    assert_eq!(gl.delete_own_runner(&own).await.unwrap(), Deleted::Removed);
    // GitLab no longer knows the token: the runner is gone already.
    assert_eq!(
        gl.delete_own_runner(&own).await.unwrap(),
        Deleted::AlreadyGone
    );
    let failed = gl.delete_own_runner(&own).await.unwrap_err();
    assert!(!failed.to_string().contains("glrt-per-job"), "{failed}");
    let calls = gitlab.calls();
    assert!(calls.len() >= 3, "{calls:?}");
    assert!(calls.iter().all(|c| c.private_token.is_none()
        && c.path == "/api/v4/runners"
        && c.body == "token=glrt-per-job"));
}
