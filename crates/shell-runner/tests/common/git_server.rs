//! A real git smart-HTTP server on loopback for the checkout tests: `git http-backend` (CGI)
//! behind a small HTTP/1.1 bridge that asks for the job token as the basic-auth password,
//! as GitLab does (`gitlab-ci-token:<job token>`). It serves the repositories under one
//! directory and stops when dropped.

use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use base64::Engine;

/// What the server saw of one request (for the tests' assertions).
#[derive(Debug, Clone)]
pub struct SeenRequest {
    pub method: String,
    pub target: String,
    pub authorized: bool,
}

pub struct GitServer {
    pub port: u16,
    tokens: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    seen: Arc<Mutex<Vec<SeenRequest>>>,
}

impl GitServer {
    /// Serves the bare repositories under `root` (`http://127.0.0.1:<port>/<name>.git`),
    /// answering 401 to any request whose basic-auth password is not `token` (or one given
    /// to [`Self::accept`]).
    pub fn start(root: &Path, token: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the git server");
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let tokens = Arc::new(Mutex::new(vec![token.to_owned()]));
        let thread = {
            let (stop, seen, tokens) = (stop.clone(), seen.clone(), tokens.clone());
            let root = root.to_path_buf();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let (root, tokens, seen) = (root.clone(), tokens.clone(), seen.clone());
                            std::thread::spawn(move || {
                                let _ = serve(stream, &root, &tokens, &seen);
                            });
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(std::time::Duration::from_millis(5));
                        }
                        Err(_) => break,
                    }
                }
            })
        };
        Self {
            port,
            tokens,
            stop,
            thread: Some(thread),
            seen,
        }
    }

    /// `http://gitlab-ci-token:<token>@127.0.0.1:<port>/<path>`, as GitLab's `CI_REPOSITORY_URL`.
    pub fn url_with_token(&self, path: &str, token: &str) -> String {
        format!(
            "http://gitlab-ci-token:{token}@127.0.0.1:{}/{path}",
            self.port
        )
    }

    /// Accepts `token` too (one server for many jobs, each with its own token).
    pub fn accept(&self, token: &str) {
        self.tokens.lock().unwrap().push(token.to_owned());
    }

    pub fn seen(&self) -> Vec<SeenRequest> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for GitServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(
    stream: TcpStream,
    root: &Path,
    tokens: &Mutex<Vec<String>>,
    seen: &Mutex<Vec<SeenRequest>>,
) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_owned();
    let target = parts.next().unwrap_or_default().to_owned();
    let mut headers = Vec::<(String, String)>::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
    }
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let body = read_body(
        &mut reader,
        header("content-length"),
        header("transfer-encoding"),
    )?;

    let authorized = header("authorization")
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .and_then(|raw| String::from_utf8(raw).ok())
        .is_some_and(|creds| {
            creds
                .split_once(':')
                .is_some_and(|(_, pass)| tokens.lock().unwrap().iter().any(|t| t == pass))
        });
    seen.lock().unwrap().push(SeenRequest {
        method: method.clone(),
        target: target.clone(),
        authorized,
    });
    if !authorized {
        out.write_all(
            b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"GitLab\"\r\n\
              Content-Length: 0\r\nConnection: close\r\n\r\n",
        )?;
        return out.shutdown(Shutdown::Both);
    }

    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let mut cgi = Command::new("git");
    cgi.arg("http-backend")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", root)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_PROJECT_ROOT", root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("GATEWAY_INTERFACE", "CGI/1.1")
        .env("REQUEST_METHOD", &method)
        .env("PATH_INFO", path)
        .env("QUERY_STRING", query)
        .env("REMOTE_USER", "gitlab-ci-token")
        .env("REMOTE_ADDR", "127.0.0.1")
        .env("CONTENT_LENGTH", body.len().to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if let Some(t) = header("content-type") {
        cgi.env("CONTENT_TYPE", t);
    }
    for (k, v) in &headers {
        if k == "authorization" || k == "content-type" || k == "content-length" {
            continue;
        }
        cgi.env(
            format!("HTTP_{}", k.to_ascii_uppercase().replace('-', "_")),
            v,
        );
    }
    let mut child = cgi.spawn()?;
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&body);
    });
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut status = "200 OK".to_owned();
    let mut response_headers = String::new();
    loop {
        let mut line = String::new();
        if stdout.read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        match line.split_once(':') {
            Some((k, v)) if k.eq_ignore_ascii_case("status") => status = v.trim().to_owned(),
            _ => {
                response_headers.push_str(line);
                response_headers.push_str("\r\n");
            }
        }
    }
    write!(
        out,
        "HTTP/1.1 {status}\r\n{response_headers}Connection: close\r\n\r\n"
    )?;
    std::io::copy(&mut stdout, &mut out)?;
    let _ = writer.join();
    let _ = child.wait();
    out.flush()?;
    out.shutdown(Shutdown::Both)
}

fn read_body(
    reader: &mut impl BufRead,
    content_length: Option<&str>,
    transfer_encoding: Option<&str>,
) -> std::io::Result<Vec<u8>> {
    let mut body = Vec::new();
    if transfer_encoding.is_some_and(|t| t.eq_ignore_ascii_case("chunked")) {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size)?;
            let size = usize::from_str_radix(size.trim().split(';').next().unwrap_or("0"), 16)
                .map_err(std::io::Error::other)?;
            if size == 0 {
                // Trailers, then the blank line.
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line)? == 0 || line.trim_end().is_empty() {
                        break;
                    }
                }
                break;
            }
            let start = body.len();
            body.resize(start + size, 0);
            reader.read_exact(&mut body[start..])?;
            let mut crlf = [0u8; 2];
            reader.read_exact(&mut crlf)?;
        }
    } else if let Some(n) = content_length.and_then(|n| n.parse::<usize>().ok()) {
        body.resize(n, 0);
        reader.read_exact(&mut body)?;
    }
    Ok(body)
}

/// Runs git (the test machine's) in `dir` with a fixed identity; panics on failure.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.com")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.com")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        // `git submodule add` of a local path.
        .env("GIT_ALLOW_PROTOCOL", "file")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// Writes `files` and commits them in the work tree `dir`; returns the commit id.
pub fn commit(dir: &Path, files: &[(&str, &str)], message: &str) -> String {
    for (name, contents) in files {
        let path = dir.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(path, contents).unwrap();
        git(dir, &["add", name]);
    }
    git(dir, &["commit", "-q", "--allow-empty", "-m", message]);
    git(dir, &["rev-parse", "HEAD"])
}

/// Pushes the work tree `dir` (all branches, tags and `refs/pipelines/*`) into a new bare
/// repository `<root>/<name>.git`, as a GitLab project is stored.
pub fn publish(dir: &Path, root: &Path, name: &str) -> PathBuf {
    let bare = root.join(format!("{name}.git"));
    if let Some(parent) = bare.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    git(root, &["init", "-q", "--bare", bare.to_str().unwrap()]);
    git(
        dir,
        &[
            "push",
            "-q",
            "--force",
            bare.to_str().unwrap(),
            "refs/heads/*:refs/heads/*",
            "refs/tags/*:refs/tags/*",
            "refs/pipelines/*:refs/pipelines/*",
        ],
    );
    bare
}
