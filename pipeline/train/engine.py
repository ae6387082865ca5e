"""The one place DeepSpeed is used: process group, ZeRO engine, checkpoint I/O, clean exit.

The ZeRO settings (stage 1/2/3, offload, bucket sizes) come from a standard ds_config JSON in
``configs/deepspeed/``; what the training config decides is filled in here: micro batch,
gradient accumulation, clipping, precision and the AdamW hyperparameters. The optimizer is
DeepSpeed's AdamW built from that config (``torch_adam: true`` in the JSON gives PyTorch's, which
needs no compiled op, and ``fused: true`` its one-kernel update, about 4x faster than ``foreach``
on CPU for GPT-B; offload configs use DeepSpeed's CPU Adam); the learning-rate schedule is a
PyTorch ``LambdaLR`` that DeepSpeed steps and checkpoints.

On CPU (tests, the local demo) the backend is gloo and the precision fp32; on GPUs NCCL and bf16.
With torch 2.14 + gloo a finished process sometimes aborts in its exit handlers, so a job ends
with :func:`shutdown`: barrier, flush, remove this rank's shared-memory all-reduce buffer, then
``os._exit``.

On CPU :func:`init_distributed` also makes glibc keep freed memory for reuse
(:mod:`pipeline.hostmem`): there is no caching allocator there, and ZeRO allocates its gradient
buckets and flat gradients anew every step (about 1.5 GB for GPT-B at ZeRO-2). On CPU
:func:`create_engine` also takes ZeRO's gradient norms in fp32 (:func:`fp32_grad_norms`) and
skips a non-finite bf16 step by its norm without a second scan (:func:`skip_bf16_steps_by_norm`):
DeepSpeed's fixed per-step cost at GPT-B fp32 went 201 -> 126 ms (``benchmarks/bench_engine.py``).
"""

from __future__ import annotations

import contextlib
import copy
import glob
import json
import logging
import math
import os
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from torch.optim.lr_scheduler import LambdaLR

from pipeline import launch_env, storage
from pipeline.hostmem import keep_freed_host_memory
from pipeline.launch_env import collective_timeout
from pipeline.log import get_logger
from pipeline.train.optim import OptimConfig

log = get_logger(__name__)

# ZeRO's parameter all-gathers call torch.distributed.all_gather_into_tensor, which torch 2.14
# marks deprecated: a FutureWarning on every rank of every run that only DeepSpeed can act on
warnings.filterwarnings(
    "ignore",
    message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
    category=FutureWarning,
)

Precision = Literal["auto", "fp32", "bf16"]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    world: int
    local_rank: int
    local_world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0


def on_cuda() -> bool:
    """Whether training runs on CUDA: a GPU is visible *and* DeepSpeed's accelerator is CUDA.

    ``DS_ACCELERATOR=cpu`` (the demo, the tests) trains on CPU with gloo even on a GPU machine,
    where DeepSpeed's launcher still sets ``CUDA_VISIBLE_DEVICES``: choosing NCCL, bf16 or a CUDA
    device from ``torch.cuda.is_available()`` alone then broadcast CPU tensors over NCCL."""
    return torch.cuda.is_available() and get_accelerator().device_name() == "cuda"


def init_distributed() -> DistInfo:
    """Join the process group of the launcher or make a group of one.

    Any launcher :mod:`pipeline.launch_env` reads: deepspeed (pdsh, or ``--launcher
    openmpi|mvapich|mpich|impi|slurm``), torchrun, ``mpirun`` or ``srun`` around ``python
    jobs/train.py``. On CUDA a rank takes its local rank's GPU, or the one GPU it sees when the
    launcher gave each process its own. On CPU it also calls
    :func:`pipeline.hostmem.keep_freed_host_memory`."""
    le = launch_env.export(os.environ)
    cuda = on_cuda()
    if cuda:
        index = launch_env.cuda_index(le.local_rank, torch.cuda.device_count())
        launch_env.use_device_for_deepspeed(le, index)
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        keep_freed_host_memory()
    if not dist.is_initialized():
        deepspeed.init_distributed(
            dist_backend="nccl" if cuda else "gloo", verbose=False, timeout=collective_timeout()
        )
    if (dist.get_rank(), dist.get_world_size()) != (le.rank, le.world):
        raise launch_env.LaunchError(
            f"the process group has rank {dist.get_rank()} of {dist.get_world_size()}, the "
            f"launcher ({le.launcher}) said {le.rank} of {le.world}"
        )
    # DeepSpeed's own INFO lines are many; ours say what matters
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    if le.world > 1:
        log.info(
            "rank %d of %d (%s launcher; %d on this node), rendezvous %s:%d",
            le.rank, le.world, le.launcher, le.local_world, le.master_addr, le.master_port,
        )  # fmt: skip
    return DistInfo(
        rank=le.rank,
        world=le.world,
        local_rank=le.local_rank,
        local_world=le.local_world,
        device=device,
    )


