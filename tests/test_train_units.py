"""Training pieces without a launcher: configs, DeepSpeed config, param groups, LR schedule,
checkpoint tags, the loss, the export round trip and the metrics files."""

import glob
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from pipeline import storage
from pipeline.config import ConfigError, load_config
from pipeline.models.gpt import GPT, GPTConfig
from pipeline.train.checkpoint import (
    MARKER,
    CheckpointManager,
    check_world_size,
    complete_tags,
    export_weights,
    init_from_export,
    load_export,
    step_of,
    tag_for,
)
from pipeline.train.engine import (
    DistInfo,
    build_ds_config,
    collective_timeout,
    on_cuda,
    zero_stage,
)
from pipeline.train.metrics import MetricsLogger, read_steps
from pipeline.train.optim import OptimConfig, lr_lambda, param_groups, peak_lr
from pipeline.train.trainer import TrainConfig, batch_loss

TRAIN_CONFIGS = sorted(glob.glob("configs/train/*.yaml"))
DS_CONFIGS = sorted(glob.glob("configs/deepspeed/*.json"))


# the stage configs name a placeholder bucket (YOUR-BUCKET), refused as it is
BUCKET = {
    "configs/train/stage1.yaml": [
        "run_dir=s3://my-bucket/t2i/runs/stage1",
        "data.shards=[s3://my-bucket/t2i/s1]",
    ],
    "configs/train/stage2.yaml": [
        "run_dir=s3://my-bucket/t2i/runs/stage2",
        "init_from=s3://my-bucket/t2i/runs/stage1/export",
        "data.shards=[s3://my-bucket/t2i/s2]",
    ],
}


@pytest.mark.parametrize("path", TRAIN_CONFIGS)
def test_every_train_config_loads(path):
    cfg = load_config(TrainConfig, path, BUCKET.get(path, []))
    assert cfg.model.prefix_len in (1, cfg.model.max_text_tokens)
    assert cfg.deepspeed_config in DS_CONFIGS


def test_stage_configs_follow_the_paper():
    s1 = load_config(TrainConfig, "configs/train/stage1.yaml", BUCKET["configs/train/stage1.yaml"])
    s2 = load_config(TrainConfig, "configs/train/stage2.yaml", BUCKET["configs/train/stage2.yaml"])
    assert (s1.model.n_layer, s1.model.dim, s1.model.grid_size) == (36, 1280, 16)  # XL, 256 px
    assert s2.model.grid_size == 32 and s2.init_from and s2.init_from.startswith(s1.run_dir)
    assert s2.model.replace(grid_size=16, grad_checkpointing=False) == s1.model  # same weights
    assert s1.optim.lr_per_256 == 1e-4 and s1.optim.betas == (0.9, 0.95)
    assert s1.optim.weight_decay == 0.05 and s1.optim.grad_clip == 1.0
    with pytest.raises(ConfigError, match="learning_rate"):
        load_config(
            TrainConfig,
            "configs/train/stage1.yaml",
            [*BUCKET["configs/train/stage1.yaml"], "optim.learning_rate=1"],
        )


@pytest.mark.parametrize("path", DS_CONFIGS)
def test_ds_configs_fill_in_training_values(path):
    ds = build_ds_config(
        path, micro_batch=4, grad_accum=3, world=2, precision="bf16", optim=OptimConfig(), lr=2e-4
    )
    assert ds["train_batch_size"] == 24 and ds["gradient_clipping"] == 1.0
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["optimizer"]["params"]["lr"] == 2e-4
    assert ds["optimizer"]["params"]["betas"] == [0.9, 0.95]
    assert zero_stage(ds) == int(path.split("zero")[1][0])
    cpu = build_ds_config(
        path, micro_batch=1, grad_accum=1, world=1, precision="auto", optim=OptimConfig(), lr=1e-4
    )
    assert cpu["bf16"]["enabled"] == on_cuda()  # DeepSpeed's accelerator decides, not the GPU alone


def test_param_groups_decay_matrices_and_embeddings_not_norms():
    model = GPT(
        GPTConfig.from_name("debug", vocab_size=32, caption_dim=8, max_text_tokens=4, grid_size=2)
    )
    decay, no_decay = param_groups(model, OptimConfig())
    assert "tok_embed.weight" in decay["names"] and "head.weight" in decay["names"]
    assert "blocks.0.attn.qkv.weight" in decay["names"]
    assert all(n.endswith("norm.weight") for n in no_decay["names"]) and no_decay["names"]
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    n = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert n == model.num_params()
    decay2, no_decay2 = param_groups(model, OptimConfig(decay_embeddings=False))
    assert "tok_embed.weight" in no_decay2["names"] and "head.weight" in decay2["names"]


def test_lr_scaling_and_schedule():
    assert peak_lr(OptimConfig(), 512) == pytest.approx(2e-4)  # 1e-4 per 256
    assert peak_lr(OptimConfig(scale_lr=False, lr_per_256=3e-3), 8) == 3e-3
    f = lr_lambda(OptimConfig(warmup_steps=4), 100)
    assert [f(i) for i in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0] and f(99) == 1.0
    c = lr_lambda(OptimConfig(warmup_steps=10, schedule="cosine", min_lr_ratio=0.1), 110)
    assert c(10) == pytest.approx(1.0) and c(60) == pytest.approx(0.55)
    assert c(110) == pytest.approx(0.1) and c(500) == pytest.approx(0.1)


