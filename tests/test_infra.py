"""The cluster files: every YAML/JSON parses, the Ray cluster config passes Ray's own schema, the
RayJob names a real job and config, stage configs load, and jobs/hostfile.py reads a live Ray."""

from __future__ import annotations

import copy
import glob
import importlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import yaml

from pipeline.config import ConfigError, load_config
from tests.conftest import free_ports
from tests.raycluster import RAY_HEAD_PORT_FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAY_YAML = os.path.join(ROOT, "infra", "ray", "aws-a100.yaml")
RAYJOB_YAML = os.path.join(ROOT, "infra", "kuberay", "rayjob-pretokenize.yaml")

# Every YAML under configs/ is a stage config, loaded by its dataclass. The class is found from
# the job whose docstring names the file, else from this table, else from the one job that names
# the file's folder; a config none of these explain fails the test (say which job reads it).
STAGE_CONFIGS = {
    "configs/data/download*.yaml": "pipeline.data.download:DownloadConfig",
    "configs/data/score*.yaml": "pipeline.data.filter:ScoreConfig",
    "configs/data/pretokenize*.yaml": "pipeline.data.pretokenize:PretokenizeConfig",
    "configs/train/*.yaml": "pipeline.train.trainer:TrainConfig",
}
# What some configs leave to the command line beyond required keys (these are filled in with
# placeholders): e.g. sampling wants exactly one of prompt / prompts_file / class_labels.
CONFIG_EXTRAS = {
    "configs/sample/t2i.yaml": ["prompt=a red apple", "text_encoder=t5"],
    # the stage configs name a placeholder bucket, refused as it is
    "configs/train/stage1.yaml": [
        "run_dir=s3://my-bucket/t2i/runs/stage1",
        "data.shards=[s3://my-bucket/t2i/tokens/stage1-256]",
    ],
    "configs/train/stage2.yaml": [
        "run_dir=s3://my-bucket/t2i/runs/stage2",
        "init_from=s3://my-bucket/t2i/runs/stage1/export",
        "data.shards=[s3://my-bucket/t2i/tokens/stage2-512]",
    ],
    "configs/sample/tiny_cpu.yaml": ["prompt=a red apple", "text_encoder=t5"],
}


def _files(*patterns: str) -> list[str]:
    out = set()
    for p in patterns:
        out.update(glob.glob(os.path.join(ROOT, p), recursive=True))
    return sorted(out)


def _rel(path: str) -> str:
    return os.path.relpath(path, ROOT)


def _load_class(spec: str) -> type:
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def _load_job(name: str):
    modname = f"job_{name[:-3]}"
    if modname in sys.modules:
        return sys.modules[modname]
    spec = importlib.util.spec_from_file_location(modname, os.path.join(ROOT, "jobs", name))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[modname] = mod  # dataclasses look their module up while being created
    spec.loader.exec_module(mod)
    return mod


def _load_with_placeholders(cls: type, path: str | None, overrides: list[str]):
    """load_config, giving a placeholder to each required key a file leaves to the command line."""
    overrides = list(overrides)
    for _ in range(10):
        try:
            return load_config(cls, path, overrides)
        except ConfigError as e:
            m = re.search(r"missing required key '(\w+)'", str(e))
            if not m:
                raise
            overrides.append(f"{m.group(1)}=/placeholder/{m.group(1)}")
    raise AssertionError(f"too many required keys missing in {path}")


# --- every file parses ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    _files("infra/**/*.yaml", "infra/**/*.yml", "configs/**/*.yaml", "configs/**/*.yml"),
    ids=_rel,
)
def test_yaml_parses(path):
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
    assert docs, f"{_rel(path)} is empty"
    assert all(isinstance(d, dict) for d in docs), f"{_rel(path)}: top level must be a mapping"


@pytest.mark.parametrize("path", _files("infra/**/*.json", "configs/**/*.json"), ids=_rel)
def test_json_parses(path):
    with open(path) as f:
        assert isinstance(json.load(f), dict)


