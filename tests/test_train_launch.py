"""End-to-end training under real launchers on CPU (2 ranks, gloo), sharing runs between tests.

Exact resume, the same procedure for ZeRO-1 (bf16, 2 accumulated micro-batches, cosine LR),
ZeRO-2 (fp32) and ZeRO-3 (fp32, activation checkpointing), over token shards on the loopback S3
server: an uninterrupted reference run; a ``deepspeed`` launcher run killed with SIGKILL (the launcher's
whole process group) right after its step-20 checkpoint completed; a ``deepspeed`` launcher rerun
with ``--resume auto``. Its every step's loss, learning rate, gradient norm and sample keys (of
every rank) must equal the reference's. The ZeRO-2 and ZeRO-3 run dirs are on S3 and the rerun
starts from an empty local dir, so the checkpoint and the metrics so far come back from S3; the
ZeRO-1 run dir is local and the rerun goes on in the killed run's dir.

The ZeRO-2 reference runs under the ``deepspeed`` launcher; the ZeRO-1 and ZeRO-3 references
share one ``torchrun`` launch (each a fresh engine, loader and model) with a stage-2 run that
starts from the ZeRO-2 reference's export at a 2x larger grid. The ZeRO-2 reference also shows
the tiny preset overfitting, checkpoint pruning and the export; the ZeRO-3 one the export job.
"""

from __future__ import annotations

import glob
import json
import math
import os
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest

from pipeline import storage
from pipeline.train.toy_data import write_toy_token_shards
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STEPS = 40
OVERFIT_STEPS = 300


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", T2I_PROGRESS="0", DS_ACCELERATOR="cpu")
    return env


def _launcher(launcher: str, port: int, n: int = 2) -> list[str]:
    """``deepspeed`` or ``torchrun`` for ``n`` local ranks on loopback."""
    ranks = ["--num_gpus", str(n)] if launcher == "deepspeed" else ["--nproc_per_node", str(n)]
    return [str(BIN / launcher), *ranks, "--master_addr", "127.0.0.1", "--master_port", str(port)]


def _cmd(launcher: str, port: int, args: list[str], n: int = 2) -> list[str]:
    return [
        *_launcher(launcher, port, n),
        "jobs/train.py",
        "--config",
        "configs/train/tiny.yaml",
        *args,
    ]


def _cleanup_shm(port: int) -> None:
    for p in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"):
        os.remove(p)


