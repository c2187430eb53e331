//! A GitLab that holds jobs the way GitLab does, on a virtual clock: each job has a project,
//! a pipeline, tags and a status; a runner that asks (`POST /api/v4/jobs/request` with its
//! token) gets the oldest pending job its scope and tags allow, whichever job it was created
//! for; every transition of a job of a project with our hook becomes a Job Hook in a queue
//! the driver delivers once (GitLab does not resend a hook answered non-2xx). It serves what
//! the stack reads: one job, a project's pending jobs (paginated with `x-next-page`), runner
//! creation and deletion, and a runner's running jobs; and, for a runner that really runs
//! the job (the shell runner), the job protocol: the job's script in `jobs/request`, trace
//! appends, the final status update, and a runner deleting itself with its own token
//! (`DELETE /runners`), after which that token is refused. Modelled on collabora's
//! `gitlab-runner-mock` (state behind a mutex, one handler per endpoint), served by wiremock
//! (`crate::loopback::serve_stateful`).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use ephemeral_core::hook::{JobEvent, JobStatus, RunnerRef};
use ephemeral_core::testing::job_event;

use crate::loopback::{Request, serve_stateful};

/// One job, as GitLab holds it.
#[derive(Debug, Clone)]
pub struct SimJob {
    pub project_id: u64,
    pub pipeline_id: u64,
    pub id: u64,
    pub name: String,
    pub tags: Vec<String>,
    pub status: JobStatus,
    pub created_ms: u64,
    /// When it became pending (what `queued_duration` counts from).
    pub queued_ms: u64,
    pub started_ms: Option<u64>,
    pub finished_ms: Option<u64>,
    pub runner_id: Option<u64>,
    /// How many times `jobs/request` handed it to a runner.
    pub handed_out: u32,
    /// What `jobs/request` hands a runner to run (`echo` of the job's name unless set).
    pub script: Vec<String>,
    /// The trace the runner sent (`PATCH /jobs/:id/trace`).
    pub trace: String,
}

/// A registered runner.
#[derive(Debug, Clone)]
pub struct SimRunner {
    pub id: u64,
    pub token: String,
    pub tags: Vec<String>,
    pub run_untagged: bool,
    /// `Some(project)` for a project runner.
    pub project_scope: Option<u64>,
}

impl SimRunner {
    /// Whether GitLab hands `job` to this runner.
    pub fn can_take(&self, job: &SimJob) -> bool {
        let scope_ok = self.project_scope.is_none_or(|p| p == job.project_id);
        let tags_ok = if job.tags.is_empty() {
            self.run_untagged
        } else {
            job.tags.iter().all(|t| self.tags.contains(t))
        };
        scope_ok && tags_ok
    }
}

/// A hook as GitLab sends it: its delivery id (`Idempotency-Key`) and body.
#[derive(Debug, Clone)]
pub struct Hook {
    pub delivery_id: String,
    pub project_id: u64,
    pub job_id: u64,
    pub status: JobStatus,
    pub body: String,
}

#[derive(Debug, Default)]
pub struct GitLabState {
    /// Virtual time, ms since the epoch: set by the driver every tick.
    pub now_ms: u64,
    pub jobs: BTreeMap<(u64, u64), SimJob>,
    pub runners: HashMap<u64, SimRunner>,
    /// Runners deleted (`DELETE /runners/:id`), for the leftovers check.
    pub deleted_runners: BTreeSet<u64>,
    /// Projects whose job hooks point at the stack; others' jobs send none.
    pub hooked_projects: BTreeSet<u64>,
    /// Hooks not yet delivered, in order.
    pub hooks: VecDeque<Hook>,
    pub next_runner_id: u64,
    next_delivery: u64,
    /// Requests by endpoint (method and first path segments), for the printout.
    pub calls: BTreeMap<String, u64>,
    /// Requests refused 401 (a wrong or missing token).
    pub unauthorized: u64,
    /// `jobs/request` calls refused 403: a token no runner has (deleted, or never made).
    pub refused_runner_tokens: u64,
}