def test_no_credentials_in_infra_files():
    # keys come from instance profiles / IRSA, never from files in the repository
    pattern = re.compile(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|AWS_SECRET_ACCESS_KEY", re.I)
    for path in _files("infra/**/*", "configs/**/*"):
        if os.path.isfile(path) and not path.endswith(".md"):
            with open(path, errors="replace") as f:
                assert not pattern.search(f.read()), f"{_rel(path)} holds a credential"


# --- the Ray cluster launcher config ----------------------------------------------------------


def _run_instances_shape():
    """EC2 RunInstances' request shape, from botocore's service model (offline)."""
    import botocore.session

    return (
        botocore.session.get_session()
        .get_service_model("ec2")
        .operation_model("RunInstances")
        .input_shape
    )


def _ec2_members_check(value, shape, where: str) -> None:
    """Every key of ``value`` must be a member of the botocore ``shape`` (recursively)."""
    if shape.type_name == "structure":
        assert isinstance(value, dict), f"{where}: expected a mapping"
        for k, v in value.items():
            assert k in shape.members, f"{where}.{k} is not an EC2 RunInstances field"
            _ec2_members_check(v, shape.members[k], f"{where}.{k}")
    elif shape.type_name == "list":
        assert isinstance(value, list), f"{where}: expected a list"
        for i, v in enumerate(value):
            _ec2_members_check(v, shape.member, f"{where}[{i}]")


def test_ray_cluster_config_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    with open(RAY_YAML) as f:
        raw = yaml.safe_load(f)
    # Ray's own path of `ray up`: fill in the AWS defaults, then check against ray-schema.json
    validate_config(prepare_config(copy.deepcopy(raw)))

    run_instances = _run_instances_shape()
    types = raw["available_node_types"]
    for name, node_type in types.items():
        # node_config goes to EC2 RunInstances as it is: a typo there fails only at launch
        _ec2_members_check(node_type["node_config"], run_instances, f"{name}.node_config")
        profile = node_type["node_config"].get("IamInstanceProfile", {})
        assert "Arn" in profile or "Name" in profile, f"{name}: S3 access must come from a role"

    gpu = [t for t in types.values() if t["node_config"]["InstanceType"].startswith("p4d")]
    assert gpu, "no A100 (p4d) worker type"
    for t in gpu:
        assert t["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
        assert t["min_workers"] <= t["max_workers"] <= raw["max_workers"]
    assert raw["head_node_type"] in types
    assert not types[raw["head_node_type"]]["node_config"]["InstanceType"].startswith("p")


def test_ray_cluster_config_efa_block_is_valid_when_uncommented():
    """The commented EFA block of the p4d node type: one EFA interface per network card (0..3),
    device index 0 only on the primary card, fields EC2 and Ray's AWS bootstrap accept."""
    from ray.autoscaler._private.aws.config import (
        _configure_subnets_and_groups_from_network_interfaces,
    )
    from ray.autoscaler._private.util import prepare_config, validate_config

    text = open(RAY_YAML).read()
    block = re.search(r"# EFA-BEGIN\n(.*?)\n\s*# EFA-END", text, re.S).group(1)
    uncommented = "\n".join(re.sub(r"^\s*# ?", "", line) for line in block.splitlines())
    efa = yaml.safe_load(uncommented)
    nics = efa["NetworkInterfaces"]
    assert [n["NetworkCardIndex"] for n in nics] == [0, 1, 2, 3]  # p4d.24xlarge: 4 cards
    assert [n["DeviceIndex"] for n in nics] == [0, 1, 1, 1]
    assert all(n["InterfaceType"] == "efa" for n in nics)
    assert len({n["SubnetId"] for n in nics}) == 1  # one subnet, so one zone

    raw = yaml.safe_load(text)
    (gpu,) = [t for t in raw["available_node_types"].values() if "p4d" in str(t)]
    gpu["node_config"].update(efa)
    validate_config(prepare_config(copy.deepcopy(raw)))
    run_instances = _run_instances_shape()
    _ec2_members_check(gpu["node_config"], run_instances, "gpu.node_config")
    # what `ray up` does with it: subnet and groups taken from the interfaces
    out = _configure_subnets_and_groups_from_network_interfaces(gpu["node_config"])
    assert out["SubnetIds"] == [nics[0]["SubnetId"]] * 4


def test_ray_cluster_config_installs_this_checkout():
    with open(RAY_YAML) as f:
        raw = yaml.safe_load(f)
    # file_mounts ship the directory `ray up` runs in: it must be the repository root
    ((remote, local),) = raw["file_mounts"].items()
    assert os.path.isfile(os.path.join(ROOT, local, "pyproject.toml"))
    setup = " && ".join(raw["setup_commands"])
    assert "-c requirements-lock.txt -e ." in setup  # the pinned torch / ray / deepspeed
    assert "venv" in setup
    # the venv lives outside the synced folder (rsync and Ray's file-mount hash walk all of it)
    venvs = set(re.findall(r"(~/[\w./-]*venv)/bin/", setup))
    assert venvs and not any(v.startswith(remote.replace("/home/ubuntu", "~") + "/") for v in venvs)
    # rsync skips what git and Ray's --working-dir upload skip; neither drops the code
    assert raw["rsync_filter"] == [".gitignore", ".rayignore"]
    assert "DPkg::Lock::Timeout" in setup  # unattended-upgrades may hold dpkg's lock at boot
    for cmd in raw["head_start_ray_commands"] + raw["worker_start_ray_commands"]:
        assert "0.0.0.0" not in cmd, "the dashboard / job API must not face the open network"
    # the local ray that runs `ray up` must match what the nodes install
    import ray

    lock = open(os.path.join(ROOT, "requirements-lock.txt")).read()
    assert f"ray=={ray.__version__}" in lock


def test_ignore_files_keep_inputs_off_the_cluster_and_the_code_on_it(tmp_path):
    """.gitignore + .rayignore, as Ray's --working-dir upload reads them (``ray up``'s
    rsync_filter names the same two files, checked with the cluster config): local inputs,
    venvs and .git stay behind; pipeline/models/ (a folder named like the local models/ input)
    and every job and config go."""
    import logging
    from pathlib import Path

    from ray._private.runtime_env.packaging import _dir_travel

    src = tmp_path / "src"
    kept = ["pipeline/models/gpt.py", "jobs/train.py", "configs/train/stage1.yaml",
            "infra/ray/aws-a100.yaml", ".gitignore", ".rayignore"]  # fmt: skip
    dropped = ["models/flan-t5-xl/model.safetensors", "laion-coco/part-0.parquet",
               "infra/ray/my-cluster.yaml", ".venv/bin/python", ".git/HEAD", "hostfile",
               "outputs/demo/report.json", "pipeline/__pycache__/x.pyc"]  # fmt: skip
    for rel in kept + dropped:
        f = src / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        if rel in (".gitignore", ".rayignore"):
            shutil.copy(os.path.join(ROOT, rel), f)
        else:
            f.write_text("x")

    uploaded: list[str] = []

    def collect(p: Path) -> None:
        if p.is_file():
            uploaded.append(p.relative_to(src).as_posix())

    _dir_travel(src, [], collect, include_gitignore=True, logger=logging.getLogger("test"))
    assert sorted(uploaded) == sorted(kept)


# --- the KubeRay RayJob -----------------------------------------------------------------------


def _rayjob_docs() -> list[dict]:
    with open(RAYJOB_YAML) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def test_rayjob_manifest_has_the_required_fields():
    import ray

    docs = _rayjob_docs()
    (job,) = [d for d in docs if d.get("kind") == "RayJob"]
    assert job["apiVersion"] == "ray.io/v1"
    assert job["metadata"]["name"]
    spec = job["spec"]
    assert spec["entrypoint"].strip()
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"].startswith("s3://")
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    pods = [cluster["headGroupSpec"]["template"]] + [
        g["template"] for g in cluster["workerGroupSpecs"]
    ]
    gpu_groups = [
        g
        for g in cluster["workerGroupSpecs"]
        for c in g["template"]["spec"]["containers"]
        if int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) > 0
    ]
    assert gpu_groups, "no GPU worker group"
    # S3 through a service account bound to an IAM role (IRSA), not keys in env vars
    accounts = {d["metadata"]["name"]: d for d in docs if d.get("kind") == "ServiceAccount"}
    for pod in pods + [spec["submitterPodTemplate"]]:
        sa = pod["spec"]["serviceAccountName"]
        assert "eks.amazonaws.com/role-arn" in accounts[sa]["metadata"]["annotations"]
        for c in pod["spec"]["containers"]:
            names = {e["name"] for e in c.get("env", [])}
            assert not names & {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


def test_rayjob_entrypoint_names_a_real_job_and_config():
    (job,) = [d for d in _rayjob_docs() if d.get("kind") == "RayJob"]
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "python"
    script = argv[1]
    assert re.fullmatch(r"jobs/\w+\.py", script) and os.path.isfile(os.path.join(ROOT, script))
    config = argv[argv.index("--config") + 1]
    assert os.path.isfile(os.path.join(ROOT, config))
    overrides = [a for a in argv[2:] if "=" in a]
    # the job's own config class must accept the file plus every override of the entrypoint
    mod = _load_job(os.path.basename(script))
    classes = [
        v
        for k, v in vars(mod).items()
        if k.endswith("Config") and isinstance(v, type) and k != "ExecutorConfig"
    ]
    assert len(classes) == 1, classes
    cfg = load_config(classes[0], os.path.join(ROOT, config), overrides)
    assert cfg.output.startswith("s3://")


# --- DeepSpeed configs and stage configs ------------------------------------------------------


@pytest.mark.parametrize("path", _files("configs/deepspeed/*.json"), ids=_rel)
def test_deepspeed_config_has_a_valid_zero_section(path):
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    with open(path) as f:
        cfg = json.load(f)
    stage = cfg["zero_optimization"]["stage"]
    assert stage in (0, 1, 2, 3)
    # DeepSpeed's own pydantic model: unknown (misspelt) keys are rejected
    assert DeepSpeedZeroConfig(**cfg["zero_optimization"]).stage == stage


def _job_config_class(job: str) -> type:
    """The config dataclass a job parses (the one ``*Config`` class in its namespace)."""
    mod = _load_job(os.path.basename(job))
    classes = {
        v
        for k, v in vars(mod).items()
        if k.endswith("Config") and isinstance(v, type) and k != "ExecutorConfig"
    }
    assert len(classes) == 1, f"{job}: cannot tell its config class among {classes}"
    return classes.pop()


def _config_class_for(path: str) -> type:
    rel = _rel(path)
    jobs = {j: open(j).read() for j in _files("jobs/*.py")}
    # "jobs/x.py --config configs/..." in job x's own text (line breaks and [ ] allowed)
    exact = sorted(
        j
        for j, text in jobs.items()
        if re.search(
            rf"jobs/{os.path.basename(j)}\s+(?:\\\s+)?\[?--config\s+{re.escape(rel)}\b", text
        )
    )
    if exact:
        classes = {_job_config_class(j) for j in exact}
        assert len(classes) == 1, f"{rel} is named by jobs with different configs: {exact}"
        return classes.pop()
    for pattern, cls in STAGE_CONFIGS.items():
        if path in _files(pattern):
            return _load_class(cls)
    folder = os.path.dirname(rel) + "/"
    by_folder = sorted(j for j, text in jobs.items() if folder in text)
    classes = {_job_config_class(j) for j in by_folder}
    assert len(classes) == 1, (
        f"which job reads {rel}? Name it in that job's docstring or add it to STAGE_CONFIGS "
        f"in tests/test_infra.py (jobs naming {folder}: {[_rel(j) for j in by_folder]})"
    )
    return classes.pop()


@pytest.mark.parametrize("path", _files("configs/**/*.yaml"), ids=_rel)
def test_stage_config_loads(path):
    extras = CONFIG_EXTRAS.get(_rel(path), [])
    cfg = _load_with_placeholders(_config_class_for(path), path, extras)
    ds = getattr(cfg, "deepspeed_config", None)
    if ds:  # a training config's DeepSpeed file must exist
        assert os.path.isfile(os.path.join(ROOT, ds)), ds


# --- the DeepSpeed hostfile ---------------------------------------------------------------------


def _parse_hostfile(path: str) -> dict[str, int]:
    """DeepSpeed's own hostfile parser (what `deepspeed --hostfile` runs)."""
    from deepspeed.launcher.runner import fetch_hostfile

    return dict(fetch_hostfile(path))


def test_hostfile_example_is_what_deepspeed_reads():
    hosts = _parse_hostfile(os.path.join(ROOT, "infra", "deepspeed", "hostfile.example"))
    assert hosts and all(n == 8 for n in hosts.values())


def _node(ip: str, alive: bool = True, **resources) -> dict:
    return {
        "Alive": alive,
        "NodeManagerAddress": ip,
        "NodeManagerHostname": f"ip-{ip.replace('.', '-')}",
        "Resources": resources,
    }


def test_hostfile_entries_rules():
    entries = _load_job("hostfile.py").hostfile_entries
    nodes = [
        _node("10.0.0.1", CPU=0.0),  # the head: no GPUs, no slots
        _node("10.0.0.9", CPU=96.0, GPU=8.0),
        _node("10.0.0.3", CPU=96.0, GPU=8.0),
        _node("10.0.0.4", alive=False, CPU=96.0, GPU=8.0),  # a lost spot node
        _node("10.0.0.5", CPU=32.0),  # a download worker
    ]
    assert entries(nodes) == [("10.0.0.3", 8), ("10.0.0.9", 8)]
    assert entries(nodes, host="hostname") == [("ip-10-0-0-3", 8), ("ip-10-0-0-9", 8)]
    # two raylets on one machine: one line with both GPU counts (DeepSpeed rejects duplicates)
    assert entries([_node("10.0.0.7", GPU=4.0), _node("10.0.0.7", GPU=4.0)]) == [("10.0.0.7", 8)]
    # no GPUs anywhere: nothing for GPU training (no silent fall back to CPU slots) ...
    cpu_only = [_node("10.0.0.1", CPU=0.0), _node("10.0.0.2", CPU=8.0), _node("10.0.0.3", CPU=8.0)]
    assert entries(cpu_only, cpu_slots=2) == []
    # ... CPU training only when asked for: slots from the flag, nodes without CPUs left out
    assert entries(cpu_only, cpu_slots=2, device="cpu") == [("10.0.0.2", 2), ("10.0.0.3", 2)]
    assert entries(nodes, device="cpu") == [(ip, 1) for ip in ("10.0.0.3", "10.0.0.5", "10.0.0.9")]
    # numeric order, as pdsh numbers the nodes (text order would put .17 before .5)
    assert [h for h, _ in entries([_node("10.0.1.17", GPU=8.0), _node("10.0.1.5", GPU=8.0)])] == [
        "10.0.1.5",
        "10.0.1.17",
    ]
    named = [_node(f"10.0.2.{i}", GPU=8.0) for i in (2, 10, 1)]
    for n in named:
        n["NodeManagerHostname"] = f"gpu-node{n['NodeManagerAddress'].rsplit('.', 1)[1]}"
    assert [h for h, _ in entries(named, host="hostname")] == [
        "gpu-node1",
        "gpu-node2",
        "gpu-node10",
    ]
    assert entries([_node("10.0.0.1", alive=False, CPU=8.0)], device="cpu") == []


def test_hostfile_checks_name_the_problem(caplog):
    mod = _load_job("hostfile.py")
    cfg = load_config(mod.HostfileConfig, None, ["address=10.0.0.1:6379"])
    with pytest.raises(RuntimeError, match=r"no alive node with GPUs.*device=cpu"):
        mod.check_entries([], cfg, 3)
    cpu = load_config(mod.HostfileConfig, None, ["device=cpu"])
    with pytest.raises(RuntimeError, match="no alive node with CPUs"):
        mod.check_entries([], cpu, 3)
    with pytest.raises(ConfigError, match="device=cpu"):
        load_config(mod.HostfileConfig, None, ["device=cpu", "wait_for_gpus=8"])
    # more GPUs alive than asked for: all are listed, with a warning on world size and batch
    entries = [("10.0.0.3", 8), ("10.0.0.9", 8)]
    asked = load_config(mod.HostfileConfig, None, ["wait_for_gpus=8"])
    with caplog.at_level("WARNING", logger="hostfile"):
        assert mod.check_entries(entries, asked, 3) == entries
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "16 GPUs are alive, more than wait_for_gpus=8" in warning and "global batch" in warning
    caplog.clear()
    exact = load_config(mod.HostfileConfig, None, ["wait_for_gpus=16"])
    with caplog.at_level("WARNING", logger="hostfile"):
        mod.check_entries(entries, exact, 3)
    assert not caplog.records


def test_one_host_hostfile_warns_that_deepspeed_needs_force_multi(caplog):
    mod = _load_job("hostfile.py")
    cfg = load_config(mod.HostfileConfig, None, [])
    with caplog.at_level("WARNING", logger="hostfile"):
        assert mod.check_entries([("10.0.0.3", 8)], cfg, 2) == [("10.0.0.3", 8)]
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "one host (10.0.0.3)" in warning and "`--force_multi`" in warning
    caplog.clear()
    with caplog.at_level("WARNING", logger="hostfile"):  # two hosts: DeepSpeed goes over ssh
        mod.check_entries([("10.0.0.3", 8), ("10.0.0.9", 8)], cfg, 3)
    assert not caplog.records


def _deepspeed_launch_command(tmp_path, monkeypatch, *flags: str) -> list[str]:
    """The command DeepSpeed's runner starts for a one-host hostfile (nothing is run)."""
    from deepspeed.launcher import runner

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("10.0.0.3 slots=2\n")
    (tmp_path / ".deepspeed_env").write_text("T2I_MARK=1\n")
    started = []

    class Started:
        returncode = 0

        def wait(self):
            return 0

    monkeypatch.setattr(runner, "DEEPSPEED_ENVIRONMENT_PATHS", [str(tmp_path)])
    monkeypatch.setattr(
        runner.subprocess, "Popen", lambda cmd, env: started.append(cmd) or Started()
    )
    monkeypatch.setattr(runner.PDSHRunner, "backend_exists", lambda self: True)
    monkeypatch.setattr(runner.signal, "signal", lambda *a: None)  # pytest's handlers stay
    runner.main(
        ["--hostfile", str(hostfile), "--master_addr", "10.0.0.3", "--no_ssh_check", *flags,
         "jobs/train.py", "--config", "configs/train/stage1.yaml"]
    )  # fmt: skip
    (cmd,) = started
    return cmd


def test_deepspeed_runs_a_one_host_hostfile_locally_without_force_multi(tmp_path, monkeypatch):
    """What ONE_HOST_WARNING says, checked against the installed DeepSpeed's runner."""
    local = _deepspeed_launch_command(tmp_path, monkeypatch)
    assert local[:4] == [sys.executable, "-u", "-m", "deepspeed.launcher.launch"]
    assert "T2I_MARK" not in " ".join(local)  # no ~/.deepspeed_env either
    remote = _deepspeed_launch_command(tmp_path, monkeypatch, "--force_multi")
    assert remote[0] == "pdsh" and remote[remote.index("-w") + 1] == "10.0.0.3"
    assert "export T2I_MARK=1" in " ".join(remote)


def test_deepspeed_env_file_is_what_deepspeeds_runner_reads(tmp_path):
    from types import SimpleNamespace

    from deepspeed.launcher.multinode_runner import PDSHRunner

    mod = _load_job("hostfile.py")
    environ = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": "/home/ubuntu",
        "TORCH_EXTENSIONS_DIR": "/home/ubuntu/.cache/torch_extensions",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "not-copied",
        "AWS_SECRET_ACCESS_KEY": "not-copied",
        "AWS_SESSION_TOKEN": "not-copied",
        "NCCL_DEBUG": "INFO",
        "FI_PROVIDER": "efa",
        "FI_EFA_USE_DEVICE_RDMA": "1",
        "T2I_CACHE": "/tmp/t2i cache",  # a space: the launcher quotes it
        "DEEPSPEED_TIMEOUT": "$(reboot)",  # would run on the remote shell: left out
    }
    lines = mod.deepspeed_env_lines(environ, "/home/ubuntu/t2i-venv/bin")
    assert lines[0] == "PATH=/home/ubuntu/t2i-venv/bin:/usr/local/bin:/usr/bin:/bin"
    path = tmp_path / "ds_env"
    assert mod.write_deepspeed_env(str(path), environ, "/home/ubuntu/t2i-venv/bin")
    text = path.read_text()
    # what runner.py does with every line of the file (no blank or comment line survives it)
    runner = PDSHRunner(SimpleNamespace(user_args=[], user_script="jobs/train.py"), "")
    for line in text.splitlines(keepends=True):
        key, val = line.split("=", maxsplit=1)
        runner.add_export(key, val)
    assert runner.exports == {
        "PATH": "/home/ubuntu/t2i-venv/bin:/usr/local/bin:/usr/bin:/bin",
        "TORCH_EXTENSIONS_DIR": "/home/ubuntu/.cache/torch_extensions",
        "T2I_CACHE": '"/tmp/t2i cache"',
        "AWS_DEFAULT_REGION": "us-east-1",
        "FI_EFA_USE_DEVICE_RDMA": "1",
        "FI_PROVIDER": "efa",
        "NCCL_DEBUG": "INFO",
    }
    # an existing file (perhaps edited by hand) is left alone
    assert not mod.write_deepspeed_env(str(path), {"PATH": "/bin"}, "/venv/bin")
    assert path.read_text() == text


@pytest.fixture()
def local_ray_head():
    """A real one-node Ray cluster on loopback that claims 2 GPUs; yields its GCS address."""
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    # a short temp dir: Ray's unix socket paths must stay under 107 characters
    temp_dir = tempfile.mkdtemp(prefix="ray-hf-", dir="/tmp")
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
    # every port explicit (other tests may run their own Ray on this machine) and distinct; the
    # minimal dashboard process starts regardless
    ports = dict(zip(RAY_HEAD_PORT_FLAGS, free_ports(len(RAY_HEAD_PORT_FLAGS)), strict=True))
    port = ports["--port"]
    cmd = [ray_bin, "start", "--head", "--num-cpus", "1", "--num-gpus", "2",
           "--node-ip-address", "127.0.0.1", "--include-dashboard", "false",
           "--temp-dir", temp_dir, "--disable-usage-stats", "--object-store-memory", "80000000",
           "--min-worker-port", "0", "--max-worker-port", "0"]  # fmt: skip
    for k, v in ports.items():
        cmd += [k, str(v)]
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=120)
    try:
        yield f"127.0.0.1:{port}", env
    finally:
        # stop only this cluster's processes: `ray stop` would stop every Ray on the machine
        _stop_ray_session(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _stop_ray_session(temp_dir: str) -> None:
    """Terminate the processes whose command line names this cluster's temp dir."""
    import psutil

    procs = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in part for part in (p.info["cmdline"] or [])):
                procs.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    # raylet and gcs_server may take a while on SIGTERM; this cluster's state is thrown away
    _, alive = psutil.wait_procs(procs, timeout=3)
    for p in alive:
        p.kill()
    psutil.wait_procs(alive, timeout=10)


