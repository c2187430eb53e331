#!/bin/bash
# User-data of a per-job EC2 runner, rendered by ephemeral_core::ec2::render_user_data.
# It holds no secret: the runner token waits in SSM under {{TOKEN_PARAMETER_PREFIX}}/<this
# instance's id>, readable and deletable only by this instance, and is deleted once read.
# AMI requirements (docs/ec2-runners.md): curl, sha256sum and systemd; gitlab-runner
# {{RUNNER_VERSION}}, the AWS CLI and (docker executor, or a privileged shell route) docker
# are installed when missing: a baked AMI (template.yaml RunnerAmiRecipe) has them all, and
# then nothing is downloaded or installed.
# Whatever happens, the instance shuts down at the end (shutdown behaviour: terminate; a
# warm-pool instance's is stop until a provision starts it for its job, which sets it to
# terminate first). The one exception is a failed warm-up, below.
# A warm-pool instance (pooled=true) is launched with no job: its first boot installs and
# verifies all of the above, never touches the token parameter, and stops. cloud-init runs
# user-data on the first boot only, so that boot leaves a copy of this script in cloud-init's
# per-boot directory: the job runs at the next boot, once a provision has claimed the
# instance, started it and put its token parameter.
set -uo pipefail
pooled={{POOLED}}
# Both overrides are never set on an instance; the tests that run this script point them at
# temporary directories.
state_dir="${EPHEMERAL_STATE_DIR:-/var/lib/ephemeral-runner}"
per_boot_dir="${CLOUD_PER_BOOT_DIR:-/var/lib/cloud/scripts/per-boot}"
# A warm-pool instance whose warm-up failed stays up instead: stopped, it would look ready
# and be started for a job it cannot run. Running, it is never claimed (only stopped ones
# are), and the reaper terminates it as an instance that never picked a job.
finish() {
  local status=$?
  if [ "$status" -ne 0 ] && [ "$pooled" = true ] && [ ! -e "$state_dir/warmed" ]; then
    echo "warm-up failed (exit $status): staying up, never claimed, until the reaper terminates this instance"
    return
  fi
  shutdown -h now
}
trap finish EXIT
exec > >(logger -t ephemeral-runner) 2>&1

# gitlab-runner: exactly the stack's GitLabRunnerVersion, and only once its SHA-256 matched:
# the release's own release.sha256, or the stack's GitLabRunnerSha256 pin for this
# architecture when one is set. An AMI with this version installed (and, pinned, with the
# pinned binary) downloads nothing; an AMI with another version gets this one in
# /usr/local/bin (its own copy is left unused).
runner_version={{RUNNER_VERSION}}
pinned_arm64="{{RUNNER_SHA256_ARM64}}"
pinned_amd64="{{RUNNER_SHA256_AMD64}}"
# >>> verified gitlab-runner install: template.yaml's RunnerAmiComponent bakes AMIs with these
# very lines (tests/template/test_baked_ami.py keeps the two copies equal).
downloads="https://gitlab-runner-downloads.s3.amazonaws.com/$runner_version"
# Never set on an instance; the tests that run this script point it at a temporary directory.
install_dir="${RUNNER_INSTALL_DIR:-/usr/local/bin}"
case "$(uname -m)" in
  aarch64 | arm64) arch=arm64 pinned=$pinned_arm64 ;;
  x86_64 | amd64) arch=amd64 pinned=$pinned_amd64 ;;
  *) echo "refusing to run: GitLab publishes no gitlab-runner for $(uname -m)"; exit 1 ;;
esac
binary="binaries/gitlab-runner-linux-$arch"

installed_version() {
  "$1" --version 2>/dev/null | awk '$1 == "Version:" { print $2; exit }'
}
# A pin holds for an installed copy too: a baked binary runs only if it is the pinned one.
pin_holds() {
  [ -z "$pinned_arm64$pinned_amd64" ] \
    || { [ -n "$pinned" ] && sha256sum -c --status <<< "$pinned  $1"; }
}
runner=$(command -v gitlab-runner || { [ -x "$install_dir/gitlab-runner" ] && echo "$install_dir/gitlab-runner"; })
have=""
[ -z "$runner" ] || have=$(installed_version "$runner")
if [ -n "$runner" ] && [ "$have" = "${runner_version#v}" ] && pin_holds "$runner"; then
  echo "gitlab-runner $runner_version is installed: $runner"
