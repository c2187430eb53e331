//! EC2 runners: the decisions behind "one instance per job" (issue: EC2 runners).
//!
//! This module holds the pure parts: what to launch for a job ([`launch_plan`]), in which
//! order to try subnets and markets and what a launch error means ([`classify_launch_error`]),
//! the user-data (rendered from a template in the repo, refusing anything that looks like a
//! secret: [`render_user_data`]), and what the reaper does with an instance ([`reap`]).
//! Which `ssm:` AMI parameters the provision function may read is one rule here too
//! ([`check_ami_readable`], over [`ami_parameter_prefixes`]); the template's IAM statement
//! `ResolveAmiParameters` grants exactly those prefixes. The function crate `fleet` acts on
//! all of it.

use crate::hook::JobEvent;
use crate::jobs::JobKey;
use crate::mapping::{AmiRef, Ec2Settings, Market, RunnerExecutor};

/// Tag keys on every instance we launch. `managed-by` scopes IAM (teardown and reaper may
/// only terminate instances carrying this stack's value) and the reaper's search.
pub const TAG_MANAGED_BY: &str = "ephemeral-runners:managed-by";
pub const TAG_JOB_ID: &str = "ephemeral-runners:job-id";
pub const TAG_PROJECT_ID: &str = "ephemeral-runners:project-id";
pub const TAG_RUNNER_ID: &str = "ephemeral-runners:runner-id";
/// The provision attempt the instance was launched for (the jobs table's `attempt`): one
/// instance and one cap slot per (job, attempt), so that a new attempt for a job whose runner
/// another job took gets a runner of its own. Absent on instances launched before attempts
/// were tagged: those count as attempt 1.
pub const TAG_ATTEMPT: &str = "ephemeral-runners:attempt";
/// An operator sets this (any value) to keep the reaper away from an instance.
pub const TAG_REAPER_BYPASS: &str = "ephemeral-runners:keep";
/// Set by the reaper's first pass; the second pass kills.
pub const TAG_REAPER_MARK: &str = "ephemeral-runners:reaper-marked-at";

/// The IMDS hop limit of every runner instance (launched IMDSv2 only, `HttpTokens`
/// required). A hop limit of 1 keeps the session token's PUT answer from crossing a second
/// network hop: a job container (docker's bridge is one more hop) cannot reach IMDS and the
/// instance role. Shell-executor jobs run on the host, as [`SHELL_JOB_USER`]. The template's
/// `LaunchTaggedInstances` refuses a launch without both (`ec2:MetadataHttpTokens`,
/// `ec2:MetadataHttpPutResponseHopLimit`).
pub const IMDS_HOP_LIMIT: i32 = 1;

/// The unprivileged user the runner-user-data creates and runs shell-executor jobs as.
pub const SHELL_JOB_USER: &str = "gitlab-job";

/// Stack-level settings (template parameters); a route's [`Ec2Settings`] override them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ec2Defaults {
    pub instance_type: String,
    pub ami: AmiRef,
    pub market: Market,
    /// Tried in this order when a subnet has no capacity.
    pub subnets: Vec<String>,
    pub executor: RunnerExecutor,
    /// The docker executor's image for jobs without `image:` (`DefaultDockerImage`).
    pub docker_image: String,
    /// The stack's name: the `managed-by` tag value.
    pub stack: String,
    /// Extra tags for cost allocation, applied to every instance.
    pub cost_tags: Vec<(String, String)>,
    /// The stack's own prefix of `ssm:` AMI parameters (ends with `/`): see
    /// [`ami_parameter_prefixes`].
    pub ami_parameter_prefix: String,
}

/// The docker executor's image for jobs without `image:` when the stack names none.
pub const DEFAULT_DOCKER_IMAGE: &str = "alpine:3";

/// AWS's public parameters (`/aws/service/ami-amazon-linux-latest/...`, Ubuntu's, ...).
pub const PUBLIC_AMI_PARAMETER_PREFIX: &str = "/aws/service/";

/// The stack's own AMI parameters when the stack parameter `AmiParameterPrefix` is empty.
pub fn default_ami_parameter_prefix(stack: &str) -> String {
    format!("/ephemeral-runners/{stack}/amis/")
}

/// Every prefix under which an `ssm:` AMI parameter may be named: the public one and the
/// stack's own (`own_prefix`, the env var `AMI_PARAMETER_PREFIX`). The provision role may read
/// `ssm:GetParameter` under exactly these (template: `ResolveAmiParameters`).
pub fn ami_parameter_prefixes(own_prefix: &str) -> [&str; 2] {
    [PUBLIC_AMI_PARAMETER_PREFIX, own_prefix]
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{source_name} names the AMI parameter `{parameter}`, which the provision function may not read (it reads only parameters under {}): put the AMI id in a String parameter under `{own_prefix}` (the stack parameter AmiParameterPrefix sets that prefix) and name it there, or give the AMI id itself (ami-...)",
    ami_parameter_prefixes(own_prefix).map(|p| format!("`{p}`")).join(" and ")
)]
pub struct AmiNotReadable {
    /// Where the AMI came from: the job's mapping item, or the stack's `DefaultAmi`.
    pub source_name: &'static str,
    pub parameter: String,
    pub own_prefix: String,
}

/// Whether the provision function may read `ami` (an id needs no read; an `ssm:` name must be
/// under one of [`ami_parameter_prefixes`]).
pub fn check_ami_readable(
    ami: &AmiRef,
    own_prefix: &str,
    source_name: &'static str,
) -> Result<(), AmiNotReadable> {
    match ami {
        AmiRef::Id(_) => Ok(()),
        AmiRef::SsmParameter(name)
            if ami_parameter_prefixes(own_prefix)
                .iter()
                .any(|p| name.starts_with(p)) =>
        {
            Ok(())
        }
        AmiRef::SsmParameter(name) => Err(AmiNotReadable {
            source_name,
            parameter: name.clone(),
            own_prefix: own_prefix.to_owned(),
        }),
    }
}