def test_tags():
    assert tag_for(1234) == "step_00001234" and step_of("step_00001234") == 1234
    with pytest.raises(ValueError):
        step_of("latest")


def test_batch_loss_is_cross_entropy_of_the_codes():
    cfg = GPTConfig.from_name("debug", vocab_size=32, caption_dim=8, max_text_tokens=4, grid_size=2)
    model = GPT(cfg).eval()
    batch = {
        "codes": torch.randint(0, 32, (3, 4)),
        "cond": torch.randn(3, 4, 8).half(),
        "cond_mask": torch.ones(3, 4, dtype=torch.bool),
    }
    loss = batch_loss(model, batch, torch.device("cpu"), torch.float32)
    assert loss.item() == pytest.approx(math.log(32), abs=1e-5)  # zero-initialised head
    torch.nn.init.normal_(model.head.weight)
    logits = model(batch["codes"], batch["cond"].float(), batch["cond_mask"])
    manual = -logits.log_softmax(-1).gather(-1, batch["codes"][..., None]).mean()
    assert batch_loss(model, batch, torch.device("cpu"), torch.float32).item() == pytest.approx(
        manual.item(), rel=1e-5
    )


def test_export_round_trip_and_architecture_check(tmp_path, monkeypatch):
    import pipeline.train.engine as engine

    cfg = GPTConfig.from_name("debug", vocab_size=32, caption_dim=8, max_text_tokens=4, grid_size=2)
    model = GPT(cfg)
    torch.nn.init.normal_(model.head.weight)
    # consolidation itself is DeepSpeed's (exercised by the launch tests): stand in a state dict
    monkeypatch.setattr(
        engine,
        "consolidated_state_dict",
        lambda root, tag, names: {k: v.clone() for k, v in model.state_dict().items()},
    )
    export_weights("unused", "step_00000007", cfg, str(tmp_path / "exp"))
    state, saved = load_export(str(tmp_path / "exp"))
    assert saved == cfg
    info = json.loads((tmp_path / "exp" / "export.json").read_text())
    assert info["step"] == 7 and info["num_tensors"] == len(model.state_dict())
    assert info["num_params"] == model.num_params()  # not the null caption buffer
    bigger = GPT(cfg.replace(grid_size=4, grad_checkpointing=True))
    init_from_export(bigger, str(tmp_path / "exp"), bigger.cfg)
    assert torch.equal(bigger.head.weight, model.head.weight)
    # a config error (one line, status 2), each value labelled with where it comes from
    other = cfg.replace(n_layer=3, cond="class")
    with pytest.raises(ConfigError) as err:
        init_from_export(GPT(other), str(tmp_path / "exp"), other)
    assert "cond: export 'text', config 'class'; n_layer: export 2, config 3" in str(err.value)


def test_a_resume_into_another_model_or_param_grouping_is_refused_by_name(tmp_path):
    """DeepSpeed's own load failed on either with a traceback (missing keys; a parameter-
    alignment layout that does not match). Fields that change no weight may change; a
    checkpoint from before meta.json recorded the model tells nothing."""
    from pipeline.config import to_dict

    cfg = GPTConfig.from_name("debug", vocab_size=32, caption_dim=8, max_text_tokens=4, grid_size=2)

    def names(model_cfg, decay_embeddings=True):
        groups = param_groups(GPT(model_cfg), OptimConfig(decay_embeddings=decay_embeddings))
        return [g["names"] for g in groups]

    ck = CheckpointManager(
        str(tmp_path), str(tmp_path), 2, DistInfo(0, 1, 0, 1, torch.device("cpu"))
    )
    folder = tmp_path / "checkpoints" / tag_for(10)
    folder.mkdir(parents=True)
    (folder / MARKER).write_text(json.dumps({"world_size": 1, "files": {}}))
    meta = {"model": to_dict(cfg), "param_groups": names(cfg)}
    (folder / "meta.json").write_text(json.dumps(meta))
    same = cfg.replace(grid_size=4, resid_dropout_p=0.3, grad_checkpointing=True)
    ck.check_model(tag_for(10), to_dict(same), names(same))  # no weight changes
    # nor does the initialisation's scale, or n_kv_head given as the n_head it defaults to
    same = cfg.replace(initializer_range=0.05, n_kv_head=cfg.n_head)
    ck.check_model(tag_for(10), to_dict(same), names(same))
    deeper = cfg.replace(n_layer=3)
    with pytest.raises(ConfigError) as err:
        ck.check_model(tag_for(10), to_dict(deeper), names(deeper))
    assert (
        f"checkpoint {tag_for(10)} was written with another model or optimizer layout: "
        "model.n_layer: checkpoint 2, this run 3. Resume with the checkpoint's values"
    ) in str(err.value)
    with pytest.raises(ConfigError) as err:
        ck.check_model(tag_for(10), to_dict(cfg), names(cfg, decay_embeddings=False))
    assert "optim.decay_embeddings: checkpoint true, this run false (" in str(err.value)
    assert "weight decay in the checkpoint only" in str(err.value)
    (folder / "meta.json").write_text(json.dumps({"model": to_dict(cfg)}))
    with pytest.raises(ConfigError, match="model.n_layer: checkpoint 2, this run 3"):
        ck.check_model(tag_for(10), to_dict(deeper), names(deeper))
    (folder / "meta.json").write_text("{}")  # written before meta.json held the model
    ck.check_model(tag_for(10), to_dict(deeper), names(deeper))