def test_hostfile_job_reads_a_live_ray_cluster(local_ray_head, tmp_path):
    address, env = local_ray_head
    out = tmp_path / "hostfile"

    def job(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, os.path.join(ROOT, "jobs", "hostfile.py"), f"address={address}",
             *args],
            env=env, cwd=ROOT, timeout=120, capture_output=True, text=True,
        )  # fmt: skip

    # no request asked: the listed GPUs are kept anyway (Ray sees DeepSpeed's nodes as idle)
    r = job(f"out={out}")
    assert r.returncode == 0, r.stderr
    assert "asked the autoscaler to keep 2 GPUs" in r.stderr
    # the GPUs are already there: the request is met at once
    r = job(f"out={out}", "wait_for_gpus=2")
    assert r.returncode == 0, r.stderr
    assert out.read_text() == "127.0.0.1 slots=2\n"
    assert _parse_hostfile(str(out)) == {"127.0.0.1": 2}
    # more GPUs than the cluster can ever have: a clear error after the timeout, no file
    r = job(f"out={tmp_path / 'none'}", "wait_for_gpus=4", "wait_timeout_s=1")
    assert r.returncode != 0 and "only 2 of 4 GPUs came up" in r.stderr
    assert not (tmp_path / "none").exists()
    # more GPUs up than asked for: all listed, with a warning; the ranks' env file beside it
    env_file = tmp_path / "deepspeed_env"
    r = job(f"out={out}", "wait_for_gpus=1", f"deepspeed_env={env_file}")
    assert r.returncode == 0, r.stderr
    assert out.read_text() == "127.0.0.1 slots=2\n"
    assert "2 GPUs are alive, more than wait_for_gpus=1" in r.stderr
    venv_bin = os.path.dirname(sys.executable)
    assert env_file.read_text().startswith(f"PATH={venv_bin}:")
    r = job("release=true")
    assert r.returncode == 0, r.stderr
    # CPU training only when asked for (this cluster's head offers 1 CPU)
    r = job(f"out={out}", "device=cpu", "cpu_slots=2")
    assert r.returncode == 0, r.stderr
    assert _parse_hostfile(str(out)) == {"127.0.0.1": 2}


