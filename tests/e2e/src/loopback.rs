//! Loopback servers for the fleet tests: a stand-in for GitLab's runner API that keeps state
//! and records every call (on `wiremock`), and a fault-injecting proxy in front of moto (AWS
//! errors as the SDK gets them on the wire, also for functions run as processes), which
//! answers one request per connection (`Connection: close`) on a thread that ends with the
//! test process.

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

/// One HTTP request as read off the wire.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    /// Path and query, as sent.
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or_default()
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub fn read_request(stream: &TcpStream) -> Option<Request> {
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_owned();
    let target = parts.next()?.to_owned();
    let mut headers = Vec::new();
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).ok()? == 0 || header == "\r\n" {
            break;
        }
        if let Some((k, v)) = header.split_once(':') {
            headers.push((k.trim().to_owned(), v.trim().to_owned()));
        }
    }
    let length = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    Some(Request {
        method,
        target,
        headers,
        body,
    })
}

pub fn respond(mut stream: &TcpStream, status: u16, content_type: &str, body: &str) {
    let reason = match status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        410 => "Gone",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Status",
    };
    let _ = write!(
        stream,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// What the runner API stand-in knows and how it misbehaves.
#[derive(Debug, Default)]
pub struct RunnerApiState {
    next_id: u64,
    /// Runners that exist, with their token.
    pub runners: HashMap<u64, String>,
    /// Every token handed out: none may appear where it must not.
    pub issued_tokens: Vec<String>,
    /// Runners GitLab reports as running a job.
    pub busy: BTreeSet<u64>,
    /// The next N creates (deletes) answer 502; `u32::MAX` for always.
    pub failing_creates: u32,
    /// The next N creates make the runner and then answer 502 (the answer was lost: a retry
    /// makes a second runner).
    pub lost_create_answers: u32,
    /// Each runner's description (`GET /runners` lists them).
    pub descriptions: HashMap<u64, String>,
    pub failing_deletes: u32,
    /// Share of all calls (after the scripted ones) answered 502, spread deterministically.
    pub failure_percent: u64,
    /// Calls answered 502 because of `failure_percent`.
    pub random_failures: u64,
    pub calls: Vec<Request>,
    /// GitLab's jobs (`GET /api/v4/projects/:project/jobs/:job`): (project, job) -> (status,
    /// the runner that ran it). A job not listed is answered 404.
    pub jobs: HashMap<(u64, u64), (String, Option<u64>)>,
    /// The job API answers 502 (GitLab unreachable for job reads).
    pub jobs_unavailable: bool,
}

/// GitLab's runner API on loopback: `POST /api/v4/user/runners` creates (201, `glrt-` token),
/// `DELETE /api/v4/runners/:id` removes (204, or 404 when unknown), `GET
/// /api/v4/runners/:id/jobs` lists one running job when the runner is marked busy, `GET
/// /api/v4/projects/:id/jobs/:job_id` answers from `jobs` (status and runner). Requests
/// without the expected `PRIVATE-TOKEN` get 401.
///
/// On [`serve_stateful`]; dropping the stand-in stops its server.
pub struct RunnerApiStandIn {
    pub url: String,
    pub state: Arc<Mutex<RunnerApiState>>,
    _server: wiremock::MockServer,
}

/// A stateful responder: every request answered by one function (status, headers, body),
/// the way `gitlab-runner-mock` answers from its state behind a mutex.
struct Stateful<F>(F);

impl<F> wiremock::Respond for Stateful<F>
where
    F: Fn(&Request) -> (u16, Vec<(String, String)>, String) + Send + Sync,
{
    fn respond(&self, request: &wiremock::Request) -> wiremock::ResponseTemplate {
        let (status, headers, body) = (self.0)(&Request::from(request));
        headers.into_iter().fold(
            wiremock::ResponseTemplate::new(status).set_body_raw(body, "application/json"),
            |answer, (k, v)| answer.insert_header(k.as_str(), v.as_str()),
        )
    }
}

/// A wiremock server on loopback that answers every request with `answer`. wiremock serves
/// on a thread of its own, so a test may block on a child process that calls it; dropping
/// the server stops it.
pub async fn serve_stateful<F>(answer: F) -> wiremock::MockServer
where
    F: Fn(&Request) -> (u16, Vec<(String, String)>, String) + Send + Sync + 'static,
{
    let server = wiremock::MockServer::start().await;
    wiremock::Mock::given(wiremock::matchers::any())
        .respond_with(Stateful(answer))
        .mount(&server)
        .await;
    server
}

impl From<&wiremock::Request> for Request {
    fn from(r: &wiremock::Request) -> Self {
        let target = match r.url.query() {
            Some(query) => format!("{}?{query}", r.url.path()),
            None => r.url.path().to_owned(),
        };
        Self {
            method: r.method.to_string(),
            target,
            headers: r
                .headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_owned()))
                .collect(),
            body: r.body.clone(),
        }
    }
}

