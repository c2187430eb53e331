//! Git without a git binary (the zip package's `provided.al2023` runtime has none): fetch over
//! smart HTTP and check out with gitoxide's building blocks, as
//! [`ephemeral_core::shell::Checkout`] says. Blocking: run it on a blocking thread.
//!
//! gix-protocol speaks git (handshake, `ls-refs`, negotiation, shallow), gix-pack writes the
//! pack and its index, gix-index and gix-worktree-state write the index and the work tree
//! (with `.gitattributes`). What is left here is what `git init` and a ref update write: a
//! few plain files. (The `gix` crate on top of these brings its configuration, credential,
//! discovery and reflog machinery, 2.4 MB of binary with the rest: past the 10 MB budget.)
//!
//! The job token reaches the server only as an `Authorization` request header, set in memory
//! for this one connection by the HTTP adapter below: the remote URL written to `.git/config`
//! has no credentials, no process is started (so no argv to read), no git configuration is
//! read, no credential helper runs, and a redirect is not followed (the runner's HTTP client
//! follows none).

use std::collections::BTreeSet;
use std::num::NonZeroU32;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use ephemeral_core::shell::{self, Checkout, SubmoduleEntry};
use gix_object::FindExt;
use gix_protocol::fetch::{Shallow, Tags, negotiate};
use gix_transport::client::blocking_io::http;
use gix_utils::progress::Discard;

/// A failed git step, worded for the job's trace (never contains the token: the URLs in it
/// are the plan's, which have no credentials, and the header is never formatted).
#[derive(Debug)]
pub struct GitError(pub String);

impl std::fmt::Display for GitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The error and what caused it, on one line.
fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        let more = e.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = e.source();
    }
    text
}

fn fail(context: &str) -> impl FnOnce(gix_error::Error) -> GitError + '_ {
    move |e| GitError(format!("{context}: {}", chain(&e)))
}

fn io(context: &str) -> impl FnOnce(std::io::Error) -> GitError + '_ {
    move |e| GitError(format!("{context}: {e}"))
}

/// What the checkout wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedOut {
    /// The submodule paths (gitlinks) of the checked-out commit and their commits.
    pub gitlinks: Vec<(String, String)>,
    pub files: usize,
}

const HASH: gix_hash::Kind = gix_hash::Kind::Sha1;

/// A fresh repository in `dir` (empty or absent), `plan.url` as `origin`, the plan's refs
/// fetched (shallow when asked), and `plan.sha` checked out as a detached HEAD.
/// `interrupt` stops the transfer and the checkout; every HTTP request ends by `deadline`;
/// `fetched` is called between the fetch and the checkout (for the trace).
pub fn checkout(
    plan: &Checkout,
    dir: &Path,
    http: &HttpClient,
    interrupt: &AtomicBool,
    deadline: std::time::Instant,
    fetched: &dyn Fn(),
) -> Result<CheckedOut, GitError> {
    let refspecs = shell::fetch_refspecs(plan);
    let git_dir = dir.join(".git");
    init(&git_dir, plan, &refspecs)?;

    let refused = Arc::new(AtomicBool::new(false));
    let result = fetch(
        &git_dir,
        plan,
        &refspecs,
        http,
        interrupt,
        deadline,
        refused.clone(),
    );
    if let Err(e) = result {
        if refused.load(Ordering::Relaxed) {
            return Err(GitError(match &plan.auth {
                Some(_) => format!(
                    "the git server refused the job token (HTTP 401) for {}: the job cannot \
                     read this repository",
                    plan.url
                ),
                None => format!(
                    "the git server asks for credentials (HTTP 401) for {}, and the runner has \
                     none for this host",
                    plan.url
                ),
            }));
        }
        return Err(e);
    }
    if interrupt.load(Ordering::Relaxed) {
        return Err(GitError("interrupted".into()));
    }
    fetched();

    let id = gix_hash::ObjectId::from_hex(plan.sha.as_bytes())
        .map_err(|e| GitError(format!("commit id `{}`: {e}", plan.sha)))?;
    let objects = gix_odb::at(git_dir.join("objects"), HASH)
        .map_err(io("opening the object database"))?
        .into_arc()
        .map_err(io("opening the object database"))?;
    let mut buf = Vec::new();
    let tree = objects
        .find_commit(&id, &mut buf)
        .map_err(|_| {
            GitError(format!(
                "commit {} is not in what {} sent for {} (was it pushed? is GIT_DEPTH too small \
                 for the pipeline ref?)",
                plan.sha,
                plan.url,
                refspecs.join(" ")
            ))
        })?
        .tree();
    let outcome = write_worktree(dir, &git_dir, objects, &tree, interrupt)?;
    // HEAD names the commit itself: a detached HEAD, as GitLab's runner leaves it.
    std::fs::write(git_dir.join("HEAD"), format!("{id}\n")).map_err(io("writing HEAD"))?;
    Ok(outcome)
}

