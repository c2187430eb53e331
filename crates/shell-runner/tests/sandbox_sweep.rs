//! Issue 12, finding 1 (the sandbox part): a hostile job in a warm environment leaves
//! processes that escape the process-group kill and the marker kill, and files outside its
//! build directory; the next job must find none of them. One test in its own binary: the
//! sweep kills every descendant of the process, which in Lambda is the runner's whole sandbox
//! and here is this test process.

mod common;

use common::*;

/// Three ways out of the job's process group and marker: a job-control group with a cleared
/// environment, a new session, and both.
const ESCAPES: [&str; 3] = [
    "(set -m; exec -c sleep 7501 &)",
    "setsid sleep 7502 &",
    "(setsid bash -c 'exec -c sleep 7503' &)",
];

fn escapees() -> Vec<u32> {
    ["7501", "7502", "7503"]
        .iter()
        .flat_map(|n| processes_running(&["sleep", n]))
        .collect()
}

fn strs(lines: &[String]) -> Vec<&str> {
    lines.iter().map(String::as_str).collect()
}

fn hostile_script(scratch: &std::path::Path) -> Vec<String> {
    let scratch = scratch.display();
    let mut script: Vec<String> = ESCAPES.iter().map(|s| s.to_string()).collect();
    script.extend([
        format!("echo stolen > {scratch}/left-by-job"),
        format!("mkdir -p {scratch}/cache/deep && echo x > {scratch}/cache/deep/file"),
        "echo done".to_owned(),
    ]);
    script
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hostile_job_leaves_nothing_for_the_next_job_in_a_warm_sandbox() {
    // Without the sweep (the runner as it was): the attack works, and this counts it.
    let unswept = tempfile::tempdir().unwrap();
    let s = setup_with(|c| c.root = unswept.path().join("shell-runner")).await;
    let script = hostile_script(unswept.path());
    let hostile = job(&s.mock, "hostile", &strs(&script), &[], 600, |_| {});
    let report = match invoke(&s.runner, hostile.id(), LAMBDA).await {
        shell_runner::Outcome::Ran(r) => r,
        other => panic!("{other:?}"),
    };
    assert_eq!(report.result, "success", "{}", log(&hostile));
    let survived = escapees();
    assert!(
        !survived.is_empty(),
        "the escapes no longer escape the job's own kill: this test shows nothing"
    );
    assert!(unswept.path().join("left-by-job").exists());
    println!(
        "without the sweep: {} escaped processes survived the job, files left under the scratch root",
        survived.len()
    );
    for pid in survived {
        // SAFETY: kill has no memory-safety preconditions; these are this test's sleeps.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }

    // With the sweep, as deployed (scratch root = the sandbox's /tmp).
    let scratch = tempfile::tempdir().unwrap();
    let s = setup_with(|c| {
        c.root = scratch.path().join("shell-runner");
        c.sandbox_scratch = Some(scratch.path().to_path_buf());
    })
    .await;
    let script = hostile_script(scratch.path());
    let hostile = job(&s.mock, "hostile", &strs(&script), &[], 600, |_| {});
    let report = match invoke(&s.runner, hostile.id(), LAMBDA).await {
        shell_runner::Outcome::Ran(r) => r,
        other => panic!("{other:?}"),
    };
    assert_eq!(report.result, "success", "{}", log(&hostile));
    assert_eq!(
        escapees(),
        Vec::<u32>::new(),
        "escaped processes survived the sweep"
    );
    let left: Vec<_> = std::fs::read_dir(scratch.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "left under the scratch root: {left:?}");

    // The next job in the same warm environment looks for the first one's leftovers.
    let dir = scratch.path().display();
    let checks = [
        format!("test ! -e {dir}/left-by-job"),
        format!("test ! -e {dir}/cache"),
        "! pgrep -f 'sleep 750[123]'".to_owned(),
    ];
    let next = job(&s.mock, "next", &strs(&checks), &[], 600, |_| {});
    let report = match invoke(&s.runner, next.id(), LAMBDA).await {
        shell_runner::Outcome::Ran(r) => r,
        other => panic!("{other:?}"),
    };
    assert_eq!(report.result, "success", "{}", log(&next));
}
