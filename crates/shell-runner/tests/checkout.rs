//! The checkout without a git binary (gix), against a real git smart-HTTP server on loopback
//! (`git http-backend` behind a small CGI bridge that wants the job token as the basic-auth
//! password), with real repositories: commits, a branch, a tag, `refs/pipelines/N`, and a
//! submodule with a submodule of its own, in other repositories of the same server. The jobs
//! run through the Lambda handler against gitlab-runner-mock, with real bash.
//!
//! The test machine's `git` builds the repositories, serves them and checks the results; the
//! runner itself starts no git process.

mod common;

use std::path::{Path, PathBuf};

use base64::Engine;
use common::git_server::{GitServer, commit, git, publish};
use common::*;
use gitlab_runner_mock::{MockJob, MockJobBuilder, MockJobState};
use shell_runner::{JobReport, Outcome};

fn ran(outcome: Outcome) -> JobReport {
    match outcome {
        Outcome::Ran(report) => report,
        other => panic!("expected a job to run, got {other:?}"),
    }
}

/// The served repositories: `group/project` (branch `main`, tag `v1`, pipeline refs 120 and
/// 121), its submodule `group/lib` at `vendor/lib` (relative URL `../lib.git`), and lib's
/// own submodule `group/inner` at `deps/inner`.
struct Fixture {
    served: tempfile::TempDir,
    /// Tagged `v1`: the first commit.
    tagged: String,
    /// `refs/pipelines/120`: the second commit, with the submodule; `main` moved on since.
    pipeline: String,
    /// `main` and `refs/pipelines/121`.
    head: String,
    lib: String,
    inner: String,
}

fn fixture() -> Fixture {
    let served = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let new_repo = |name: &str| {
        let dir = work.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        git(&dir, &["init", "-q", "--initial-branch=main"]);
        dir
    };
    let add_submodule = |dir: &Path, name: &str, path: &str, url: &str, sha: &str| {
        std::fs::write(
            dir.join(".gitmodules"),
            format!("[submodule \"{name}\"]\n\tpath = {path}\n\turl = {url}\n"),
        )
        .unwrap();
        git(dir, &["add", ".gitmodules"]);
        git(
            dir,
            &[
                "update-index",
                "--add",
                "--cacheinfo",
                &format!("160000,{sha},{path}"),
            ],
        );
    };

    let inner_dir = new_repo("inner");
    let inner = commit(
        &inner_dir,
        &[("inner.txt", "from the inner submodule\n")],
        "i",
    );
    publish(&inner_dir, served.path(), "group/inner");

    let lib_dir = new_repo("lib");
    commit(&lib_dir, &[("lib.txt", "old lib\n")], "l1");
    add_submodule(&lib_dir, "inner", "deps/inner", "../inner.git", &inner);
    let lib = commit(&lib_dir, &[("lib.txt", "from the lib submodule\n")], "l2");
    publish(&lib_dir, served.path(), "group/lib");

    let project = new_repo("project");
    let tagged = commit(&project, &[("README", "tagged release\n")], "first");
    git(&project, &["tag", "v1"]);
    add_submodule(&project, "lib", "vendor/lib", "../lib.git", &lib);
    let pipeline = commit(
        &project,
        &[
            ("README", "checked out from the pipeline commit\n"),
            ("src/main.sh", "echo main\n"),
        ],
        "second",
    );
    git(&project, &["update-ref", "refs/pipelines/120", &pipeline]);
    // A later commit on the branch: pipeline 120 must not get it.
    let head = commit(&project, &[("README", "a later commit\n")], "third");
    git(&project, &["update-ref", "refs/pipelines/121", &head]);
    publish(&project, served.path(), "group/project");
    Fixture {
        served,
        tagged,
        pipeline,
        head,
        lib,
        inner,
    }
}

/// The variables GitLab gives a job for the project: the URL with the job token in it,
/// the commit, the pipeline and its branch (or tag); `extra` on top.
fn checkout_vars(
    b: &mut MockJobBuilder,
    server: &GitServer,
    token: &str,
    sha: &str,
    snapshot: &Path,
    extra: &[(&str, &str)],
) {
    let mut set = |k: &str, v: &str| b.add_variable(k.into(), v.into(), true, false);
    set("GIT_STRATEGY", "fetch");
    set(
        "CI_REPOSITORY_URL",
        &server.url_with_token("group/project.git", token),
    );
    set("CI_PROJECT_PATH", "group/project");
    set("CI_COMMIT_SHA", sha);
    set("CI_COMMIT_BRANCH", "main");
    set("CI_COMMIT_REF_NAME", "main");
    set("SNAPSHOT", snapshot.to_str().unwrap());
    for (k, v) in extra {
        set(k, v);
    }
    // GitLab's other copies of the job token (the mock has placeholders).
    for k in [
        "CI_JOB_TOKEN",
        "CI_BUILD_TOKEN",
        "CI_REGISTRY_PASSWORD",
        "CI_DEPENDENCY_PROXY_PASSWORD",
    ] {
        b.add_variable(k.into(), token.into(), false, true);
    }
}