@pytest.mark.parametrize("killed_at", ["gpt_config.json", "export.json"])
def test_an_export_killed_over_an_older_one_is_refused_not_loaded(tmp_path, monkeypatch, killed_at):
    """Exporting again into a folder replaces its files one by one: killed half-way, the new
    weights sat beside the old export.json and loaded without a word."""
    import pipeline.train.engine as engine
    from pipeline.sample_job import load_exported_gpt, save_exported_gpt

    cfg = GPTConfig.from_name("debug", vocab_size=32, caption_dim=8, max_text_tokens=4, grid_size=2)
    old, new = GPT(cfg), GPT(cfg)
    torch.nn.init.normal_(new.head.weight)
    state = {"m": old.state_dict()}
    monkeypatch.setattr(
        engine, "consolidated_state_dict", lambda root, tag, names: dict(state["m"])
    )
    out = str(tmp_path / "exp")
    export_weights("unused", "step_00000007", cfg, out)
    load_export(out)  # whole: loads

    real_write_json = storage.write_json

    def killed(uri, obj):
        if str(uri).endswith(killed_at):
            raise KeyboardInterrupt("killed")
        real_write_json(uri, obj)

    state["m"] = new.state_dict()
    monkeypatch.setattr(storage, "write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        export_weights("unused", "step_00000009", cfg, out)
    monkeypatch.setattr(storage, "write_json", real_write_json)
    with pytest.raises(RuntimeError, match="did not finish"):
        load_export(out)
    export_weights("unused", "step_00000009", cfg, out)  # exported again: whole
    assert torch.equal(load_export(out)[0]["head.weight"], new.head.weight)

    # the sampling side's export (jobs/export.py) and loader alike
    save_exported_gpt(old, out)
    monkeypatch.setattr(storage, "write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        save_exported_gpt(new, out)
    monkeypatch.setattr(storage, "write_json", real_write_json)
    with pytest.raises(RuntimeError, match="did not finish"):
        load_exported_gpt(out)
    save_exported_gpt(new, out)
    assert torch.equal(load_exported_gpt(out).head.weight, new.head.weight)


def test_weights_of_another_export_than_export_json_names_are_refused(tmp_path, caplog):
    from safetensors.torch import save_file

    from pipeline.sample_job import load_exported_gpt, save_exported_gpt

    cfg = GPTConfig.from_name("debug", vocab_size=32, caption_dim=8, max_text_tokens=4, grid_size=2)
    a, b = tmp_path / "a", tmp_path / "b"
    save_exported_gpt(GPT(cfg), str(a))
    save_exported_gpt(GPT(cfg), str(b))
    (a / "export.json").write_text((b / "export.json").read_text())
    with pytest.raises(RuntimeError, match="is not the export export.json describes"):
        load_exported_gpt(str(a))
    with pytest.raises(RuntimeError, match="is not the export"):
        load_export(str(a))
    # exports written before ids: none on either side, loaded (a missing export.json warned)
    state = {k: v.contiguous() for k, v in GPT(cfg).state_dict().items()}
    save_file(state, str(b / "model.safetensors"))
    (b / "export.json").write_text('{"num_tensors": 1}')
    load_exported_gpt(str(b))
    (b / "export.json").unlink()
    load_exported_gpt(str(b))
    assert "has no export.json" in caplog.text


def test_complete_tags_need_their_marker(tmp_path):
    for t in ("step_00000010", "step_00000020", "step_00000030"):
        (tmp_path / t).mkdir()
    (tmp_path / "step_00000010" / "COMPLETE.json").write_text("{}")
    (tmp_path / "step_00000030" / "COMPLETE.json").write_text("{}")
    assert complete_tags(str(tmp_path)) == ["step_00000010", "step_00000030"]


def test_a_plain_load_on_another_world_size_is_refused_when_the_optimizer_is_cut(tmp_path):
    (tmp_path / MARKER).write_text(json.dumps({"tag": "step_00000020", "world_size": 4}))
    (tmp_path / "mp_rank_00_model_states.pt").write_bytes(b"")
    # without ZeRO the optimizer state is whole: any number of ranks loads it
    check_world_size(str(tmp_path), "step_00000020", 2)
    for name in (
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
    ):
        d = tmp_path / name.split("_pp")[0]
        d.mkdir()
        (d / MARKER).write_text(json.dumps({"tag": "step_00000020", "world_size": 4}))
        (d / name).write_bytes(b"")
        check_world_size(str(d), "step_00000020", 4)
        with pytest.raises(ValueError, match=r"written by 4 ranks and this run has 2.*universal"):
            check_world_size(str(d), "step_00000020", 2)


def test_collective_timeout_outlasts_a_long_export():
    assert collective_timeout({}).total_seconds() == 3600  # DeepSpeed's own default is 600
    assert collective_timeout({"DEEPSPEED_TIMEOUT": "90"}).total_seconds() == 5400


def _node_files(ranks) -> dict[str, bytes]:
    """What DeepSpeed ZeRO-2 and the trainer write for ``ranks`` of a 4-rank run."""
    files = {}
    for r in ranks:
        files[f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"] = f"optim {r}".encode()
        files[f"rank_state_{r:05d}.pt"] = f"rng {r}".encode()
        if r == 0:  # data-parallel rank 0 alone writes the model states
            files["mp_rank_00_model_states.pt"] = b"model"
    return files


@pytest.mark.parametrize("nodes", [1, 2])
def test_resume_on_a_second_node_fetches_the_other_nodes_files(s3_bucket, tmp_path, nodes):
    """4 ranks on two nodes without a shared disk: each node saved its own ranks' files and
    uploaded them; resuming on node 1 (ranks 2-3) needs node 0's too, and gets them from S3
    without touching its own. On one node of 4 ranks nothing is fetched."""
    run_dir = f"{s3_bucket}/run"
    tag = tag_for(20)
    remote = f"{run_dir}/checkpoints/{tag}"
    for name, data in {**_node_files(range(4)), MARKER: b'{"host_rank0": true}'}.items():
        storage.write_bytes(f"{remote}/{name}", data)
    local = tmp_path / "node" / "checkpoints" / tag
    local.mkdir(parents=True)
    mine = _node_files([2, 3]) if nodes == 2 else {}
    for name, data in {**mine, MARKER: b'{"host_rank0": false}'}.items():
        (local / name).write_bytes(data)
    world, local_world = 4, 4 // nodes
    dist = DistInfo(
        rank=4 - local_world,
        world=world,
        local_rank=0,
        local_world=local_world,
        device=torch.device("cpu"),
    )
    ckpt = CheckpointManager(run_dir, str(tmp_path / "node"), keep_last=2, dist=dist)
    assert ckpt.ensure_local(tag) == str(local)
    have = {p.name for p in local.iterdir()}
    if nodes == 2:
        assert have == set(_node_files(range(4))) | {MARKER}
        assert (local / "mp_rank_00_model_states.pt").read_bytes() == b"model"
        assert (local / MARKER).read_bytes() == b'{"host_rank0": false}'  # its own, kept
    else:
        assert have == {MARKER}  # one node: its copy is taken as whole, nothing fetched


def test_a_fresh_start_or_an_older_resume_in_a_run_dir_with_checkpoints_is_refused(
    tmp_path, s3_bucket
):
    """Pruning keeps the highest steps: a new run there would lose its own checkpoints."""
    run_dir = f"{s3_bucket}/runs/busy"
    for step in (10, 20):
        storage.write_json(f"{run_dir}/checkpoints/{tag_for(step)}/{MARKER}", {"step": step})
    dist = DistInfo(rank=0, world=1, local_rank=0, local_world=1, device=torch.device("cpu"))
    ckpt = CheckpointManager(run_dir, str(tmp_path / "node"), keep_last=2, dist=dist)
    assert ckpt.find("auto") == "step_00000020"
    assert ckpt.find("step_00000020") == "step_00000020"
    with pytest.raises(ValueError, match=r"already has checkpoints \(newest: step 20\).*another"):
        ckpt.find("none")
    with pytest.raises(ValueError, match=r"from step 10, but .* newer checkpoint \(step 20\)"):
        ckpt.find("step_00000010")
    empty = CheckpointManager(f"{s3_bucket}/runs/new", str(tmp_path / "n2"), keep_last=2, dist=dist)
    assert empty.find("none") is None and empty.find("auto") is None


def test_metrics_files_and_resume_cut(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("T2I_PROGRESS", "1")  # the bar, as on a terminal

    def run(start, stop):
        m = MetricsLogger(
            str(tmp_path),
            enabled=True,
            start_step=start,
            total_steps=stop,
            log_every=2,
            flops_per_sample=1e6,
            tokens_per_sample=16,
            peak_flops=1e9,
            world=2,
        )
        for s in range(start + 1, stop + 1):
            m.step(s, loss=10.0 / s, lr=1e-3, grad_norm=1.0, samples=8, seconds=0.01)
        return m.close()

    run(0, 7)
    capsys.readouterr()
    png = run(4, 10)  # resumed at 4: steps 5-7 of the first run are dropped, then rewritten
    bar = capsys.readouterr().err
    assert "| 4/10 " in bar and "| 0/10 " not in bar  # the resumed bar counts from step 4
    steps = read_steps(str(tmp_path / "steps.jsonl"))
    assert [r["step"] for r in steps] == list(range(1, 11))
    assert png and (tmp_path / "loss.png").stat().st_size > 1000
    assert glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))


def test_a_kill_while_the_metrics_are_cut_back_keeps_them_whole(tmp_path, monkeypatch):
    """A resume cuts steps.jsonl back to its step by writing a new file and renaming it: a kill
    before the rename leaves the old file as it was (it was emptied first, then rewritten)."""
    from pipeline import storage

    def logger(start):
        return MetricsLogger(
            str(tmp_path), enabled=True, start_step=start, total_steps=10, log_every=1,
            flops_per_sample=1.0, tokens_per_sample=1, peak_flops=1.0, world=1,
            tensorboard=False,
        )  # fmt: skip

    m = logger(0)
    for s in range(1, 8):
        m.step(s, loss=1.0 / s, lr=1e-3, grad_norm=1.0, samples=1, seconds=0.01)
    m.close()

    def killed(tmp, uri):
        raise KeyboardInterrupt("killed before the rename")

    monkeypatch.setattr(storage, "_durable_replace", killed)
    with pytest.raises(KeyboardInterrupt):
        logger(4)
    assert [r["step"] for r in read_steps(str(tmp_path / "steps.jsonl"))] == list(range(1, 8))
    monkeypatch.undo()
    logger(4).close()
    assert [r["step"] for r in read_steps(str(tmp_path / "steps.jsonl"))] == [1, 2, 3, 4]


def test_class_conditional_batches_train_the_class_model(tmp_path):
    from pipeline.data.loader import BatchSpec, TokenLoader
    from pipeline.train.toy_data import write_toy_token_shards

    write_toy_token_shards(str(tmp_path / "toy"), num_shards=2, per_shard=8, num_patterns=5)
    cfg = load_config(
        TrainConfig,
        "configs/train/class_cond.yaml",
        [
            "model.preset=debug",
            "model.num_classes=5",
            "model.vocab_size=64",
            "model.grid_size=4",
            f"data.shards=[{tmp_path / 'toy'}]",
            "data.num_workers=0",
            "data.batch_size=4",
        ],
    )
    assert cfg.model.cond == "class" and cfg.model.n_layer == 2
    spec = BatchSpec.for_model(cfg.model)  # the trainer's: labels checked against 5 classes
    assert spec == BatchSpec(4, "class", 120, 2048, 64, num_classes=5)
    batch = next(iter(TokenLoader(cfg.data, spec)))
    assert batch["cond"].dtype == torch.long and batch["cond_mask"] is None
    model = GPT(cfg.model)
    torch.nn.init.normal_(model.head.weight, std=0.02)
    loss = batch_loss(model, batch, torch.device("cpu"), torch.float32)
    loss.backward()
    assert model.cond_embed.table.weight.grad[batch["cond"]].abs().sum() > 0


_FAULTS_SCRIPT = r"""
import resource, sys
import torch
from pipeline.hostmem import keep_freed_host_memory
applied = keep_freed_host_memory() if sys.argv[1] == "keep" else False
def step():  # a training step's large temporary buffer: 64 MiB, written, freed
    x = torch.empty(16 * 2**20)
    x.fill_(1.0)
    del x
for _ in range(8):  # the heap grows to its steady size (a few blocks) in the first steps
    step()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(16):
    step()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


@pytest.mark.parametrize("mode", ["keep", "default"])
def test_keep_freed_host_memory_stops_per_step_page_faults(mode):
    """ZeRO's per-step CPU gradient buffers: with the setting a freed block is reused (no page
    faults), without it glibc unmaps it and every step faults all its pages in again."""
    env = {**os.environ, "PIPELINE_KEEP_FREED_MEMORY": "1"}
    out = subprocess.run(
        [sys.executable, "-c", _FAULTS_SCRIPT, mode],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=True,
    ).stdout.split()
    applied, faults = out[-2] == "True", int(out[-1])
    pages = 16 * 64 * 2**20 // 4096  # every step faulting its block in anew
    if mode == "keep":
        assert applied
        assert faults < pages // 5, faults  # at most a rare late growth of the heap
    else:
        assert faults > pages // 2, faults


_STEP_SCRIPT_HEAD = r"""
import json, sys
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from pipeline.models.gpt import GPT, GPTConfig
from pipeline.train import engine
from pipeline.train.optim import OptimConfig, param_groups

class Recorder(TorchDispatchMode):  # the ops run and the dtypes they make, while the engine steps
    def __init__(self):
        super().__init__()
        self.ops, self.dtypes = set(), set()
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.__name__.split(".")[0])
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.dtypes.add(str(t.dtype))
        return out