/// What to launch for one job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchPlan {
    pub instance_type: String,
    pub ami: AmiRef,
    pub executor: RunnerExecutor,
    /// The docker executor's image for jobs that name none (the route's, else the stack's).
    pub docker_image: String,
    /// Docker-in-Docker: privileged containers (docker executor), the host's docker for the
    /// job user (shell executor). The route's `privileged`; off unless asked for.
    pub privileged: bool,
    /// Every (subnet, market) to try, in order: see [`attempts`].
    pub attempts: Vec<(String, Market)>,
    pub tags: Vec<(String, String)>,
    /// Description of the GitLab runner: names the job, so an operator can tell.
    pub runner_description: String,
    /// The runner's tags: the job's own, so that it can take the job; empty when unknown
    /// (then the runner must be allowed to run untagged jobs).
    pub runner_tags: Vec<String>,
    /// The route's warm pool size ([`crate::pool`]); 0: none.
    pub warm_pool: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("no subnet: set the stack's default subnets or the route's `subnets`")]
    NoSubnet,
    #[error("{0}")]
    AmiNotReadable(#[from] AmiNotReadable),
}

/// The order of launch attempts: each subnet with the preferred market, then, if that market
/// is spot, each subnet on demand. Spot is cheaper; on-demand is the fallback when spot has no
/// capacity or its price is too low.
pub fn attempts(subnets: &[String], market: Market) -> Vec<(String, Market)> {
    let mut out: Vec<_> = subnets.iter().map(|s| (s.clone(), market)).collect();
    if market == Market::Spot {
        out.extend(subnets.iter().map(|s| (s.clone(), Market::OnDemand)));
    }
    out
}

pub fn launch_plan(
    job: &JobEvent,
    route: &Ec2Settings,
    defaults: &Ec2Defaults,
    job_tags: Option<&[String]>,
) -> Result<LaunchPlan, PlanError> {
    let subnets = if route.subnets.is_empty() {
        &defaults.subnets
    } else {
        &route.subnets
    };
    if subnets.is_empty() {
        return Err(PlanError::NoSubnet);
    }
    let ami = match &route.ami {
        Some(ami) => {
            check_ami_readable(
                ami,
                &defaults.ami_parameter_prefix,
                "the job's mapping item",
            )?;
            ami.clone()
        }
        None => defaults.ami.clone(),
    };
    let key = JobKey::of(job);
    let mut tags = vec![
        (TAG_MANAGED_BY.to_owned(), defaults.stack.clone()),
        (TAG_JOB_ID.to_owned(), job.job_id.to_string()),
        (TAG_PROJECT_ID.to_owned(), job.project_id.to_string()),
        (
            "Name".to_owned(),
            format!("ephemeral-runner p{}-j{}", key.project_id, key.job_id),
        ),
    ];
    tags.extend(defaults.cost_tags.iter().cloned());
    Ok(LaunchPlan {
        instance_type: route
            .instance_type
            .clone()
            .unwrap_or_else(|| defaults.instance_type.clone()),
        ami,
        executor: route.executor.unwrap_or(defaults.executor),
        docker_image: route
            .image
            .clone()
            .unwrap_or_else(|| defaults.docker_image.clone()),
        privileged: route.privileged.unwrap_or(false),
        attempts: attempts(subnets, route.market.unwrap_or(defaults.market)),
        tags,
        runner_description: format!(
            "ephemeral {} job {} ({})",
            job.project_path
                .clone()
                .unwrap_or_else(|| format!("project {}", job.project_id)),
            job.job_id,
            job.job_name
        ),
        runner_tags: job_tags.map(<[String]>::to_vec).unwrap_or_default(),
        warm_pool: route.warm_pool.unwrap_or(0),
    })
}

/// EC2's answer to a spot launch in an account without the `AWSServiceRoleForEC2Spot`
/// service-linked role, when the caller may not create it (a fresh account).
pub const SPOT_ROLE_MISSING: &str = "AuthFailure.ServiceLinkedRoleCreationNotPermitted";

/// What the operator does about [`SPOT_ROLE_MISSING`].
pub const SPOT_ROLE_FIX: &str = "spot is refused for this account: it has no AWSServiceRoleForEC2Spot service-linked role and the provision role could not create it; the job was launched on demand. Create the role once per account (aws iam create-service-linked-role --aws-service-name spot.amazonaws.com), or deploy the current template, whose provision role may create it (iam:CreateServiceLinkedRole for spot.amazonaws.com only)";

/// What a RunInstances error means for the next attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LaunchFailure {
    /// No capacity or price for this market here: try the next subnet, then on-demand.
    Capacity,
    /// Spot is refused for the whole account ([`SPOT_ROLE_MISSING`]): no other subnet will
    /// take spot either; skip the remaining spot attempts and go on to the on-demand ones.
    SpotRefused,
    /// This subnet cannot take it (full, or the type is not offered in its zone): next subnet.
    Subnet,
    /// AWS is throttling or failing: retry the same attempt with backoff.
    Transient,
    /// Configuration or permission: retrying will not help; fail with the message.
    Fatal,
}

/// Classifies an EC2 error code (as the SDK reports it).
pub fn classify_launch_error(code: &str) -> LaunchFailure {
    match code {
        "InsufficientInstanceCapacity"
        | "SpotMaxPriceTooLow"
        | "MaxSpotInstanceCountExceeded"
        | "InsufficientCapacity"
        | "InsufficientHostCapacity"
        | "InsufficientReservedInstanceCapacity"
        | "UnfulfillableCapacity" => LaunchFailure::Capacity,
        SPOT_ROLE_MISSING => LaunchFailure::SpotRefused,
        "InsufficientFreeAddressesInSubnet" | "Unsupported" | "InvalidSubnetID.NotFound" => {
            LaunchFailure::Subnet
        }
        "RequestLimitExceeded"
        | "Throttling"
        | "InternalError"
        | "ServiceUnavailable"
        | "Unavailable" => LaunchFailure::Transient,
        _ => LaunchFailure::Fatal,
    }
}

/// A failed RunInstances whose instance may exist all the same: EC2 failed inside (500, 503)
/// or no answer came (`Unavailable`: a timeout or a dropped connection, after the SDK's
/// retries). Throttling and every refusal launched nothing.
pub fn launch_may_have_run(code: &str) -> bool {
    matches!(code, "InternalError" | "ServiceUnavailable" | "Unavailable")
}