# --- the README's commands point at real files --------------------------------------------------


def test_infra_readme_names_existing_files():
    text = open(os.path.join(ROOT, "infra", "README.md")).read()
    named = set(
        re.findall(r"\b((?:jobs|configs|infra)/[\w./-]+\.(?:py|yaml|json|md|example))", text)
    )
    assert named
    # my-cluster.yaml is the reader's own copy, made by a command in the README
    missing = sorted(
        p
        for p in named
        if not os.path.exists(os.path.join(ROOT, p)) and not os.path.basename(p).startswith("my-")
    )
    assert not missing, f"infra/README.md names missing files: {missing}"


def _readme_commands() -> list[list[str]]:
    """Each `python jobs/X.py ...` / `deepspeed ... jobs/X.py ...` command of infra/README.md:
    the lines of its bash blocks, and inline code that is a whole `python jobs/...` command."""
    text = open(os.path.join(ROOT, "infra", "README.md")).read()
    lines = [
        line
        for block in re.findall(r"```bash\n(.*?)```", text, re.S)
        for line in block.replace("\\\n", " ").splitlines()
    ]
    lines += re.findall(r"(?<!`)`(python jobs/[^`]+)`(?!`)", text)
    out = []
    for cmd in lines:
        if "jobs/" not in cmd:
            continue
        cmd = cmd.split(" #", 1)[0].replace("$BUCKET", "bucket").replace("~", "/home/u")
        argv = shlex.split(cmd)
        scripts = [i for i, a in enumerate(argv) if re.fullmatch(r"jobs/\w+\.py", a)]
        if scripts:
            out.append(argv[scripts[0] :])
    return out