engine.init_distributed()
"""

_NORM_SCRIPT = (
    _STEP_SCRIPT_HEAD
    + r"""
cfg = GPTConfig.from_name("debug", token_dropout_p=0.0, resid_dropout_p=0.0,
                          ffn_dropout_p=0.0, cond_dropout_p=0.0)
g = torch.Generator().manual_seed(0)
codes = torch.randint(0, cfg.vocab_size, (2, cfg.image_tokens), generator=g)
feats = torch.randn(2, cfg.max_text_tokens, cfg.caption_dim, generator=g)
mask = torch.ones(2, cfg.max_text_tokens, dtype=torch.bool)
torch.manual_seed(0)
bare = GPT(cfg).train()
with torch.no_grad():  # a non-zero head, so that every weight gets a gradient
    bare.head.weight.normal_(0, 0.02)
state = {k: v.clone() for k, v in bare.state_dict().items()}
F.cross_entropy(bare(codes, feats, mask).flatten(0, 1), codes.flatten()).backward()
want = torch.linalg.vector_norm(
    torch.stack([torch.linalg.vector_norm(p.grad.double()) for p in bare.parameters()])).item()
torch_fp32 = torch.nn.utils.clip_grad_norm_(bare.parameters(), 1.0).item()
out = {}
for stage in sys.argv[1:]:
    model = GPT(cfg)
    model.load_state_dict(state)
    ds = engine.build_ds_config(f"configs/deepspeed/zero{stage}.json", micro_batch=2,
                                grad_accum=1, world=1, precision="fp32", optim=OptimConfig(),
                                lr=1e-4)
    eng = engine.create_engine(model, param_groups(model, OptimConfig()), ds, lambda s: 1.0)
    eng.train()
    eng.backward(F.cross_entropy(eng(codes, feats, mask).flatten(0, 1), codes.flatten()))
    with Recorder() as rec:
        eng.step()
    out[stage] = [engine.grad_norm(eng), sorted(rec.dtypes)]