impl GitLabState {
    /// A new job of `project_id`, pending from now (its pending hook queued).
    pub fn add_pending_job(
        &mut self,
        project_id: u64,
        pipeline_id: u64,
        id: u64,
        name: &str,
        tags: &[&str],
        queued_ms: u64,
    ) {
        let job = SimJob {
            project_id,
            pipeline_id,
            id,
            name: name.to_owned(),
            tags: tags.iter().map(|t| (*t).to_owned()).collect(),
            status: JobStatus::Pending,
            created_ms: queued_ms,
            queued_ms,
            started_ms: None,
            finished_ms: None,
            runner_id: None,
            handed_out: 0,
            script: vec![format!("echo {name}")],
            trace: String::new(),
        };
        self.jobs.insert((project_id, id), job);
        self.emit(project_id, id);
    }

    /// The oldest pending job (by the time it became pending, then id) `runner` may take.
    pub fn oldest_for(&self, runner: &SimRunner) -> Option<(u64, u64)> {
        self.jobs
            .values()
            .filter(|j| j.status == JobStatus::Pending && runner.can_take(j))
            .min_by_key(|j| (j.queued_ms, j.id))
            .map(|j| (j.project_id, j.id))
    }

    /// Whether `jobs/request` with `token` would hand out a job now (no state changes).
    pub fn has_job_for(&self, token: &str) -> bool {
        self.runner_by_token(token)
            .is_some_and(|r| self.oldest_for(r).is_some())
    }

    /// Whether `token` authenticates a runner now.
    pub fn token_is_valid(&self, token: &str) -> bool {
        self.runner_by_token(token).is_some()
    }

    fn runner_by_token(&self, token: &str) -> Option<&SimRunner> {
        self.runners.values().find(|r| r.token == token)
    }

    /// `POST /jobs/request`: the oldest job the runner may take turns running with it.
    /// `Err(())`: no runner has this token (GitLab answers 403).
    #[allow(clippy::result_unit_err)]
    pub fn request_job(&mut self, token: &str) -> Result<Option<(u64, u64)>, ()> {
        let runner = self.runner_by_token(token).ok_or(())?.clone();
        let Some(key) = self.oldest_for(&runner) else {
            return Ok(None);
        };
        let now = self.now_ms;
        let job = self.jobs.get_mut(&key).unwrap();
        job.status = JobStatus::Running;
        job.runner_id = Some(runner.id);
        job.started_ms = Some(now);
        job.handed_out += 1;
        self.emit(key.0, key.1);
        Ok(Some(key))
    }

    /// The runner reports the job done (`PUT /jobs/:id` with `state=success`).
    pub fn finish(&mut self, key: (u64, u64), status: JobStatus) {
        let now = self.now_ms;
        let job = self.jobs.get_mut(&key).unwrap();
        job.status = status;
        job.finished_ms = Some(now);
        self.emit(key.0, key.1);
    }

    /// Queues the job's hook for its current status, if its project has our hook.
    fn emit(&mut self, project_id: u64, id: u64) {
        if !self.hooked_projects.contains(&project_id) {
            return;
        }
        let job = &self.jobs[&(project_id, id)];
        self.next_delivery += 1;
        let delivery_id = format!(
            "sim-{project_id}-{id}-{}-{}",
            job.status.as_str(),
            self.next_delivery
        );
        let mut event: JobEvent = job_event(project_id, id, &job.name, job.status.clone());
        event.delivery_id = delivery_id.clone();
        event.pipeline_id = Some(job.pipeline_id);
        event.runner = job.runner_id.map(|id| RunnerRef {
            id,
            description: Some(format!("runner {id}")),
            tags: self
                .runners
                .get(&id)
                .map(|r| r.tags.clone())
                .unwrap_or_default(),
        });
        let hook = Hook {
            delivery_id,
            project_id,
            job_id: id,
            status: job.status.clone(),
            body: crate::chain::hook_body(&event),
        };
        self.hooks.push_back(hook);
    }