/// A job that checks out and then runs `script`; its after_script copies the whole build
/// directory to `snapshot` (the runner empties it after the job), also when the job failed.
fn checkout_job(
    s: &Setup,
    name: &str,
    script: &[&str],
    adjust: impl FnOnce(&mut MockJobBuilder),
) -> MockJob {
    job(
        &s.mock,
        name,
        script,
        &["cp -a \"$CI_BUILDS_DIR\" \"$SNAPSHOT\""],
        600,
        adjust,
    )
}

/// The token of the `n`th job of a fresh gitlab-runner-mock: it numbers jobs from 266 and
/// gives job N the token `job-token-N`. GitLab puts the job's token in `CI_REPOSITORY_URL`,
/// so the test must know it before the job exists (each test checks it guessed right).
fn next_token(n: u64) -> String {
    format!("job-token-{}", 265 + n)
}

fn needles(token: &str) -> Vec<String> {
    vec![
        token.to_owned(),
        base64::engine::general_purpose::STANDARD.encode(format!("gitlab-ci-token:{token}")),
    ]
}

fn project(snapshot: &Path) -> PathBuf {
    snapshot.join("group/project")
}

fn commits_in(repo: &Path) -> usize {
    git(
        repo,
        &[
            "cat-file",
            "--batch-all-objects",
            "--batch-check=%(objecttype)",
        ],
    )
    .lines()
    .filter(|t| *t == "commit")
    .count()
}

#[tokio::test]
async fn checks_out_the_pipeline_commit_over_http_and_uploads_untracked_files() {
    let f = fixture();
    let s = setup().await;
    let token = next_token(1);
    let server = GitServer::start(f.served.path(), &token);
    let kept = tempfile::tempdir().unwrap();
    let snapshot = kept.path().join("build");
    let job = checkout_job(
        &s,
        "checkout",
        &[
            "cat README",
            "cat src/main.sh",
            "test -d vendor/lib && test -z \"$(ls -A vendor/lib)\" && echo submodule-left-empty",
            "echo built > build.log",
        ],
        |b| {
            checkout_vars(
                b,
                &server,
                &token,
                &f.pipeline,
                &snapshot,
                &[("GIT_STRATEGY", "clone")],
            );
            b.add_artifact(
                None,
                true,
                vec![],
                None,
                "archive".into(),
                Some("zip".into()),
                None,
            );
        },
    );
    assert_eq!(job.token(), token);
    let watch = ArgvWatch::start(needles(&token));
    let report = ran(invoke(&s.runner, job.id(), LAMBDA).await);
    let (in_argv, scans) = watch.stop();

    let log = log(&job);
    assert_eq!(report.result, "success", "{log}");
    assert_eq!(job.state(), MockJobState::Success);
    assert!(log.contains("Cloning repository...\n"), "{log}");
    let short = &f.pipeline[..8];
    assert!(
        log.contains(&format!(
            "Checking out {short} as detached HEAD (ref is main)...\n"
        )),
        "{log}"
    );
    assert!(log.contains("Skipping Git submodules setup\n"), "{log}");
    assert!(
        log.contains("checked out from the pipeline commit\n"),
        "{log}"
    );
    assert!(log.contains("echo main\n"), "{log}");
    assert!(log.contains("submodule-left-empty\n"), "{log}");

    // A repository git itself accepts: HEAD detached at the commit, the work tree and the
    // index agree with it, the refs the plan named and no tags (the server has `v1`).
    let repo = project(&snapshot);
    assert_eq!(git(&repo, &["rev-parse", "HEAD"]), f.pipeline);
    assert_eq!(
        git(&repo, &["rev-parse", "--symbolic-full-name", "HEAD"]),
        "HEAD",
        "detached"
    );
    assert_eq!(
        git(&repo, &["status", "--porcelain", "--untracked-files=no"]),
        ""
    );
    assert_eq!(
        git(
            &repo,
            &["for-each-ref", "--format=%(refname) %(objectname)"]
        ),
        format!(
            "refs/pipelines/120 {}\nrefs/remotes/origin/main {}",
            f.pipeline, f.head
        )
    );
    assert_eq!(
        git(&repo, &["rev-list", "--count", "HEAD"]),
        "2",
        "full history"
    );
    assert_eq!(
        git(&repo, &["config", "remote.origin.url"]),
        format!("http://127.0.0.1:{}/group/project.git", server.port)
    );
    assert!(
        server.seen().iter().all(|r| r.authorized),
        "{:?}",
        server.seen()
    );

    // The token: not in the trace, in no file of the build directory, in no argv.
    for needle in needles(&token) {
        assert!(!log.contains(&needle), "the trace shows the token");
    }
    assert_eq!(
        files_containing(&snapshot, &needles(&token)),
        Vec::<String>::new()
    );
    assert!(scans > 0);
    assert_eq!(
        in_argv,
        Vec::<String>::new(),
        "processes with the token in argv"
    );

    // `untracked: true` takes what the job made, not the checkout or .git.
    let uploaded: Vec<_> = job.uploaded_artifacts().collect();
    assert_eq!(uploaded.len(), 1);
    let zip = zip::ZipArchive::new(std::io::Cursor::new(uploaded[0].data.to_vec())).unwrap();
    let names: Vec<_> = zip.file_names().collect();
    assert_eq!(names, ["build.log"], "untracked only, not README or .git");
}