print(json.dumps({"want": want, "torch": torch_fp32, "got": out}))
engine.shutdown(0)
"""
)


def _run_engine_script(script: str, *args: str) -> dict:
    """Run ``script`` (an in-process DeepSpeed engine on CPU) in a fresh interpreter; returns
    the JSON it prints last."""
    env = {k: v for k, v in os.environ.items() if k != "MASTER_PORT"}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_cpu_engine_takes_gradient_norms_in_fp32():
    """On CPU the ZeRO engine's clipping norm is computed without an fp64 copy of every
    gradient (``engine.fp32_grad_norms``): for ZeRO-1, -2 and -3 it is the norm PyTorch's
    ``clip_grad_norm_`` gives for the same gradients, within PyTorch's fp32 rounding of the
    fp64 norm (its CPU norm kernel sums in fp32 lanes: about 1e-5 relative at 2M weights)."""
    res = _run_engine_script(_NORM_SCRIPT, "1", "2", "3")
    assert set(res["got"]) == {"1", "2", "3"}
    for stage, (norm, dtypes) in res["got"].items():
        assert "torch.float64" not in dtypes, (stage, dtypes)
        assert norm == pytest.approx(res["torch"], rel=1e-6), stage
        assert norm == pytest.approx(res["want"], rel=2e-4), stage


# a small bf16 batch for the debug preset at a 2x2 grid
_TINY_BF16_BATCH = r"""
cfg = GPTConfig.from_name("debug", grid_size=2, max_text_tokens=4)
g = torch.Generator().manual_seed(0)
codes = torch.randint(0, cfg.vocab_size, (2, cfg.image_tokens), generator=g)
feats = torch.randn(2, cfg.max_text_tokens, cfg.caption_dim, generator=g).bfloat16()
"""

_BF16_SKIP_SCRIPT = (
    _STEP_SCRIPT_HEAD
    + _TINY_BF16_BATCH
    + r"""
