"""Training the GPT from token shards under DeepSpeed ZeRO, readable top to bottom.

One function, :func:`train`, runs on every rank: build the model (from scratch, or from a stage-1
export for stage 2), wrap it in a ZeRO engine, resume the newest complete checkpoint if any, then
loop: ``grad_accum`` micro-batches of next-token cross-entropy, one optimizer step, metrics, a
checkpoint every ``ckpt_every`` steps and at the end, then a consolidated export.

Exact resume: a checkpoint holds the model, optimizer and LR schedule (DeepSpeed), the step and
samples seen, and per rank every RNG state and the data loader's place; a resumed run draws the
same dropout and CFG masks and sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import storage
from pipeline.config import doc, save_config, to_dict
from pipeline.data.loader import BatchSpec, LoaderConfig, TokenLoader, list_training_shards
from pipeline.log import get_logger
from pipeline.models.gpt import GPT, GPTConfig, train_flops_per_sample
from pipeline.precision import warn_if_slow
from pipeline.resume import decided_on_rank0
from pipeline.train import engine
from pipeline.train.checkpoint import (
    CheckpointManager,
    export_is_of,
    export_weights,
    init_from_export,
)
from pipeline.train.metrics import MetricsLogger
from pipeline.train.optim import OptimConfig, lr_lambda, param_groups, peak_lr
from pipeline.train.rng import capture_rng_state, restore_rng_state
from pipeline.train.stop import StopRequest, TrainingStopped

log = get_logger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """One training stage (stage 1 at 256 px, stage 2 at 512 px, class-conditional, tiny)."""

    name: str = doc("run name (for logs)", "run")
    run_dir: str = doc(
        "checkpoints, exports, metrics, resolved config (local or s3://)", "outputs/train/run"
    )
    local_dir: str | None = doc(
        "local working copy of an s3:// run dir (default $T2I_CACHE/runs/<bucket>/<prefix>)", None
    )
    model: GPTConfig = field(default_factory=GPTConfig, metadata={"doc": "GPT preset + overrides"})
    data: LoaderConfig = field(default_factory=LoaderConfig, metadata={"doc": "token shards"})
    optim: OptimConfig = field(default_factory=OptimConfig, metadata={"doc": "AdamW + schedule"})
    deepspeed_config: str = doc(
        "ds_config JSON (ZeRO stage, offload)", "configs/deepspeed/zero2.json"
    )
    precision: Literal["auto", "fp32", "bf16"] = doc("auto: bf16 on GPU, fp32 on CPU", "auto")
    grad_accum: int = doc("micro-batches per optimizer step", 1)
    steps: int = doc("total optimizer steps", 1000)
    log_every: int = doc("steps per log line", 10)
    ckpt_every: int = doc("steps between checkpoints (one is always written at the end)", 1000)
    keep_last: int = doc("complete checkpoints kept", 2)
    resume: str = doc("auto (newest complete checkpoint), none, or a tag step_NNNNNNNN", "auto")
    resume_data: bool = doc(
        "restore the data loader's place (false: the data order starts afresh; so does a "
        "resume on another number of ranks)",
        True,
    )
    init_from: str | None = doc(
        "export to start from (stage 2 from stage 1), when not resuming", None
    )
    export: bool = doc("write consolidated weights to <run_dir>/export at the end", True)
    seed: int = doc("model init and per-rank dropout seeds", 0)
    peak_flops: float = doc(
        "peak FLOP/s of one device, for MFU (A100 bf16: 312e12; 0: no MFU)", 312e12
    )
    max_skipped_steps: int = doc(
        "stop after this many steps in a row that DeepSpeed skipped for a non-finite gradient "
        "(the run has diverged: more steps would only burn compute); 0: never",
        100,
    )
    log_keys: bool = doc("record every rank's sample keys per step in steps.jsonl", False)
    tensorboard: bool = doc("write TensorBoard logs", True)
    threads: int = doc(
        "torch CPU threads per rank (0: OMP_NUM_THREADS, or without it the cores this process "
        "may use / the ranks on the node)",
        0,
    )
    compile: bool = doc(
        "torch.compile the model (DeepSpeed's engine.compile; same random draws as eager)", False
    )

    def __post_init__(self) -> None:
        small = [
            f"{k} {getattr(self, k)}"
            for k in ("steps", "grad_accum", "log_every", "ckpt_every", "keep_last")
            if getattr(self, k) < 1
        ]
        if small:
            raise ValueError(f"{', '.join(small)}: each must be at least 1")
        if self.max_skipped_steps < 0 or self.peak_flops < 0:
            raise ValueError("max_skipped_steps and peak_flops must not be negative")
        run_dir = storage.normalize(self.run_dir)
        if (
            self.local_dir
            and not storage.is_remote(run_dir)
            and os.path.abspath(storage.normalize(self.local_dir)) != os.path.abspath(run_dir)
        ):
            raise ValueError(
                f"local_dir {self.local_dir!r} with the local run_dir {self.run_dir!r}: local_dir "
                "is the working copy of an s3:// run_dir; a local run_dir holds the checkpoints "
                "itself (drop local_dir, or make run_dir an s3:// URI)"
            )


def default_local_dir(run_dir: str) -> str:
    if not storage.is_remote(run_dir):
        return run_dir
    cache = os.path.expanduser(os.environ.get("T2I_CACHE", "~/.cache/t2i-pipeline"))
    return os.path.join(cache, "runs", run_dir.replace("://", "/").rstrip("/"))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def batch_loss(
    model: Any, batch: dict[str, Any], device: torch.device, cond_dtype: torch.dtype
) -> torch.Tensor:
    """Mean next-token cross-entropy of a loader batch (``model``: a GPT or its engine)."""
    codes = batch["codes"].to(device, non_blocking=True)
    cond = batch["cond"].to(device, non_blocking=True)
    if cond.is_floating_point():
        cond = cond.to(cond_dtype)
    mask = batch["cond_mask"]
    mask = mask.to(device, non_blocking=True) if mask is not None else None
    logits = model(codes, cond, mask)  # (B, N, V)
    return F.cross_entropy(logits.float().flatten(0, 1), codes.flatten())


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) one training stage on every rank; returns a summary (on every rank)."""
    # file:// dropped: the checkpoint folders are also handled with os.path
    cfg = dataclasses.replace(cfg, run_dir=storage.normalize(cfg.run_dir))
    dist = engine.init_distributed()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    elif "OMP_NUM_THREADS" not in os.environ and dist.local_world > 1:
        # torchrun sets it; the deepspeed launcher does not, and each rank's torch would take
        # every core of the node (N ranks x all cores). A rank bound to its own cores keeps them
        getaffinity = getattr(os, "sched_getaffinity", None)  # Linux only
        cores = len(getaffinity(0)) if getaffinity else (os.cpu_count() or 1)
        threads = max(1, cores // dist.local_world if cores == os.cpu_count() else cores)
        torch.set_num_threads(threads)
        if dist.is_local_main:
            log.info(
                "%d cores, %d ranks on this node: %d torch threads per rank (set threads or "
                "OMP_NUM_THREADS to choose)", cores, dist.local_world, threads,
            )  # fmt: skip
    local_dir = cfg.local_dir or default_local_dir(cfg.run_dir)
    os.makedirs(local_dir, exist_ok=True)
    precision = engine.resolve_precision(cfg.precision)
    cond_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    warn_if_slow(cond_dtype, dist.device, "training")

    # -- model: identical initial weights on every rank, then per-rank randomness for dropout
    seed_everything(cfg.seed)
    model = GPT(cfg.model)
    ckpt = CheckpointManager(cfg.run_dir, local_dir, cfg.keep_last, dist)
    tag = ckpt.find(cfg.resume)
    init_state = None
    if tag is None and cfg.init_from:
        init_state = init_from_export(model, cfg.init_from, cfg.model)
    elif cfg.init_from and dist.is_main:
        log.info("init_from %s is ignored: the run resumes from %s", cfg.init_from, tag)
    seed_everything(cfg.seed + 1 + 7919 * dist.rank)

    global_batch = cfg.data.batch_size * cfg.grad_accum * dist.world
    lr = peak_lr(cfg.optim, global_batch)
    ds_config = engine.build_ds_config(
        cfg.deepspeed_config,
        micro_batch=cfg.data.batch_size,
        grad_accum=cfg.grad_accum,
        world=dist.world,
        precision=cfg.precision,
        optim=cfg.optim,
        lr=lr,
    )
    n_params = model.num_params()  # before ZeRO-3 partitions the parameters away
    groups = param_groups(model, cfg.optim)
    group_names = [g["names"] for g in groups]
    if tag is not None:  # another architecture or grouping: refused here, not in DeepSpeed
        ckpt.check_model(tag, to_dict(cfg.model), group_names)
    # a checkpoint of another world size whose optimizer state is cut per rank (ZeRO 1-3)
    # resumes through DeepSpeed's universal form; without ZeRO the state is whole in the
    # checkpoint and loads as it is
    # (the same for another ZeRO stage or precision, which DeepSpeed's plain load refuses)
    written = ckpt.written_world(tag) if tag is not None else None
    layout = {"zero_stage": engine.zero_stage(ds_config), "precision": precision}
    changed = ckpt.check_layout(tag, layout) if tag is not None else {}
    universal = tag is not None and ckpt.needs_universal(tag, layout)
    if universal:
        ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
        if changed and dist.is_main:
            log.info(
                "checkpoint %s was written with %s: resumed through DeepSpeed's universal form",
                tag, ", ".join(f"{k} {a} (this run: {b})" for k, (a, b) in changed.items()),
            )  # fmt: skip
    eng = engine.create_engine(model, groups, ds_config, lr_lambda(cfg.optim, cfg.steps))
    if init_state is not None:  # the export's fp32 values, not their bf16 rounding
        engine.set_fp32_weights(eng, init_state)
        init_state = None
    if cfg.compile:
        engine.compile_engine(eng)
    spec = BatchSpec.for_model(cfg.model)
    # one rank lists the token shards and every rank reads that list: listed apart, ranks could
    # see different sets while pretokenize is still finishing shards, and plan different orders
    shard_list = decided_on_rank0(
        dist.is_main, engine.broadcast_object, lambda: list_training_shards(cfg.data.shards)
    )
    loader = TokenLoader(
        cfg.data,
        spec,
        rank=dist.rank,
        world=dist.world,
        shards=shard_list,
        pin_memory=dist.device.type == "cuda",
    )
    if dist.is_main:
        log.info(
            "%s: GPT %.1fM params, ZeRO-%d, %s%s, %d ranks x %d x %d accum = global batch %d, "
            "peak lr %.3g",
            cfg.name,
            n_params / 1e6,
            engine.zero_stage(ds_config),
            precision,
            ", torch.compile" if eng.is_compiled else "",  # what the engine is, not was asked
            dist.world,
            cfg.data.batch_size,
            cfg.grad_accum,
            global_batch,
            lr,
        )

    # -- resume
    step, samples_seen = 0, 0
    if tag is not None:
        client, rank_state = ckpt.load(eng, tag, universal=universal)
        step, samples_seen = int(client["step"]), int(client["samples_seen"])
        if step >= cfg.steps and dist.is_main:
            log.warning(
                "steps=%d but checkpoint %s is at step %d: nothing to train", cfg.steps, tag, step
            )
        if rank_state is None:  # another world size: no rank's place maps onto a new rank
            seed_everything(cfg.seed + 1 + 7919 * dist.rank + 104729 * step)
            if dist.is_main:
                log.warning(
                    "checkpoint %s came from %d ranks, this run has %d: model, optimizer, LR "
                    "schedule and step carried over; the data order starts afresh",
                    tag, written, dist.world,
                )  # fmt: skip
        else:
            restore_rng_state(rank_state["rng"])
        # the saved place, where it still means something; else a fresh order salted by the
        # step (epoch 0's order again would replay the samples the run began with)
        if not (
            rank_state is not None
            and cfg.resume_data
            and loader.load_state_dict(rank_state["loader"])
        ):
            loader.start_afresh(salt=step)
            if dist.is_main and rank_state is not None:
                log.warning("the data order starts afresh at step %d (a new shuffle)", step)
        saved_next_lr = engine.current_lr(eng)
        old_lr = engine.set_peak_lr(eng, lr)
        if old_lr is not None and dist.is_main:
            log.warning(
                "peak learning rate %.4g (global batch %d) replaces the checkpoint's %.4g",
                lr, global_batch, old_lr,
            )  # fmt: skip
        elif dist.is_main and not math.isclose(
            saved_next_lr, engine.current_lr(eng), rel_tol=1e-9, abs_tol=1e-15
        ):
            log.warning(
                "the LR schedule differs from the checkpoint's (steps, warmup or shape): "
                "step %d trains at %.4g, where the checkpoint's schedule gave %.4g",
                step + 1, engine.current_lr(eng), saved_next_lr,
            )  # fmt: skip
        # the load brought back the checkpoint's AdamW settings too: this run's apply
        adamw = engine.set_adamw_settings(
            eng, [g["weight_decay"] for g in groups], cfg.optim.betas, cfg.optim.eps
        )
        if adamw and dist.is_main:
            log.warning(
                "%s replace the checkpoint's (its optimizer moments carry over)",
                ", ".join(f"optim.{k} {a} -> {b}" for k, (a, b) in adamw.items()),
            )
    metrics_dir = os.path.join(local_dir, "metrics")
    remote_metrics = (
        storage.join(cfg.run_dir, "metrics") if storage.is_remote(cfg.run_dir) else None
    )
    if dist.is_main:
        save_config(cfg, storage.join(cfg.run_dir, "config.yaml"))
        steps_file = os.path.join(metrics_dir, "steps.jsonl")
        if remote_metrics and step > 0:
            # the run dir's copy, uploaded before every checkpoint, is the run's history; a
            # local one may be another attempt's (rank 0 ran on this node before, then elsewhere)
            remote_steps = storage.join(remote_metrics, "steps.jsonl")
            if storage.exists(remote_steps):
                storage.get_file(remote_steps, steps_file)
    metrics = MetricsLogger(
        metrics_dir,
        enabled=dist.is_main,
        start_step=step,
        total_steps=cfg.steps,
        log_every=cfg.log_every,
        flops_per_sample=train_flops_per_sample(cfg.model),
        tokens_per_sample=cfg.model.image_tokens,
        peak_flops=cfg.peak_flops,
        world=dist.world,
        tensorboard=cfg.tensorboard,
    )

    def save(at: int) -> str:
        client_state = {
            "step": at,
            "samples_seen": samples_seen,
            "world_size": dist.world,
            "config": to_dict(cfg),
        }
        rank_state = {"rng": capture_rng_state(), "loader": loader.state_dict()}
        metrics.flush()
        if dist.is_main and remote_metrics:
            storage.put_dir(metrics_dir, remote_metrics)
        return ckpt.save(
            eng,
            at,
            client_state,
            rank_state,
            meta={
                "model": to_dict(cfg.model),
                "step": at,
                "run": cfg.name,
                # the order of DeepSpeed's fp32 master copies without ZeRO (for the export)
                "param_groups": group_names,
                **layout,  # a resume with another stage or precision goes through universal
            },
        )

    # -- the loop
    eng.train()
    batches = iter(loader)
    last_tag, resumed_step = tag, step
    loss_value = float("nan")
    skipped_in_a_row = 0
    stop = StopRequest()  # SIGTERM / SIGUSR1: save the step and end (pipeline/train/stop.py)
    stop.install()
    try:
        while step < cfg.steps:
            t0 = time.perf_counter()
            # what this step applies (the schedule moves in eng.step)
            lr_now = engine.current_lr(eng)
            skipped_before = engine.skipped_steps(eng)
            losses, keys = [], []
            data_seconds = 0.0
            for _ in range(cfg.grad_accum):
                t_data = time.perf_counter()
                batch = next(batches)
                data_seconds += time.perf_counter() - t_data
                loss = batch_loss(eng, batch, eng.device, cond_dtype)
                eng.backward(loss)
                eng.step()
                losses.append(loss.detach())
                keys.extend(batch["keys"])
            step += 1
            samples_seen += global_batch
            # with whether any rank was asked to stop: all stop after this same step
            loss_value, stopping = engine.mean_and_any(torch.stack(losses).mean(), stop.requested)
            extra = {"epoch": loader.epoch, "data_seconds": data_seconds}
            if engine.skipped_steps(eng) > skipped_before:
                # DeepSpeed skipped the update (non-finite gradient norm) and did not move the
                # schedule: the step is counted, the weights and the learning rate are not
                extra["skipped"] = True
                skipped_in_a_row += 1
                if dist.is_main:
                    log.warning(
                        "step %d skipped by DeepSpeed: the gradient norm was not finite", step
                    )
            else:
                skipped_in_a_row = 0
            if cfg.log_keys:
                extra["keys"] = engine.gather_objects(keys)
            metrics.step(
                step,
                loss=loss_value,
                lr=lr_now,
                grad_norm=engine.grad_norm(eng),
                samples=global_batch,
                seconds=time.perf_counter() - t0,
                extra=extra,
            )
            if step % cfg.ckpt_every == 0 or step == cfg.steps or stopping:
                last_tag = save(step)
            if stopping and step < cfg.steps:
                signame = engine.broadcast_object(stop.signame)  # rank 0's, or another's
                raise TrainingStopped(signame or "a signal to another rank", step, last_tag)
            if cfg.max_skipped_steps and skipped_in_a_row >= cfg.max_skipped_steps:
                raise FloatingPointError(
                    f"the last {skipped_in_a_row} steps (to step {step}) were all skipped for a "
                    "non-finite gradient norm: the run has diverged. Rerun with a lower "
                    "learning rate (optim.lr_per_256; a resumed run takes the new one): "
                    "resume=auto takes the newest checkpoint, whose weights are those of step "
                    f"{step - skipped_in_a_row} if it was saved since (a skipped step changes "
                    "none); resume=step_NNNNNNNN an earlier one. Or raise max_skipped_steps "
                    "(0: never stop)"
                )
    except BaseException:
        stop.restore()
        metrics.flush()  # TensorBoard's events of the steps before the failure
        raise
    # kept through the export: a signal now is not acted on (the last step is saved), but it
    # does not end the rank mid-export either (SIGUSR1's default action)

    # -- the end: export, plots, summary
    export_uri = None
    trained = step > resumed_step
    if cfg.export and last_tag is not None:
        export_uri = storage.join(cfg.run_dir, "export")
        # every rank waits while rank 0's node checks its copy against the marker's file list
        # and completes it from the run dir (other nodes' partitions); an error there reaches
        # every rank
        ckpt.ensure_local(last_tag, main_only=True)
        if dist.is_main:
            written = ckpt.written_time(last_tag)
            if not trained and export_is_of(export_uri, last_tag, written, cfg.model):
                log.info("%s already holds the export of %s: kept", export_uri, last_tag)
            else:
                export_weights(
                    ckpt.local_root,
                    last_tag,
                    cfg.model,
                    export_uri,
                    extra={
                        "run": cfg.name,
                        "samples_seen": samples_seen,
                        "checkpoint_time": written,
                    },
                )
        engine.barrier()
    counters = engine.gather_objects(loader.counters())
    data_damage = {k: sum(c[k] for c in counters) for k in counters[0]}
    if dist.is_main:
        plot = metrics.close()
        if remote_metrics:
            storage.put_dir(metrics_dir, remote_metrics)
        log.info(
            "%s done: step %d, %s, data damage %s, loss curve %s",
            cfg.name,
            step,
            f"loss {loss_value:.4f}" if trained else "nothing trained",
            data_damage,
            plot,
        )
    stop.restore()
    return {
        "step": step,
        "loss": loss_value,
        "samples_seen": samples_seen,
        "export": export_uri,
        "checkpoint": last_tag,
        "data_damage": data_damage,
        "steps_file": os.path.join(metrics_dir, "steps.jsonl"),
    }
