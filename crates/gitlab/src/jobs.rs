//! Reading jobs: one job (the truth a step confirms with before it spends or destroys) and a
//! project's pending list (what the reconciler holds the jobs table against), paginated and
//! within a per-pass request budget so one pass cannot flood GitLab.

use std::sync::atomic::{AtomicU32, Ordering};

use ephemeral_core::JobStatus;
use serde::Deserialize;

use crate::{GitLabClient, GitLabError, Secret, refused};

/// A job as `GET /projects/:id/jobs[/:job_id]` returns it (the fields we use).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct GitLabJob {
    pub id: u64,
    pub name: String,
    pub status: JobStatus,
    #[serde(default)]
    pub stage: Option<String>,
    #[serde(default)]
    pub tag_list: Vec<String>,
    #[serde(default, rename = "ref")]
    pub git_ref: Option<String>,
    #[serde(default)]
    pub tag: Option<bool>,
    #[serde(default)]
    pub pipeline: Option<JobPipeline>,
    /// Seconds since the job became pending (GitLab's own clock).
    #[serde(default)]
    pub queued_duration: Option<f64>,
    #[serde(default)]
    pub created_at: Option<String>,
    #[serde(default)]
    pub runner: Option<JobRunner>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct JobPipeline {
    pub id: u64,
    #[serde(default)]
    pub project_id: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct JobRunner {
    pub id: u64,
}

/// How many requests a pass may still make (shared by its concurrent listings).
#[derive(Debug)]
pub struct RequestBudget {
    remaining: AtomicU32,
}

impl RequestBudget {
    pub fn new(requests: u32) -> Self {
        Self {
            remaining: AtomicU32::new(requests),
        }
    }

    /// Takes one request from the budget; false when it is spent.
    pub fn take(&self) -> bool {
        self.remaining
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }

    pub fn remaining(&self) -> u32 {
        self.remaining.load(Ordering::SeqCst)
    }
}

/// What a paginated listing got: every page, or as many as the budget allowed.
#[derive(Debug, Clone, PartialEq)]
pub struct Listing<T> {
    pub items: Vec<T>,
    /// False when the budget ran out before the last page.
    pub complete: bool,
}

const PER_PAGE: &str = "100";

impl GitLabClient {
    /// One job (`GET /projects/:id/jobs/:job_id`, a `read_api` token).
    pub async fn job(
        &self,
        api_token: &Secret,
        project_id: u64,
        job_id: u64,
    ) -> Result<GitLabJob, GitLabError> {
        let endpoint = format!("GET /projects/{project_id}/jobs/{job_id}");
        let (status, body) = self
            .send(&endpoint, || {
                self.http
                    .get(self.url(&format!("/projects/{project_id}/jobs/{job_id}")))
                    .header("PRIVATE-TOKEN", api_token.expose())
            })
            .await?;
        match status {
            200 => parse(&endpoint, &body),
            _ => Err(refused(&endpoint, status, &body)),
        }
    }

    /// The project's pending jobs, every page (`scope[]=pending`), as far as `budget` allows.
    pub async fn pending_jobs(
        &self,
        api_token: &Secret,
        project_id: u64,
        budget: &RequestBudget,
    ) -> Result<Listing<GitLabJob>, GitLabError> {
        let path = format!("/projects/{project_id}/jobs");
        self.all_pages(api_token, &path, &[("scope[]", "pending")], budget)
            .await
    }

    /// The ids of a group's projects, subgroups included, archived ones left out.
    pub async fn group_project_ids(
        &self,
        api_token: &Secret,
        group_id: u64,
        budget: &RequestBudget,
    ) -> Result<Listing<u64>, GitLabError> {
        #[derive(Deserialize)]
        struct Project {
            id: u64,
        }
        let path = format!("/groups/{group_id}/projects");
        let query = [
            ("include_subgroups", "true"),
            ("archived", "false"),
            ("simple", "true"),
        ];
        let page: Listing<Project> = self.all_pages(api_token, &path, &query, budget).await?;
        Ok(Listing {
            items: page.items.into_iter().map(|p| p.id).collect(),
            complete: page.complete,
        })
    }

    /// The runners the token's user owns of one type (`GET /runners?type=`; id and
    /// description), for finding a runner whose creation answer was lost.
    pub async fn owned_runners(
        &self,
        api_token: &Secret,
        runner_type: &str,
        budget: &RequestBudget,
    ) -> Result<Listing<(u64, String)>, GitLabError> {
        #[derive(Deserialize)]
        struct Runner {
            id: u64,
            #[serde(default)]
            description: Option<String>,
        }
        let query = [("type", runner_type)];
        let page: Listing<Runner> = self
            .all_pages(api_token, "/runners", &query, budget)
            .await?;
        Ok(Listing {
            items: page
                .items
                .into_iter()
                .map(|r| (r.id, r.description.unwrap_or_default()))
                .collect(),
            complete: page.complete,
        })
    }

    /// Follows `x-next-page` from page 1; each request (retries are the client's own) takes
    /// one unit of `budget`.
    async fn all_pages<T: serde::de::DeserializeOwned>(
        &self,
        api_token: &Secret,
        path: &str,
        query: &[(&str, &str)],
        budget: &RequestBudget,
    ) -> Result<Listing<T>, GitLabError> {
        let endpoint = format!("GET {path}");
        let mut items = Vec::new();
        let mut page = 1u64;
        loop {
            if !budget.take() {
                return Ok(Listing {
                    items,
                    complete: false,
                });
            }
            let page_text = page.to_string();
            let answer = self
                .send_for_answer(&endpoint, || {
                    self.http
                        .get(self.url(path))
                        .query(query)
                        .query(&[("per_page", PER_PAGE), ("page", page_text.as_str())])
                        .header("PRIVATE-TOKEN", api_token.expose())
                })
                .await?;
            if answer.status != 200 {
                return Err(refused(&endpoint, answer.status, &answer.body));
            }
            items.extend(parse::<Vec<T>>(&endpoint, &answer.body)?);
            match answer.next_page {
                Some(next) if next > page => page = next,
                _ => {
                    return Ok(Listing {
                        items,
                        complete: true,
                    });
                }
            }
        }
    }
}

fn parse<T: serde::de::DeserializeOwned>(endpoint: &str, body: &str) -> Result<T, GitLabError> {
    serde_json::from_str(body).map_err(|e| GitLabError::Unexpected {
        endpoint: endpoint.to_owned(),
        message: format!("not what GitLab documents ({e})"),
    })
}
