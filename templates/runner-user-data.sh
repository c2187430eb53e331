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

# The token goes in the environment, not on the command line: argv is visible to every
# process on the host (`ps`). gitlab-runner reads CI_SERVER_TOKEN for --token.
docker_args=()
if [ "{{EXECUTOR}}" = docker ]; then
  docker_args=(--docker-image alpine:3)
fi
CI_SERVER_TOKEN="$runner_token" gitlab-runner run-single \
  --url {{GITLAB_URL}} \
  --executor {{EXECUTOR}} "${docker_args[@]}" \
  --max-builds 1 \
  --wait-timeout {{WAIT_TIMEOUT}}
echo "run-single exited with $?"