# Jobs that take flags instead of --config (no parse_job), with the library function their
# main() calls for the README's command.
NO_CONFIG_JOBS = {"jobs/export.py": "export_checkpoint"}


@pytest.mark.parametrize("argv", _readme_commands(), ids=lambda a: a[0])
def test_infra_readme_commands_parse(argv, monkeypatch):
    """The README's job commands give configs their jobs accept (file, keys and values); the
    few jobs without a --config accept the README's flags."""
    script, args = argv[0], argv[1:]
    mod = _load_job(os.path.basename(script))
    classes = [
        v
        for k, v in vars(mod).items()
        if k.endswith("Config") and isinstance(v, type) and k != "ExecutorConfig"
    ]
    if script in NO_CONFIG_JOBS:
        assert not hasattr(mod, "parse_job"), f"{script} takes a --config now"
        calls = []
        monkeypatch.setattr(mod, NO_CONFIG_JOBS[script], lambda *a, **kw: calls.append((a, kw)))
        monkeypatch.setattr(mod, "setup_logging", lambda *a, **kw: None)  # leave the root logger
        mod.main(args)  # argparse exits on a flag it does not know or one that is missing
        assert len(calls) == 1
        return
    assert len(classes) == 1 and hasattr(mod, "parse_job"), (
        f"{script}: no single *Config class plus parse_job; if it takes no --config, add it to "
        "NO_CONFIG_JOBS"
    )
    config = None
    if "--config" in args:
        config = os.path.join(ROOT, args[args.index("--config") + 1])
    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    load_config(classes[0], config, overrides)