out = {}
for stage in sys.argv[1:]:
    torch.manual_seed(0)
    model = GPT(cfg)
    ds = engine.build_ds_config(f"configs/deepspeed/zero{stage}.json", micro_batch=2,
                                grad_accum=1, world=1, precision="bf16", optim=OptimConfig(),
                                lr=1e-3)
    eng = engine.create_engine(model, param_groups(model, OptimConfig()), ds, lambda s: 1.0)
    eng.train()
    res = {"by_norm": getattr(eng.optimizer, "check_overflow", None) is engine._no_scan,
           "optimizer": type(eng.optimizer).__name__}
    for what, x in (("finite", feats), ("nan", feats.clone().index_fill_(2, torch.tensor([0]), float("nan")))):
        before = [p.detach().float().clone() for p in eng.module.parameters()]
        eng.backward(F.cross_entropy(eng(codes, x).float().flatten(0, 1), codes.flatten()))
        with Recorder() as rec:
            eng.step()
        changed = any(not torch.equal(b, p.detach().float()) for b, p in zip(before, eng.module.parameters()))
        finite = all(bool(torch.isfinite(p).all()) for p in eng.module.parameters())
        res[what] = {"changed": changed, "finite": finite, "skipped": eng.skipped_steps,
                     "scanned": "amax" in rec.ops or "amin" in rec.ops}
    out[stage] = res