def resolve_precision(precision: Precision) -> Literal["fp32", "bf16"]:
    """``auto``: bf16 on GPU, fp32 on CPU (DeepSpeed's accelerator decides: :func:`on_cuda`)."""
    if precision == "auto":
        return "bf16" if on_cuda() else "fp32"
    return precision


def build_ds_config(
    path: str,
    *,
    micro_batch: int,
    grad_accum: int,
    world: int,
    precision: Precision,
    optim: OptimConfig,
    lr: float,
) -> dict[str, Any]:
    """The ds_config JSON at ``path`` with the training config's values filled in.

    The training YAML owns the batch, accumulation, clipping, precision and AdamW settings and
    the LR schedule: a JSON that sets one of them to something else is refused (naming the YAML
    key to use), not silently overridden."""
    given = json.loads(storage.read_text(path))
    ds = copy.deepcopy(given)
    ds["train_micro_batch_size_per_gpu"] = micro_batch
    ds["gradient_accumulation_steps"] = grad_accum
    ds["train_batch_size"] = micro_batch * grad_accum * world
    ds["gradient_clipping"] = optim.grad_clip
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": resolve_precision(precision) == "bf16"}
    ds["fp16"] = {"enabled": False}
    opt = ds.setdefault("optimizer", {})
    opt["type"] = "AdamW"
    opt["params"] = {
        **opt.get("params", {}),
        "lr": lr,
        "betas": list(optim.betas),
        "eps": optim.eps,
        "weight_decay": optim.weight_decay,
    }
    ds.setdefault("steps_per_print", 1 << 30)  # our metrics log; DeepSpeed's would repeat it
    ds.setdefault("wall_clock_breakdown", False)
    _refuse_overridden(given, ds, path)
    accum = _at(ds, "data_types.grad_accum_dtype")
    offload = _at(ds, "zero_optimization.offload_optimizer.device") == "cpu"
    if zero_stage(ds) == 1 and ds["bf16"]["enabled"] and str(accum) in _FP32_NAMES and not offload:
        # DeepSpeed swaps in its BF16_Optimizer for exactly this mix (without optimizer
        # offload); the export at the end of a run (zero_to_fp32) cannot read that optimizer's
        # checkpoints, so it would fail then
        raise ValueError(
            f"{path}: ZeRO-1 in bf16 with data_types.grad_accum_dtype = {accum!r} is "
            "DeepSpeed's BF16_Optimizer, whose checkpoints DeepSpeed's zero_to_fp32 cannot "
            "consolidate (the run's export would fail): use ZeRO-2 "
            "(configs/deepspeed/zero2.json), which accumulates bf16 gradients in fp32, or "
            "drop data_types (ZeRO-1 then accumulates them in bf16)"
        )
    return ds


_FP32_NAMES = ("torch.float32", "fp32", "float32", "float")


# ds_config keys the training config fills in, and the training config's key that owns each
_OWNED = (
    ("train_micro_batch_size_per_gpu", "data.batch_size"),
    ("gradient_accumulation_steps", "grad_accum"),
    ("train_batch_size", "data.batch_size x grad_accum x ranks"),
    ("gradient_clipping", "optim.grad_clip"),
    ("bf16.enabled", "precision"),
    ("fp16.enabled", "precision (bf16 or fp32)"),
    ("optimizer.type", "(AdamW only)"),
    ("optimizer.params.betas", "optim.betas"),
    ("optimizer.params.eps", "optim.eps"),
    ("optimizer.params.weight_decay", "optim.weight_decay"),
)