def test_iam_policies_and_ray_bootstrap_against_loopback_aws(s3_server, monkeypatch, tmp_path):
    """The README's IAM steps and `ray up`'s AWS bootstrap, run against moto's IAM and EC2."""
    import boto3
    from ray.autoscaler._private.aws.config import bootstrap_aws
    from ray.autoscaler._private.util import prepare_config, validate_config

    monkeypatch.setenv("HOME", str(tmp_path))  # Ray writes its ssh key under ~/.ssh
    iam = boto3.client("iam", endpoint_url=s3_server)
    account = boto3.client("sts", endpoint_url=s3_server).get_caller_identity()["Account"]

    def policy(name: str) -> str:
        text = open(os.path.join(ROOT, "infra", "aws", name)).read()
        return text.replace("BUCKET", "my-bucket").replace("ACCOUNT_ID", account)

    # moto validates policy documents (version, effects, actions, resource ARNs)
    trust = policy("ec2-trust-policy.json")
    for role in ("t2i-ray-head", "t2i-ray-worker"):
        iam.create_role(RoleName=role, AssumeRolePolicyDocument=trust)
        iam.put_role_policy(
            RoleName=role, PolicyName="t2i-s3", PolicyDocument=policy("s3-access-policy.json")
        )
        iam.create_instance_profile(InstanceProfileName=role)
        iam.add_role_to_instance_profile(InstanceProfileName=role, RoleName=role)
    iam.put_role_policy(
        RoleName="t2i-ray-head",
        PolicyName="ray-autoscaler",
        PolicyDocument=policy("ray-head-ec2-policy.json"),
    )
    for name in ("s3-access-policy.json", "ray-head-ec2-policy.json"):
        iam.create_policy(PolicyName=name[:-5], PolicyDocument=policy(name))

    with open(RAY_YAML) as f:
        text = f.read().replace("ACCOUNT_ID", account)  # as the README's sed does
    cfg = prepare_config(yaml.safe_load(text))
    validate_config(cfg)
    out = bootstrap_aws(cfg)  # subnets per zone, security group, key pair: what `ray up` does
    profiles = {p["Arn"] for p in iam.list_instance_profiles()["InstanceProfiles"]}
    for name, node_type in out["available_node_types"].items():
        nc = node_type["node_config"]
        assert nc["IamInstanceProfile"]["Arn"] in profiles, name
        assert len(nc["SubnetIds"]) == 4 and nc["SecurityGroupIds"] and nc["KeyName"], name
    assert os.path.isfile(out["auth"]["ssh_private_key"])