impl RunnerApiStandIn {
    pub async fn start(api_token: &str, first_id: u64) -> Self {
        let state = Arc::new(Mutex::new(RunnerApiState {
            next_id: first_id,
            ..Default::default()
        }));
        let shared = state.clone();
        let api_token = api_token.to_owned();
        let server = serve_stateful(move |request| {
            let (status, body) = answer(&mut shared.lock().unwrap(), request, &api_token);
            (status, Vec::new(), body)
        })
        .await;
        Self {
            url: server.uri(),
            state,
            _server: server,
        }
    }

    pub fn state(&self) -> std::sync::MutexGuard<'_, RunnerApiState> {
        self.state.lock().unwrap()
    }
}

fn answer(state: &mut RunnerApiState, request: &Request, api_token: &str) -> (u16, String) {
    state.calls.push(request.clone());
    // "Delete a runner by authentication token": a per-job runner removes itself.
    if request.method == "DELETE" && request.path() == "/api/v4/runners" {
        let body = request.body_text();
        let token = body.strip_prefix("token=").unwrap_or_default();
        let id = state
            .runners
            .iter()
            .find(|(_, t)| t.as_str() == token)
            .map(|(id, _)| *id);
        return match id.and_then(|id| state.runners.remove(&id)) {
            Some(_) => (204, String::new()),
            None => (403, r#"{"message":"403 Forbidden"}"#.into()),
        };
    }
    if request.header("private-token") != Some(api_token) {
        return (401, r#"{"message":"401 Unauthorized"}"#.into());
    }
    if state.failure_percent > 0 {
        let n = state.calls.len() as u64;
        let roll = (n.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) % 100;
        if roll < state.failure_percent {
            state.random_failures += 1;
            return (502, "<html>502 Bad Gateway</html>".into());
        }
    }
    let segments: Vec<&str> = request.path().trim_matches('/').split('/').collect();
    match (request.method.as_str(), segments.as_slice()) {
        ("POST", ["api", "v4", "user", "runners"]) => {
            if state.failing_creates > 0 {
                if state.failing_creates != u32::MAX {
                    state.failing_creates -= 1;
                }
                return (502, "<html>502 Bad Gateway</html>".into());
            }
            state.next_id += 1;
            let id = state.next_id;
            let token = format!("glrt-t{id}-{:016x}", id.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            state.runners.insert(id, token.clone());
            state.issued_tokens.push(token.clone());
            let description =
                crate::liveness::gitlab::form_value(&request.body_text(), "description");
            state
                .descriptions
                .insert(id, description.unwrap_or_default());
            if state.lost_create_answers > 0 {
                state.lost_create_answers -= 1;
                return (502, "<html>502 Bad Gateway</html>".into());
            }
            (
                201,
                serde_json::json!({"id": id, "token": token, "token_expires_at": null}).to_string(),
            )
        }
        ("DELETE", ["api", "v4", "runners", id]) => {
            if state.failing_deletes > 0 {
                if state.failing_deletes != u32::MAX {
                    state.failing_deletes -= 1;
                }
                return (503, "{}".into());
            }
            match id.parse().ok().and_then(|id| state.runners.remove(&id)) {
                Some(_) => (204, String::new()),
                None => (404, r#"{"message":"404 Not found"}"#.into()),
            }
        }
        ("GET", ["api", "v4", "projects", project, "jobs", job]) => {
            if state.jobs_unavailable {
                return (502, "<html>502 Bad Gateway</html>".into());
            }
            let key = (project.parse().unwrap_or(0), job.parse().unwrap_or(0));
            match state.jobs.get(&key) {
                Some((status, runner)) => (
                    200,
                    serde_json::json!({
                        "id": key.1, "name": format!("job {}", key.1), "status": status,
                        "stage": "test", "tag_list": [],
                        "pipeline": {"id": 1, "project_id": key.0},
                        "runner": runner.map(|id| serde_json::json!({"id": id})),
                    })
                    .to_string(),
                ),
                None => (404, r#"{"message":"404 Job Not Found"}"#.into()),
            }
        }
        ("GET", ["api", "v4", "runners"]) => {
            let listed: Vec<serde_json::Value> = state
                .runners
                .keys()
                .map(|id| serde_json::json!({"id": id, "description": state.descriptions.get(id)}))
                .collect();
            (200, serde_json::Value::from(listed).to_string())
        }
        ("GET", ["api", "v4", "runners", id, "jobs"]) => {
            let id: u64 = id.parse().unwrap_or(0);
            if state.busy.contains(&id) {
                (200, r#"[{"id": 1, "status": "running"}]"#.into())
            } else {
                (200, "[]".into())
            }
        }
        _ => (404, r#"{"message":"404 Not found"}"#.into()),
    }
}

/// A rule of the fault proxy: given a request, an answer instead of forwarding it.
pub type FaultRule = dyn Fn(&Request) -> Option<(u16, String)> + Send + Sync;

/// A proxy in front of `upstream` (moto) that answers some requests itself (an AWS error, a
/// throttle) and forwards the rest. Counts the faults it injected.
///
/// Where the fault's meaning is on the wire: the SDK's retries of a throttle, our adapters'
/// reading of an AWS error code (`InsufficientInstanceCapacity` as no capacity), and
/// functions run as separate processes. A fault at a port in process goes through the
/// decorator `ephemeral_core::testing::Faulty` instead, which never reaches the SDK.
pub struct FaultProxy {
    pub url: String,
    pub faults: Arc<Mutex<Vec<Request>>>,
}

impl FaultProxy {
    pub fn start(upstream: &str, rule: Box<FaultRule>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let upstream = upstream
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_owned();
        let faults = Arc::new(Mutex::new(Vec::new()));
        let seen = faults.clone();
        let rule: Arc<FaultRule> = Arc::from(rule);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let (upstream, seen, rule) = (upstream.clone(), seen.clone(), rule.clone());
                std::thread::spawn(move || {
                    let Some(request) = read_request(&stream) else {
                        return;
                    };
                    if let Some((status, body)) = rule(&request) {
                        seen.lock().unwrap().push(request);
                        respond(&stream, status, "text/xml", &body);
                        return;
                    }
                    forward(&upstream, &request, &stream);
                });
            }
        });
        Self { url, faults }
    }

    pub fn fault_count(&self) -> usize {
        self.faults.lock().unwrap().len()
    }
}

fn forward(upstream: &str, request: &Request, mut client: &TcpStream) {
    let Ok(mut server) = TcpStream::connect(upstream) else {
        respond(client, 502, "text/plain", "upstream unreachable");
        return;
    };
    let mut head = format!("{} {} HTTP/1.1\r\n", request.method, request.target);
    for (k, v) in &request.headers {
        if !k.eq_ignore_ascii_case("connection") {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
    }
    head.push_str("Connection: close\r\n\r\n");
    if server.write_all(head.as_bytes()).is_err() || server.write_all(&request.body).is_err() {
        return;
    }
    // The upstream closes after its answer: relay everything, framing included.
    let mut answer = Vec::new();
    let _ = server.read_to_end(&mut answer);
    let _ = client.write_all(&answer);
}

/// An EC2 Query API error document, as EC2 sends it.
pub fn ec2_error(code: &str, message: &str) -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{code}</Code><Message>{message}</Message></Error></Errors><RequestID>fault-proxy</RequestID></Response>"
    )
}