#[tokio::test]
async fn git_depth_1_fetches_one_commit() {
    let f = fixture();
    let s = setup().await;
    let token = next_token(1);
    let server = GitServer::start(f.served.path(), &token);
    let kept = tempfile::tempdir().unwrap();
    let snapshot = kept.path().join("build");
    // Pipeline 121 and the branch are at the same commit, the usual case: one commit to get.
    let job = checkout_job(&s, "shallow", &["cat README"], |b| {
        checkout_vars(
            b,
            &server,
            &token,
            &f.head,
            &snapshot,
            &[("GIT_DEPTH", "1"), ("CI_PIPELINE_ID", "121")],
        )
    });
    assert_eq!(job.token(), token);
    let report = ran(invoke(&s.runner, job.id(), LAMBDA).await);

    let log = log(&job);
    assert_eq!(report.result, "success", "{log}");
    assert!(
        log.contains("Fetching changes with git depth set to 1...\n"),
        "{log}"
    );
    assert!(log.contains("a later commit\n"), "{log}");
    let repo = project(&snapshot);
    assert_eq!(commits_in(&repo), 1, "a shallow fetch of depth 1");
    assert_eq!(
        std::fs::read_to_string(repo.join(".git/shallow"))
            .unwrap()
            .trim(),
        f.head
    );
    assert_eq!(git(&repo, &["rev-parse", "HEAD"]), f.head);
    assert_eq!(
        git(&repo, &["status", "--porcelain", "--untracked-files=no"]),
        ""
    );
}