/// What `git init` writes and git needs, and the remote as `git clone` records it (the
/// credential-free URL and the refspecs), so that later `git` commands of the job (in the
/// container image) see a normal repository.
fn init(git_dir: &Path, plan: &Checkout, refspecs: &[String]) -> Result<(), GitError> {
    for sub in ["objects/pack", "objects/info", "refs/heads", "refs/tags"] {
        std::fs::create_dir_all(git_dir.join(sub)).map_err(io("creating the repository"))?;
    }
    let quote = |v: &str| format!("\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""));
    let mut config = String::from(
        "[core]\n\trepositoryformatversion = 0\n\tfilemode = true\n\tbare = false\n\
         \tlogallrefupdates = true\n",
    );
    config.push_str(&format!(
        "[remote \"origin\"]\n\turl = {}\n",
        quote(&plan.url)
    ));
    for spec in refspecs.iter().filter(|s| s.contains(':')) {
        config.push_str(&format!("\tfetch = {}\n", quote(spec)));
    }
    config.push_str("\ttagOpt = --no-tags\n");
    std::fs::write(git_dir.join("config"), config).map_err(io("writing .git/config"))?;
    std::fs::write(git_dir.join("HEAD"), "ref: refs/heads/main\n").map_err(io("writing HEAD"))
}

/// The negotiation of a repository that has nothing yet: every wanted tip is new, no `have`
/// to send, done after the first round.
struct Fresh<'a> {
    ref_map: &'a gix_protocol::fetch::RefMap,
    shallow: &'a Shallow,
}

struct NoObjects;

impl gix_object::FindHeader for NoObjects {
    fn try_header(&self, _id: &gix_hash::oid) -> gix_error::Result<Option<gix_object::Header>> {
        Ok(None)
    }
}

impl gix_protocol::fetch::Negotiate for Fresh<'_> {
    fn mark_complete_and_common_ref(&mut self) -> gix_error::Result<negotiate::Action> {
        Ok(negotiate::Action::MustNegotiate {
            remote_ref_target_known: vec![false; self.ref_map.mappings.len()],
        })
    }

    fn add_wants(
        &mut self,
        arguments: &mut gix_protocol::fetch::Arguments,
        remote_ref_target_known: &[bool],
    ) -> bool {
        negotiate::add_wants(
            &NoObjects,
            arguments,
            self.ref_map,
            remote_ref_target_known,
            self.shallow,
            |_| false,
        )
    }

    fn one_round(
        &mut self,
        _state: &mut negotiate::one_round::State,
        _arguments: &mut gix_protocol::fetch::Arguments,
        _previous_response: Option<&gix_protocol::fetch::Response>,
    ) -> gix_error::Result<(negotiate::Round, bool)> {
        Ok((
            negotiate::Round {
                haves_sent: 0,
                in_vain: 0,
                haves_to_send: 0,
                previous_response_had_at_least_one_in_common: false,
            },
            true,
        ))
    }
}

/// Fetches the refspecs' refs and their objects (a pack) into the fresh repository at
/// `git_dir`: connect, list the refs, receive the pack, write the refs.
fn fetch(
    git_dir: &Path,
    plan: &Checkout,
    refspecs: &[String],
    http: &HttpClient,
    interrupt: &AtomicBool,
    deadline: std::time::Instant,
    refused: Arc<AtomicBool>,
) -> Result<(), GitError> {
    let mut transport = transport_to(plan, http, deadline)?;
    let mut handshake = gix_protocol::handshake(
        &mut transport,
        gix_transport::Service::UploadPack,
        // Never a credential helper or a prompt: the job token is the only credential.
        move |_action| {
            refused.store(true, Ordering::Relaxed);
            Err(gix_error::message("the server refused the request's credentials").into())
        },
        Vec::new(),
        &mut Discard,
    )
    .map_err(fail(&format!("connecting to {}", plan.url)))?;
    let ref_map = list_refs(&mut handshake, &mut transport, plan, refspecs)?;
    receive_pack(
        git_dir,
        plan,
        &ref_map,
        &mut handshake,
        &mut transport,
        interrupt,
    )?;
    update_refs(git_dir, &ref_map)
}