def _at(d: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _refuse_overridden(given: dict[str, Any], filled: dict[str, Any], path: str) -> None:
    """Raise if the JSON as written (``given``) sets an owned key to another value than the
    training config filled in."""
    clashes = [
        f"{key} = {_at(given, key)!r} (the training config gives {_at(filled, key)!r}: set "
        f"{owner} instead)"
        for key, owner in _OWNED
        if _at(given, key) is not None and _at(given, key) != _at(filled, key)
    ]
    if _at(given, "optimizer.params.lr") is not None:
        clashes.append("optimizer.params.lr (set optim.lr_per_256, scaled by the global batch)")
    if "scheduler" in given:
        clashes.append("scheduler (the LR schedule is optim.warmup_steps / optim.schedule)")
    if clashes:
        raise ValueError(f"{path} sets what the training config owns: " + "; ".join(clashes))


def zero_stage(ds_config: dict[str, Any]) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def create_engine(
    model: torch.nn.Module,
    groups: list[dict[str, Any]],
    ds_config: dict[str, Any],
    lr_fn: Callable[[int], float],
):
    """Wrap ``model`` in a DeepSpeed engine with AdamW over ``groups`` and a LambdaLR schedule."""
    groups = [{k: v for k, v in g.items() if k != "names"} for g in groups]
    cpu = get_accelerator().device_name() == "cpu"
    if cpu:
        fp32_grad_norms()
    eng, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=groups,
        config=copy.deepcopy(ds_config),
        lr_scheduler=lambda opt: LambdaLR(opt, lr_fn),
    )
    if cpu:
        skip_bf16_steps_by_norm(eng)
    return eng


def _fp32() -> torch.dtype:
    return torch.float32


def fp32_grad_norms(on: bool = True) -> list[str]:
    """Make ZeRO (stages 1-3) compute gradient norms in fp32, as ``clip_grad_norm_`` does.

    DeepSpeed converts every gradient to fp64 before taking its norm (``get_norm_dtype``, fp64
    wherever the accelerator has it): a copy of all gradients at twice their size, every step.
    On a GPU that is cheap; on CPU it was a third of the engine's extra time over the bare model
    (``benchmarks/bench_engine.py``, AMD EPYC: GPT-B fp32 optimizer step 214-251 -> 111-128 ms).

    The norm is then the one the bare model's ``torch.nn.utils.clip_grad_norm_`` computes (the
    same value, to the bit, in the test). PyTorch's CPU norm kernel sums in fp32 lanes, so it is
    off the fp64 norm by 1.4e-5 relative for the debug preset and 2.9e-5 for GPT-B
    (``bench_engine``): nothing to clipping at 1.0, and the logged norm is a bare run's.
    :func:`create_engine` calls it on CPU; ``on=False`` puts DeepSpeed's own choice back
    (``benchmarks/bench_engine.py`` measures both). Returns the DeepSpeed modules changed."""
    import importlib

    from deepspeed.runtime.zero.utils import get_norm_dtype

    changed = []
    for name in ("deepspeed.runtime.zero.stage_1_and_2", "deepspeed.runtime.zero.stage3"):
        mod = importlib.import_module(name)
        if hasattr(mod, "get_norm_dtype"):
            mod.get_norm_dtype = _fp32 if on else get_norm_dtype
            changed.append(name)
    if not changed:  # a DeepSpeed that no longer has the hook: still correct, only slower
        log.warning("DeepSpeed has no get_norm_dtype to set; gradient norms stay in its dtype")
    return changed


def skip_bf16_steps_by_norm(eng) -> bool:
    """bf16 ZeRO-1/2: skip a step with a non-finite gradient by its norm, not a separate scan.

    A gradient with an inf or NaN anywhere has a non-finite norm, and DeepSpeed skips the step
    on a non-finite norm already (``check_grad_overflow``, on by default in bf16). In bf16 it
    first scans every gradient for inf/NaN as well (an ``amax`` and an ``amin`` per tensor, two
    more reads of all gradients), which is what fp32 does without: 50 ms of a GPT-B bf16 step
    on CPU. Here the engine's optimizer goes straight to the norm; a step is skipped exactly when
    it would have been (and also, which the scan misses, when finite gradients are so large that
    their squared norm overflows fp32). Only where the norm is computed (clipping on or
    ``compute_grad_norm``) and DeepSpeed checks it; :func:`create_engine` calls it on CPU.
    Returns whether it applied."""
    opt = getattr(eng, "optimizer", None)
    stage = eng.zero_optimization_stage()
    applies = (
        stage in (1, 2)
        and eng.bfloat16_enabled()
        and getattr(opt, "check_grad_overflow", False)
        and getattr(opt, "compute_grad_norm", False)
        and not getattr(opt, "cpu_offload", False)
        and callable(getattr(opt, "check_overflow", None))
    )
    if applies:
        opt.check_overflow = _no_scan
    return bool(applies)


def _no_scan(partition_gradients: bool = True) -> None:
    """ZeRO's ``step`` has set ``overflow = False``; the norm check that follows decides."""


def compile_engine(eng) -> None:
    """``torch.compile`` the engine's model (DeepSpeed's ``engine.compile``, inductor backend).

    Random ops keep PyTorch's eager generator (inductor's ``fallback_random``): a compiled run
    draws the same dropout and CFG masks as an eager one from the same RNG state, so it trains
    the same model (up to float rounding) and resumes as exactly. The parameters' names do not
    change, so checkpoints and exports are those of an eager run."""
    import torch._inductor.config as inductor_config

    inductor_config.fallback_random = True
    eng.compile()


