"""The README's main job, end to end at a CI-sized scale: every stage runs for real."""

import glob
import hashlib
import json
import os

import pytest
from PIL import Image

from pipeline.config import load_config
from pipeline.demo import DemoConfig, run_demo

# every stage for real, twice (162 s on 2 idle cores; it waits for CPU on a busy machine)
pytestmark = pytest.mark.timeout(900)


def _snapshot(root, pattern):
    """{path: (mtime in ns, sha256)} of the files under ``root`` matching ``pattern``."""
    out = {}
    for path in sorted(glob.glob(os.path.join(root, pattern), recursive=True)):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            out[os.path.relpath(path, root)] = (os.stat(path).st_mtime_ns, digest)
    return out


# What a rerun must keep as it is: the downloaded shards, the scores, the token shards and every
# checkpoint (exports, configs and samples are legitimately written again).
KEPT = {
    "raw shards": "raw/*.tar",
    "scores": "scores/*.parquet",
    "token shards": "tokens/*/*.tar",
    "tokenizer checkpoints": "vq/checkpoints/**",
    "stage 1 checkpoints": "train/stage1/checkpoints/**",
    "stage 2 checkpoints": "train/stage2/checkpoints/**",
}


def test_demo_pipeline_small(tmp_path, monkeypatch):
    monkeypatch.setenv("T2I_CACHE", str(tmp_path / "cache"))
    cfg = load_config(
        DemoConfig,
        "configs/demo.yaml",
        out=str(tmp_path / "demo"),
        num_images=48,
        shards=2,
        tokenizer_steps=20,
        stage1_steps=6,
        stage2_steps=3,
        prompts_per_check=2,
        images_per_prompt=1,
    )
    report = run_demo(cfg)
    steps = report["steps"]
    assert steps["download (img2dataset, local Ray)"]["shards"] == 2
    assert steps["download (img2dataset, local Ray)"]["images"] == 48
    tokens = steps["pretokenize stage 1 and stage 2"]
    assert 0 < tokens["stage2"]["num_samples"] < tokens["stage1"]["num_samples"] <= 48
    assert steps["train stage 1 (DeepSpeed)"]["step"] == 6
    assert steps["train stage 2 from stage 1 (DeepSpeed)"]["step"] == 3
    check = steps["sample and check against the prompts"]
    for stage, side in (("stage1", 64), ("stage2", 128)):
        assert check[stage]["images"] == 2
        grid = Image.open(check[stage]["grid"])
        assert grid.width >= side
        assert os.path.exists(tmp_path / "demo" / "train" / stage / "metrics" / "loss.png")
    saved = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert saved["steps"].keys() == steps.keys()
    # a rerun finds every step's work done and goes through (the README: "rerunning continues
    # where it stopped"): no new download, the same shards, the trained steps kept
    root = str(tmp_path / "demo")
    before = {what: _snapshot(root, pattern) for what, pattern in KEPT.items()}
    for what, files in before.items():
        assert files, f"no {what} ({KEPT[what]}) after the first run"
    again = run_demo(cfg)["steps"]
    for what, pattern in KEPT.items():
        assert _snapshot(root, pattern) == before[what], f"the rerun rewrote {what}"
    assert again["download (img2dataset, local Ray)"]["images"] == 48
    assert again["pretokenize stage 1 and stage 2"]["stage1"] == tokens["stage1"]
    assert again["train stage 2 from stage 1 (DeepSpeed)"]["step"] == 3


def test_a_model_cut_short_by_a_kill_is_built_again(tmp_path):
    """The demo's tiny T5 and its images are built once: a rerun keeps a finished folder, and
    rebuilds one a kill cut short (weights half written, no marker) instead of keeping it."""
    from pipeline.demo import Demo

    demo = Demo(DemoConfig(out=str(tmp_path / "demo")))
    demo.models()
    weights = glob.glob(os.path.join(demo.t5, "*.safetensors"))[0]
    whole = open(weights, "rb").read()
    mtime = os.stat(weights).st_mtime_ns
    demo.models()  # finished: kept as it is
    assert os.stat(weights).st_mtime_ns == mtime
    with open(weights, "r+b") as f:  # killed while writing the weights
        f.truncate(len(whole) // 2)
    os.remove(os.path.join(demo.t5, ".built"))
    demo.models()
    assert open(weights, "rb").read() == whole  # built again (the same seed)


def test_training_launch_finds_the_venvs_tools_without_an_activated_venv(tmp_path, monkeypatch):
    """``.venv/bin/python jobs/demo.py`` from a plain shell: the DeepSpeed launch gets the
    interpreter's folder first on PATH (DeepSpeed builds its CPU op with the ninja there)."""
    import subprocess
    import sys

    from pipeline.demo import Demo

    seen = {}

    def fake_run(cmd, cwd, env):
        seen.update(cmd=cmd, env=env)
        return subprocess.CompletedProcess(cmd, 1)

    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.setattr(subprocess, "run", fake_run)
    demo = Demo(DemoConfig(out=str(tmp_path / "demo")))
    demo.codebook_size = 512
    with pytest.raises(RuntimeError, match="stage1 training failed"):
        demo.train("stage1", "configs/train/demo_stage1.yaml", 1, [])
    venv_bin = os.path.dirname(sys.executable)
    assert seen["env"]["PATH"].split(os.pathsep)[0] == venv_bin
    assert seen["cmd"][0] == os.path.join(venv_bin, "deepspeed")
