//! A function's built binary run the way Lambda runs it: a Runtime API on loopback
//! ([`RuntimeApi`]) hands it one event at a time, the binary is one execution environment (one
//! process, warm between events), and each invoke waits for the function's response or error.
//! Only a separate process shows what a function costs in memory: its peak RSS (`VmHWM`)
//! after the events is what a Lambda memory size must hold.
//!
//! Why not `cargo lambda watch --only-lambda-apis`: cargo-lambda 1.9.2 sends
//! `Lambda-Runtime-Deadline-Ms: 600000` (a duration, not the epoch milliseconds Lambda sends),
//! so `lambda_runtime`'s `Context::deadline` lies 56 years in the past and a function that
//! plans by its remaining time (the shell runner) stops every job at once.
//!
//! The function process stops when this process exits, however it exits: it runs under a
//! `sh` that kills it when its stdin (a pipe from us) closes.

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::loopback::read_request;
use crate::workspace_root;

/// One process under a `sh` guard: killed on drop or when we exit.
struct Guarded {
    pid: u32,
    sh: Child,
    _stdin: ChildStdin,
}

impl Guarded {
    /// Starts `program` with `env` added, output to `log`; answers once it runs.
    fn start(program: &Path, env: &[(String, String)], log: &Path) -> Self {
        let mut command = Command::new("sh");
        command
            .arg("-c")
            // The pid first (so we can read the process's own /proc entry), then wait for our
            // end of the pipe to close.
            .arg(r#"log="$1"; shift; "$@" >"$log" 2>&1 & echo $!; read _; kill $! 2>/dev/null"#)
            .arg("sh")
            .arg(log)
            .arg(program)
            .current_dir(workspace_root())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        for (k, v) in env {
            command.env(k, v);
        }
        let mut sh = command
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", program.display()));
        let mut line = String::new();
        BufReader::new(sh.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let pid = line.trim().parse().expect("sh printed the pid");
        let stdin = sh.stdin.take().unwrap();
        Self {
            pid,
            sh,
            _stdin: stdin,
        }
    }

    fn alive(&self) -> bool {
        std::fs::read_to_string(format!("/proc/{}/stat", self.pid))
            .is_ok_and(|s| !s.contains(") Z "))
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        // SIGKILL: a Lambda environment is frozen and discarded, never shut down politely.
        let _ = Command::new("kill")
            .args(["-9", &self.pid.to_string()])
            .status();
        let _ = self.sh.kill();
        let _ = self.sh.wait();
    }
}

/// Memory of a process, from `/proc/<pid>/status`, in KiB.
#[derive(Debug, Clone, Copy, Default)]
pub struct Memory {
    /// Resident now.
    pub rss_kib: u64,
    /// Peak resident since start (`VmHWM`).
    pub peak_rss_kib: u64,
}

pub fn memory_of(pid: u32) -> Memory {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    Memory {
        rss_kib: field("VmRSS:"),
        peak_rss_kib: field("VmHWM:"),
    }
}

/// What one invoke answered.
#[derive(Debug)]
pub enum Answer {
    Ok(serde_json::Value),
    /// The function returned an error (`errorType`, `errorMessage` as Lambda reports them).
    Error(serde_json::Value),
}

impl Answer {
    pub fn ok(self) -> serde_json::Value {
        match self {
            Answer::Ok(v) => v,
            Answer::Error(e) => panic!("the function failed: {e}"),
        }
    }
}

pub struct LambdaProcess {
    pub name: String,
    pub binary: PathBuf,
    pub log: PathBuf,
    api: RuntimeApi,
    function: Guarded,
    /// Memory after the cold start (init done, waiting for its first event).
    pub after_init: Memory,
    /// Wall time of every invoke through the emulator, in order.
    pub invoke_times: Vec<Duration>,
    /// Invokes answered with a function error (counted by the caller that retries them).
    pub errors: usize,
}

/// The directory holding the built function binaries: `FUNCTION_BIN_DIR`, else the profile
/// directory this test or benchmark was built into (`target/<profile>/deps/..`).
pub fn function_bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("FUNCTION_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().unwrap();
    exe.parent().and_then(Path::parent).unwrap().to_path_buf()
}

impl LambdaProcess {
    /// Starts the Runtime API and `binary` with `env` (plus what Lambda sets), and waits
    /// until the function asks for its first event, i.e. its init (configuration, SDK
    /// clients, secrets read at cold start) is done. `timeout` is the function's configured
    /// timeout (the template's `Timeout`): each event's deadline is that far from its start.
    pub async fn start(
        name: &str,
        binary: &Path,
        timeout: Duration,
        env: &[(String, String)],
        logs: &Path,
    ) -> Self {
        assert!(
            binary.exists(),
            "{} is not built: run `cargo build --locked --bins` (or `--release`) first",
            binary.display()
        );
        std::fs::create_dir_all(logs).unwrap();
        let api = RuntimeApi::start(name, timeout);
        let mut full_env: Vec<(String, String)> = [
            ("AWS_LAMBDA_RUNTIME_API", format!("127.0.0.1:{}", api.port)),
            ("AWS_LAMBDA_FUNCTION_NAME", name.into()),
            ("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST".into()),
            ("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "256".into()),
            ("AWS_LAMBDA_LOG_STREAM_NAME", name.into()),
            ("AWS_LAMBDA_LOG_GROUP_NAME", format!("/aws/lambda/{name}")),
            // No instance metadata on this machine: don't let the SDK's chain look for it.
            ("AWS_EC2_METADATA_DISABLED", "true".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        full_env.extend(env.iter().cloned());
        let log = logs.join(format!("{name}.log"));
        let function = Guarded::start(binary, &full_env, &log);
        let process = Self {
            name: name.into(),
            binary: binary.to_path_buf(),
            log,
            api,
            function,
            after_init: Memory::default(),
            invoke_times: Vec::new(),
            errors: 0,
        };
        process.wait_ready().await
    }

    /// Init is done when the function has connected to the Runtime API: `lambda_runtime`
    /// opens that connection for its first `next` long-poll, after `main` built its
    /// configuration, clients and secrets. Polled, as the Runtime API tells the invoker nothing.
    async fn wait_ready(mut self) -> Self {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            assert!(
                self.function.alive(),
                "{} exited during init; its log ({}):\n{}",
                self.name,
                self.log.display(),
                tail(&self.log)
            );
            if connected_to(self.function.pid, self.api.port) {
                self.after_init = memory_of(self.function.pid);
                return self;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{} did not finish init within 60 s", self.name);
    }

    /// One synchronous invoke (`RequestResponse`), as API Gateway or Step Functions make it.
    pub async fn invoke(&mut self, payload: &serde_json::Value) -> Answer {
        let started = Instant::now();
        let mut reply = self.api.invoke(payload.to_string().into_bytes());
        let answer = loop {
            // Checked every 200 ms: a function that dies mid-invoke never answers.
            match tokio::time::timeout(Duration::from_millis(200), &mut reply).await {
                Ok(answer) => break answer.expect("the Runtime API answers every invoke"),
                Err(_) => assert!(
                    self.function.alive(),
                    "{} died during an invoke; its log ({}):\n{}",
                    self.name,
                    self.log.display(),
                    tail(&self.log)
                ),
            }
        };
        self.invoke_times.push(started.elapsed());
        answer
    }

    pub fn memory(&self) -> Memory {
        memory_of(self.function.pid)
    }
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut start = text.len().saturating_sub(3000);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    text[start..].to_owned()
}

/// Whether `pid` holds an established TCP connection to 127.0.0.1:`port`: its socket fds'
/// inodes, looked up in the kernel's IPv4 table.
fn connected_to(pid: u32, port: u16) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    let inodes: std::collections::HashSet<String> = fds
        .filter_map(|fd| {
            let target = std::fs::read_link(fd.ok()?.path()).ok()?;
            let target = target.to_str()?;
            Some(
                target
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .to_owned(),
            )
        })
        .collect();
    let remote = format!("0100007F:{port:04X}");
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .any(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local, remote, state (01 = ESTABLISHED), ..., inode (field 9)
            f.len() > 9 && f[2] == remote && f[3] == "01" && inodes.contains(f[9])
        })
}

/// One event for the function, and where its answer goes.
struct Invocation {
    payload: Vec<u8>,
    reply: tokio::sync::oneshot::Sender<Answer>,
}

/// Lambda's Runtime API (the 2018-06-01 interface `lambda_runtime` speaks) for one function,
/// on 127.0.0.1: `GET .../invocation/next` hands out the next queued event with the headers
/// Lambda sends, `POST .../invocation/<id>/response` and `.../error` answer it. One request
/// per connection; a thread per connection, ending with this process.
struct RuntimeApi {
    port: u16,
    queue: mpsc::Sender<Invocation>,
}

impl RuntimeApi {
    fn start(name: &str, timeout: Duration) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let (queue, events) = mpsc::channel::<Invocation>();
        let events = Arc::new(Mutex::new(events));
        let waiting: Arc<Mutex<HashMap<String, tokio::sync::oneshot::Sender<Answer>>>> =
            Arc::default();
        let arn = format!("arn:aws:lambda:us-east-1:123456789012:function:{name}");
        let sequence = Arc::new(AtomicU64::new(0));
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let (events, waiting, arn, sequence) = (
                    events.clone(),
                    waiting.clone(),
                    arn.clone(),
                    sequence.clone(),
                );
                std::thread::spawn(move || {
                    let Some(request) = read_request(&stream) else {
                        return;
                    };
                    let path = request.path().to_owned();
                    if request.method == "GET" && path.ends_with("/runtime/invocation/next") {
                        // Long poll: blocks until an event is queued (or we exit).
                        let Ok(event) = events.lock().unwrap().recv() else {
                            return;
                        };
                        let n = sequence.fetch_add(1, Ordering::SeqCst);
                        let id = format!("00000000-0000-4000-8000-{n:012}");
                        let deadline_ms = SystemTime::now()
                            .duration_since(UNIX_EPOCH)
                            .unwrap()
                            .as_millis()
                            + timeout.as_millis();
                        waiting.lock().unwrap().insert(id.clone(), event.reply);
                        let headers = [
                            ("Lambda-Runtime-Aws-Request-Id", id.clone()),
                            ("Lambda-Runtime-Deadline-Ms", deadline_ms.to_string()),
                            ("Lambda-Runtime-Invoked-Function-Arn", arn.clone()),
                            (
                                "Lambda-Runtime-Trace-Id",
                                format!("Root=1-00000000-{n:024};Sampled=0"),
                            ),
                        ];
                        write_response(&stream, 200, &headers, &event.payload);
                        return;
                    }
                    let answered = path
                        .strip_prefix("/2018-06-01/runtime/invocation/")
                        .and_then(|rest| rest.split_once('/'));
                    match answered {
                        Some((id, kind @ ("response" | "error"))) if request.method == "POST" => {
                            let body = serde_json::from_slice(&request.body)
                                .unwrap_or_else(|_| serde_json::Value::String(request.body_text()));
                            let answer = if kind == "error" {
                                Answer::Error(body)
                            } else {
                                Answer::Ok(body)
                            };
                            if let Some(reply) = waiting.lock().unwrap().remove(id) {
                                let _ = reply.send(answer);
                            }
                            write_response(&stream, 202, &[], b"{}");
                        }
                        // init/error and anything else: the function's log says why.
                        _ => write_response(&stream, 202, &[], b"{}"),
                    }
                });
            }
        });
        Self { port, queue }
    }

    fn invoke(&self, payload: Vec<u8>) -> tokio::sync::oneshot::Receiver<Answer> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.queue
            .send(Invocation { payload, reply })
            .expect("the Runtime API runs");
        answer
    }
}

fn write_response(mut stream: &TcpStream, status: u16, headers: &[(&str, String)], body: &[u8]) {
    let mut head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        if status == 200 { "OK" } else { "Accepted" },
        body.len()
    );
    for (k, v) in headers {
        head += &format!("{k}: {v}\r\n");
    }
    head += "\r\n";
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(body);
}