type GitTransport = http::Transport<ReqwestHttp>;

/// Smart HTTP (protocol v2) to the repository, with the job token as its only credential.
fn transport_to(
    plan: &Checkout,
    http: &HttpClient,
    deadline: std::time::Instant,
) -> Result<GitTransport, GitError> {
    let url = gix_url::parse(gix_object::bstr::BStr::new(plan.url.as_str()))
        .map_err(|e| GitError(format!("the repository URL {}: {}", plan.url, chain(&e))))?;
    let auth = match &plan.auth {
        Some(auth) => {
            let value = auth
                .header
                .expose()
                .split_once(':')
                .map(|(_, v)| v.trim())
                .unwrap_or_default();
            let mut value = reqwest::header::HeaderValue::from_str(value)
                .map_err(|_| GitError("the job token is not a valid header value".into()))?;
            value.set_sensitive(true);
            Some(value)
        }
        None => None,
    };
    Ok(http::Transport::new_http(
        ReqwestHttp {
            client: http.client.clone(),
            runtime: http.runtime.clone(),
            auth,
            deadline,
        },
        url,
        gix_transport::Protocol::V2,
        false,
    ))
}

fn user_agent() -> (&'static str, Option<String>) {
    let agent = format!("git/ephemeral-shell-runner-{}", crate::VERSION);
    ("agent", Some(agent))
}