else
  if [ "$have" = "${runner_version#v}" ]; then
    echo "replacing gitlab-runner $have ($runner): not the binary GitLabRunnerSha256 pins for $arch"
  elif [ -n "$runner" ]; then
    echo "replacing gitlab-runner $have ($runner) with $runner_version"
  fi
  stage=$(mktemp -d) && mkdir -p "$stage/binaries" || { echo "no temporary directory"; exit 1; }
  curl -sSfL -o "$stage/$binary" "$downloads/$binary" \
    || { echo "could not download $downloads/$binary"; exit 1; }
  if [ -n "$pinned_arm64$pinned_amd64" ]; then
    checksum_source="the stack parameter GitLabRunnerSha256"
    [ -n "$pinned" ] || {
      echo "refusing to run gitlab-runner: GitLabRunnerSha256 pins no checksum for $arch"
      exit 1
    }
    printf '%s  %s\n' "$pinned" "$binary" > "$stage/check.sha256"
  else
    checksum_source="$downloads/release.sha256"
    curl -sSfL -o "$stage/release.sha256" "$downloads/release.sha256" \
      || { echo "refusing to run gitlab-runner: could not download $checksum_source"; exit 1; }
    # Lines of `sha256sum` (text or binary mode): <sha256>  binaries/gitlab-runner-linux-<arch>
    awk -v f="$binary" '$2 == f || $2 == "*" f { print $1 "  " f; exit }' \
      "$stage/release.sha256" > "$stage/check.sha256"
    [ -s "$stage/check.sha256" ] || {
      echo "refusing to run gitlab-runner: $checksum_source has no checksum for $binary"
      exit 1
    }
  fi
  (cd "$stage" && sha256sum -c check.sha256) || {
    echo "refusing to run gitlab-runner: the SHA-256 of $downloads/$binary does not match $checksum_source"
    exit 1
  }
  # Executable only now, once verified.
  install -m 0755 "$stage/$binary" "$install_dir/gitlab-runner" \
    || { echo "could not install gitlab-runner in $install_dir"; exit 1; }
  rm -rf "$stage"
  runner="$install_dir/gitlab-runner"
  echo "gitlab-runner $runner_version installed (SHA-256 checked against $checksum_source)"
fi
# <<< verified gitlab-runner install

# Docker from the distribution's own packages only (Amazon Linux: dnf; AL2: yum), never a
# convenience script; bake it into your AMI to skip this. A privileged shell route gets it
# too: its jobs build images with the host's docker.
privileged={{PRIVILEGED}}
if [ "{{EXECUTOR}}" = docker ] || [ "$privileged" = true ]; then
  if ! command -v docker >/dev/null; then
    dnf install -y docker || yum install -y docker || { echo "could not install docker"; exit 1; }
  fi
  systemctl enable --now docker || { echo "could not start docker"; exit 1; }
fi

# The AWS CLI reads and deletes the token: Amazon Linux 2023 ships it (package awscli-2),
# Amazon Linux 2 has v1 (yum awscli), a baked AMI has it.
if ! command -v aws >/dev/null; then
  dnf install -y awscli-2 || yum install -y awscli || { echo "could not install the AWS CLI"; exit 1; }
fi

# Warm pool: everything is installed and verified now, and the token is not ours to read yet
# (no provision has claimed this instance). Run again at every later boot (cloud-init's
# per-boot scripts), mark this one warmed and stop (the EXIT trap; shutdown behaviour stop).
# The next boot finds the marker and goes on as any instance does, with nothing left to
# install. A failure before the marker leaves the instance running unmarked (`finish`).
if [ "$pooled" = true ] && [ ! -e "$state_dir/warmed" ]; then
  mkdir -p "$per_boot_dir" && install -m 0700 "$0" "$per_boot_dir/ephemeral-runner.sh" \
    || { echo "could not copy $0 to $per_boot_dir"; exit 1; }
  mkdir -p "$state_dir" && : > "$state_dir/warmed" \
    || { echo "could not mark this instance warmed in $state_dir"; exit 1; }
  echo "warmed for the warm pool: stopping until a provision starts this instance for a job"
  exit 0