    /// The job as `jobs/request` hands it to a runner: its script, GIT_STRATEGY none.
    fn runner_payload(&self, job: &SimJob) -> serde_json::Value {
        let variable = |key: &str, value: String| serde_json::json!({"key": key, "value": value, "public": true, "masked": false});
        serde_json::json!({
            "id": job.id,
            "token": job_token(job.id),
            "allow_git_fetch": false,
            "job_info": {"id": job.id, "name": job.name, "stage": "test",
                         "project_id": job.project_id, "project_name": "sim"},
            "variables": [
                variable("GIT_STRATEGY", "none".into()),
                variable("CI_JOB_ID", job.id.to_string()),
                variable("CI_PROJECT_ID", job.project_id.to_string()),
            ],
            "steps": [{"name": "script", "script": job.script, "timeout": 3600,
                       "when": "on_success", "allow_failure": false}],
            "dependencies": [],
            "artifacts": [],
        })
    }

    /// The job as `GET /projects/:id/jobs/:job_id` returns it.
    pub fn job_json(&self, job: &SimJob) -> serde_json::Value {
        let queued = match job.status {
            JobStatus::Pending => self.now_ms.saturating_sub(job.queued_ms),
            _ => job
                .started_ms
                .unwrap_or(self.now_ms)
                .saturating_sub(job.queued_ms),
        };
        serde_json::json!({
            "id": job.id, "name": job.name, "status": job.status.as_str(), "stage": "test",
            "tag_list": job.tags, "ref": "main", "tag": false,
            "pipeline": {"id": job.pipeline_id, "project_id": job.project_id},
            "queued_duration": queued as f64 / 1000.0,
            "created_at": iso8601(job.created_ms),
            "runner": job.runner_id.map(|id| serde_json::json!({"id": id})),
        })
    }

    /// Live (not deleted) runners.
    pub fn live_runners(&self) -> usize {
        self.runners.len()
    }
}

/// ms since the epoch as GitLab's `2026-01-01T00:00:00.000Z` (UTC).
pub fn iso8601(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

/// The stand-in's HTTP server (on [`serve_stateful`]; dropping it stops the server).
pub struct GitLabSim {
    pub url: String,
    pub state: Arc<Mutex<GitLabState>>,
    _server: wiremock::MockServer,
}

impl GitLabSim {
    pub async fn start(api_token: &str, first_runner_id: u64, hooked: &[u64]) -> Self {
        let state = Arc::new(Mutex::new(GitLabState {
            next_runner_id: first_runner_id,
            hooked_projects: hooked.iter().copied().collect(),
            ..Default::default()
        }));
        let shared = state.clone();
        let api_token = api_token.to_owned();
        let server =
            serve_stateful(move |request| answer(&mut shared.lock().unwrap(), request, &api_token))
                .await;
        Self {
            url: server.uri(),
            state,
            _server: server,
        }
    }

    pub fn state(&self) -> MutexGuard<'_, GitLabState> {
        self.state.lock().unwrap()
    }
}

/// The query's value of `name` (first occurrence), `scope[]` and `scope%5B%5D` alike.
fn query_value(target: &str, name: &str) -> Option<String> {
    let query = target.split_once('?')?.1;
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = k.replace("%5B", "[").replace("%5D", "]");
        (k == name).then(|| v.to_owned())
    })
}

/// A form body's (`application/x-www-form-urlencoded`) values of `name`.
pub fn form_value(body: &str, name: &str) -> Option<String> {
    body.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == name).then(|| {
            let v = v.replace('+', " ");
            let mut out = Vec::new();
            let bytes = v.as_bytes();
            let mut i = 0;
            while i < bytes.len() {
                if bytes[i] == b'%'
                    && i + 2 < bytes.len()
                    && let Ok(b) = u8::from_str_radix(&v[i + 1..i + 3], 16)
                {
                    out.push(b);
                    i += 3;
                    continue;
                }
                out.push(bytes[i]);
                i += 1;
            }
            String::from_utf8_lossy(&out).into_owned()
        })
    })
}

