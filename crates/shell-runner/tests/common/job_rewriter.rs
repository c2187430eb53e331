//! An HTTP/1.1 bridge in front of gitlab-runner-mock that adds what the mock cannot send: a
//! job's `cache:` entries (the mock always answers `"cache": []`). Every request is passed on
//! unchanged; the answer to `POST /api/v4/jobs/request` gets the entries set for that job id.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use url::Url;

pub struct JobRewriter {
    port: u16,
    caches: Arc<Mutex<HashMap<u64, Value>>>,
    task: tokio::task::JoinHandle<()>,
}

impl JobRewriter {
    pub async fn start(upstream: Url) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let caches: Arc<Mutex<HashMap<u64, Value>>> = Arc::default();
        let task = {
            let caches = caches.clone();
            tokio::spawn(async move {
                let http = reqwest::Client::new();
                while let Ok((stream, _)) = listener.accept().await {
                    let (http, caches, upstream) = (http.clone(), caches.clone(), upstream.clone());
                    tokio::spawn(async move {
                        let _ = serve(stream, &http, &upstream, &caches).await;
                    });
                }
            })
        };
        Self { port, caches, task }
    }

    pub fn url(&self) -> Url {
        Url::parse(&format!("http://127.0.0.1:{}/", self.port)).unwrap()
    }

    /// The `cache` array GitLab would send with job `job_id`.
    pub fn set_cache(&self, job_id: u64, cache: Value) {
        self.caches.lock().unwrap().insert(job_id, cache);
    }
}

impl Drop for JobRewriter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(
    stream: TcpStream,
    http: &reqwest::Client,
    upstream: &Url,
    caches: &Mutex<HashMap<u64, Value>>,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    loop {
        let mut request_line = String::new();
        if read.read_line(&mut request_line).await? == 0 {
            return Ok(());
        }
        let mut parts = request_line.split_whitespace();
        let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
            return Ok(());
        };
        let (method, target) = (method.to_owned(), target.to_owned());
        let mut headers = Vec::new();
        loop {
            let mut line = String::new();
            read.read_line(&mut line).await?;
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
                .map(|(_, v)| v.clone())
        };
        let mut body = Vec::new();
        if header("transfer-encoding").is_some_and(|t| t.contains("chunked")) {
            loop {
                let mut size = String::new();
                read.read_line(&mut size).await?;
                let size = usize::from_str_radix(size.trim().split(';').next().unwrap(), 16)
                    .map_err(std::io::Error::other)?;
                let mut chunk = vec![0; size + 2];
                read.read_exact(&mut chunk).await?;
                if size == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..size]);
            }
        } else if let Some(length) = header("content-length").and_then(|l| l.parse().ok()) {
            body.resize(length, 0);
            read.read_exact(&mut body).await?;
        }
        let url = upstream.join(target.trim_start_matches('/')).unwrap();
        let mut forward = http.request(method.parse().unwrap(), url);
        for (k, v) in &headers {
            if !["host", "content-length", "transfer-encoding", "connection"].contains(&k.as_str())
            {
                forward = forward.header(k, v);
            }
        }
        let answer = forward
            .body(body)
            .send()
            .await
            .map_err(std::io::Error::other)?;
        let status = answer.status();
        let answer_headers = answer.headers().clone();
        let mut answer_body = answer
            .bytes()
            .await
            .map_err(std::io::Error::other)?
            .to_vec();
        if target.ends_with("/api/v4/jobs/request")
            && status.as_u16() == 201
            && let Ok(mut job) = serde_json::from_slice::<Value>(&answer_body)
        {
            let id = job["id"].as_u64().unwrap_or_default();
            if let Some(cache) = caches.lock().unwrap().get(&id) {
                job["cache"] = cache.clone();
            }
            answer_body = serde_json::to_vec(&job).unwrap();
        }
        let mut head = format!(
            "HTTP/1.1 {} {}\r\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or("")
        );
        for (k, v) in &answer_headers {
            if !["content-length", "transfer-encoding", "connection"].contains(&k.as_str()) {
                head.push_str(&format!("{k}: {}\r\n", v.to_str().unwrap_or_default()));
            }
        }
        head.push_str(&format!("content-length: {}\r\n\r\n", answer_body.len()));
        write.write_all(head.as_bytes()).await?;
        write.write_all(&answer_body).await?;
        write.flush().await?;
    }
}