/// The remote's refs the refspecs name (`ls-refs`); none is an error that names them.
fn list_refs(
    handshake: &mut gix_protocol::Handshake,
    transport: &mut GitTransport,
    plan: &Checkout,
    refspecs: &[String],
) -> Result<gix_protocol::fetch::RefMap, GitError> {
    let specs = refspecs
        .iter()
        .map(|s| {
            gix_refspec::parse(s.as_str().into(), gix_refspec::parse::Operation::Fetch)
                .map(|r| r.to_owned())
                .map_err(|e| GitError(format!("refspec `{s}`: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let ref_map = handshake
        .prepare_lsrefs_or_extract_refmap(
            user_agent(),
            true,
            gix_protocol::fetch::refmap::init::Context {
                fetch_refspecs: specs,
                extra_refspecs: Vec::new(),
            },
        )
        .map_err(fail(&format!("asking {} for its refs", plan.url)))?
        .fetch_blocking(Discard, transport, false)
        .map_err(fail(&format!("asking {} for its refs", plan.url)))?;
    if ref_map.mappings.is_empty() {
        return Err(GitError(format!(
            "{} has none of {}",
            plan.url,
            refspecs.join(" ")
        )));
    }
    Ok(ref_map)
}

/// Wants every listed ref (to the plan's depth), has nothing, and writes the pack the remote
/// sends into `objects/pack`.
fn receive_pack(
    git_dir: &Path,
    plan: &Checkout,
    ref_map: &gix_protocol::fetch::RefMap,
    handshake: &mut gix_protocol::Handshake,
    transport: &mut GitTransport,
    interrupt: &AtomicBool,
) -> Result<(), GitError> {
    let shallow = match plan.depth.and_then(NonZeroU32::new) {
        Some(depth) => Shallow::DepthAtRemote(depth),
        None => Shallow::NoChange,
    };
    let pack_dir = git_dir.join("objects").join("pack");
    let mut negotiate = Fresh {
        ref_map,
        shallow: &shallow,
    };
    gix_protocol::fetch(
        &mut negotiate,
        |pack, progress, interrupt| {
            gix_pack::Bundle::write_to_directory(
                pack,
                Some(&pack_dir),
                progress,
                interrupt,
                None::<gix_object::find::Never>,
                HASH,
                Default::default(),
            )?;
            Ok(true)
        },
        Discard,
        interrupt,
        gix_protocol::fetch::Context {
            handshake,
            transport,
            user_agent: user_agent(),
            trace_packetlines: false,
        },
        gix_protocol::fetch::Options {
            shallow_file: git_dir.join("shallow"),
            shallow: &shallow,
            tags: Tags::None,
            reject_shallow_remote: false,
        },
    )
    .map_err(fail(&format!("fetching from {}", plan.url)))?;
    Ok(())
}

/// The local refs the refspecs name, as loose ref files (what `git fetch` writes in a fresh
/// repository).
fn update_refs(git_dir: &Path, ref_map: &gix_protocol::fetch::RefMap) -> Result<(), GitError> {
    for mapping in &ref_map.mappings {
        let (Some(local), Some(id)) = (&mapping.local, mapping.remote.as_id()) else {
            continue;
        };
        let name = local.to_string();
        if gix_validate::reference::name(local.as_ref()).is_err() || !name.starts_with("refs/") {
            return Err(GitError(format!("`{name}` is not a ref name")));
        }
        let path = git_dir.join(&name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io("writing refs"))?;
        }
        std::fs::write(&path, format!("{id}\n")).map_err(io("writing refs"))?;
    }
    Ok(())
}

/// The HTTP client for git: the runner's own async reqwest client (no redirect, rustls,
/// connection pool), driven from the blocking thread gix runs on.
#[derive(Clone)]
pub struct HttpClient {
    pub client: reqwest::Client,
    pub runtime: tokio::runtime::Handle,
}

/// gix's smart-HTTP transport ([`Http`](http::Http))
/// over the async reqwest client. gix speaks the git protocol; this only carries its requests.
/// (gix's own reqwest backend would add reqwest's blocking client, HTTP/2 and charset
/// decoding: about 1 MB of binary for nothing this runner needs.)
struct ReqwestHttp {
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
    /// `Authorization: Basic ...`, marked sensitive (never printed by reqwest).
    auth: Option<reqwest::header::HeaderValue>,
    deadline: std::time::Instant,
}

impl ReqwestHttp {
    fn exchange(
        &self,
        method: reqwest::Method,
        url: &str,
        headers: impl IntoIterator<Item = impl AsRef<str>>,
    ) -> Arc<Mutex<Exchange>> {
        let mut request = self.client.request(method, url);
        for line in headers {
            if let Some((name, value)) = line.as_ref().split_once(':') {
                request = request.header(name.trim(), value.trim());
            }
        }
        if let Some(auth) = &self.auth {
            request = request.header(reqwest::header::AUTHORIZATION, auth.clone());
        }
        Arc::new(Mutex::new(Exchange {
            stage: Stage::Pending(request),
            upload: Vec::new(),
            runtime: self.runtime.clone(),
            deadline: self.deadline,
        }))
    }
}

impl http::Http for ReqwestHttp {
    type Headers = Headers;
    type ResponseBody = Body;
    type PostBody = Upload;

    fn get(
        &mut self,
        url: &str,
        _base_url: &str,
        headers: impl IntoIterator<Item = impl AsRef<str>>,
    ) -> gix_error::Result<http::GetResponse<Headers, Body>> {
        let exchange = self.exchange(reqwest::Method::GET, url, headers);
        Ok(http::GetResponse {
            headers: Headers::new(exchange.clone()),
            body: Body::new(exchange),
        })
    }

    fn post(
        &mut self,
        url: &str,
        _base_url: &str,
        headers: impl IntoIterator<Item = impl AsRef<str>>,
        _body: http::PostBodyDataKind,
    ) -> gix_error::Result<http::PostResponse<Headers, Body, Upload>> {
        let exchange = self.exchange(reqwest::Method::POST, url, headers);
        Ok(http::PostResponse {
            post_body: Upload(exchange.clone()),
            headers: Headers::new(exchange.clone()),
            body: Body::new(exchange),
        })
    }

    fn configure(&mut self, _config: &dyn std::any::Any) -> gix_error::Result {
        // Everything is set here, not from git configuration.
        Ok(())
    }
}

enum Stage {
    Pending(reqwest::RequestBuilder),
    Sent(reqwest::Response),
    Failed,
}

/// One request: its body is collected (git's requests are want/have lists: small), sent when
/// gix first reads the response, and the response body streamed as gix reads it.
struct Exchange {
    stage: Stage,
    upload: Vec<u8>,
    runtime: tokio::runtime::Handle,
    deadline: std::time::Instant,
}

impl Exchange {
    fn response(&mut self) -> std::io::Result<&mut reqwest::Response> {
        if let Stage::Pending(_) = self.stage {
            let Stage::Pending(mut request) = std::mem::replace(&mut self.stage, Stage::Failed)
            else {
                unreachable!()
            };
            if !self.upload.is_empty() {
                request = request.body(std::mem::take(&mut self.upload));
            }
            let timeout = self
                .deadline
                .saturating_duration_since(std::time::Instant::now());
            let response = self
                .runtime
                .block_on(request.timeout(timeout).send())
                .map_err(|e| std::io::Error::other(chain(&e)))?;
            let status = response.status();
            if status == reqwest::StatusCode::UNAUTHORIZED {
                let www_authenticate = response
                    .headers()
                    .get_all(reqwest::header::WWW_AUTHENTICATE)
                    .iter()
                    .map(|v| v.as_bytes().into())
                    .collect();
                return Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    gix_transport::client::AuthenticationRequired { www_authenticate },
                ));
            }
            if !status.is_success() {
                return Err(std::io::Error::other(format!("HTTP status {status}")));
            }
            self.stage = Stage::Sent(response);
        }
        match &mut self.stage {
            Stage::Sent(response) => Ok(response),
            _ => Err(std::io::Error::other("the request failed")),
        }
    }
}

/// What gix writes for a POST.
pub struct Upload(Arc<Mutex<Exchange>>);

impl std::io::Write for Upload {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .expect("exchange lock")
            .upload
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The response headers as `name:value` lines (what gix checks the content type in).
pub struct Headers {
    exchange: Arc<Mutex<Exchange>>,
    text: Option<std::io::Cursor<Vec<u8>>>,
}

impl Headers {
    fn new(exchange: Arc<Mutex<Exchange>>) -> Self {
        Self {
            exchange,
            text: None,
        }
    }
    fn text(&mut self) -> std::io::Result<&mut std::io::Cursor<Vec<u8>>> {
        if self.text.is_none() {
            let mut exchange = self.exchange.lock().expect("exchange lock");
            let mut text = Vec::new();
            for (name, value) in exchange.response()?.headers() {
                text.extend_from_slice(name.as_str().as_bytes());
                text.push(b':');
                text.extend_from_slice(value.as_bytes());
                text.push(b'\n');
            }
            self.text = Some(std::io::Cursor::new(text));
        }
        Ok(self.text.as_mut().expect("just set"))
    }
}

impl std::io::Read for Headers {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        std::io::Read::read(self.text()?, buf)
    }
}

impl std::io::BufRead for Headers {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        std::io::BufRead::fill_buf(self.text()?)
    }
    fn consume(&mut self, amount: usize) {
        if let Some(text) = &mut self.text {
            text.consume(amount);
        }
    }
}

/// The response body, a chunk at a time.
pub struct Body {
    exchange: Arc<Mutex<Exchange>>,
    chunk: Vec<u8>,
    at: usize,
}

impl Body {
    fn new(exchange: Arc<Mutex<Exchange>>) -> Self {
        Self {
            exchange,
            chunk: Vec::new(),
            at: 0,
        }
    }
}

impl std::io::Read for Body {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let available = std::io::BufRead::fill_buf(self)?;
        let n = available.len().min(buf.len());
        buf[..n].copy_from_slice(&available[..n]);
        std::io::BufRead::consume(self, n);
        Ok(n)
    }
}