def _launch(cmd_for_port, timeout: int) -> subprocess.CompletedProcess:
    """Run ``cmd_for_port(port)`` on a free port to its end, output captured; the port's shared
    memory buffers are removed after."""
    port = free_port()
    try:
        return subprocess.run(
            cmd_for_port(port),
            cwd=REPO,
            env=_env(),
            timeout=timeout,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    finally:
        _cleanup_shm(port)


def _train(launcher: str, args: list[str], log_path: Path, timeout: int = 240, n: int = 2) -> str:
    """Run a training job to the end on ``n`` ranks; returns its output (asserting success)."""
    proc = _launch(lambda port: _cmd(launcher, port, args, n), timeout)
    log_path.write_text(proc.stdout)
    assert proc.returncode == 0, f"{launcher} run failed:\n{proc.stdout[-4000:]}"
    return proc.stdout


def _train_and_kill(args: list[str], after: str, log_path: Path, timeout: int = 240) -> str:
    """Start a launcher run, SIGKILL its whole process group once ``after`` is printed."""
    port = free_port()
    proc = subprocess.Popen(
        _cmd("deepspeed", port, args),
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    watchdog = threading.Timer(timeout, lambda: os.killpg(proc.pid, signal.SIGKILL))
    watchdog.start()
    lines, seen = [], False
    try:
        for line in proc.stdout:  # blocks on the pipe: no polling
            lines.append(line)
            if after in line:
                seen = True
                os.killpg(proc.pid, signal.SIGKILL)
                break
        proc.wait()
        lines.extend(proc.stdout.read().splitlines(keepends=True))
    finally:
        watchdog.cancel()
        _cleanup_shm(port)
    out = "".join(lines)
    log_path.write_text(out)
    assert seen, f"the run never printed {after!r}:\n{out[-4000:]}"
    assert proc.returncode == -signal.SIGKILL
    return out


def _steps(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _common(run_dir: str, local_dir: Path, shards: str, extra: list[str] = ()) -> list[str]:
    return [
        f"run_dir={run_dir}",
        f"local_dir={local_dir}",
        f"data.shards=[{shards}]",
        f"steps={STEPS}",
        "ckpt_every=10",
        *extra,
    ]


# Each ZeRO stage's overrides of tiny.yaml (zero2.json, fp32, constant LR after warmup): ZeRO-1
# also covers bf16 (bf16 weights, fp32 masters in ZeRO's optimizer), gradient accumulation and the cosine schedule
# (the LR of every step differs, so a resume that restarted or shifted it shows), ZeRO-3
# activation checkpointing.
STAGE_ARGS = {
    1: [
        "deepspeed_config=configs/deepspeed/zero1.json",
        "precision=bf16",
        "grad_accum=2",
        "optim.schedule=cosine",
    ],
    2: [],
    3: ["deepspeed_config=configs/deepspeed/zero3.json", "model.grad_checkpointing=true"],
}


def _kill_then_resume(run_dir: str, tmp: Path, shards: str, stage: int) -> dict:
    """A launcher run SIGKILLed after its step-20 checkpoint, then rerun with ``--resume auto``.

    An ``s3://`` run dir is resumed from an empty local dir (as on a new machine: checkpoint and
    metrics so far come from S3), a local one in the killed run's own dir. Returns the rerun's
    output and steps.jsonl records."""
    tmp.mkdir(parents=True, exist_ok=True)
    if storage.is_remote(run_dir):
        local_killed, local_resumed = tmp / "killed_a", tmp / "killed_b"
    else:
        local_killed = local_resumed = Path(run_dir)
    # the killed run is the reference's command: its cosine schedule (ZeRO-1) decays over the
    # same steps. It is killed as soon as step 20's checkpoint is written, with 20 steps, two
    # checkpoints and the export still to go (seconds): it is still training then
    _train_and_kill(
        _common(run_dir, local_killed, shards, STAGE_ARGS[stage]),
        after="checkpoint step_00000020 complete",
        log_path=tmp / "killed.log",
    )
    out = _train(
        "deepspeed",
        [*_common(run_dir, local_resumed, shards, STAGE_ARGS[stage]), "--resume", "auto"],
        tmp / "resumed.log",
    )
    return {"out": out, "steps": _steps(local_resumed / "metrics" / "steps.jsonl")}


@pytest.fixture(scope="module")
def bucket(s3_server) -> str:
    import boto3

    name = f"train-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="module")
def shards(bucket) -> str:
    uri = f"{bucket}/tokens/toy"
    write_toy_token_shards(
        uri, num_shards=4, per_shard=16, grid_size=4, caption_dim=16, vocab_size=64
    )
    return uri


@pytest.fixture(scope="module")
def zero2(bucket, shards, tmp_path_factory) -> dict:
    """The ZeRO-2 reference run, then a killed and a resumed one, all through the launcher."""
    tmp = tmp_path_factory.mktemp("zero2")
    ref = _common(f"{bucket}/runs/ref", tmp / "ref", shards)
    out_ref = _train("deepspeed", ref, tmp / "ref.log")
    return {
        "tmp": tmp,
        "bucket": bucket,
        "out_ref": out_ref,
        "ref": _steps(tmp / "ref" / "metrics" / "steps.jsonl"),
        "resumed": _kill_then_resume(f"{bucket}/runs/killed", tmp, shards, stage=2),
    }


def test_tiny_preset_learns_and_overfits(zero2, zero13):
    # the learning rate each step applied: warmup over 2 steps to the peak (3e-3, unscaled)
    assert [r["lr"] for r in zero2["ref"][:3]] == pytest.approx([1.5e-3, 3e-3, 3e-3])
    losses = [r["loss"] for r in zero2["ref"]]
    assert losses[0] == pytest.approx(math.log(64), abs=1e-3)  # zero-initialised head
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0], losses  # in the 40 steps the tests share
    # trained on: the 64 samples are learnt nearly by heart. What is left is mostly the 10% of
    # captions dropped for CFG, whose first code cannot be known (one of 8 patterns); one
    # rank measured 0.04-0.45 a step over steps 250-300, two ranks a mean of 0.145 over the
    # last 20 (from log(64) = 4.16)
    over = [r["loss"] for r in zero13["overfit"]]
    assert len(over) == OVERFIT_STEPS and over[0] == pytest.approx(math.log(64), abs=1e-3)
    assert sum(over[-20:]) / 20 < 0.15 * over[0] and min(over[-50:]) < 0.2, over[-50:]


def test_checkpoints_pruned_exported_and_logged(zero2):
    ref_run = f"{zero2['bucket']}/runs/ref"
    ckpts = storage.list_dir(f"{ref_run}/checkpoints")
    assert ckpts == ["step_00000030", "step_00000040"]  # keep_last: 2
    for t in ckpts:
        names = storage.list_dir(f"{ref_run}/checkpoints/{t}")
        assert "COMPLETE.json" in names and "rank_state_00001.pt" in names
    export = storage.list_dir(f"{ref_run}/export")
    assert {"model.safetensors", "gpt_config.json", "export.json"} <= set(export)
    assert storage.read_json(f"{ref_run}/export/export.json")["step"] == STEPS
    assert storage.exists(f"{ref_run}/config.yaml")
    local = zero2["tmp"] / "ref" / "metrics"
    assert (local / "loss.png").stat().st_size > 1000
    assert glob.glob(str(local / "tensorboard" / "events.out.tfevents.*"))
    assert storage.exists(f"{ref_run}/metrics/loss.png")
    assert "MFU" in zero2["out_ref"] and "tokens/s" in zero2["out_ref"]
    # the killed run was killed right after its step-20 checkpoint (a partial step 30 at most,
    # which the resumed run writes again); the resumed run went from 20 to 40 and pruned to the
    # newest two: steps 10 and 20 are gone, and nothing else is left
    killed = storage.list_dir(f"{zero2['bucket']}/runs/killed/checkpoints")
    assert killed == ["step_00000030", "step_00000040"]


def test_sigterm_saves_the_step_and_stops_then_resume_auto_is_exact(zero2, shards, tmp_path):
    """SIGTERM to the ``deepspeed`` launcher's process group (its ranks, their data workers, and
    launch.py, which kills them 30 s later): every rank ends its step, they save it, and end
    with status 75; the rerun's steps equal the uninterrupted reference's. Without OMP_NUM_THREADS the
    ranks share the node's cores."""
    run = tmp_path / "run"
    args = [*_common(str(run), run, shards), "ckpt_every=1000", "log_every=1", "threads=0"]
    port = free_port()
    env = _env()
    del env["OMP_NUM_THREADS"]
    proc = subprocess.Popen(
        _cmd("deepspeed", port, args),
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    watchdog = threading.Timer(240, lambda: os.killpg(proc.pid, signal.SIGKILL))
    watchdog.start()
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if " step 5 loss " in line:
                # the whole group, as Slurm signals a step's processes (the `deepspeed` runner
                # on one node ends at a SIGTERM of its own without passing it on)
                os.killpg(proc.pid, signal.SIGTERM)
                break
        lines.extend(proc.stdout.read().splitlines(keepends=True))
        proc.wait()
    finally:
        watchdog.cancel()
        _cleanup_shm(port)
    out = "".join(lines)
    (tmp_path / "stopped.log").write_text(out)
    stopped = [x for x in out.splitlines() if "stopped by SIGTERM after step" in x]
    assert len(stopped) == 1, out[-4000:]  # rank 0 says it, once
    at = int(stopped[0].split("after step ")[1].split()[0])
    assert 5 <= at < STEPS
    assert f"with checkpoint step_{at:08d}" in stopped[0]
    assert "Traceback" not in out, out[-4000:]  # no data worker died of the signal
    assert [n for n in os.listdir(run / "checkpoints") if n.startswith("step_")] == [
        f"step_{at:08d}"
    ]
    assert "COMPLETE.json" in storage.list_dir(str(run / "checkpoints" / f"step_{at:08d}"))
    cores = len(os.sched_getaffinity(0))
    assert (
        f"{cores} cores, 2 ranks on this node: {max(1, cores // 2)} torch threads per rank" in out
    )

    out = _train("deepspeed", [*args, "--resume", "auto"], tmp_path / "resumed.log")
    assert f"resumed from checkpoint step_{at:08d}" in out
    res = _steps(run / "metrics" / "steps.jsonl")
    assert [r["step"] for r in res] == list(range(1, STEPS + 1))
    for a, b in zip(zero2["ref"], res):
        assert (a["keys"], a["loss"], a["lr"]) == (b["keys"], b["loss"], b["lr"]), a["step"]


def test_resume_on_another_number_of_ranks_goes_through_the_universal_format(
    bucket, shards, tmp_path
):
    """A 2-rank ZeRO-2 checkpoint resumed on 1 rank (a node lost) and back on 2: DeepSpeed
    re-cuts the optimizer partitions from the universal form; the step, samples seen, weights
    and the schedule carry over."""
    run = f"{bucket}/runs/rescaled"

    def args(local: str, steps: int) -> list[str]:
        return _common(run, tmp_path / local, shards, [f"steps={steps}"])

    _train("deepspeed", args("two", 10), tmp_path / "two.log")
    out = _train("deepspeed", args("one", 20), tmp_path / "one.log", n=1)  # a fresh local dir
    assert "converting checkpoint step_00000010 to DeepSpeed's universal format" in out
    assert "came from 2 ranks, this run has 1" in out
    two = _steps(tmp_path / "two" / "metrics" / "steps.jsonl")
    one = _steps(tmp_path / "one" / "metrics" / "steps.jsonl")
    assert [r["step"] for r in one] == list(range(1, 21))  # steps 1-10 fetched from S3
    assert one[10]["samples"] * 2 == two[-1]["samples"]  # the global batch of 1 rank, not 2
    # trained weights: a fresh model starts at log(64) exactly (zero-initialised head)
    assert one[10]["loss"] < two[0]["loss"] - 0.3, (
        two[0]["loss"],
        two[-1]["loss"],
        one[10]["loss"],
    )
    assert one[10]["lr"] == pytest.approx(two[-1]["lr"])
    # and back to 2 ranks from the 1-rank checkpoint
    out = _train("deepspeed", args("two_again", 25), tmp_path / "again.log")
    assert "came from 1 ranks, this run has 2" in out
    again = _steps(tmp_path / "two_again" / "metrics" / "steps.jsonl")
    assert again[-1]["step"] == 25 and again[20]["loss"] < two[0]["loss"] - 0.3


# Several training runs in one torchrun launch: each is a fresh engine, loader and model, and
# a resumed one loads everything from its checkpoint; sharing the processes saves ~30 s of start.
DRIVER = """
import json, sys
from pipeline.config import load_config
from pipeline.log import setup_logging
from pipeline.train import engine
from pipeline.train.trainer import TrainConfig, train

setup_logging()
for overrides in json.loads(sys.argv[1]):
    train(load_config(TrainConfig, "configs/train/tiny.yaml", overrides))
engine.shutdown(0)
"""


def _train_many(runs: list[list[str]], tmp: Path, name: str, n: int = 2) -> str:
    driver = tmp / "driver.py"
    driver.write_text(DRIVER)
    proc = _launch(
        lambda port: [*_launcher("torchrun", port, n), str(driver), json.dumps(runs)], 300
    )
    (tmp / f"{name}.log").write_text(proc.stdout)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-4000:]}"
    return proc.stdout


def test_resume_on_another_number_of_ranks_for_every_optimizer_layout(shards, tmp_path):
    """2 ranks -> 1 for each way DeepSpeed lays out the optimizer state: cut per rank by ZeRO-1's
    bf16 optimizer and by ZeRO-3 (through the universal form), and whole in the checkpoint
    without ZeRO, fp32 and bf16 (loaded as it is; the bf16 export takes the fp32 masters)."""
    stage0 = tmp_path / "zero0.json"
    stage0.write_text(
        json.dumps(
            {
                "zero_optimization": {"stage": 0},
                "optimizer": {"type": "AdamW", "params": {"torch_adam": True, "fused": True}},
            }
        )
    )
    layouts = {
        "zero1_bf16": ["deepspeed_config=configs/deepspeed/zero1.json", "precision=bf16"],
        "zero3": ["deepspeed_config=configs/deepspeed/zero3.json"],
        "zero0_bf16": [f"deepspeed_config={stage0}", "precision=bf16"],
        "zero0_fp32": [f"deepspeed_config={stage0}"],
    }

    def runs(steps: int) -> list[list[str]]:
        return [
            [*_common(str(tmp_path / k), tmp_path / k, shards, [*v, f"steps={steps}"])]
            for k, v in layouts.items()
        ]

    _train_many(runs(10), tmp_path, "two")
    out = _train_many(runs(20), tmp_path, "one", n=1)
    assert out.count("came from 2 ranks, this run has 1") == len(layouts)
    for k in layouts:
        converted = f"{tmp_path / k / 'universal'}" in out
        assert converted == k.startswith(("zero1", "zero3")), k
        steps = _steps(tmp_path / k / "metrics" / "steps.jsonl")
        assert [r["step"] for r in steps] == list(range(1, 21)), k
        # trained weights and optimizer: a fresh model starts at log(64) (zero-initialised head)
        assert steps[10]["loss"] < steps[0]["loss"] - 0.3, (k, steps[0], steps[10])
        assert steps[10]["samples"] * 2 == steps[9]["samples"]  # 1 rank's global batch
        assert steps[10]["lr"] == pytest.approx(steps[9]["lr"])  # the schedule went on
    # the bf16 run without ZeRO exports its fp32 master weights, of which the model's bf16
    # weights are the rounding
    import torch

    from pipeline.models.gpt import GPT
    from pipeline.train.checkpoint import load_export

    state, cfg = load_export(str(tmp_path / "zero0_bf16" / "export"))
    GPT(cfg).load_state_dict(state, strict=True)
    saved = torch.load(
        tmp_path / "zero0_bf16" / "checkpoints" / "step_00000020" / "mp_rank_00_model_states.pt",
        weights_only=True,
    )["module"]
    w = state["blocks.0.attn.qkv.weight"]
    assert saved["blocks.0.attn.qkv.weight"].dtype == torch.bfloat16 and w.dtype == torch.float32
    assert torch.equal(w.bfloat16(), saved["blocks.0.attn.qkv.weight"])
    assert not torch.equal(w, w.bfloat16().float())  # not bf16 values: the masters


@pytest.fixture(scope="module")
def zero13(bucket, shards, zero2, tmp_path_factory) -> dict:
    """ZeRO-1 and ZeRO-3 reference runs, and stage 2 from the ZeRO-2 reference's export, in one
    torchrun launch."""
    tmp = tmp_path_factory.mktemp("zero13")
    shards8 = f"{bucket}/tokens/toy8"  # the same "images" at twice the resolution
    write_toy_token_shards(
        shards8, num_shards=2, per_shard=16, grid_size=4, caption_dim=16, vocab_size=64, upsample=2
    )
    refs = [
        [*_common(str(tmp / f"ref{s}"), tmp / f"ref{s}", shards), *STAGE_ARGS[s]] for s in (1, 3)
    ]
    stage2 = [
        f"run_dir={tmp / 'stage2'}",
        f"data.shards=[{shards8}]",
        "model.grid_size=8",
        f"init_from={bucket}/runs/ref/export",
        "steps=2",
        "export=false",
    ]
    # the tiny preset driven to overfit its 64 samples (8 caption-coded patterns)
    overfit = [
        *_common(str(tmp / "overfit"), tmp / "overfit", shards),
        f"steps={OVERFIT_STEPS}",
        "ckpt_every=100000",
        "export=false",
        "tensorboard=false",
    ]
    # last: compiling sets inductor's fallback_random for the rest of the process
    compiled = [
        *_common(str(tmp / "compiled"), tmp / "compiled", shards),
        "steps=12",
        "compile=true",
    ]
    # ZeRO-3 compiled: its partitioned token table is gathered by the module's own hook
    compiled3 = [
        *_common(str(tmp / "compiled3"), tmp / "compiled3", shards),
        *STAGE_ARGS[3],
        "steps=4",
        "compile=true",
        "export=false",
    ]
    out = _train_many([*refs, stage2, overfit, compiled, compiled3], tmp, "refs")
    return {
        "tmp": tmp,
        "out": out,
        "shards8": shards8,
        "ref": {s: _steps(tmp / f"ref{s}" / "metrics" / "steps.jsonl") for s in (1, 3)},
        "compiled": _steps(tmp / "compiled" / "metrics" / "steps.jsonl"),
        "compiled3": _steps(tmp / "compiled3" / "metrics" / "steps.jsonl"),
        "overfit": _steps(tmp / "overfit" / "metrics" / "steps.jsonl"),
    }


@pytest.fixture(scope="module")
def resumed13(bucket, shards, tmp_path_factory) -> dict:
    """ZeRO-1 (local run dir) and ZeRO-3 (S3 run dir), each killed and resumed by the launcher."""
    tmp = tmp_path_factory.mktemp("resumed13")
    return {
        1: _kill_then_resume(str(tmp / "zero1" / "run"), tmp / "zero1", shards, stage=1),
        3: _kill_then_resume(f"{bucket}/runs/killed3", tmp / "zero3", shards, stage=3),
    }


@pytest.fixture()
def ref_and_resumed(stage, request) -> tuple[list[dict], dict]:
    """(reference steps, killed-then-resumed run) of ZeRO ``stage``: only its runs are made."""
    if stage == 2:
        zero2 = request.getfixturevalue("zero2")
        return zero2["ref"], zero2["resumed"]
    ref = request.getfixturevalue("zero13")["ref"][stage]
    return ref, request.getfixturevalue("resumed13")[stage]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_launcher_kill9_then_resume_auto_is_exact(stage, ref_and_resumed):
    ref, resumed = ref_and_resumed
    res, out = resumed["steps"], resumed["out"]
    assert f"ZeRO-{stage}, {'bf16' if stage == 1 else 'fp32'}" in out
    assert [r["step"] for r in ref] == list(range(1, STEPS + 1))
    assert [r["step"] for r in res] == list(range(1, STEPS + 1))
    line = next(x for x in out.splitlines() if "resumed from checkpoint" in x)
    resumed_at = int(line.split("step_")[1][:8])
    assert 20 <= resumed_at < STEPS  # a real mid-run resume
    lrs = [r["lr"] for r in ref]
    if stage == 1:  # cosine from the peak (step 3) on: every step's LR is lower than the last
        assert lrs[2] == lrs[1] and all(b < a for a, b in zip(lrs[2:], lrs[3:]))
        assert lrs[-1] < 0.15 * lrs[1]  # near the floor (0.1 of the peak) at the end
    else:
        assert lrs[2:] == [lrs[1]] * (STEPS - 2)
    # from S3 into an empty local dir (ZeRO-2, ZeRO-3), or in the killed run's local dir (ZeRO-1)
    assert ("downloading checkpoint" in out) == (stage != 1)
    for a, b in zip(ref, res):
        at = f"ZeRO-{stage} step {a['step']}"
        assert a["keys"] == b["keys"], f"{at}: different samples"
        assert a["loss"] == b["loss"], f"{at}: loss {a['loss']} != {b['loss']}"
        assert a["lr"] == b["lr"], f"{at}: lr {a['lr']} != {b['lr']}"
        assert a["grad_norm"] == b["grad_norm"], (
            f"{at}: grad norm {a['grad_norm']} != {b['grad_norm']}"
        )
    # every rank's keys are logged: 2 ranks x 4 (x 2 accumulated micro-batches for ZeRO-1), and
    # the two ranks never share a sample
    per_rank = 8 if stage == 1 else 4
    assert all(len(r["keys"]) == 2 and len(r["keys"][0]) == per_rank for r in ref)
    assert not any(set(r["keys"][0]) & set(r["keys"][1]) for r in ref)
    assert res[-1]["loss"] < res[0]["loss"]


def test_export_job_consolidates_zero3(zero13):
    import torch

    from pipeline.models.gpt import GPT
    from pipeline.train.checkpoint import export_checkpoint, load_export

    tmp = zero13["tmp"]
    export_checkpoint(str(tmp / "ref3"), str(tmp / "job_export"))  # newest complete: step 40
    a, cfg_a = load_export(str(tmp / "ref3" / "export"))
    b, cfg_b = load_export(str(tmp / "job_export"))
    assert cfg_a == cfg_b and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    GPT(cfg_b).load_state_dict(b, strict=True)  # every parameter and buffer, full shapes


def test_stage2_starts_from_stage1_export_at_a_larger_grid(zero13):
    import torch

    from pipeline.data.loader import BatchSpec, LoaderConfig, TokenLoader
    from pipeline.models.gpt import GPT, GPTConfig
    from pipeline.train.trainer import batch_loss

    assert "initialised from export" in zero13["out"]
    first = _steps(zero13["tmp"] / "stage2" / "metrics" / "steps.jsonl")[0]
    # a freshly initialised model on the same first batches (both ranks' streams)
    cfg = GPTConfig.from_name(
        "debug", vocab_size=64, caption_dim=16, max_text_tokens=8, grid_size=8
    )
    spec = BatchSpec(grid_size=8, caption_dim=16, max_text_tokens=8)
    fresh = GPT(cfg).eval()
    losses = []
    for rank in range(2):
        loader = TokenLoader(
            LoaderConfig(
                shards=[zero13["shards8"]], batch_size=4, num_workers=0, shuffle_buffer=16
            ),
            spec,
            rank=rank,
            world=2,
        )
        batch = next(iter(loader))
        assert batch["keys"] == first["keys"][rank]
        assert batch["codes"].shape == (4, 64)
        with torch.no_grad():
            losses.append(batch_loss(fresh, batch, torch.device("cpu"), torch.float32).item())
    fresh_loss = sum(losses) / 2
    assert first["loss"] < fresh_loss - 0.5, (first["loss"], fresh_loss)


def test_compiled_training_follows_the_eager_run(zero2, zero13):
    """``compile=true``: the same losses as the eager ZeRO-2 reference (same batches, same CFG
    drops from the eager RNG), up to float rounding; its step-10 checkpoint is written."""
    assert "ZeRO-2, fp32, torch.compile" in zero13["out"]
    compiled = zero13["compiled"]
    assert [r["step"] for r in compiled] == list(range(1, 13))
    ref = [r["loss"] for r in zero2["ref"][:12]]
    assert [r["loss"] for r in compiled] == pytest.approx(ref, rel=1e-4)
    assert (zero13["tmp"] / "compiled" / "checkpoints" / "step_00000010" / "COMPLETE.json").exists()


def test_compiled_training_under_zero3_follows_its_eager_run(zero13):
    """``compile=true`` with ZeRO-3 (stage 1's shipped config compiles; zero3.json is one of its
    choices): the compiled step handed the token table's weight to the embedding op directly,
    so ZeRO-3's hook never gathered it and the first step failed on the empty placeholder."""
    compiled = zero13["compiled3"]
    assert [r["step"] for r in compiled] == [1, 2, 3, 4]
    ref = [r["loss"] for r in zero13["ref"][3][:4]]
    assert [r["loss"] for r in compiled] == pytest.approx(ref, rel=1e-4)


def test_a_diverged_run_stops_and_says_why(tmp_path):
    """A learning rate of 1e30: after the first update every gradient is NaN and DeepSpeed skips
    every step. The run stops after max_skipped_steps of them in a row, with status 1 and the
    reason, instead of burning the rest; steps.jsonl stays strict JSON (NaN losses are null)."""
    shards = str(tmp_path / "tokens")
    write_toy_token_shards(
        shards, num_shards=2, per_shard=16, grid_size=4, caption_dim=16, vocab_size=64
    )
    args = [
        f"run_dir={tmp_path / 'run'}",
        f"data.shards=[{shards}]",
        "optim.lr_per_256=1e30",
        "optim.warmup_steps=0",
        "max_skipped_steps=3",
        "ckpt_every=100",
        "data.num_workers=0",
    ]
    proc = _launch(lambda port: _cmd("torchrun", port, args, n=1), 240)
    (tmp_path / "run.log").write_text(proc.stdout)
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert "were all skipped for a non-finite gradient norm: the run has diverged" in proc.stdout
    lines = (tmp_path / "run" / "metrics" / "steps.jsonl").read_text().splitlines()
    steps = [
        json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in steps.jsonl"))
        for line in lines
    ]
    skipped = [r["step"] for r in steps if r.get("skipped")]
    assert len(skipped) == 3 and skipped == list(
        range(steps[-1]["step"] - 2, steps[-1]["step"] + 1)
    )
    assert steps[-1]["step"] < 40  # stopped, not run to the end
    assert any(r["loss"] is None for r in steps)  # NaN written as null


def test_a_resume_with_another_zero_stage_or_precision_goes_through_universal(shards, tmp_path):
    """A checkpoint of ZeRO-2 in fp32 resumed with ZeRO-1 in bf16 (a change after an
    out-of-memory, or to a faster precision): DeepSpeed's plain load failed on its file names
    ("not found: ...bf16_zero_pp_rank_0...", which reads as an incomplete checkpoint). The stage
    and precision are in meta.json now; a change goes through the universal form, and on the
    same ranks each keeps its data place: the same samples as the uninterrupted run's."""
    ref = _common(str(tmp_path / "ref"), tmp_path / "ref", shards, ["steps=14", "export=false"])
    run = _common(str(tmp_path / "run"), tmp_path / "run", shards, ["export=false"])
    changed = [*run, "steps=14", "deepspeed_config=configs/deepspeed/zero1.json", "precision=bf16"]
    out = _train_many([ref, [*run, "steps=10"], changed], tmp_path, "layout", n=1)
    assert (
        "was written with zero_stage 2 (this run: 1), precision fp32 (this run: bf16): resumed "
        "through DeepSpeed's universal form" in out
    )
    assert "data order starts afresh" not in out
    a = _steps(tmp_path / "ref" / "metrics" / "steps.jsonl")
    b = _steps(tmp_path / "run" / "metrics" / "steps.jsonl")
    assert [r["step"] for r in b] == list(range(1, 15))
    assert [r["keys"] for r in b[10:]] == [r["keys"] for r in a[10:]]
    assert b[10]["loss"] == pytest.approx(a[10]["loss"], rel=0.05)  # bf16 now: close, not equal


def test_layout_changes_deepspeed_cannot_load_are_refused_by_name(tmp_path):
    """ZeRO-3's per-rank model states load into no other stage, and without ZeRO there is no
    per-rank state to re-cut: a bare AssertionError or a missing file inside DeepSpeed before.
    Refused before the engine is built; a checkpoint from before the layout was recorded tells
    nothing (loaded as before)."""
    import torch

    from pipeline.config import ConfigError
    from pipeline.train.checkpoint import CheckpointManager, tag_for
    from pipeline.train.engine import DistInfo

    ck = CheckpointManager(
        str(tmp_path), str(tmp_path), 2, DistInfo(0, 1, 0, 1, torch.device("cpu"))
    )
    folder = tmp_path / "checkpoints" / tag_for(10)
    folder.mkdir(parents=True)
    (folder / "COMPLETE.json").write_text(json.dumps({"world_size": 1, "files": {}}))

    def check(written, now):
        (folder / "meta.json").write_text(json.dumps(written))
        return ck.check_layout(tag_for(10), now)

    fp32 = {"precision": "fp32"}
    assert check({"zero_stage": 2, **fp32}, {"zero_stage": 1, "precision": "bf16"}) == {
        "zero_stage": (2, 1),
        "precision": ("fp32", "bf16"),
    }
    assert check({"zero_stage": 3, **fp32}, {"zero_stage": 3, "precision": "bf16"})
    assert check({"zero_stage": 2, **fp32}, {"zero_stage": 2, **fp32}) == {}
    assert check({}, {"zero_stage": 3, **fp32}) == {}  # written before the layout was recorded
    for written, now in [
        ({"zero_stage": 2, **fp32}, {"zero_stage": 3, **fp32}),
        ({"zero_stage": 3, **fp32}, {"zero_stage": 1, **fp32}),
        ({"zero_stage": 0, **fp32}, {"zero_stage": 0, "precision": "bf16"}),
        ({"zero_stage": 0, **fp32}, {"zero_stage": 2, **fp32}),
    ]:
        with pytest.raises(ConfigError, match=r"written with .*Resume with the settings it was"):
            check(written, now)
