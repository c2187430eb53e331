//! The environment `template.yaml` gives each function against what that function reads
//! (issue 16): exactly equal, so a variable the template sets that nothing reads (a setting
//! that does nothing) or one the code reads that the template does not set (a default nobody
//! chose) fails here. What a function reads is recorded from its own configuration code, run
//! over a lookup that answers every variable, so the reading code is the one owner of the
//! names. The webhook, the intake drainer (crates/webhook/src/config.rs) and the reconciler
//! (crates/reconciler/src/config.rs) have this test in their own crates; these are the rest.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};

use ephemeral_gitlab::UrlPolicy;
use serde_norway::Value;

fn template() -> Value {
    let path = e2e_tests::workspace_root().join("template.yaml");
    serde_norway::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The variable names of an `Environment.Variables` mapping (none when absent).
fn names(environment: &Value) -> BTreeSet<String> {
    let Some(variables) = environment["Variables"].as_mapping() else {
        return BTreeSet::new();
    };
    variables
        .keys()
        .map(|k| k.as_str().unwrap().to_owned())
        .collect()
}

/// What `function` runs with: its own variables and those of SAM's `Globals: Function`.
fn template_variables(template: &Value, function: &str) -> BTreeSet<String> {
    let resource = &template["Resources"][function];
    assert_eq!(
        resource["Type"].as_str(),
        Some("AWS::Serverless::Function"),
        "{function} in template.yaml"
    );
    let mut set = names(&template["Globals"]["Function"]["Environment"]);
    set.extend(names(&resource["Properties"]["Environment"]));
    set
}

/// The names `read` asks its lookup for, answered from `values` (chosen so that every branch
/// that reads a variable is taken) and `"1"` for any other name.
fn asked(
    values: &[(&str, &str)],
    read: impl FnOnce(&dyn Fn(&str) -> Option<String>),
) -> BTreeSet<String> {
    let values: BTreeMap<&str, &str> = values.iter().copied().collect();
    let asked = RefCell::new(BTreeSet::new());
    let lookup = |name: &str| {
        asked.borrow_mut().insert(name.to_owned());
        Some(values.get(name).copied().unwrap_or("1").to_owned())
    };
    read(&lookup);
    asked.into_inner()
}

/// Read by the code, never set by the template, on purpose: each with its reason.
fn not_set(asked: &mut BTreeSet<String>, unset: &[(&str, &str)]) {
    for (name, why) in unset {
        assert!(asked.remove(*name), "{name} ({why}) is no longer read");
    }
}

fn assert_matches(template: &Value, function: &str, mut read: BTreeSet<String>) {
    // The Lambda runtime's own (AWS_REGION, the credentials) and the SDK's standard settings
    // (AWS_ENDPOINT_URL_*, for tests): never the template's to set.
    read.retain(|name| !name.starts_with("AWS_"));
    let set = template_variables(template, function);
    let unused: Vec<_> = set.difference(&read).collect();
    let missing: Vec<_> = read.difference(&set).collect();
    assert!(
        unused.is_empty() && missing.is_empty(),
        "{function}: template.yaml sets {unused:?} that it does not read, and does not set {missing:?} that it reads"
    );
}

/// The GitLab client's own switch: every function with a GitLab client reads it when built.
fn gitlab_client(lookup: &dyn Fn(&str) -> Option<String>) {
    UrlPolicy::from_lookup(lookup);
}

#[test]
fn the_router_gets_exactly_what_it_reads() {
    let read = asked(&[("PROVISION_ON", "pending")], |l| {
        router::RouterConfig::from_lookup(l).unwrap();
    });
    assert_matches(&template(), "RouterFunction", read);
}

#[test]
fn the_mapper_gets_exactly_what_it_reads() {
    // DEFAULT_EXECUTOR LAMBDA: the only branch that reads DEFAULT_LAMBDA_ARN.
    let values = [
        ("DEFAULT_EXECUTOR", "LAMBDA"),
        ("GITLAB_URL", "https://gitlab.example.com"),
    ];
    let read = asked(&values, |l| {
        mapper::MapperConfig::from_lookup(l).unwrap();
        gitlab_client(l);
    });
    assert_matches(&template(), "MapperFunction", read);
}

/// A stack with EC2 runners and both caps: every fleet setting is read.
const FLEET_VALUES: &[(&str, &str)] = &[
    ("GITLAB_URL", "https://gitlab.example.com"),
    ("STACK_NAME", "er"),
    ("AMI_PARAMETER_PREFIX", "/ephemeral-runners/er/amis/"),
    (
        "TOKEN_PARAMETER_PREFIX",
        "/ephemeral-runners/er/runner-tokens",
    ),
    ("DEFAULT_AMI", "ami-0123456789abcdef0"),
    ("DEFAULT_MARKET", "spot"),
    ("DEFAULT_RUNNER_EXECUTOR", "docker"),
    ("DEFAULT_DOCKER_IMAGE", "alpine:3"),
    ("RUNNER_SCOPE", "project"),
    ("COST_TAGS", "team=ci"),
    ("GITLAB_RUNNER_VERSION", "v17.11.3"),
    ("GITLAB_RUNNER_SHA256", ""),
    ("SHELL_RUNNER_MODE", "per-job"),
    (
        "INSTANCE_ARN_PREFIX",
        "arn:aws:ec2:us-east-1:123456789012:instance/",
    ),
];

/// What every fleet function's configuration reads (`FleetSetup` is shared by all three).
fn fleet_reads() -> BTreeSet<String> {
    asked(FLEET_VALUES, |l| {
        let setup = fleet::FleetSetup::from_lookup(l).unwrap();
        assert!(matches!(setup, fleet::FleetSetup::Ec2(_)));
        gitlab_client(l);
    })
}

/// Read by the shared fleet configuration, but set for no fleet function.
const FLEET_NEVER_SET: &[(&str, &str)] = &[
    (
        "RUNNER_BOOT_GRACE_SECONDS",
        "a test's knob; its default fits",
    ),
    ("ORPHAN_GRACE_SECONDS", "a test's knob; its default fits"),
];

#[test]
fn each_fleet_function_gets_exactly_what_it_reads() {
    let template = template();
    let provision_only: &[(&str, &str)] = &[
        (
            "GITLAB_RUNNER_VERSION",
            "only the provision function renders user-data",
        ),
        (
            "GITLAB_RUNNER_SHA256",
            "only the provision function renders user-data",
        ),
        (
            "DEFAULT_DOCKER_IMAGE",
            "only the provision function renders user-data",
        ),
        (
            "CACHE_BUCKET_NAME",
            "only the provision function renders user-data",
        ),
    ];
    let teardown_only = (
        "GITLAB_API_TOKEN_PARAMETER",
        "only teardown confirms finished hooks",
    );
    let reaper_only = ("LEASES_TABLE_NAME", "only the reaper holds a lease");
    let mut provision = fleet_reads();
    provision.extend(asked(FLEET_VALUES, |l| {
        fleet::shell_runner_mode(l).unwrap();
    }));
    not_set(&mut provision, FLEET_NEVER_SET);
    not_set(&mut provision, &[teardown_only, reaper_only]);
    assert_matches(&template, "Ec2ProvisionFunction", provision);
    for (function, theirs) in [
        ("Ec2TeardownFunction", reaper_only),
        ("ReaperFunction", teardown_only),
    ] {
        let mut read = fleet_reads();
        not_set(&mut read, FLEET_NEVER_SET);
        not_set(&mut read, provision_only);
        not_set(&mut read, &[theirs]);
        assert_matches(&template, function, read);
    }
}

#[test]
fn the_shell_runner_gets_exactly_what_it_reads() {
    let values = [
        ("GITLAB_URL", "https://gitlab.example.com"),
        ("SANDBOX_SCRATCH_ROOT", "/tmp"),
        ("INHERIT_ENV", "PATH"),
    ];
    let mut read = asked(&values, |l| {
        shell_runner::Config::from_lookup(l).unwrap();
        gitlab_client(l);
    });
    let knob = "a tuning knob for tests; its default fits a Lambda";
    not_set(
        &mut read,
        &[
            ("SHELL_RUNNER_ROOT", knob),
            ("REQUEST_WAIT_SECONDS", knob),
            ("DEADLINE_RESERVE_SECONDS", knob),
            ("DEADLINE_REPORT_SECONDS", knob),
            ("STATUS_POLL_SECONDS", knob),
            ("INHERIT_ENV", knob),
        ],
    );
    assert_matches(&template(), "ShellRunnerFunction", read);
}

/// The check fails on a one-sided change: a variable added to the template only.
#[test]
fn a_variable_set_on_one_side_only_is_caught() {
    let mut template = template();
    let variables =
        &mut template["Resources"]["RouterFunction"]["Properties"]["Environment"]["Variables"];
    variables
        .as_mapping_mut()
        .unwrap()
        .insert("JOB_TTL_SECOND".into(), "1".into());
    let read = asked(&[("PROVISION_ON", "pending")], |l| {
        router::RouterConfig::from_lookup(l).unwrap();
    });
    let failed = std::panic::catch_unwind(|| assert_matches(&template, "RouterFunction", read));
    assert!(failed.is_err());
}