type Answer = (u16, Vec<(String, String)>, String);

/// The job token GitLab hands out with a job (`CI_JOB_TOKEN`).
fn job_token(job_id: u64) -> String {
    format!("glcbt-{job_id}")
}

/// The runner protocol's calls, which authenticate with a runner or job token, not the
/// API token: `None` when `request` is not one of them.
fn runner_protocol(
    state: &mut GitLabState,
    request: &Request,
    segments: &[&str],
) -> Option<Answer> {
    let job_of = |state: &GitLabState, id: &str| {
        let id: u64 = id.parse().ok()?;
        state.jobs.keys().find(|(_, j)| *j == id).copied()
    };
    Some(match (request.method.as_str(), segments) {
        ("POST", ["api", "v4", "jobs", "request"]) => {
            let body: serde_json::Value = serde_json::from_slice(&request.body).unwrap_or_default();
            let token = body["token"].as_str().unwrap_or_default();
            match state.request_job(token) {
                Err(()) => {
                    state.refused_runner_tokens += 1;
                    plain(403, r#"{"message":"403 Forbidden"}"#)
                }
                Ok(None) => plain(204, ""),
                Ok(Some(key)) => plain(201, state.runner_payload(&state.jobs[&key]).to_string()),
            }
        }
        ("PUT", ["api", "v4", "jobs", id]) => {
            let Some(key) = job_of(state, id) else {
                return Some(plain(404, ""));
            };
            let body: serde_json::Value = serde_json::from_slice(&request.body).unwrap_or_default();
            if body["token"].as_str() != Some(job_token(key.1).as_str()) {
                return Some(plain(403, ""));
            }
            match body["state"].as_str() {
                Some("success") => state.finish(key, JobStatus::Success),
                Some("failed") => state.finish(key, JobStatus::Failed),
                _ => {}
            }
            plain(200, "")
        }
        ("PATCH", ["api", "v4", "jobs", id, "trace"]) => {
            let Some(key) = job_of(state, id) else {
                return Some(plain(404, ""));
            };
            if request.header("job-token") != Some(job_token(key.1).as_str()) {
                return Some(plain(403, ""));
            }
            let text = request.body_text();
            state.jobs.get_mut(&key).unwrap().trace.push_str(&text);
            plain(202, "")
        }
        // GitLab's "delete a runner by authentication token".
        ("DELETE", ["api", "v4", "runners"]) => {
            let token = form_value(&request.body_text(), "token").unwrap_or_default();
            let id = state.runner_by_token(&token).map(|r| r.id);
            match id.and_then(|id| state.runners.remove(&id)) {
                Some(r) => {
                    state.deleted_runners.insert(r.id);
                    plain(204, "")
                }
                None => plain(403, r#"{"message":"403 Forbidden"}"#),
            }
        }
        _ => return None,
    })
}

fn plain(status: u16, body: impl Into<String>) -> Answer {
    (status, Vec::new(), body.into())
}

fn answer(state: &mut GitLabState, request: &Request, api_token: &str) -> Answer {
    let segments: Vec<&str> = request.path().trim_matches('/').split('/').collect();
    let endpoint = format!(
        "{} {}",
        request.method,
        segments
            .iter()
            .map(|s| if s.parse::<u64>().is_ok() { ":id" } else { s })
            .collect::<Vec<_>>()
            .join("/")
    );
    *state.calls.entry(endpoint).or_default() += 1;
    if let Some(answer) = runner_protocol(state, request, &segments) {
        return answer;
    }
    if request.header("private-token") != Some(api_token) {
        state.unauthorized += 1;
        return plain(401, r#"{"message":"401 Unauthorized"}"#);
    }
    let not_found = || plain(404, r#"{"message":"404 Not found"}"#);
    match (request.method.as_str(), &segments[..]) {
        ("GET", ["api", "v4", "projects", project, "jobs", job]) => {
            let (Ok(project), Ok(job)) = (project.parse::<u64>(), job.parse::<u64>()) else {
                return not_found();
            };
            match state.jobs.get(&(project, job)) {
                Some(j) => plain(200, state.job_json(j).to_string()),
                None => not_found(),
            }
        }
        ("GET", ["api", "v4", "projects", project, "jobs"]) => {
            let Ok(project) = project.parse::<u64>() else {
                return not_found();
            };
            let scope = query_value(&request.target, "scope[]");
            let per_page: usize = query_value(&request.target, "per_page")
                .and_then(|v| v.parse().ok())
                .unwrap_or(20)
                .clamp(1, 100);
            let page: usize = query_value(&request.target, "page")
                .and_then(|v| v.parse().ok())
                .unwrap_or(1)
                .max(1);
            // GitLab lists newest first.
            let mut jobs: Vec<&SimJob> = state
                .jobs
                .values()
                .filter(|j| j.project_id == project)
                .filter(|j| scope.as_deref().is_none_or(|s| s == j.status.as_str()))
                .collect();
            jobs.sort_by_key(|j| std::cmp::Reverse(j.id));
            let total = jobs.len();
            let pages = total.div_ceil(per_page).max(1);
            let items: Vec<serde_json::Value> = jobs
                .iter()
                .skip((page - 1) * per_page)
                .take(per_page)
                .map(|j| state.job_json(j))
                .collect();
            let next = if page < pages {
                (page + 1).to_string()
            } else {
                String::new()
            };
            let headers = vec![
                ("x-page".into(), page.to_string()),
                ("x-per-page".into(), per_page.to_string()),
                ("x-total".into(), total.to_string()),
                ("x-total-pages".into(), pages.to_string()),
                ("x-next-page".into(), next),
            ];
            (200, headers, serde_json::Value::from(items).to_string())
        }
        ("POST", ["api", "v4", "user", "runners"]) => {
            let body = request.body_text();
            let tags: Vec<String> = form_value(&body, "tag_list")
                .unwrap_or_default()
                .split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(str::to_owned)
                .collect();
            let run_untagged = form_value(&body, "run_untagged").as_deref() == Some("true");
            let project_scope = match form_value(&body, "runner_type").as_deref() {
                Some("project_type") => {
                    form_value(&body, "project_id").and_then(|p| p.parse().ok())
                }
                _ => None,
            };
            state.next_runner_id += 1;
            let id = state.next_runner_id;
            let token = format!(
                "glrt-sim{id}-{:016x}",
                id.wrapping_mul(0x9E37_79B9_7F4A_7C15)
            );
            state.runners.insert(
                id,
                SimRunner {
                    id,
                    token: token.clone(),
                    tags,
                    run_untagged,
                    project_scope,
                },
            );
            plain(
                201,
                serde_json::json!({"id": id, "token": token, "token_expires_at": null}).to_string(),
            )
        }
        ("DELETE", ["api", "v4", "runners", id]) => {
            match id.parse().ok().and_then(|id| state.runners.remove(&id)) {
                Some(r) => {
                    state.deleted_runners.insert(r.id);
                    plain(204, "")
                }
                None => not_found(),
            }
        }
        ("GET", ["api", "v4", "runners", id, "jobs"]) => {
            let id: u64 = id.parse().unwrap_or(0);
            let status = query_value(&request.target, "status");
            let jobs: Vec<serde_json::Value> = state
                .jobs
                .values()
                .filter(|j| j.runner_id == Some(id))
                .filter(|j| status.as_deref().is_none_or(|s| s == j.status.as_str()))
                .map(|j| state.job_json(j))
                .collect();
            plain(200, serde_json::Value::from(jobs).to_string())
        }
        _ => not_found(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_values_decode() {
        assert_eq!(
            form_value("a=1&tag_list=docker%2Clinux&b=x+y", "tag_list").as_deref(),
            Some("docker,linux")
        );
        assert_eq!(form_value("b=x+y", "b").as_deref(), Some("x y"));
    }
}