impl std::io::BufRead for Body {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        if self.at == self.chunk.len() {
            let mut exchange = self.exchange.lock().expect("exchange lock");
            let runtime = exchange.runtime.clone();
            let response = exchange.response()?;
            match runtime.block_on(response.chunk()) {
                Ok(Some(bytes)) => {
                    self.chunk = bytes.to_vec();
                    self.at = 0;
                }
                Ok(None) => return Ok(&[]),
                Err(e) => return Err(std::io::Error::other(chain(&e))),
            }
        }
        Ok(&self.chunk[self.at..])
    }
    fn consume(&mut self, amount: usize) {
        self.at = (self.at + amount).min(self.chunk.len());
    }
}

fn write_worktree(
    workdir: &Path,
    git_dir: &Path,
    objects: gix_odb::HandleArc,
    tree: &gix_hash::oid,
    interrupt: &AtomicBool,
) -> Result<CheckedOut, GitError> {
    let state = gix_index::State::from_tree(tree, &objects, Default::default())
        .map_err(fail("building the index"))?;
    let mut index = gix_index::File::from_state(state, git_dir.join("index"));
    // Built-in filters only (line endings, `ident`): no filter driver is configured, so
    // no process is started.
    let filters = gix_filter::Pipeline::new(Default::default(), HASH, Default::default());
    let options = gix_worktree_state::checkout::Options {
        fs: gix_fs::Capabilities::probe(git_dir),
        destination_is_initially_empty: true,
        // `.gitattributes` from the index decide line endings and filters, as with git.
        attributes: gix_worktree::stack::state::Attributes::new(
            Default::default(),
            None,
            gix_worktree::stack::state::attributes::Source::IdMapping,
            Default::default(),
        ),
        ..gix_worktree_state::checkout::Options::new(filters)
    };
    let outcome = gix_worktree_state::checkout(
        &mut index, workdir, objects, &Discard, &Discard, interrupt, options,
    )
    .map_err(|e| GitError(format!("writing the files: {}", chain(&e))))?;
    if interrupt.load(Ordering::Relaxed) {
        return Err(GitError("interrupted".into()));
    }
    if let Some(first) = outcome.errors.first() {
        return Err(GitError(format!(
            "writing {} files failed, the first {}: {}",
            outcome.errors.len(),
            first.path,
            chain(&first.error)
        )));
    }
    index
        .write(Default::default())
        .map_err(|e| GitError(format!("writing the index: {}", chain(&e))))?;
    Ok(CheckedOut {
        gitlinks: gitlinks(&index),
        files: outcome.files_updated,
    })
}