#[tokio::test]
async fn submodules_follow_git_submodule_strategy() {
    let f = fixture();
    let s = setup().await;
    let kept = tempfile::tempdir().unwrap();
    let snapshots = kept.path().to_path_buf();
    let run = async |n: u64, strategy: &str| {
        let token = next_token(n);
        let server = GitServer::start(f.served.path(), &token);
        let snapshot = snapshots.join(strategy);
        let job = checkout_job(
            &s,
            strategy,
            &["cat vendor/lib/lib.txt", "ls -A vendor/lib/deps/inner"],
            |b| {
                checkout_vars(
                    b,
                    &server,
                    &token,
                    &f.pipeline,
                    &snapshot,
                    &[("GIT_SUBMODULE_STRATEGY", strategy), ("GIT_DEPTH", "5")],
                )
            },
        );
        assert_eq!(job.token(), token);
        let report = ran(invoke(&s.runner, job.id(), LAMBDA).await);
        let log = log(&job);
        assert_eq!(report.result, "success", "{log}");
        // Every repository was fetched with the job token (the server wants it for all).
        let seen = server.seen();
        assert!(seen.iter().all(|r| r.authorized), "{seen:?}");
        assert!(
            seen.iter().any(|r| r.target.starts_with("/group/lib.git/")),
            "{seen:?}"
        );
        (log, project(&snapshot), seen, server.port)
    };

    let (log, repo, seen, port) = run(1, "normal").await;
    assert!(
        log.contains("Updating/initializing submodules...\n"),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "Submodule 'lib' (http://127.0.0.1:{port}/group/lib.git) registered for path 'vendor/lib'\n"
        )),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "Submodule path 'vendor/lib': checked out '{}'\n",
            f.lib
        )),
        "{log}"
    );
    assert!(log.contains("from the lib submodule\n"), "{log}");
    let lib = repo.join("vendor/lib");
    assert_eq!(git(&lib, &["rev-parse", "HEAD"]), f.lib);
    // Fetched by id at GIT_SUBMODULE_DEPTH (= GIT_DEPTH 5): both of lib's commits.
    assert_eq!(commits_in(&lib), 2);
    // The project sees its submodule at the recorded commit.
    assert_eq!(
        git(&repo, &["status", "--porcelain", "--untracked-files=no"]),
        ""
    );
    // Not recursive: lib's own submodule stays empty.
    assert!(
        std::fs::read_dir(lib.join("deps/inner"))
            .unwrap()
            .next()
            .is_none(),
        "inner checked out without recursive"
    );
    assert!(
        !seen
            .iter()
            .any(|r| r.target.starts_with("/group/inner.git/"))
    );

    let (log, repo, _, _) = run(2, "recursive").await;
    assert!(
        log.contains("Updating/initializing submodules recursively...\n"),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "Submodule path 'vendor/lib/deps/inner': checked out '{}'\n",
            f.inner
        )),
        "{log}"
    );
    assert_eq!(
        std::fs::read_to_string(repo.join("vendor/lib/deps/inner/inner.txt")).unwrap(),
        "from the inner submodule\n"
    );
}

#[tokio::test]
async fn a_tag_pipeline_fetches_the_tag() {
    let f = fixture();
    let s = setup().await;
    let token = next_token(1);
    let server = GitServer::start(f.served.path(), &token);
    let kept = tempfile::tempdir().unwrap();
    let snapshot = kept.path().join("build");
    let job = checkout_job(&s, "tag", &["cat README"], |b| {
        checkout_vars(
            b,
            &server,
            &token,
            &f.tagged,
            &snapshot,
            &[
                ("CI_COMMIT_TAG", "v1"),
                ("CI_COMMIT_REF_NAME", "v1"),
                ("CI_PIPELINE_ID", "7"),
            ],
        )
    });
    let report = ran(invoke(&s.runner, job.id(), LAMBDA).await);
    let log = log(&job);
    assert_eq!(report.result, "success", "{log}");
    assert!(log.contains("tagged release\n"), "{log}");
    assert!(log.contains("(ref is v1)"), "{log}");
    let repo = project(&snapshot);
    assert_eq!(
        git(&repo, &["for-each-ref", "--format=%(refname)"]),
        "refs/tags/v1"
    );
}

#[tokio::test]
async fn a_wrong_job_token_fails_the_job_and_never_shows_the_token() {
    let f = fixture();
    let s = setup().await;
    let token = next_token(1);
    // The server wants another token than the job's (a token of another project, expired).
    let server = GitServer::start(f.served.path(), "the-token-this-project-wants");
    let kept = tempfile::tempdir().unwrap();
    let snapshot = kept.path().join("build");
    let job = checkout_job(&s, "refused", &["echo script-ran"], |b| {
        checkout_vars(b, &server, &token, &f.pipeline, &snapshot, &[])
    });
    assert_eq!(job.token(), token);
    let watch = ArgvWatch::start(needles(&token));
    let report = ran(invoke(&s.runner, job.id(), LAMBDA).await);
    let (in_argv, _) = watch.stop();

    let log = log(&job);
    assert_eq!(report.result, "failed", "{log}");
    assert_eq!(job.state(), MockJobState::Failed);
    assert!(
        log.contains(&format!(
            "ERROR: the git server refused the job token (HTTP 401) for http://127.0.0.1:{}/group/project.git",
            server.port
        )),
        "{log}"
    );
    assert!(!log.contains("script-ran"), "{log}");
    assert!(server.seen().iter().any(|r| !r.authorized));
    for needle in needles(&token) {
        assert!(!log.contains(&needle), "the trace shows the token");
    }
    assert!(snapshot.exists(), "after_script ran");
    assert_eq!(
        files_containing(&snapshot, &needles(&token)),
        Vec::<String>::new()
    );
    assert_eq!(
        in_argv,
        Vec::<String>::new(),
        "processes with the token in argv"
    );
}
