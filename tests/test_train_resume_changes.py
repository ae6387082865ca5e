"""What a resumed run does with settings changed since its checkpoint, and with a local cache
the run dir does not know (1-rank ``python jobs/train.py`` runs of the tiny config, a few steps
each): AdamW settings apply, another architecture or parameter grouping is refused by name, no
steps left trains nothing (and keeps the export), ``init_from`` beside a checkpoint is said to be
ignored, and a cache of checkpoints that an ``s3://`` run dir lacks is refused, not pruned."""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_st

from pipeline import storage
from pipeline.data.loader import LoaderConfig, TokenLoader
from pipeline.train.checkpoint import complete_tags, tag_for
from pipeline.train.toy_data import write_toy_token_shards
from tests.test_loader import SPEC

REPO = Path(__file__).resolve().parents[1]


def _train(tmp: Path, run_dir: str, *args: str) -> subprocess.CompletedProcess:
    """One rank of ``jobs/train.py`` on the tiny config over ``tmp``'s toy shards."""
    env = {k: v for k, v in os.environ.items() if k != "MASTER_PORT"}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", T2I_PROGRESS="0", PYTHONUNBUFFERED="1")
    cmd = [
        sys.executable, "jobs/train.py", "--config", "configs/train/tiny.yaml",
        f"run_dir={run_dir}", f"data.shards=[{tmp / 'tokens'}]", "data.num_workers=0",
        "tensorboard=false", *args,
    ]  # fmt: skip
    return subprocess.run(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=300,
    )  # fmt: skip


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc.stdout


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A finished local run: steps 2 and 4 checkpointed (ZeRO-2, fp32), exported at 4."""
    tmp = tmp_path_factory.mktemp("base")
    write_toy_token_shards(
        str(tmp / "tokens"), num_shards=2, per_shard=16, grid_size=4, caption_dim=16, vocab_size=64
    )
    _ok(_train(tmp, str(tmp / "run"), "steps=4", "ckpt_every=2"))
    return tmp


def _copy(base: Path, tmp_path: Path) -> Path:
    shutil.copytree(base / "tokens", tmp_path / "tokens")
    shutil.copytree(base / "run", tmp_path / "run")
    return tmp_path / "run"


def _saved_adamw(ckpt_dir: Path) -> list[dict]:
    """Each AdamW group's settings as the checkpoint's optimizer state holds them."""
    (path,) = glob.glob(str(ckpt_dir / "*optim_states.pt"))
    state = torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
    groups = state.get("base_optimizer_state", state.get("optimizer_state_dict"))["param_groups"]
    return [{k: g[k] for k in ("weight_decay", "betas", "eps")} for g in groups]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_changed_adamw_settings_apply_on_resume(tmp_path, stage):
    """DeepSpeed's load brought back the checkpoint's weight decay, betas and eps; the new ones
    were recorded in config.yaml and ignored. They apply now (the no-decay group stays at 0),
    with a warning naming old and new values."""
    tokens = tmp_path / "tokens"
    write_toy_token_shards(
        str(tokens), num_shards=2, per_shard=16, grid_size=4, caption_dim=16, vocab_size=64
    )
    run, zero = str(tmp_path / "run"), f"deepspeed_config=configs/deepspeed/zero{stage}.json"
    _ok(_train(tmp_path, run, zero, "steps=2", "ckpt_every=2", "export=false"))
    first = Path(run) / "checkpoints" / tag_for(2)
    was = {"betas": (0.9, 0.95), "eps": 1e-8}
    assert _saved_adamw(first) == [{"weight_decay": 0.05, **was}, {"weight_decay": 0.0, **was}]
    changed = ["optim.weight_decay=0.2", "optim.betas=[0.8,0.9]", "optim.eps=1e-6"]
    out = _ok(_train(tmp_path, run, zero, "steps=3", "export=false", *changed))
    now = {"betas": (0.8, 0.9), "eps": 1e-6}
    got = _saved_adamw(Path(run) / "checkpoints" / tag_for(3))  # what step 3 trained with
    assert [{**g, "betas": tuple(g["betas"])} for g in got] == [
        {"weight_decay": 0.2, **now},
        {"weight_decay": 0.0, **now},
    ]
    assert (
        "optim.weight_decay 0.05 -> 0.2, optim.betas (0.9, 0.95) -> (0.8, 0.9), "
        "optim.eps 1e-08 -> 1e-06 replace the checkpoint's" in out
    ), out[-3000:]
    # the same settings again: nothing to say
    assert "replace the checkpoint's" not in _ok(
        _train(tmp_path, run, zero, "steps=4", "export=false", *changed)
    )


def test_another_architecture_or_param_grouping_is_refused_by_name(base, tmp_path):
    """A raw DeepSpeed traceback before (missing keys of the state dict; a parameter-alignment
    layout that does not match); a config error now, with each key's two values. Fields that
    change no weight (dropout) still resume."""
    run = str(_copy(base, tmp_path))
    proc = _train(tmp_path, run, "steps=6", "model.n_layer=3")
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert (
        f"checkpoint {tag_for(4)} was written with another model or optimizer layout: "
        "model.n_layer: checkpoint 2, this run 3. Resume with" in proc.stdout
    ), proc.stdout[-3000:]
    assert "Traceback" not in proc.stdout
    proc = _train(tmp_path, run, "steps=6", "optim.decay_embeddings=false")
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert "optim.decay_embeddings: checkpoint true, this run false (" in proc.stdout
    assert "Traceback" not in proc.stdout
    assert complete_tags(f"{run}/checkpoints") == [tag_for(2), tag_for(4)]
    out = _ok(_train(tmp_path, run, "steps=5", "model.resid_dropout_p=0.2", "export=false"))
    assert f"resumed from checkpoint {tag_for(4)}" in out


def test_no_steps_left_trains_nothing_and_keeps_the_export(base, tmp_path):
    """steps=2 on a step-4 checkpoint said "resumed", rewrote the export and ended with "loss
    nan". Now it says there is nothing to train and keeps the export of that very checkpoint;
    a run that trains exports again. init_from beside a checkpoint is said to be ignored."""
    run = _copy(base, tmp_path)
    before = json.loads((run / "export" / "export.json").read_text())
    assert before["tag"] == tag_for(4)
    out = _ok(_train(tmp_path, str(run), "steps=2", f"init_from={base / 'run' / 'export'}"))
    assert f"steps=2 but checkpoint {tag_for(4)} is at step 4: nothing to train" in out
    assert (
        f"init_from {base / 'run' / 'export'} is ignored: the run resumes from {tag_for(4)}" in out
    )
    assert "done: step 4, nothing trained" in out and "nan" not in out, out[-3000:]
    assert json.loads((run / "export" / "export.json").read_text()) == before
    assert f"already holds the export of {tag_for(4)}: kept" in out
    # a setting that keeps the weights but is in gpt_config.json: exported again, same weights
    weights = (run / "export" / "model.safetensors").read_bytes()
    out = _ok(_train(tmp_path, str(run), "steps=4", "model.resid_dropout_p=0.2"))
    assert "already holds the export" not in out, out[-3000:]
    cfg = json.loads((run / "export" / "gpt_config.json").read_text())
    assert cfg["resid_dropout_p"] == 0.2
    again = json.loads((run / "export" / "export.json").read_text())
    assert again["tag"] == tag_for(4) and again["export_id"] != before["export_id"]
    new, old = load_st((run / "export" / "model.safetensors").read_bytes()), load_st(weights)
    assert new.keys() == old.keys() and all(torch.equal(new[k], old[k]) for k in new)
    before = again
    out = _ok(_train(tmp_path, str(run), "steps=5"))
    after = json.loads((run / "export" / "export.json").read_text())
    assert after["tag"] == tag_for(5) and after["export_id"] != before["export_id"]
    assert "done: step 5, loss " in out


def test_an_s3_run_dir_refuses_a_cache_of_checkpoints_it_lacks(base, tmp_path, s3_bucket):
    """A finished local run moved to S3 with local_dir=<its old dir> (or a run dir wiped, or
    another endpoint): the empty run dir decided, training began at step 0, and the first save
    pruned every cached checkpoint. Now the run is refused, naming the cached tags and both
    ways out, and the cache is left as it was; uploaded, they resume."""
    cache = _copy(base, tmp_path)
    run_dir = f"{s3_bucket}/run7"
    proc = _train(tmp_path, run_dir, f"local_dir={cache}", "steps=6", "ckpt_every=2")
    assert proc.returncode == 2, proc.stdout[-3000:]
    for said in (
        f"the run dir {run_dir}/checkpoints has no checkpoint, but the local cache "
        f"{cache}/checkpoints holds complete checkpoints that it has no trace of: "
        f"{tag_for(2)}, {tag_for(4)}",
        f"aws s3 sync {cache}/checkpoints {run_dir}/checkpoints",
        "or give another local_dir",
    ):
        assert said in proc.stdout, proc.stdout[-3000:]
    assert complete_tags(str(cache / "checkpoints")) == [tag_for(2), tag_for(4)]
    assert complete_tags(f"{run_dir}/checkpoints") == []
    storage.put_dir(str(cache / "checkpoints"), f"{run_dir}/checkpoints")  # the way out
    out = _ok(_train(tmp_path, run_dir, f"local_dir={cache}", "steps=6", "ckpt_every=2"))
    assert f"resumed from checkpoint {tag_for(4)}" in out
    assert complete_tags(f"{run_dir}/checkpoints") == [tag_for(4), tag_for(6)]


def test_a_reordered_shard_list_is_named_as_such(tmp_path, caplog):
    """The same shards in another order cannot continue the saved place either; the warning
    said only that the shard set changed."""
    for seed, name in enumerate("ab"):
        write_toy_token_shards(str(tmp_path / name), num_shards=1, per_shard=10, seed=seed)
    shards = [str(tmp_path / "a"), str(tmp_path / "b")]
    cfg = LoaderConfig(shards=shards, batch_size=2, num_workers=0, shuffle_buffer=4)
    loader = TokenLoader(cfg, SPEC)
    next(iter(loader))
    state = loader.state_dict()
    swapped = LoaderConfig(**{**vars(cfg), "shards": cfg.shards[::-1]})
    with caplog.at_level(logging.WARNING):
        assert not TokenLoader(swapped, SPEC).load_state_dict(state)
    assert "the token shard set (or its order) changed since the checkpoint" in caplog.text