fi

imds() {
  local token
  token=$(curl -sf -X PUT http://169.254.169.254/latest/api/token \
    -H 'X-aws-ec2-metadata-token-ttl-seconds: 300') || return 1
  curl -sf -H "X-aws-ec2-metadata-token: $token" "http://169.254.169.254/latest/meta-data/$1"
}

instance_id=$(imds instance-id) || { echo "no instance id from IMDSv2"; exit 1; }
parameter="{{TOKEN_PARAMETER_PREFIX}}/$instance_id"

# The provision task puts the parameter right after RunInstances returns: wait for it. The
# token is read only now, once the runner is verified and docker runs: an instance that
# refused to run never held it.
runner_token=""
for _ in $(seq 1 60); do
  runner_token=$(aws ssm get-parameter --region {{REGION}} --name "$parameter" \
    --with-decryption --query Parameter.Value --output text 2>/dev/null) && break
  runner_token=""
  sleep 5
done
[ -n "$runner_token" ] || { echo "runner token parameter never appeared: $parameter"; exit 1; }
aws ssm delete-parameter --region {{REGION}} --name "$parameter" || echo "could not delete $parameter"

# The shell executor runs the job as the runner's own user: that is an unprivileged user
# made here (no sudo; the docker group only on a privileged route, which makes it root's
# equal on this one-job instance), not root. Docker jobs run in containers, and the runner
# stays root to reach the docker socket; the instance's IMDS hop limit of 1 keeps containers
# away from the instance role. A privileged docker route runs its containers privileged, with
# the TLS certificate volume docker:dind shares with the job (DOCKER_TLS_CERTDIR=/certs).
executor_args=()
run_as=()
if [ "{{EXECUTOR}}" = docker ]; then
  executor_args=(--docker-image "{{DOCKER_IMAGE}}")
  if [ "$privileged" = true ]; then
    executor_args+=(--docker-privileged --docker-volumes /certs/client)
  fi
else
  job_user=gitlab-job
  id -u "$job_user" >/dev/null 2>&1 \
    || useradd --create-home --user-group --shell /bin/bash "$job_user" \
    || { echo "could not create the job user $job_user"; exit 1; }
  if [ "$privileged" = true ]; then
    usermod -aG docker "$job_user" || { echo "could not add $job_user to the docker group"; exit 1; }
  fi
  job_home=$(getent passwd "$job_user" | cut -d: -f6)
  [ -n "$job_home" ] && cd "$job_home" || { echo "no home directory for $job_user"; exit 1; }
  executor_args=(--builds-dir "$job_home/builds" --cache-dir "$job_home/cache")
  # runuser keeps the environment (CI_SERVER_TOKEN) and drops every root privilege.
  run_as=(runuser -u "$job_user" --)
fi

# The job cache (cache: in .gitlab-ci.yml): gitlab-runner's own S3 cache in the stack's
# bucket, signed with this instance's role (no key in any file). Shared, because every job
# gets a new runner: an unshared cache lives under runner/<token>/ and no later job would
# ever find it. Objects are {{CACHE_PATH}}/project/<project id>/<key>: the runner presigns a
# URL for the job's own keys only (docs/ec2-runners.md says which jobs can reach the role).
cache_bucket="{{CACHE_BUCKET}}"
cache_args=()
if [ -n "$cache_bucket" ]; then
  cache_args=(--cache-type s3 --cache-shared --cache-path {{CACHE_PATH}}
    --cache-s3-bucket-name "$cache_bucket" --cache-s3-bucket-location {{REGION}}
    --cache-s3-authentication_type iam)
fi

# The token goes in the environment, not on the command line: argv is visible to every
# process on the host (`ps`). gitlab-runner reads CI_SERVER_TOKEN for --token.
CI_SERVER_TOKEN="$runner_token" "${run_as[@]}" "$runner" run-single \
  --url {{GITLAB_URL}} \
  --executor {{EXECUTOR}} "${executor_args[@]}" "${cache_args[@]}" \
  --max-builds 1 \
  --wait-timeout {{WAIT_TIMEOUT}}
echo "run-single exited with $?"
