//! Listing pending jobs as the reconciler does, against a wiremock GitLab: every page is
//! followed, the per-pass budget stops the listing, and a 429's Retry-After is honoured.

use std::time::{Duration, Instant};

use ephemeral_core::JobStatus;
use ephemeral_gitlab::*;
use serde_json::json;
use wiremock::matchers::{header, method, path, query_param};
use wiremock::{Mock, MockServer, ResponseTemplate};

fn token() -> Secret {
    Secret::new("glpat-reconciler".to_owned())
}

fn fast() -> RetryPolicy {
    RetryPolicy {
        max_retries: 3,
        min_delay: Duration::from_millis(1),
        max_delay: Duration::from_millis(100),
    }
}

fn job(id: u64) -> serde_json::Value {
    json!({
        "id": id, "name": format!("build {id}"), "status": "pending", "stage": "build",
        "tag_list": ["docker"], "ref": "main", "pipeline": {"id": 9, "project_id": 7},
        "queued_duration": 75.5, "created_at": "2026-12-01T10:00:00.000Z", "runner": null
    })
}

async fn pages(server: &MockServer, pages: &[(u64, &[u64])]) {
    for (n, (page, ids)) in pages.iter().enumerate() {
        let body: Vec<_> = ids.iter().map(|id| job(*id)).collect();
        let mut answer = ResponseTemplate::new(200).set_body_json(body);
        if n + 1 < pages.len() {
            answer = answer.insert_header("x-next-page", (page + 1).to_string());
        }
        Mock::given(method("GET"))
            .and(path("/api/v4/projects/7/jobs"))
            .and(query_param("scope[]", "pending"))
            .and(query_param("page", page.to_string()))
            .and(header("PRIVATE-TOKEN", "glpat-reconciler"))
            .respond_with(answer)
            .expect(1)
            .mount(server)
            .await;
    }
}

#[tokio::test]
async fn every_page_is_read_within_the_budget() {
    let server = MockServer::start().await;
    pages(&server, &[(1, &[1, 2]), (2, &[3]), (3, &[4, 5])]).await;
    let client = GitLabClient::new(&server.uri(), fast());
    let budget = RequestBudget::new(10);
    let listing = client.pending_jobs(&token(), 7, &budget).await.unwrap();
    assert!(listing.complete);
    let ids: Vec<u64> = listing.items.iter().map(|j| j.id).collect();
    assert_eq!(ids, [1, 2, 3, 4, 5]);
    assert_eq!(budget.remaining(), 7);
    let first = &listing.items[0];
    assert_eq!(first.status, JobStatus::Pending);
    assert_eq!(first.tag_list, ["docker"]);
    assert_eq!(first.pipeline.as_ref().map(|p| p.id), Some(9));
    assert_eq!(first.queued_duration, Some(75.5));
}

#[tokio::test]
async fn a_spent_budget_stops_the_listing_and_says_so() {
    let server = MockServer::start().await;
    for (page, next) in [(1, Some(2)), (2, Some(3))] {
        let mut answer = ResponseTemplate::new(200).set_body_json(vec![job(page)]);
        if let Some(next) = next {
            answer = answer.insert_header("x-next-page", next.to_string());
        }
        Mock::given(method("GET"))
            .and(query_param("page", page.to_string()))
            .respond_with(answer)
            .expect(1)
            .mount(&server)
            .await;
    }
    let client = GitLabClient::new(&server.uri(), fast());
    let budget = RequestBudget::new(2);
    let listing = client.pending_jobs(&token(), 7, &budget).await.unwrap();
    assert!(!listing.complete, "page 3 was never asked for");
    assert_eq!(listing.items.len(), 2);
    assert_eq!(budget.remaining(), 0);
    // wiremock checks the expectations (one request per page, none for page 3) on drop.
}

#[tokio::test]
async fn a_429_waits_as_long_as_retry_after_asks() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(429).insert_header("retry-after", "1"))
        .up_to_n_times(1)
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200).set_body_json(vec![job(1)]))
        .expect(1)
        .mount(&server)
        .await;
    // max_delay 100 ms: without Retry-After the retry would come within 100 ms.
    let client = GitLabClient::new(
        &server.uri(),
        RetryPolicy {
            max_delay: Duration::from_millis(200),
            ..fast()
        },
    );
    let started = Instant::now();
    let listing = client
        .pending_jobs(&token(), 7, &RequestBudget::new(5))
        .await
        .unwrap();
    let waited = started.elapsed();
    assert_eq!(listing.items.len(), 1);
    assert!(waited >= Duration::from_secs(1), "retried after {waited:?}");
    assert_eq!(server.received_requests().await.unwrap().len(), 2);
}

#[tokio::test]
async fn one_job_is_read_and_a_missing_one_is_an_error() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/api/v4/projects/7/jobs/3"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "id": 3, "name": "deploy", "status": "success", "tag_list": [],
            "runner": {"id": 44, "description": "ephemeral"}
        })))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/api/v4/projects/7/jobs/4"))
        .respond_with(ResponseTemplate::new(404).set_body_json(json!({"message": "404 Not found"})))
        .mount(&server)
        .await;
    let client = GitLabClient::new(&server.uri(), fast());
    let done = client.job(&token(), 7, 3).await.unwrap();
    assert_eq!(done.status, JobStatus::Success);
    assert_eq!(done.runner, Some(JobRunner { id: 44 }));
    let e = client.job(&token(), 7, 4).await.unwrap_err();
    assert!(e.to_string().contains("404"), "{e}");
    assert!(!e.to_string().contains("glpat"), "{e}");
}

#[tokio::test]
async fn group_projects_are_listed_with_subgroups() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/api/v4/groups/12/projects"))
        .and(query_param("include_subgroups", "true"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!([{"id": 7}, {"id": 8}])))
        .expect(1)
        .mount(&server)
        .await;
    let client = GitLabClient::new(&server.uri(), fast());
    let listing = client
        .group_project_ids(&token(), 12, &RequestBudget::new(3))
        .await
        .unwrap();
    assert_eq!(listing.items, [7, 8]);
    assert!(listing.complete);
}
