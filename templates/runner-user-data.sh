#!/bin/bash
# User-data of a per-job EC2 runner, rendered by ephemeral_core::ec2::render_user_data.
# It holds no secret: the runner token waits in SSM under {{TOKEN_PARAMETER_PREFIX}}/<this
# instance's id>, readable and deletable only by this instance, and is deleted once read.
# AMI requirements (docs/ec2-runners.md): the AWS CLI v2, curl and systemd; gitlab-runner and
# docker are installed when missing.
# Whatever happens, the instance shuts down at the end (shutdown behaviour: terminate).
set -uo pipefail
trap 'shutdown -h now' EXIT
exec > >(logger -t ephemeral-runner) 2>&1

imds() {
  local token
  token=$(curl -sf -X PUT http://169.254.169.254/latest/api/token \
    -H 'X-aws-ec2-metadata-token-ttl-seconds: 300') || return 1
  curl -sf -H "X-aws-ec2-metadata-token: $token" "http://169.254.169.254/latest/meta-data/$1"
}

instance_id=$(imds instance-id) || { echo "no instance id from IMDSv2"; exit 1; }
parameter="{{TOKEN_PARAMETER_PREFIX}}/$instance_id"

# The provision task puts the parameter right after RunInstances returns: wait for it.
runner_token=""
for _ in $(seq 1 60); do
  runner_token=$(aws ssm get-parameter --region {{REGION}} --name "$parameter" \
    --with-decryption --query Parameter.Value --output text 2>/dev/null) && break
  runner_token=""
  sleep 5
done
[ -n "$runner_token" ] || { echo "runner token parameter never appeared: $parameter"; exit 1; }
aws ssm delete-parameter --region {{REGION}} --name "$parameter" || echo "could not delete $parameter"

# A stock AMI (e.g. Amazon Linux 2023) works too: what is missing is installed here, at the
# cost of boot time. Bake gitlab-runner (and docker) into your AMI to skip this.
if ! command -v gitlab-runner >/dev/null; then
  case "$(uname -m)" in aarch64) arch=arm64 ;; *) arch=amd64 ;; esac
  curl -sSfL -o /usr/local/bin/gitlab-runner \
    "https://gitlab-runner-downloads.s3.amazonaws.com/latest/binaries/gitlab-runner-linux-$arch" \
    || { echo "could not download gitlab-runner"; exit 1; }
  chmod +x /usr/local/bin/gitlab-runner
fi
if [ "{{EXECUTOR}}" = docker ] && ! command -v docker >/dev/null; then
  dnf install -y docker || yum install -y docker || { echo "could not install docker"; exit 1; }
  systemctl start docker
fi

# The shell executor runs the job as the runner's own user: that is an unprivileged user
# made here (no sudo, no docker group), not root. Docker jobs run in containers, and the
# runner stays root to reach the docker socket; the instance's IMDS hop limit of 1 keeps
# containers away from the instance role.
executor_args=()
run_as=()
if [ "{{EXECUTOR}}" = docker ]; then
  executor_args=(--docker-image alpine:3)
else
  job_user=gitlab-job
  id -u "$job_user" >/dev/null 2>&1 \
    || useradd --create-home --user-group --shell /bin/bash "$job_user" \
    || { echo "could not create the job user $job_user"; exit 1; }
  job_home=$(getent passwd "$job_user" | cut -d: -f6)
  [ -n "$job_home" ] && cd "$job_home" || { echo "no home directory for $job_user"; exit 1; }
  executor_args=(--builds-dir "$job_home/builds" --cache-dir "$job_home/cache")
  # runuser keeps the environment (CI_SERVER_TOKEN) and drops every root privilege.
  run_as=(runuser -u "$job_user" --)
fi

# The token goes in the environment, not on the command line: argv is visible to every
# process on the host (`ps`). gitlab-runner reads CI_SERVER_TOKEN for --token.
CI_SERVER_TOKEN="$runner_token" "${run_as[@]}" gitlab-runner run-single \
  --url {{GITLAB_URL}} \
  --executor {{EXECUTOR}} "${executor_args[@]}" \
  --max-builds 1 \
  --wait-timeout {{WAIT_TIMEOUT}}
echo "run-single exited with $?"