def _slurm_sandbox(tmp_path, tools: dict[str, str]) -> tuple[str, dict[str, str]]:
    """infra/slurm/train.sbatch, and an environment to run it in: a submit dir with the
    checkout's parts, and stand-ins (bash bodies by name: srun, scancel, ...) first on PATH."""
    submit = tmp_path / "submit"
    submit.mkdir()
    for name in (".venv", "jobs", "configs", "pipeline"):
        (submit / name).symlink_to(os.path.join(ROOT, name))
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name, body in tools.items():
        (bindir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bindir / name).chmod(0o755)
    env = {**os.environ, "SLURM_SUBMIT_DIR": str(submit)}
    env["PATH"] = f"{bindir}:{env['PATH']}"
    return os.path.join(ROOT, "infra", "slurm", "train.sbatch"), env


@pytest.mark.parametrize(
    "config, extra",
    [
        (None, ["grad_accum=2", *CONFIG_EXTRAS["configs/train/stage1.yaml"]]),
        ("configs/train/stage2.yaml", CONFIG_EXTRAS["configs/train/stage2.yaml"]),
    ],
    ids=["stage1", "stage2"],
)
def test_slurm_script_starts_one_train_task_per_gpu_with_a_valid_config(tmp_path, config, extra):
    """infra/slurm/train.sbatch under a stand-in srun (which records what it was asked to run):
    the command is ``python -u jobs/train.py --config ... --resume auto`` plus the arguments
    given to sbatch, and that config loads with them. (That srun's tasks join one group is
    tested in test_launch_env.)"""
    script = os.path.join(ROOT, "infra", "slurm", "train.sbatch")
    subprocess.run(["bash", "-n", script], check=True)
    directives = re.findall(r"^#SBATCH (\S+)", open(script).read(), re.M)
    assert "--ntasks-per-node=8" in directives and "--gpus-per-node=8" in directives
    assert not any(d.startswith("--output=") and "/" in d for d in directives), (
        "Slurm opens the log before the script runs: a folder in --output must already exist"
    )
    record = tmp_path / "srun.args"
    _, env = _slurm_sandbox(tmp_path, {"srun": f'printf "%s\\n" "$@" > {record}'})
    env["SLURM_CPUS_PER_TASK"] = "10"
    if config:
        env["CONFIG"] = config
    subprocess.run(["bash", script, *extra], env=env, check=True, timeout=60)
    argv = record.read_text().splitlines()
    assert "--kill-on-bad-exit=1" in argv
    start = argv.index("jobs/train.py")
    assert argv[start - 2 : start] == ["python", "-u"]
    args = argv[start + 1 :]
    want = config or "configs/train/stage1.yaml"
    assert args == ["--config", want, "--resume", "auto", *extra]
    from pipeline.train.trainer import TrainConfig

    load_config(TrainConfig, os.path.join(ROOT, want), extra)