def grad_norm(eng) -> float:
    """Global gradient norm of the last optimizer step (before clipping); nan if unknown."""
    g = eng.get_global_grad_norm()
    if g is None:
        return float("nan")
    return float(g.item() if torch.is_tensor(g) else g)


def current_lr(eng) -> float:
    """The learning rate the next optimizer step applies."""
    return float(eng.get_lr()[0])


def set_peak_lr(eng, lr: float) -> float | None:
    """After a resume: make ``lr`` the schedule's peak and the next step's LR this run's
    schedule at the resumed step; returns the old peak if it differed.

    A resumed LambdaLR takes its state from the checkpoint, including the peak (``base_lrs``)
    it was built with: a run resumed with another global batch (another number of ranks, say),
    whose peak scales with it, would otherwise go on at the old one. The optimizer's state
    also brings back each group's LR for the next step as the old schedule gave it, while the
    schedule's function is this run's (its ``steps``, warmup or shape may have changed, e.g. a
    cosine run extended): without this the first resumed step would train at the old value."""
    sched = eng.lr_scheduler
    old = float(sched.base_lrs[0])
    sched.base_lrs = [lr] * len(sched.base_lrs)
    for group, fn in zip(sched.optimizer.param_groups, sched.lr_lambdas, strict=True):
        group["lr"] = lr * fn(sched.last_epoch)
    sched._last_lr = [group["lr"] for group in sched.optimizer.param_groups]
    return None if math.isclose(old, lr, rel_tol=1e-12) else old


def set_adamw_settings(
    eng, weight_decays: list[float], betas: tuple[float, float], eps: float
) -> dict[str, tuple[Any, Any]]:
    """After a resume: give the optimizer's parameter groups this run's AdamW settings
    (``weight_decays``: one per group, in the order the engine was built with); returns
    ``{setting: (checkpoint's, now)}`` for those that changed (the decayed group's decay).

    DeepSpeed's load brings back the optimizer's saved groups whole, settings included, so a
    change of ``optim.weight_decay``, ``betas`` or ``eps`` would be silently ignored. ZeRO 1-3
    keep one group of the wrapped torch optimizer (the one the LR schedule holds) per group
    given, whatever the partitioning; without ZeRO it is the engine's optimizer itself."""
    groups = eng.lr_scheduler.optimizer.param_groups
    if len(groups) != len(weight_decays):
        raise RuntimeError(
            f"the optimizer has {len(groups)} parameter groups, the engine was built with "
            f"{len(weight_decays)}"
        )
    new = {"betas": tuple(float(b) for b in betas), "eps": float(eps)}
    old = {"betas": tuple(float(b) for b in groups[0]["betas"]), "eps": float(groups[0]["eps"])}
    # the decayed group's setting (the other's is 0 in both)
    i = max(range(len(groups)), key=lambda k: weight_decays[k])
    old["weight_decay"], new["weight_decay"] = float(groups[i]["weight_decay"]), weight_decays[i]
    for group, decay in zip(groups, weight_decays, strict=True):
        group.update(betas=new["betas"], eps=new["eps"], weight_decay=decay)
    return {k: (old[k], new[k]) for k in ("weight_decay", "betas", "eps") if old[k] != new[k]}


def skipped_steps(eng) -> int:
    """Optimizer steps DeepSpeed skipped so far (a non-finite gradient norm in bf16/fp16)."""
    return int(getattr(eng, "skipped_steps", 0))


def set_fp32_weights(eng, state: Mapping[str, torch.Tensor]) -> None:
    """Give the engine's fp32 master weights the exact values of ``state`` (by parameter name).

    In bf16 DeepSpeed builds its fp32 masters from the bf16 model, so weights loaded into the
    model before (stage 2 from stage 1's fp32 export) would start rounded to bf16. ZeRO 1-3."""
    from deepspeed.utils import safe_set_full_fp32_param

    for name, p in eng.module.named_parameters():
        if name in state:
            safe_set_full_fp32_param(p, state[name].to(torch.float32))


def save_checkpoint(eng, root: str, tag: str, client_state: dict[str, Any]) -> None:
    """DeepSpeed's sharded save of model, optimizer and LR schedule (every rank calls it)."""
    eng.save_checkpoint(root, tag=tag, client_state=client_state, save_latest=False)