print(json.dumps(out))
engine.shutdown(0)
"""
)


def test_cpu_bf16_engine_skips_non_finite_steps_by_the_norm():
    """bf16 ZeRO-1/2 on CPU: no separate inf/NaN scan of the gradients (``amax``/``amin``) in
    a step, a finite step updates the weights, and a step with NaN gradients is still skipped
    (weights unchanged and finite, DeepSpeed's skipped-step count up by one)."""
    res = _run_engine_script(_BF16_SKIP_SCRIPT, "1", "2")
    for stage in ("1", "2"):
        r = res[stage]
        assert r["by_norm"] and r["optimizer"] == "DeepSpeedZeroOptimizer", stage
        assert r["finite"] == {"changed": True, "finite": True, "skipped": 0, "scanned": False}
        assert r["nan"] == {"changed": False, "finite": True, "skipped": 1, "scanned": False}


_MASTERS_AND_LR_SCRIPT = (
    _STEP_SCRIPT_HEAD
    + _TINY_BF16_BATCH
    + r"""
from deepspeed.utils import safe_get_full_fp32_param
torch.manual_seed(0)
export = {k: v.clone() for k, v in GPT(cfg).state_dict().items()}  # fp32, not bf16 values

def build(lr, stage, schedule=lambda s: min(1.0, (s + 1) / 4)):
    model = GPT(cfg)
    model.load_state_dict(export)
    ds = engine.build_ds_config(f"configs/deepspeed/zero{stage}.json", micro_batch=2,
                                grad_accum=1, world=1, precision="bf16", optim=OptimConfig(),
                                lr=lr)
    return engine.create_engine(model, param_groups(model, OptimConfig()), ds, schedule)

def master_error(eng):
    return max((safe_get_full_fp32_param(p) - export[n]).abs().max().item()
               for n, p in eng.module.named_parameters())

out = {}
for stage in sys.argv[2:]:
    eng = build(1e-3, stage)
    before = master_error(eng)
    engine.set_fp32_weights(eng, export)
    out[stage] = {"before": before, "after": master_error(eng)}
    eng.train()
    eng.backward(F.cross_entropy(eng(codes, feats).float().flatten(0, 1), codes.flatten()))
    eng.step()
    engine.save_checkpoint(eng, sys.argv[1], f"s{stage}", {"step": 1})
    again = build(2e-3, stage)  # resumed with twice the global batch: twice the peak
    engine.load_checkpoint(again, sys.argv[1], f"s{stage}")
    loaded = engine.current_lr(again)
    old = engine.set_peak_lr(again, 2e-3)
    out[stage].update(loaded=loaded, old=old, now=engine.current_lr(again),
                      same=engine.set_peak_lr(again, 2e-3))
    # resumed with the same peak and another schedule (say, a cosine run extended): the next
    # step's LR is the new schedule's at the resumed step, not the one the checkpoint brought
    other = build(1e-3, stage, schedule=lambda s: 0.1 * (s + 1))
    engine.load_checkpoint(other, sys.argv[1], f"s{stage}")
    out[stage].update(other_loaded=engine.current_lr(other),
                      other_old=engine.set_peak_lr(other, 1e-3),
                      other_now=engine.current_lr(other))
print(json.dumps(out))
engine.shutdown(0)
"""
)


def test_fp32_weights_reach_the_bf16_masters_and_a_resume_takes_the_new_peak_lr(tmp_path):
    """Stage 2 starts from stage 1's fp32 export: in bf16 the engine's fp32 masters get those
    values, not their bf16 rounding. A run resumed with another global batch (so another
    scaled peak) goes on at the new peak, at the same point of the schedule."""
    res = _run_engine_script(_MASTERS_AND_LR_SCRIPT, str(tmp_path), "1", "2")
    for stage in ("1", "2"):
        r = res[stage]
        assert r["before"] > 1e-4 and r["after"] == 0.0, (stage, r)  # rounded, then exact
        # after one step of a 4-step warmup the schedule is at 2/4 of the peak
        assert r["loaded"] == pytest.approx(0.5e-3) and r["old"] == pytest.approx(1e-3)
        assert r["now"] == pytest.approx(1e-3) and r["same"] is None, (stage, r)
        # the new schedule after one step: 0.1 * 2 of the peak (the checkpoint's gave 2/4)
        assert r["other_loaded"] == pytest.approx(0.5e-3) and r["other_old"] is None, r
        assert r["other_now"] == pytest.approx(0.2e-3), r


_ACCUM_SCRIPT = (
    _STEP_SCRIPT_HEAD
    + r"""
import copy
from deepspeed.utils import safe_get_full_grad
cfg = GPTConfig.from_name("debug", grid_size=4, max_text_tokens=8, token_dropout_p=0.0,
                          resid_dropout_p=0.0, ffn_dropout_p=0.0, cond_dropout_p=0.0)
GA = 16
g = torch.Generator().manual_seed(0)
batches = [(torch.randint(0, cfg.vocab_size, (2, cfg.image_tokens), generator=g),
            torch.randn(2, cfg.max_text_tokens, cfg.caption_dim, generator=g).bfloat16())
           for _ in range(GA)]
torch.manual_seed(0)
base = GPT(cfg).train()
with torch.no_grad():  # bf16 weights, and a non-zero head so that every weight gets a gradient
    base.head.weight.normal_(0, 0.02)
    for p in base.parameters():
        p.copy_(p.bfloat16().float())
ref = copy.deepcopy(base).double()  # the same weights, every gradient in fp64
for codes, feats in batches:
    loss = F.cross_entropy(ref(codes, feats.double()).flatten(0, 1), codes.flatten()) / GA
    loss.backward()
want = dict((n, p.grad) for n, p in ref.named_parameters())
out = {}
for stage in sys.argv[1:]:
    for how in ("shipped", "bf16"):
        ds = engine.build_ds_config(f"configs/deepspeed/zero{stage}.json", micro_batch=2,
                                    grad_accum=GA, world=1, precision="bf16",
                                    optim=OptimConfig(), lr=1e-3)
        if how == "bf16":  # DeepSpeed's default: accumulate in the model's dtype
            del ds["data_types"]
        model = copy.deepcopy(base)
        eng = engine.create_engine(model, param_groups(model, OptimConfig()), ds, lambda s: 1.0)
        eng.train()
        for codes, feats in batches:
            eng.backward(F.cross_entropy(eng(codes, feats).float().flatten(0, 1), codes.flatten()))
            if not eng.is_gradient_accumulation_boundary():
                eng.step()  # a micro-step: DeepSpeed only counts it
        got = {n: safe_get_full_grad(p).double() for n, p in eng.module.named_parameters()}
        rel = torch.cat([((got[n] - want[n]).abs() / want[n].abs().clamp_min(1e-12)).flatten()
                         for n in want])
        out[f"{stage}-{how}"] = {"optimizer": type(eng.optimizer).__name__,
                                 "median_rel_err": rel.median().item()}
        eng.step()
        del eng
print(json.dumps(out))
engine.shutdown(0)
"""
)


def test_bf16_gradients_accumulate_in_fp32():
    """The shipped ZeRO-2 and -3 ds_configs accumulate bf16 gradients over micro-batches in
    fp32 (``data_types.grad_accum_dtype``; DeepSpeed's default is the model's bf16, which rounds
    the running sum at every micro-batch). Over 16 micro-batches each weight's accumulated
    gradient is much closer to the fp64 one than with bf16 accumulation (the rest of the error
    is the bf16 forward and backward passes themselves)."""
    res = _run_engine_script(_ACCUM_SCRIPT, "2", "3")
    for stage in ("2", "3"):  # measured: 0.30 of the bf16 accumulation's error
        shipped, bf16 = res[f"{stage}-shipped"], res[f"{stage}-bf16"]
        assert shipped["median_rel_err"] < 0.5 * bf16["median_rel_err"], (stage, res)


def test_rng_state_holds_and_restores_only_the_ranks_own_cuda_device(monkeypatch):
    """A rank draws on its own GPU: its state alone is saved, and restored into the device the
    resumed process uses, whatever the number of GPUs it sees (Slurm shows each task one)."""
    from pipeline.train.rng import capture_rng_state, restore_rng_state

    devices = {2: torch.tensor([2], dtype=torch.uint8), 0: torch.tensor([0], dtype=torch.uint8)}
    current = {"dev": 2}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current["dev"])
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda d: devices[d].clone())
    monkeypatch.setattr(
        torch.cuda, "get_rng_state_all", lambda: pytest.fail("every device's state was saved")
    )
    restored = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, d: restored.append((s, d)))
    state = capture_rng_state()
    assert torch.equal(state["cuda_device"], devices[2]) and "cuda" not in state
    current["dev"] = 0  # resumed where the process sees its GPU as device 0
    restore_rng_state(state)
    assert len(restored) == 1 and torch.equal(restored[0][0], devices[2]) and restored[0][1] == 0
    # a state saved the old way (every visible device's): the current device's entry, into
    # the current device (device 1 here, so taking entry 0 or device 0 would show)
    old = {k: v for k, v in state.items() if k != "cuda_device"}
    every = [torch.tensor([10], dtype=torch.uint8), torch.tensor([11], dtype=torch.uint8)]
    current["dev"] = 1
    restored.clear()
    restore_rng_state({**old, "cuda": every})
    assert len(restored) == 1 and torch.equal(restored[0][0], every[1]) and restored[0][1] == 1
    current["dev"] = 0
    restored.clear()
    restore_rng_state({**old, "cuda": every})
    assert len(restored) == 1 and torch.equal(restored[0][0], every[0]) and restored[0][1] == 0
    current["dev"] = 2  # more devices now than the old state has entries for
    with pytest.raises(RuntimeError, match="RNG states of 2 CUDA devices"):
        restore_rng_state({**old, "cuda": every})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="no CUDA device"):
        restore_rng_state(state)


def test_a_decision_on_rank0_reaches_every_rank_error_included():
    from pipeline.resume import decided_on_rank0

    sent = []

    def broadcast(obj):  # rank 0 sends, the others receive what it sent
        if obj != (None, None):
            sent.append(obj)
        return sent[-1]

    assert decided_on_rank0(True, broadcast, lambda: ["a", "b"]) == ["a", "b"]
    assert decided_on_rank0(False, broadcast, lambda: pytest.fail("ran off rank 0")) == ["a", "b"]

    def refuse():
        raise ValueError("run dir already has checkpoints")

    for is_main in (True, False):  # rank 0 first: the others get its error
        with pytest.raises(ValueError, match="already has checkpoints"):
            decided_on_rank0(is_main, broadcast, refuse)