/// The gitlab-runner release of the stack default when `GITLAB_RUNNER_VERSION` is absent (the
/// teardown and reaper functions, which render no user-data, are not given it). The template's
/// `GitLabRunnerVersion` default is the same (a test checks).
pub const DEFAULT_RUNNER_VERSION: &str = "v18.5.0";

/// The architectures GitLab publishes a Linux gitlab-runner binary for that EC2 runs.
pub const RUNNER_ARCHITECTURES: [&str; 2] = ["arm64", "amd64"];

/// Which gitlab-runner every runner instance runs: exactly this release (the stack parameter
/// `GitLabRunnerVersion`), checked with `sha256sum -c` before it is made executable, against
/// the release's own `release.sha256` or, when pinned (`GitLabRunnerSha256`), against the
/// pinned checksum of the instance's architecture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunnerRelease {
    version: String,
    /// Lowercase hex, per architecture ([`RUNNER_ARCHITECTURES`] order); all `None`: not pinned.
    sha256: [Option<String>; 2],
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RunnerReleaseError {
    #[error(
        "`{0}` is not a gitlab-runner release: use vMAJOR.MINOR.PATCH, e.g. {DEFAULT_RUNNER_VERSION}"
    )]
    Version(String),
    #[error(
        "`{0}` is not arm64=<sha256>,amd64=<sha256>: each entry an architecture (arm64 or amd64, at most once) and the 64 hex digits of that binary's SHA-256 (the release's release.sha256 lists them)"
    )]
    Sha256(String),
}

impl RunnerRelease {
    /// `version` is `vMAJOR.MINOR.PATCH`; `pins` is empty (the release's `release.sha256`
    /// decides) or `arm64=<hex>,amd64=<hex>` (either or both; an instance of an architecture
    /// not pinned refuses to run).
    pub fn new(version: &str, pins: &str) -> Result<Self, RunnerReleaseError> {
        let numbers: Vec<&str> = version.strip_prefix('v').unwrap_or("").split('.').collect();
        let well_formed = numbers.len() == 3
            && numbers
                .iter()
                .all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        if !well_formed {
            return Err(RunnerReleaseError::Version(version.to_owned()));
        }
        let mut sha256: [Option<String>; 2] = [None, None];
        for entry in pins.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let bad = || RunnerReleaseError::Sha256(pins.to_owned());
            let (arch, hex) = entry.split_once('=').ok_or_else(bad)?;
            let slot = RUNNER_ARCHITECTURES
                .iter()
                .position(|a| *a == arch.trim())
                .ok_or_else(bad)?;
            let hex = hex.trim();
            if hex.len() != 64
                || !hex.bytes().all(|b| b.is_ascii_hexdigit())
                || sha256[slot].is_some()
            {
                return Err(bad());
            }
            sha256[slot] = Some(hex.to_ascii_lowercase());
        }
        Ok(Self {
            version: version.to_owned(),
            sha256,
        })
    }

    /// `vMAJOR.MINOR.PATCH`: the release's directory in GitLab's download bucket.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The pinned SHA-256 of `gitlab-runner-linux-<arch>`, if pinned.
    pub fn sha256(&self, arch: &str) -> Option<&str> {
        let slot = RUNNER_ARCHITECTURES.iter().position(|a| *a == arch)?;
        self.sha256[slot].as_deref()
    }
}

impl Default for RunnerRelease {
    fn default() -> Self {
        Self::new(DEFAULT_RUNNER_VERSION, "").expect("DEFAULT_RUNNER_VERSION is well-formed")
    }
}