fn gitlinks(index: &gix_index::State) -> Vec<(String, String)> {
    index
        .entries()
        .iter()
        .filter(|e| e.mode == gix_index::entry::Mode::COMMIT)
        .map(|e| (e.path(index).to_string(), e.id.to_string()))
        .collect()
}

/// The `.gitmodules` entries of the work tree in `dir` (a symlinked `.gitmodules` is ignored,
/// like git), each with the commit its gitlink records.
pub fn submodule_entries(
    dir: &Path,
    gitlinks: &[(String, String)],
) -> Result<Vec<SubmoduleEntry>, GitError> {
    let path = dir.join(".gitmodules");
    match std::fs::symlink_metadata(&path) {
        Ok(m) if m.file_type().is_file() => {}
        _ => return Ok(Vec::new()),
    }
    let bytes = std::fs::read(&path).map_err(io("reading .gitmodules"))?;
    let modules = gix_submodule::File::from_bytes(&bytes, path, &Default::default())
        .map_err(fail("reading .gitmodules"))?;
    let mut entries = Vec::new();
    for name in modules.names() {
        let path = modules
            .path(name)
            .map_err(|e| GitError(format!("submodule `{name}`: {}", chain(&e))))?
            .to_string();
        let field = |key: &str| {
            modules
                .config()
                .string_by("submodule", Some(name), key)
                .map(|v| v.to_string())
        };
        let url = field("url")
            .filter(|u| !u.is_empty())
            .ok_or_else(|| GitError(format!("submodule `{name}` has no url in .gitmodules")))?;
        entries.push(SubmoduleEntry {
            name: name.to_string(),
            commit: gitlinks
                .iter()
                .find(|(p, _)| *p == path)
                .map(|(_, c)| c.clone()),
            path,
            url,
            update: field("update"),
        });
    }
    Ok(entries)
}

/// The paths the index of the repository in `dir` tracks, and its gitlinks (for
/// `artifacts: untracked`). Empty when there is no index.
pub fn tracked(dir: &Path) -> (BTreeSet<String>, Vec<String>) {
    let Ok(index) = gix_index::File::at(
        dir.join(".git").join("index"),
        HASH,
        false,
        Default::default(),
    ) else {
        return Default::default();
    };
    let tracked = index
        .entries()
        .iter()
        .map(|e| e.path(&index).to_string())
        .collect();
    let gitlinks = gitlinks(&index).into_iter().map(|(p, _)| p).collect();
    (tracked, gitlinks)
}