def load_checkpoint(eng, root: str, tag: str) -> dict[str, Any]:
    """Load model, optimizer and LR schedule; returns the client state saved with them."""
    path, client = eng.load_checkpoint(
        root, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if path is None:
        raise FileNotFoundError(f"DeepSpeed could not load checkpoint {tag} from {root}")
    return client or {}


def partitioned_optimizer(ckpt_dir: str) -> bool:
    """Whether the checkpoint in local ``ckpt_dir`` holds its optimizer state cut per rank: ZeRO
    stages 1-3 (``zero_pp_rank_*``; ``bf16_zero_pp_rank_*`` from ZeRO-1's bf16 optimizer).
    Without ZeRO (stage 0, fp32 or bf16) the whole state is in the model-states file, which any
    number of ranks loads as it is."""
    return bool(glob.glob(os.path.join(ckpt_dir, "*zero_pp_rank_*_optim_states.pt")))


def consolidated_state_dict(
    root: str, tag: str, param_names: list[list[str]] | None = None
) -> dict[str, torch.Tensor]:
    """fp32 weights (and buffers) of a checkpoint, on CPU.

    ZeRO 1/2/3: merged from the per-rank partitions. Without ZeRO the model states file holds
    the whole model; in bf16 its parameters are bf16 and DeepSpeed's optimizer keeps their fp32
    master copies (``fp32_groups``) in the order of the parameter groups, whose names
    ``param_names`` gives (the trainer writes them in the checkpoint's ``meta.json``)."""
    ckpt = os.path.join(root, tag)
    if partitioned_optimizer(ckpt):
        with contextlib.redirect_stdout(sys.stderr):  # it prints progress to stdout
            sd = get_fp32_state_dict_from_zero_checkpoint(root, tag=tag)
        return {k: v.contiguous() for k, v in sd.items()}
    path = os.path.join(ckpt, "mp_rank_00_model_states.pt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{ckpt} has neither ZeRO partitions nor {os.path.basename(path)}")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    state = dict(saved["module"])
    low = sorted(k for k, v in state.items() if v.is_floating_point() and v.dtype != torch.float32)
    if low:
        masters = (saved.get("optimizer") or {}).get("fp32_groups")
        if masters is None or param_names is None:
            raise ValueError(
                f"{ckpt}: {len(low)} parameters (e.g. {low[0]}) are {state[low[0]].dtype} and "
                + (
                    "the optimizer state has no fp32 master copies"
                    if masters is None
                    else "the parameter groups' names are unknown (meta.json: param_groups)"
                )
            )
        for names, tensors in zip(param_names, masters, strict=True):
            for name, t in zip(names, tensors, strict=True):
                if t.shape != state[name].shape:
                    raise ValueError(f"{ckpt}: fp32 master of {name} has shape {tuple(t.shape)}")
                state[name] = t
    return {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in state.items()}


# --- collectives --------------------------------------------------------------------------------


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def mean_across_ranks(x: torch.Tensor) -> float:
    """The mean of a scalar over all ranks."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return float(x)
    t = x.detach().float().reshape(1).clone()
    if on_cuda():  # NCCL reduces CUDA tensors only
        t = t.cuda()
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def mean_and_any(x: torch.Tensor, flag: bool) -> tuple[float, bool]:
    """The mean of a scalar over all ranks, and whether ``flag`` is set on any rank: one
    all-reduce for both."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return float(x), flag
    x = x.detach().to(torch.float64).reshape(1)
    t = torch.cat([x, torch.tensor([float(flag)], dtype=torch.float64, device=x.device)])
    if on_cuda():  # NCCL reduces CUDA tensors only
        t = t.cuda()
    dist.all_reduce(t)
    total, flags = t.tolist()
    return total / dist.get_world_size(), flags > 0


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (on every rank)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shutdown(code: int = 0) -> None:
    """End the process without running the exit handlers that abort under gloo.

    Waits for every rank, flushes logs and standard streams, removes this rank's shared-memory
    all-reduce buffer (DeepSpeed's CPU comm leaves ~66 MB in /dev/shm per rank), then exits.
    """
    if dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.barrier()
    remove_shm_buffers(os.environ.get("MASTER_PORT"), os.environ.get("RANK"))
    for h in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            h.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def remove_shm_buffers(port: str | int | None, rank: str | int | None = None) -> list[str]:
    """Delete DeepSpeed's /dev/shm all-reduce buffers of the job on ``port`` (one rank or all)."""
    if port is None:
        return []
    suffix = "*" if rank is None else str(rank)
    pattern = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_{suffix}"
    gone = []
    for path in glob.glob(pattern):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
            gone.append(path)
    return gone