/// Values substituted into the user-data template. None of them is a secret: the instance
/// reads its runner token from SSM itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserDataValues {
    pub gitlab_url: String,
    /// SSM path under which the token parameter for this instance is put (the instance appends
    /// its own instance id).
    pub token_parameter_prefix: String,
    pub executor: RunnerExecutor,
    pub docker_image: String,
    pub privileged: bool,
    pub wait_timeout_seconds: u64,
    pub region: String,
    pub runner: RunnerRelease,
    /// The stack's cache bucket (`CACHE_BUCKET_NAME`), in `region`: the runner keeps jobs'
    /// `cache:` there with the instance role ([`crate::cache`]). `None`: no cache.
    pub cache_bucket: Option<String>,
    /// A warm-pool instance ([`crate::pool`]): its first boot installs what it needs and stops
    /// the instance (launched with shutdown behaviour `stop`); the job runs on its next boot,
    /// once a provision has claimed and started it.
    pub pooled: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserDataError {
    #[error("the user-data template has no `{0}` placeholder")]
    MissingPlaceholder(&'static str),
    #[error("the user-data template still has `{{{{...}}}}` after rendering: `{0}`")]
    UnknownPlaceholder(String),
    #[error(
        "refusing to render: the value for {0} looks like a secret (user-data is readable by anyone who can describe the instance)"
    )]
    LooksLikeSecret(&'static str),
    #[error("the value for {0} contains characters that are not safe in a shell script")]
    Unsafe(&'static str),
}

/// Prefixes of GitLab and webhook secrets: none may ever reach user-data.
const SECRET_PREFIXES: [&str; 6] = ["glrt-", "glpat-", "gldt-", "glptt-", "whsec_", "GR1348941"];

/// Placeholders that may render empty: the pinned checksums, when not pinned, and the cache
/// bucket, when the stack has none.
const MAY_BE_EMPTY: [&str; 3] = ["RUNNER_SHA256_ARM64", "RUNNER_SHA256_AMD64", "CACHE_BUCKET"];

/// Renders `template` (placeholders `{{GITLAB_URL}}`, `{{TOKEN_PARAMETER_PREFIX}}`,
/// `{{EXECUTOR}}`, `{{WAIT_TIMEOUT}}`, `{{REGION}}`, `{{RUNNER_VERSION}}`,
/// `{{RUNNER_SHA256_ARM64}}`, `{{RUNNER_SHA256_AMD64}}`, `{{CACHE_BUCKET}}`, `{{CACHE_PATH}}`,
/// each required; the checksums are empty when not pinned, the bucket when there is no
/// cache). Values must be plain (no quotes, spaces or shell metacharacters)
/// and must not look like secrets.
pub fn render_user_data(template: &str, values: &UserDataValues) -> Result<String, UserDataError> {
    let executor = values.executor.to_string();
    let wait = values.wait_timeout_seconds.to_string();
    let pinned = |arch| values.runner.sha256(arch).unwrap_or_default();
    let privileged = if values.privileged { "true" } else { "false" };
    let cache_bucket = values.cache_bucket.as_deref().unwrap_or_default();
    let pooled = if values.pooled { "true" } else { "false" };
    let pairs: [(&'static str, &str); 13] = [
        ("GITLAB_URL", &values.gitlab_url),
        ("TOKEN_PARAMETER_PREFIX", &values.token_parameter_prefix),
        ("EXECUTOR", &executor),
        ("DOCKER_IMAGE", &values.docker_image),
        ("PRIVILEGED", privileged),
        ("WAIT_TIMEOUT", &wait),
        ("REGION", &values.region),
        ("RUNNER_VERSION", values.runner.version()),
        ("RUNNER_SHA256_ARM64", pinned("arm64")),
        ("RUNNER_SHA256_AMD64", pinned("amd64")),
        ("CACHE_BUCKET", cache_bucket),
        ("CACHE_PATH", crate::cache::PATH),
        ("POOLED", pooled),
    ];
    let mut out = template.to_owned();
    for (name, value) in pairs {
        if SECRET_PREFIXES.iter().any(|p| value.contains(p)) {
            return Err(UserDataError::LooksLikeSecret(name));
        }
        let safe = value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:@".contains(c));
        if !safe || (value.is_empty() && !MAY_BE_EMPTY.contains(&name)) {
            return Err(UserDataError::Unsafe(name));
        }
        let placeholder = format!("{{{{{name}}}}}");
        if !out.contains(&placeholder) {
            return Err(UserDataError::MissingPlaceholder(name));
        }
        out = out.replace(&placeholder, value);
    }
    if let Some(start) = out.find("{{") {
        let rest = &out[start..];
        let end = rest.find("}}").map_or(rest.len().min(40), |e| e + 2);
        return Err(UserDataError::UnknownPlaceholder(rest[..end].to_owned()));
    }
    Ok(out)
}

/// What the reaper knows about one instance tagged `managed-by` this stack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceFacts {
    pub launched_at_ms: u64,
    pub bypass: bool,
    /// Stopped in a warm pool, launched for no job ([`crate::pool::is_ready`]).
    pub pooled: bool,
    /// When an earlier pass marked it, if one did.
    pub marked_at_ms: Option<u64>,
    /// Whether the runner on it has ever picked a job (GitLab says, or the jobs table does).
    pub picked_a_job: bool,
    /// The job it was launched for is finished (or cleaned) in the jobs table.
    pub job_finished: bool,
    /// GitLab's answer to "is this runner running a job now?", asked once before a kill;
    /// `None` when not asked (no runner on it, or nothing to decide yet).
    pub runner_busy: Option<bool>,
    /// GitLab was asked and gave no answer: the runner may be running a job, so it is taken
    /// as busy (issue 12: never destroy on a guess; the lifetime limit still applies).
    pub busy_unknown: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReaperSettings {
    /// No instance lives longer, whatever it is doing.
    pub max_lifetime_ms: u64,
    /// `run-single --wait-timeout` plus boot time: a runner idle this long got no job.
    pub idle_grace_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReaperAction {
    Keep(&'static str),
    /// First pass: tag it; a slow boot or a job about to start gets one more interval.
    Mark(&'static str),
    Kill(&'static str),
}

/// The reaper's decision for one instance. Two-phase: an instance that looks orphaned is
/// marked on one pass and killed on the next only if it still looks orphaned then. Past the
/// maximum lifetime it is killed at once. A runner GitLab reports busy is kept (unless past
/// the maximum lifetime: a job may not outlive it).
pub fn reap(facts: &InstanceFacts, settings: &ReaperSettings, now_ms: u64) -> ReaperAction {
    if facts.bypass {
        return ReaperAction::Keep("bypass tag set");
    }
    let age = now_ms.saturating_sub(facts.launched_at_ms);
    // Stopped, it runs nothing and has no runner: the lifetime and idle limits are for
    // running instances. One still running after its first boot is not ready: the rules below.
    if facts.pooled {
        return if age >= crate::pool::POOL_MAX_IDLE_MS {
            ReaperAction::Kill("unused in the warm pool for a day")
        } else {
            ReaperAction::Keep("stopped in the warm pool")
        };
    }
    if age >= settings.max_lifetime_ms {
        return ReaperAction::Kill("past the maximum lifetime");
    }
    let maybe_busy = facts.runner_busy == Some(true) || facts.busy_unknown;
    let reason = if facts.job_finished && !maybe_busy {
        Some("its job is finished")
    } else if !facts.picked_a_job && age >= settings.idle_grace_ms && !maybe_busy {
        Some("never picked a job within the wait timeout")
    } else {
        None
    };
    match (reason, facts.marked_at_ms) {
        (None, _) => ReaperAction::Keep("in use or still within its grace time"),
        (Some(why), Some(_)) => ReaperAction::Kill(why),
        (Some(why), None) => ReaperAction::Mark(why),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hook::JobStatus;
    use crate::testing::job_event;

    fn defaults() -> Ec2Defaults {
        Ec2Defaults {
            instance_type: "t3.medium".into(),
            ami: AmiRef::SsmParameter(
                "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64".into(),
            ),
            market: Market::Spot,
            subnets: vec!["subnet-aaaa1111".into(), "subnet-bbbb2222".into()],
            executor: RunnerExecutor::Docker,
            docker_image: crate::ec2::DEFAULT_DOCKER_IMAGE.into(),
            stack: "ci-runners".into(),
            cost_tags: vec![("cost-center".into(), "ci".into())],
            ami_parameter_prefix: default_ami_parameter_prefix("ci-runners"),
        }
    }

    #[test]
    fn a_privileged_route_and_its_image_reach_the_plan_and_the_stack_default_otherwise() {
        let job = job_event(1, 2, "build", JobStatus::Pending);
        let plain = launch_plan(&job, &Ec2Settings::default(), &defaults(), None).unwrap();
        assert_eq!(plain.docker_image, DEFAULT_DOCKER_IMAGE);
        assert!(!plain.privileged, "off unless a route asks");
        let dind = Ec2Settings {
            privileged: Some(true),
            image: Some("docker:27".into()),
            ..Ec2Settings::default()
        };
        let plan = launch_plan(&job, &dind, &defaults(), None).unwrap();
        assert_eq!(
            (plan.docker_image.as_str(), plan.privileged),
            ("docker:27", true)
        );
    }

    #[test]
    fn route_settings_override_defaults_and_spot_falls_back_to_on_demand() {
        let job = job_event(7, 99, "build", JobStatus::Pending);
        let route = Ec2Settings {
            instance_type: Some("c7i.xlarge".into()),
            subnets: vec!["subnet-cccc3333".into()],
            ..Default::default()
        };
        let plan = launch_plan(&job, &route, &defaults(), Some(&["docker".into()])).unwrap();
        assert_eq!(plan.instance_type, "c7i.xlarge");
        assert_eq!(plan.executor, RunnerExecutor::Docker);
        assert_eq!(
            plan.attempts,
            [
                ("subnet-cccc3333".to_owned(), Market::Spot),
                ("subnet-cccc3333".to_owned(), Market::OnDemand)
            ]
        );
        assert!(
            plan.tags
                .contains(&(TAG_MANAGED_BY.into(), "ci-runners".into()))
        );
        assert!(plan.tags.contains(&(TAG_JOB_ID.into(), "99".into())));
        assert!(plan.tags.contains(&("cost-center".into(), "ci".into())));
        assert_eq!(plan.runner_tags, ["docker"]);
        assert!(plan.runner_description.contains("job 99"));

        let on_demand = Ec2Settings {
            market: Some(Market::OnDemand),
            ..Default::default()
        };
        let plan = launch_plan(&job, &on_demand, &defaults(), None).unwrap();
        assert_eq!(
            plan.attempts.len(),
            2,
            "each default subnet once, on demand only"
        );
        let mut no_subnets = defaults();
        no_subnets.subnets.clear();
        assert_eq!(
            launch_plan(&job, &Ec2Settings::default(), &no_subnets, None),
            Err(PlanError::NoSubnet)
        );
    }

    #[test]
    fn launch_errors_are_classified() {
        assert_eq!(
            classify_launch_error("InsufficientInstanceCapacity"),
            LaunchFailure::Capacity
        );
        assert_eq!(
            classify_launch_error("SpotMaxPriceTooLow"),
            LaunchFailure::Capacity
        );
        assert_eq!(
            classify_launch_error("MaxSpotInstanceCountExceeded"),
            LaunchFailure::Capacity
        );
        assert_eq!(
            classify_launch_error("InsufficientFreeAddressesInSubnet"),
            LaunchFailure::Subnet
        );
        assert_eq!(
            classify_launch_error("RequestLimitExceeded"),
            LaunchFailure::Transient
        );
        assert_eq!(
            classify_launch_error("UnauthorizedOperation"),
            LaunchFailure::Fatal
        );
        assert_eq!(
            classify_launch_error("InvalidAMIID.NotFound"),
            LaunchFailure::Fatal
        );
        // A fresh account without the spot service-linked role: spot is out, on demand is not.
        assert_eq!(
            classify_launch_error("AuthFailure.ServiceLinkedRoleCreationNotPermitted"),
            LaunchFailure::SpotRefused
        );
        assert!(
            SPOT_ROLE_FIX
                .contains("create-service-linked-role --aws-service-name spot.amazonaws.com")
        );
    }

    #[test]
    fn only_ami_parameters_under_the_allowed_prefixes_are_readable() {
        let own = default_ami_parameter_prefix("ci-runners");
        assert_eq!(own, "/ephemeral-runners/ci-runners/amis/");
        assert_eq!(
            ami_parameter_prefixes(&own),
            ["/aws/service/", own.as_str()]
        );
        let ssm = |name: &str| AmiRef::SsmParameter(name.into());
        let ok = |ami: &AmiRef| check_ami_readable(ami, &own, "DEFAULT_AMI").is_ok();
        assert!(ok(&AmiRef::Id("ami-0123abcd".into())));
        assert!(ok(&ssm(
            "/aws/service/canonical/ubuntu/server/24.04/stable/current/arm64/hvm/ebs-gp3/ami-id"
        )));
        assert!(ok(&ssm("/ephemeral-runners/ci-runners/amis/builder")));
        // Another stack's prefix, a look-alike without the slash, a name outside any prefix.
        for name in [
            "/ephemeral-runners/other/amis/builder",
            "/ephemeral-runners/ci-runners/amis-old/builder",
            "/golden/ami",
            "golden-ami",
        ] {
            let e = check_ami_readable(&ssm(name), &own, "the job's mapping item").unwrap_err();
            let text = e.to_string();
            assert!(
                text.starts_with("the job's mapping item names the AMI parameter"),
                "{text}"
            );
            assert!(
                text.contains("under `/ephemeral-runners/ci-runners/amis/`"),
                "{text}"
            );
            assert!(text.contains("AmiParameterPrefix"), "{text}");
        }
        // A route's AMI is checked when the launch is planned: a clear configuration error.
        let job = job_event(7, 99, "build", JobStatus::Pending);
        let route = Ec2Settings {
            ami: Some(ssm("/golden/ami")),
            ..Default::default()
        };
        assert!(matches!(
            launch_plan(&job, &route, &defaults(), None),
            Err(PlanError::AmiNotReadable(e)) if e.parameter == "/golden/ami"
        ));
        let mut own_prefix = defaults();
        own_prefix.ami_parameter_prefix = "/golden/".into();
        assert!(launch_plan(&job, &route, &own_prefix, None).is_ok());
    }

    const TEMPLATE: &str = "#!/bin/bash\nurl={{GITLAB_URL}}\np={{TOKEN_PARAMETER_PREFIX}}\ne={{EXECUTOR}}\ni=\"{{DOCKER_IMAGE}}\"\npriv={{PRIVILEGED}}\nw={{WAIT_TIMEOUT}}\nr={{REGION}}\nv={{RUNNER_VERSION}}\na=\"{{RUNNER_SHA256_ARM64}}\"\nx=\"{{RUNNER_SHA256_AMD64}}\"\nc=\"{{CACHE_BUCKET}}\"\ncp={{CACHE_PATH}}\npool={{POOLED}}\n";

    fn values() -> UserDataValues {
        UserDataValues {
            gitlab_url: "https://gitlab.example.com".into(),
            token_parameter_prefix: "/ephemeral-runners/ci-runners/runner-tokens".into(),
            executor: RunnerExecutor::Shell,
            docker_image: DEFAULT_DOCKER_IMAGE.into(),
            privileged: false,
            wait_timeout_seconds: 600,
            region: "eu-west-1".into(),
            runner: RunnerRelease::default(),
            cache_bucket: Some("ci-runners-cachebucket-1a2b3c".into()),
            pooled: false,
        }
    }

    const SHA: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn the_runner_release_is_a_version_and_optional_pins_per_architecture() {
        let r = RunnerRelease::new("v18.5.0", "").unwrap();
        assert_eq!((r.version(), r.sha256("arm64")), ("v18.5.0", None));
        assert_eq!(RunnerRelease::default().version(), DEFAULT_RUNNER_VERSION);
        let upper = SHA.to_ascii_uppercase();
        let r = RunnerRelease::new("v18.5.0", &format!(" amd64={upper} ")).unwrap();
        assert_eq!((r.sha256("amd64"), r.sha256("arm64")), (Some(SHA), None));
        let r = RunnerRelease::new("v18.5.0", &format!("arm64={SHA},amd64={SHA}")).unwrap();
        assert_eq!(r.sha256("arm64"), Some(SHA));
        for version in [
            "18.5.0",
            "latest",
            "v18.5",
            "v18.5.0-rc1",
            "v18..0",
            "v18.5.0;x",
            "",
        ] {
            assert_eq!(
                RunnerRelease::new(version, ""),
                Err(RunnerReleaseError::Version(version.into()))
            );
        }
        for pins in [
            SHA.to_owned(),
            format!("x86_64={SHA}"),
            format!("arm64={}", &SHA[1..]),
            format!("arm64={}g", &SHA[1..]),
            format!("arm64={SHA},arm64={SHA}"),
        ] {
            assert!(
                matches!(
                    RunnerRelease::new("v18.5.0", &pins),
                    Err(RunnerReleaseError::Sha256(_))
                ),
                "{pins}"
            );
        }
    }

    #[test]
    fn user_data_renders_and_refuses_secrets_and_shell_metacharacters() {
        let out = render_user_data(TEMPLATE, &values()).unwrap();
        assert!(out.contains("url=https://gitlab.example.com\n") && out.contains("w=600\n"));
        // Not pinned: the checksums render empty (the release's release.sha256 decides).
        assert!(out.contains("v=v18.5.0\na=\"\"\nx=\"\"\n"), "{out}");
        let mut v = values();
        v.runner = RunnerRelease::new("v17.11.3", &format!("amd64={SHA}")).unwrap();
        let out = render_user_data(TEMPLATE, &v).unwrap();
        assert!(
            out.contains(&format!("v=v17.11.3\na=\"\"\nx=\"{SHA}\"\n")),
            "{out}"
        );
        assert_eq!(
            render_user_data(&TEMPLATE.replace("{{RUNNER_VERSION}}", "latest"), &values()),
            Err(UserDataError::MissingPlaceholder("RUNNER_VERSION"))
        );

        let mut v = values();
        v.gitlab_url = "https://gitlab.example.com/glrt-abc".into();
        assert_eq!(
            render_user_data(TEMPLATE, &v),
            Err(UserDataError::LooksLikeSecret("GITLAB_URL"))
        );
        let mut v = values();
        v.region = "eu-west-1; curl evil".into();
        assert_eq!(
            render_user_data(TEMPLATE, &v),
            Err(UserDataError::Unsafe("REGION"))
        );
        assert_eq!(
            render_user_data(&TEMPLATE.replace("{{REGION}}", "x"), &values()),
            Err(UserDataError::MissingPlaceholder("REGION"))
        );
        assert!(matches!(
            render_user_data(&format!("{TEMPLATE}{{{{TOKEN}}}}"), &values()),
            Err(UserDataError::UnknownPlaceholder(p)) if p == "{{TOKEN}}"
        ));
    }

    #[test]
    fn the_repository_user_data_template_renders() {
        let template = include_str!("../../../templates/runner-user-data.sh");
        let out = render_user_data(template, &values()).unwrap();
        assert!(out.starts_with("#!/bin/bash"));
        assert!(out.contains("run-single"));
        assert!(out.contains("--max-builds 1"));
        assert!(out.contains("--wait-timeout 600"));
        assert!(!SECRET_PREFIXES.iter().any(|p| out.contains(p)));
        // The pinned release, never `latest`; docker from the distribution only.
        assert!(out.contains("runner_version=v18.5.0\n"), "{out}");
        assert!(
            out.contains("https://gitlab-runner-downloads.s3.amazonaws.com/$runner_version")
                && out.contains("sha256sum -c"),
            "{out}"
        );
        assert!(
            !out.contains("/latest/binaries") && !out.contains("| sh"),
            "{out}"
        );
        assert!(
            out.contains("dnf install -y docker") && out.contains("systemctl enable --now docker")
        );
        // A syntax error here would surface only as runners that never start.
        use std::io::Write as _;
        let mut bash = std::process::Command::new("bash")
            .arg("-n")
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("bash");
        bash.stdin
            .take()
            .unwrap()
            .write_all(out.as_bytes())
            .unwrap();
        assert!(
            bash.wait().unwrap().success(),
            "rendered user-data is not valid bash"
        );
    }

    /// Runs the rendered user-data with stand-ins for the commands it calls (IMDS via curl,
    /// the AWS CLI, gitlab-runner of the pinned version, as an AMI may have it, useradd,
    /// runuser, systemctl, shutdown) and returns their log. tests/e2e/tests/user_data_moto.rs
    /// runs it with the real AWS CLI against moto, and downloads and checks gitlab-runner.
    fn run_user_data(executor: RunnerExecutor) -> String {
        run_user_data_with(UserDataValues {
            executor,
            ..values()
        })
    }

    fn run_user_data_with(values: UserDataValues) -> String {
        let executor = values.executor;
        let dir = std::env::temp_dir().join(format!(
            "user-data-{}-{executor:?}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let bin = dir.join("bin");
        let home = dir.join("home");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::create_dir_all(&home).unwrap();
        let log = dir.join("calls.log");
        let stub = |name: &str, body: &str| {
            use std::os::unix::fs::PermissionsExt as _;
            let path = bin.join(name);
            std::fs::write(&path, format!("#!/bin/bash\n{body}\n")).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        };
        let record = r#"echo "$(basename "$0") $*" >> "$CALLS""#;
        stub(
            "curl",
            &format!(
                "{record}\ncase \"$*\" in *api/token*) echo imds-session ;; *instance-id*) echo i-0abc ;; esac"
            ),
        );
        stub(
            "aws",
            &format!("{record}\ncase \"$*\" in *get-parameter*) echo runner-token-value ;; esac"),
        );
        // The job user does not exist yet: `id -u` fails until useradd ran.
        stub("id", &format!("{record}\nexit 1"));
        stub("useradd", record);
        stub("usermod", record);
        stub(
            "getent",
            &format!(
                "{record}\necho \"gitlab-job:x:990:990::{}:/bin/bash\"",
                home.display()
            ),
        );
        stub(
            "runuser",
            &format!("{record}\nwhile [ \"$1\" != -- ]; do shift; done; shift; exec \"$@\""),
        );
        stub(
            "gitlab-runner",
            &format!(
                "[ \"$1\" = --version ] && {{ printf 'Version:      18.5.0\\nGit revision: 1234abcd\\n'; exit; }}\n{record}\necho \"gitlab-runner env CI_SERVER_TOKEN=$CI_SERVER_TOKEN cwd=$PWD\" >> \"$CALLS\""
            ),
        );
        stub("docker", record);
        stub("systemctl", record);
        stub("uname", "echo aarch64");
        stub("shutdown", record);
        stub("logger", "cat > /dev/null");
        let script = render_user_data(
            include_str!("../../../templates/runner-user-data.sh"),
            &values,
        )
        .unwrap();
        let status = std::process::Command::new("bash")
            .arg("-c")
            .arg(&script)
            .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
            .env("CALLS", &log)
            // A warm-pool boot's marker and per-boot copy: never /var/lib on the test host.
            .env("EPHEMERAL_STATE_DIR", dir.join("state"))
            .env("CLOUD_PER_BOOT_DIR", dir.join("per-boot"))
            .current_dir(&dir)
            .status()
            .expect("bash");
        assert!(status.success());
        let calls = std::fs::read_to_string(&log).unwrap_or_default();
        let _ = std::fs::remove_dir_all(&dir);
        calls
    }

    #[test]
    fn shell_jobs_run_as_an_unprivileged_user_and_docker_jobs_do_not_need_one() {
        let calls = run_user_data(RunnerExecutor::Shell);
        let line = |prefix: &str| {
            calls
                .lines()
                .find(|l| l.starts_with(prefix))
                .unwrap_or_else(|| panic!("no `{prefix}` call in:\n{calls}"))
                .to_owned()
        };
        assert!(
            line("useradd").ends_with(&format!(" {SHELL_JOB_USER}")),
            "{calls}"
        );
        let runuser = line("runuser");
        assert!(
            runuser.starts_with(&format!("runuser -u {SHELL_JOB_USER} -- /"))
                && runuser.contains("/bin/gitlab-runner run-single "),
            "{runuser}"
        );
        // The AMI's gitlab-runner is the pinned version: nothing is downloaded.
        assert!(
            !calls.lines().any(|l| l.contains("gitlab-runner-downloads")),
            "{calls}"
        );
        let run = line("gitlab-runner run-single");
        assert!(run.contains("--executor shell"), "{run}");
        assert!(
            run.contains("--builds-dir ") && run.contains("/home/builds"),
            "{run}"
        );
        // The token reaches the runner in its environment, never on a command line.
        assert!(line("gitlab-runner env").contains("CI_SERVER_TOKEN=runner-token-value"));
        assert!(
            !calls
                .lines()
                .filter(|l| !l.starts_with("gitlab-runner env"))
                .any(|l| l.contains("runner-token-value")),
            "{calls}"
        );
        // The parameter is deleted once read, and the instance shuts down at the end.
        assert!(line("aws ssm delete-parameter").contains("/runner-tokens/i-0abc"));
        assert!(
            calls.lines().last().unwrap().starts_with("shutdown -h now"),
            "{calls}"
        );

        let calls = run_user_data(RunnerExecutor::Docker);
        assert!(
            !calls
                .lines()
                .any(|l| l.starts_with("useradd") || l.starts_with("runuser")),
            "{calls}"
        );
        // Docker is on the AMI: enabled and started, not installed.
        assert!(
            calls.lines().any(|l| l == "systemctl enable --now docker"),
            "{calls}"
        );
        assert!(
            calls
                .lines()
                .any(|l| l.starts_with("gitlab-runner run-single")
                    && l.contains("--docker-image alpine:3")),
            "{calls}"
        );
    }

    #[test]
    fn a_privileged_route_runs_docker_in_docker_or_gives_the_shell_job_user_docker() {
        let run_single = |calls: &str| {
            calls
                .lines()
                .find(|l| l.starts_with("gitlab-runner run-single"))
                .unwrap_or_else(|| panic!("no run-single in:\n{calls}"))
                .to_owned()
        };
        let dind = run_user_data_with(UserDataValues {
            executor: RunnerExecutor::Docker,
            privileged: true,
            docker_image: "docker:27".into(),
            ..values()
        });
        let run = run_single(&dind);
        assert!(
            run.contains("--docker-image docker:27")
                && run.contains("--docker-privileged")
                && run.contains("--docker-volumes /certs/client"),
            "{run}"
        );
        // Unprivileged unless asked: the same route without it.
        let plain = run_single(&run_user_data(RunnerExecutor::Docker));
        assert!(!plain.contains("--docker-privileged"), "{plain}");

        let shell = run_user_data_with(UserDataValues {
            executor: RunnerExecutor::Shell,
            privileged: true,
            ..values()
        });
        assert!(
            shell.lines().any(|l| l == "systemctl enable --now docker"),
            "docker started for a privileged shell route:\n{shell}"
        );
        assert!(
            shell
                .lines()
                .any(|l| l == format!("usermod -aG docker {SHELL_JOB_USER}")),
            "{shell}"
        );
        let unprivileged = run_user_data(RunnerExecutor::Shell);
        assert!(
            !unprivileged
                .lines()
                .any(|l| l.starts_with("usermod") || l == "systemctl enable --now docker"),
            "{unprivileged}"
        );
    }

    /// The job cache: gitlab-runner's shared S3 cache in the stack's bucket with the instance
    /// role, for both executors; no cache flag at all when the stack has no bucket.
    #[test]
    fn the_runner_keeps_the_job_cache_in_the_stack_bucket_with_the_instance_role() {
        for executor in [RunnerExecutor::Docker, RunnerExecutor::Shell] {
            let calls = run_user_data(executor);
            let run = calls
                .lines()
                .find(|l| l.starts_with("gitlab-runner run-single"))
                .unwrap_or_else(|| panic!("no run-single in:\n{calls}"));
            // Shared: each job has a runner of its own, and only a shared cache is found
            // again (the object is cache/project/<id>/<key>, crate::cache::object_key).
            assert!(
                run.contains(&format!(
                    " --cache-type s3 --cache-shared --cache-path {} --cache-s3-bucket-name ci-runners-cachebucket-1a2b3c --cache-s3-bucket-location eu-west-1 --cache-s3-authentication_type iam "
                , crate::cache::PATH)),
                "{run}"
            );
            assert!(
                !run.contains("access-key") && !run.contains("secret-key"),
                "{run}"
            );
        }
        let without = run_user_data_with(UserDataValues {
            cache_bucket: None,
            ..values()
        });
        assert!(
            !without.contains("--cache-type") && !without.contains("--cache-s3"),
            "{without}"
        );
        // A bucket name is a plain value like every other.
        assert_eq!(
            render_user_data(
                include_str!("../../../templates/runner-user-data.sh"),
                &UserDataValues {
                    cache_bucket: Some("b; rm -rf /".into()),
                    ..values()
                }
            ),
            Err(UserDataError::Unsafe("CACHE_BUCKET"))
        );
    }

    fn facts() -> InstanceFacts {
        InstanceFacts {
            launched_at_ms: 0,
            bypass: false,
            pooled: false,
            marked_at_ms: None,
            picked_a_job: true,
            job_finished: false,
            runner_busy: None,
            busy_unknown: false,
        }
    }

    const SETTINGS: ReaperSettings = ReaperSettings {
        max_lifetime_ms: 3_600_000,
        idle_grace_ms: 900_000,
    };

    #[test]
    fn reaper_is_two_phase_and_respects_bypass_busy_and_max_lifetime() {
        // Working on its job: kept.
        assert!(matches!(
            reap(&facts(), &SETTINGS, 1_000_000),
            ReaperAction::Keep(_)
        ));
        // Job finished (finished event lost): marked, then killed next pass.
        let finished = InstanceFacts {
            job_finished: true,
            ..facts()
        };
        assert!(matches!(
            reap(&finished, &SETTINGS, 1_000_000),
            ReaperAction::Mark(_)
        ));
        let marked = InstanceFacts {
            marked_at_ms: Some(1_000_000),
            ..finished.clone()
        };
        assert!(matches!(
            reap(&marked, &SETTINGS, 1_300_000),
            ReaperAction::Kill(_)
        ));
        // ...unless GitLab says its runner is busy (it took another job),
        let busy = InstanceFacts {
            runner_busy: Some(true),
            ..marked.clone()
        };
        assert!(matches!(
            reap(&busy, &SETTINGS, 1_300_000),
            ReaperAction::Keep(_)
        ));
        // ...or GitLab could not say: it may be running a job, so nothing is destroyed.
        let unknown = InstanceFacts {
            busy_unknown: true,
            ..marked
        };
        assert!(matches!(
            reap(&unknown, &SETTINGS, 1_300_000),
            ReaperAction::Keep(_)
        ));
        let idle_unknown = InstanceFacts {
            picked_a_job: false,
            busy_unknown: true,
            marked_at_ms: Some(1_000_000),
            ..facts()
        };
        assert!(matches!(
            reap(&idle_unknown, &SETTINGS, 1_300_000),
            ReaperAction::Keep(_)
        ));
        // Never picked a job: kept during the grace time (slow boot), then marked.
        let idle = InstanceFacts {
            picked_a_job: false,
            ..facts()
        };
        assert!(matches!(
            reap(&idle, &SETTINGS, 899_999),
            ReaperAction::Keep(_)
        ));
        assert!(matches!(
            reap(&idle, &SETTINGS, 900_000),
            ReaperAction::Mark(_)
        ));
        // Past the maximum lifetime: killed at once, busy or not.
        let old = InstanceFacts {
            runner_busy: Some(true),
            ..facts()
        };
        assert!(matches!(
            reap(&old, &SETTINGS, 3_600_000),
            ReaperAction::Kill(_)
        ));
        // Bypass wins over everything.
        let kept = InstanceFacts {
            bypass: true,
            ..old
        };
        assert!(matches!(
            reap(&kept, &SETTINGS, 9_000_000),
            ReaperAction::Keep(_)
        ));
    }

    #[test]
    fn a_stopped_pooled_instance_outlives_the_running_limits_for_a_day_then_goes() {
        let pooled = InstanceFacts {
            pooled: true,
            picked_a_job: false,
            ..facts()
        };
        // Past the lifetime and the idle grace of a running instance: kept, it runs nothing.
        let waiting = reap(&pooled, &SETTINGS, crate::pool::POOL_MAX_IDLE_MS - 1);
        assert_eq!(waiting, ReaperAction::Keep("stopped in the warm pool"));
        let expired = reap(&pooled, &SETTINGS, crate::pool::POOL_MAX_IDLE_MS);
        assert_eq!(
            expired,
            ReaperAction::Kill("unused in the warm pool for a day")
        );
        // The same instance not (yet) stopped: the running instance's rules.
        let warming = InstanceFacts {
            pooled: false,
            ..pooled
        };
        assert_eq!(
            reap(&warming, &SETTINGS, SETTINGS.max_lifetime_ms),
            ReaperAction::Kill("past the maximum lifetime")
        );
    }
}