@pytest.mark.parametrize("rank_status", [75, 0, 3])
def test_slurm_script_passes_the_time_limit_warning_to_the_ranks_and_requeues(
    tmp_path, rank_status
):
    """Slurm's ``--signal=B:USR1@600`` reaches the batch script alone: it must pass USR1 on to
    the job's steps (``scancel --signal=USR1``: the ranks save their step and end) and requeue
    the job once srun has ended with the ranks' "stopped" status 75 (a run that ended by itself
    meanwhile, or failed, is not requeued); srun's status is the script's."""
    script = os.path.join(ROOT, "infra", "slurm", "train.sbatch")
    assert "--signal=B:USR1@600" in re.findall(r"^#SBATCH (\S+)", open(script).read(), re.M)
    log, pid = tmp_path / "calls", tmp_path / "srun.pid"
    tools = {
        # a rank: saves and ends with status 75 on USR1, else runs on (until the test's end)
        "srun": f'echo $$ > {pid}; trap "echo srun got USR1 >> {log}; exit {rank_status}" USR1\n'
        "for i in $(seq 600); do sleep 0.1; done",
        "scancel": f'echo "scancel $*" >> {log}; kill -USR1 "$(cat {pid})"',
        "scontrol": f'echo "scontrol $*" >> {log}',
    }
    _, env = _slurm_sandbox(tmp_path, tools)
    env["SLURM_JOB_ID"] = "4242"
    proc = subprocess.Popen(["bash", script], env=env, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not pid.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)  # what Slurm sends ten minutes before the limit
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == rank_status, out
    assert log.read_text().splitlines() == [
        "scancel --signal=USR1 4242",
        "srun got USR1",
        *(["scontrol requeue 4242"] if rank_status == 75 else []),
    ]


def test_a_resume_override_after_the_scripts_resume_flag_wins(monkeypatch):
    """The Slurm script runs ``jobs/train.py --config C --resume auto "$@"``; the trainer's own
    divergence message advises ``resume=step_NNNNNNNN``. Given to sbatch, that override was
    replaced by the flag without a word (the flag was applied after the overrides). Now the
    flag is the override ``resume=X`` where it stands: the later one wins."""
    import jobs.train as job

    seen = []
    monkeypatch.setattr(job, "train", lambda cfg: seen.append(cfg.resume))
    monkeypatch.setattr(job.engine, "shutdown", lambda code: None)
    base = ["--config", "configs/train/tiny.yaml"]
    job.main([*base, "--resume", "auto", "resume=step_00004000"])
    job.main([*base, "resume=step_00004000", "--resume=none"])
    job.main([*base, "--resume", "step_00000020"])
    job.main(base)
    assert seen == ["step_00004000", "none", "step_00000020", "auto"]
    with pytest.raises(SystemExit, match="--resume needs a value"):
        job.main([*base, "--resume"])
