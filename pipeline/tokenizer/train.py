"""Training the VQ tokenizer: L2 + LPIPS + PatchGAN (hinge) + VQ losses, resumable exactly.

Runs as one process or under torchrun (DDP: gloo on CPU, NCCL on GPU)::

    torchrun --nproc_per_node 8 jobs/train_tokenizer.py --config configs/tokenizer/vq16_256.yaml

Each step is LlamaGen's: a generator (VQ model) update on
``rec_weight * L2 + perceptual_weight * LPIPS + [g] * disc_weight * hinge_G + VQ losses``, then,
from step ``disc_start`` on (counting from 1, as LlamaGen's ``adopt_weight`` does), a
discriminator update on the hinge loss. ``[g]`` is 1 or the adaptive weight of
taming-transformers. Before that LlamaGen still steps the discriminator's optimizer on a zero
loss, which only advances its Adam step count (so its first real updates are damped as a late
Adam step's are); here the discriminator is not run then, and its optimizer starts with that
step count instead (:func:`_start_at_step`).

Exact resume: a checkpoint holds model, discriminator, both optimizers, the step, and every
rank's RNG states and data position (``RawImageStream.state_dict``). Resuming from step k
replays steps k+1... with the same samples, augmentations and RNG states as an uninterrupted
run. On CPU the losses are bit-identical too (tested with gloo and two ranks); on GPU cuDNN may
pick nondeterministic kernels, so the losses agree closely but not to the bit.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch.nn.parallel import DistributedDataParallel as DDP

from pipeline import launch_env, storage
from pipeline.config import ConfigError, doc, save_config, to_dict
from pipeline.data.raw import RawImageStream, list_complete_shards, nonempty_shards
from pipeline.log import get_logger
from pipeline.models.vq import VQConfig, VQModel, count_params
from pipeline.precision import exact_fp32_on_cuda, warn_if_slow
from pipeline.resume import decided_on_rank0, resume_conflict
from pipeline.tokenizer import checkpoint as ckpt
from pipeline.tokenizer.discriminator import PatchGANDiscriminator
from pipeline.tokenizer.losses import (
    adaptive_gan_weight,
    build_lpips,
    hinge_d_loss,
    hinge_g_loss,
    psnr_from_mse,
)
from pipeline.train.rng import capture_rng_state, restore_rng_state
from pipeline.train.stop import StopRequest, TrainingStopped

log = get_logger(__name__)


# TokenizerTrainConfig's fields that must be >= 1, and those that must not be negative
_AT_LEAST_ONE = (
    "image_size",
    "batch_size",
    "max_steps",
    "disc_ndf",
    "disc_layers",
    "shuffle_buffer",
    "decode_threads",
    "log_every",
    "ckpt_every",
)
_NOT_NEGATIVE = (
    "weight_decay",
    "grad_clip",
    "rec_weight",
    "perceptual_weight",
    "disc_weight",
    "threads",
    "keep_checkpoints",
    "eval_images",
)

# the crops of rank 0 that the warning of most crops being enlarged looks at (at the start of
# each run, resumed or not)
ENLARGED_CHECK_CROPS = 64


@dataclass(frozen=True)
class TokenizerTrainConfig:
    """How to train a VQ tokenizer on raw img2dataset shards."""

    data: str = doc("folder of raw img2dataset shards (local or s3://)")
    run_dir: str = doc("output folder: config, checkpoints, metrics, export (local or s3://)")
    model: VQConfig = doc(
        "VQ preset name (VQ-16, VQ-8, tiny) or a mapping of VQConfig fields",
        default_factory=VQConfig,
    )
    local_dir: str | None = doc(
        "local working folder for checkpoints and metrics when run_dir is on S3 "
        "(default: $T2I_CACHE/runs/<run_dir>)",
        None,
    )
    image_size: int = doc("training crop size in pixels", 256)
    batch_size: int = doc("images per rank per step", 8)
    max_steps: int = doc("optimizer steps to train for", 400_000)
    lr: float = doc("learning rate of both optimizers (constant)", 1e-4)
    betas: tuple[float, float] = doc("AdamW betas", (0.9, 0.95))
    weight_decay: float = doc("AdamW weight decay", 0.0)
    grad_clip: float = doc("gradient norm clip (0 = off)", 1.0)
    rec_weight: float = doc("weight of the pixel L2 loss", 1.0)
    perceptual_weight: float = doc("weight of the LPIPS loss (0 = off)", 1.0)
    lpips_backbone: Literal["auto", "pretrained", "random"] = doc(
        "VGG16 weights for LPIPS: auto uses the torch hub cache copy if present", "auto"
    )
    disc_start: int = doc(
        "the step (counting from 1) from which the GAN loss and discriminator updates run", 20_000
    )
    disc_weight: float = doc("weight of the GAN losses", 0.5)
    disc_adaptive_weight: bool = doc("scale the generator GAN loss by the adaptive weight", False)
    disc_ndf: int = doc("discriminator base channels", 64)
    disc_layers: int = doc("discriminator strided layers", 3)
    precision: Literal["fp32", "bf16"] = doc("autocast dtype of forward passes", "fp32")
    device: Literal["auto", "cpu", "cuda"] = doc("where to train (auto: cuda if available)", "auto")
    threads: int = doc(
        "torch CPU threads per rank (0 = torch's default); 1 avoids OpenMP threads spinning "
        "against each other on a busy small machine",
        0,
    )
    seed: int = doc("seed of model init, data order and augmentation", 0)
    shuffle_buffer: int = doc("samples in the seeded shuffle buffer", 1000)
    max_scale: float = doc(
        "random resize of the short side before cropping: up to this x size (>= 1.0); raw "
        "images stored smaller than that are enlarged (warned when most are)",
        1.1,
    )
    decode_threads: int = doc("image decoding threads per rank", 4)
    log_every: int = doc("steps between log lines", 50)
    ckpt_every: int = doc("steps between checkpoints", 5000)
    keep_checkpoints: int = doc("complete checkpoints to keep (0 = all)", 2)
    eval_images: int = doc(
        "images to evaluate at the end (center crops of the first TRAINING shards, not held "
        "out: a reconstruction check, not a validation score; eval.json says so); 0 = skip",
        0,
    )
    inception_weights: str | None = doc(
        "local/s3 InceptionV3 weights (torch-fidelity) for rFID", None
    )

    def __post_init__(self) -> None:
        # each caught here, at load, by name: later they fail deep in a run (an IndexError of
        # an empty batch, a ZeroDivisionError of a step modulo 0, an empty random.randrange)
        for name in _AT_LEAST_ONE:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in _NOT_NEGATIVE:
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must each be in [0, 1), got {list(self.betas)}")
        if not self.max_scale >= 1.0:
            raise ValueError(
                f"max_scale must be >= 1.0 (crops are never taken from a shrunk image), got "
                f"{self.max_scale}"
            )
        ds = self.model.downsample
        if self.image_size % ds:
            raise ValueError(f"image_size {self.image_size} is not a multiple of downsample {ds}")

    def local_root(self) -> str:
        if not storage.is_remote(self.run_dir):
            return self.run_dir
        if self.local_dir:
            return self.local_dir
        cache = os.path.expanduser(os.environ.get("T2I_CACHE", "~/.cache/t2i-pipeline"))
        return os.path.join(cache, "runs", self.run_dir.replace("://", "/"))


@dataclass
class _Dist:
    rank: int
    world: int
    device: torch.device
    local_rank: int = 0

    def all_mean(self, values: dict[str, float]) -> dict[str, float]:
        if self.world == 1:
            return values
        t = torch.tensor(list(values.values()), dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return dict(zip(values, (t / self.world).tolist()))

    def all_sum(self, value: int) -> int:
        """The sum of ``value`` over all ranks, on every rank (a collective: all ranks call it)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t)
        return int(t.item())

    def count_distinct(self, items: set[Any]) -> int:
        """The number of distinct items in the union of every rank's ``items`` (hashable,
        picklable and sortable), on every rank (a collective: all ranks call it)."""
        if self.world == 1:
            return len(items)
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, sorted(items))
        return len(set().union(*out))

    def broadcast(self, obj: Any) -> Any:
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` on rank 0 (None elsewhere); ``obj`` may hold tensors."""
        if self.world == 1:
            return [obj]
        # torch.save bytes, not the objects: gather_object fails to unpickle tensors (torch 2.14)
        buf = io.BytesIO()
        torch.save(obj, buf)
        out: list[Any] | None = [None] * self.world if self.rank == 0 else None
        dist.gather_object(buf.getvalue(), out, dst=0)
        if out is None:
            return None
        return [torch.load(io.BytesIO(b), weights_only=True) for b in out]


def _setup_distributed(kind: str) -> _Dist:
    """The launcher's group (torchrun, deepspeed, mpirun, srun: :mod:`pipeline.launch_env`)."""
    le = launch_env.export(os.environ)
    world = le.world
    use_cuda = kind == "cuda" or (kind == "auto" and torch.cuda.is_available())
    if use_cuda:
        device = torch.device(
            "cuda", launch_env.cuda_index(le.local_rank, torch.cuda.device_count())
        )
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        # rank 0 alone saves and uploads a checkpoint (or fetches one) while the others wait in
        # a barrier: NCCL's default of 10 minutes would end a run on a slow S3 transfer
        dist.init_process_group(
            "nccl" if use_cuda else "gloo", timeout=launch_env.collective_timeout()
        )
    rank = dist.get_rank() if world > 1 else 0
    return _Dist(rank, world, device, le.local_rank)


def _allreduce_grads(params: list[torch.nn.Parameter], world: int) -> None:
    """Average gradients over ranks in one flat all-reduce (for the non-DDP discriminator)."""
    grads = [p.grad for p in params if p.grad is not None]
    if world == 1 or not grads:
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= world
    for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)


class _Metrics:
    """One JSON line per step on rank 0; mirrored to the run folder with each checkpoint."""

    def __init__(self, local_root: str, run_dir: str, resume_step: int | None):
        self.local = os.path.join(local_root, "metrics.jsonl")
        self.remote = storage.join(run_dir, "metrics.jsonl") if storage.is_remote(run_dir) else None
        keep: list[str] = []
        if resume_step is not None:
            # a resumed run rewrites the steps after its checkpoint: keep one line per step
            keep = [ln for ln, step in self._history() if step <= resume_step]
        storage.write_text(self.local, "".join(ln + "\n" for ln in keep))
        self.f = open(self.local, "a")

    def _history(self) -> list[tuple[str, int]]:
        """(line, step) of the saved history, from the remote copy when the run folder is remote.

        The remote copy is uploaded before each checkpoint, so it holds every step up to the one
        resumed from; the local file may be stale (the run moved to another node and back) and is
        read only without a remote run folder, or when the remote copy is missing. Lines that do
        not parse (one torn by a power loss mid-write) are skipped with a warning: they would
        otherwise stop the resume."""
        src = self.remote if self.remote and storage.exists(self.remote) else self.local
        if not storage.exists(src):
            return []
        out, bad = [], 0
        for ln in storage.read_text(src).splitlines():
            if not ln.strip():
                continue
            try:
                step = int(json.loads(ln)["step"])
            except (ValueError, KeyError, TypeError):
                bad += 1
                continue
            out.append((ln, step))
        if bad:
            log.warning("skipped %d unreadable line(s) of %s (torn by a crash?)", bad, src)
        return out

    def write(self, row: dict[str, Any]) -> None:
        self.f.write(json.dumps(row) + "\n")
        self.f.flush()

    def mirror(self) -> None:
        if self.remote:
            storage.put_file(self.local, self.remote)


def train_tokenizer(cfg: TokenizerTrainConfig, resume: str = "auto") -> dict[str, Any]:
    """Train (or continue training) a tokenizer; returns a summary. ``resume``: auto|none|STEP."""
    cfg = dataclasses.replace(cfg, run_dir=storage.normalize(cfg.run_dir))  # os.path-ready
    saved_threads = torch.get_num_threads()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg, resume)
    finally:
        torch.set_num_threads(saved_threads)


def _train(cfg: TokenizerTrainConfig, resume: str) -> dict[str, Any]:
    d = _setup_distributed(cfg.device)
    local_root = cfg.local_root()
    ckpt_local = os.path.join(local_root, "checkpoints")
    ckpt_remote = (
        storage.join(cfg.run_dir, "checkpoints") if storage.is_remote(cfg.run_dir) else None
    )

    # identical initialisation on every rank (DDP also broadcasts rank 0's weights)
    torch.manual_seed(cfg.seed)
    model = VQModel(cfg.model).to(d.device)
    disc = PatchGANDiscriminator(ndf=cfg.disc_ndf, n_layers=cfg.disc_layers).to(d.device)
    lpips_net = build_lpips(cfg.lpips_backbone).to(d.device) if cfg.perceptual_weight > 0 else None
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay
    )
    opt_d = torch.optim.AdamW(
        disc.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay
    )
    # per-rank global RNG streams (dropout etc.); data order has its own seeded generators
    torch.manual_seed(cfg.seed * 1000 + d.rank)

    step = 0
    used_at_resume: torch.Tensor | None = None
    state: dict[str, Any] | None = None
    resume_step: int | None = None

    def decide_resume() -> int | None:  # one rank decides, so all resume from the same step
        where = ckpt_remote or ckpt_local  # with a mirror, it alone says what is complete
        complete = ckpt.complete_steps(where)
        newest = complete[-1] if complete else None
        if resume in ("none", "auto"):
            found = None if resume == "none" else newest
        else:
            try:
                found = int(resume)
            except ValueError:
                raise ConfigError(f"resume={resume!r}: give auto, none or a step number") from None
            if found not in complete:
                raise ConfigError(
                    f"resume={resume}: no complete checkpoint of step {found} under {where} "
                    f"(complete: {complete or 'none'})"
                )
        conflict = resume_conflict(resume, found, newest, where)
        if conflict:
            raise ConfigError(conflict)
        return found

    resume_step = decided_on_rank0(d.rank == 0, d.broadcast, decide_resume)
    if resume_step is not None:
        if ckpt_remote and d.world > 1:  # one download a node, not one a rank
            ckpt.fetch_once_per_node(
                resume_step, ckpt_local, ckpt_remote, d.local_rank, dist.barrier
            )
        state = ckpt.load_checkpoint(resume_step, ckpt_local, ckpt_remote)
        if len(state["ranks"]) != d.world:
            raise RuntimeError(
                f"checkpoint step {resume_step} was written by {len(state['ranks'])} ranks; this "
                f"run has {d.world}: the data position of each rank cannot be carried over"
            )
        model.load_state_dict(state["model"])
        disc.load_state_dict(state["disc"])
        opt.load_state_dict(state["opt"])
        opt_d.load_state_dict(state["opt_disc"])
        # loading puts back the saved hyperparameters; the config's are the ones in effect (and
        # the ones config.yaml records): a resume may lower the learning rate, say
        g = opt.param_groups[0]
        saved = (g["lr"], tuple(g["betas"]), g["weight_decay"])
        now = (cfg.lr, tuple(cfg.betas), cfg.weight_decay)
        if saved != now:
            log.info("resumed with other lr, betas, weight decay: %s -> %s", saved, now)
        for group in (*opt.param_groups, *opt_d.param_groups):
            group.update(lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
        step = int(state["step"])

    # one rank lists the shards and every rank reads that list: listed apart, ranks could see
    # different shard sets while the download stage is still finishing shards, and split them
    # differently (samples read twice or never)
    shards = decided_on_rank0(d.rank == 0, d.broadcast, lambda: _training_shards(cfg.data, state))
    stream = RawImageStream(
        shards,
        cfg.image_size,
        cfg.batch_size,
        seed=cfg.seed,
        rank=d.rank,
        world_size=d.world,
        shuffle_buffer=cfg.shuffle_buffer,
        max_scale=cfg.max_scale,
        decode_threads=cfg.decode_threads,
    )
    if state is not None:
        mine = state["ranks"][d.rank]
        stream.load_state_dict(mine["data"])
        restore_rng_state(mine["rng"])
        if "used" in mine:  # codes seen since the last log line (the next one counts them)
            used_at_resume = mine["used"]
        state = None  # free the optimizer copies
        log.info("resumed from checkpoint step %d", step)

    metrics = None
    if d.rank == 0:
        storage.makedirs(local_root)
        _save_config(cfg)
        metrics = _Metrics(local_root, cfg.run_dir, resume_step)
        log.info(
            "VQ %s params, discriminator %s params; %d shards; %d rank(s) x batch %d at %d px",
            f"{count_params(model):,}",
            f"{count_params(disc):,}",
            len(shards),
            d.world,
            cfg.batch_size,
            cfg.image_size,
        )

    ddp = DDP(model) if d.world > 1 else model
    autocast = torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    if cfg.precision == "bf16":
        warn_if_slow(torch.bfloat16, d.device, "tokenizer training")
    used = torch.zeros(cfg.model.codebook_size, dtype=torch.bool, device=d.device)
    if used_at_resume is not None:
        used.copy_(used_at_resume.to(d.device))
    t0, steps_since = time.time(), 0
    warned_enlarged = False  # said once, on rank 0
    # rank 0's first crops of this run: most of them enlarged is said at once, loudly
    check_enlarged, first_crops, enlarged_at_start = d.rank == 0, 0, stream.enlarged
    batches = iter(stream)
    stop = StopRequest()  # SIGTERM / SIGUSR1: save the step and end (pipeline/train/stop.py)
    stop.install()
    try:
        while step < cfg.max_steps:
            x = next(batches).to(d.device, non_blocking=True)
            if check_enlarged:
                first_crops += x.shape[0]
                if first_crops >= ENLARGED_CHECK_CROPS or step + 1 >= cfg.max_steps:
                    check_enlarged = False
                    enlarged = stream.enlarged - enlarged_at_start
                    msg = enlarged_warning(cfg, enlarged, first_crops, "first")
                    if msg:
                        warned_enlarged = True
                        log.warning("%s", msg)
            gan_on = step + 1 >= cfg.disc_start  # ``step`` steps are done; this is step + 1

            # --- generator (VQ model) update ---
            model.train()
            disc.train()
            disc.requires_grad_(False)  # its gradients from this loss are not wanted
            with autocast:
                recon, vq, codes = ddp(x)
                rec = F.mse_loss(recon.float(), x)
                p_loss = (
                    lpips_net(x, recon.float()).mean()
                    if lpips_net is not None
                    else rec.new_zeros(())
                )
                nll = cfg.rec_weight * rec + cfg.perceptual_weight * p_loss
                loss = nll + vq.total()
                g_adv = rec.new_zeros(())
                g_scale = torch.zeros(())
                if gan_on:
                    g_adv = hinge_g_loss(disc(recon.float()))
                    g_scale = (
                        adaptive_gan_weight(nll, g_adv, model.decoder.last_layer)
                        if cfg.disc_adaptive_weight
                        else torch.ones(())
                    )
                    loss = loss + g_scale.to(loss) * cfg.disc_weight * g_adv
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            disc.requires_grad_(True)

            # --- discriminator update ---
            d_loss = torch.zeros(())
            if gan_on:
                with autocast:
                    d_loss = cfg.disc_weight * hinge_d_loss(disc(x), disc(recon.detach().float()))
                opt_d.zero_grad(set_to_none=True)
                _start_at_step(opt_d, step)
                d_loss.backward()
                _allreduce_grads(list(disc.parameters()), d.world)
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(disc.parameters(), cfg.grad_clip)
                opt_d.step()

            step += 1
            steps_since += 1
            used[codes.flatten()] = True
            row = d.all_mean(
                {
                    "loss": loss.item(),
                    "rec": rec.item(),
                    "perceptual": p_loss.item(),
                    "codebook": vq.codebook.item(),
                    "commit": vq.commit.item(),
                    "entropy": vq.entropy.item(),
                    "g_adv": g_adv.item(),
                    "g_scale": float(g_scale),
                    "d_loss": d_loss.item(),
                    # any rank asked to stop: all stop after this same step
                    "stop": float(stop.requested),
                }
            )
            stopping = row.pop("stop") > 0
            row = {"step": step, **row, "psnr": psnr_from_mse(row["rec"])}
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                usage = used.float()
                if d.world > 1:
                    dist.all_reduce(usage, op=dist.ReduceOp.MAX)
                row["codebook_usage"] = usage.mean().item()
                row["broken_images"] = _broken_images(d, stream)
                row["enlarged_crops"] = d.all_sum(stream.enlarged)
                crops = step * cfg.batch_size * d.world  # every step takes a batch per rank
                if row["enlarged_crops"] and not warned_enlarged and d.rank == 0:
                    warned_enlarged = True  # a few: said once (most: said above, at the start)
                    log.warning("%s", enlarged_warning(cfg, row["enlarged_crops"], crops, "some"))
                used.zero_()
                rate = steps_since / (time.time() - t0)
                t0, steps_since = time.time(), 0
                log.info(
                    "step %d | loss %.4f rec %.4f lpips %.4f vq %.4f g_adv %.4f d %.4f | psnr %.2f | "
                    "codes used %.1f%% | %.2f steps/s%s",
                    step,
                    row["loss"],
                    row["rec"],
                    row["perceptual"],
                    row["codebook"] + row["commit"],
                    row["g_adv"],
                    row["d_loss"],
                    row["psnr"],
                    100 * row["codebook_usage"],
                    rate,
                    _data_notes(row, crops),
                )
            if metrics:
                metrics.write(row)
            if step % cfg.ckpt_every == 0 or step == cfg.max_steps or stopping:
                _checkpoint(
                    d,
                    cfg,
                    step,
                    model,
                    disc,
                    opt,
                    opt_d,
                    stream,
                    used,
                    ckpt_local,
                    ckpt_remote,
                    metrics,
                )
            if stopping and step < cfg.max_steps:
                raise TrainingStopped(
                    stop.signame or "a signal to another rank", step, f"step {step}"
                )
    finally:
        stop.restore()

    # every rank's count, as logged (each rank reads its own shards); every rank gets the sum
    summary: dict[str, Any] = {
        "step": step,
        "broken_images": _broken_images(d, stream),
        "enlarged_crops": d.all_sum(stream.enlarged),
        "training_crops": step * cfg.batch_size * d.world,
    }
    if d.rank == 0 and 2 * summary["enlarged_crops"] > summary["training_crops"]:
        log.warning(
            "%s", enlarged_warning(cfg, summary["enlarged_crops"], summary["training_crops"], "all")
        )
    if d.world > 1:
        # every rank's last step is saved; the export and the evaluation are rank 0's alone and
        # need no collective, so no rank waits in one (a timeout) while they run
        dist.barrier()
    if d.rank == 0:
        export = storage.join(cfg.run_dir, "export")
        model.save_pretrained(export)
        summary["export"] = export
        log.info("exported tokenizer weights to %s", export)
        if cfg.eval_images > 0:
            from pipeline.tokenizer.evaluate import evaluate_model

            log.info(
                "end-of-training evaluation on %d crops of the TRAINING shards (not held out; "
                "for held-out figures run jobs/eval_tokenizer.py on other shards)",
                cfg.eval_images,
            )
            exact_fp32_on_cuda(d.device)  # as jobs/eval_tokenizer.py: no TF32 convolutions
            summary["eval"] = evaluate_model(
                model.eval(),
                shards,
                cfg.image_size,
                cfg.eval_images,
                batch_size=cfg.batch_size,
                inception_weights=cfg.inception_weights,
            )
            summary["eval"]["images_from"] = "training shards (not held out)"
            storage.write_json(storage.join(cfg.run_dir, "eval.json"), summary["eval"])
    return summary


def _broken_images(d: _Dist, stream: RawImageStream) -> int:
    """Distinct undecodable images skipped so far by all ranks (a collective): ranks read other
    shards from epoch to epoch, so one image may be skipped by several of them. (Plus the counts
    of states saved before the stream kept which images.)"""
    return d.count_distinct(stream.broken_ids) + d.all_sum(stream.broken - len(stream.broken_ids))


def enlarged_warning(
    cfg: TokenizerTrainConfig, enlarged: int, crops: int, which: str
) -> str | None:
    """The warning of training crops resized up from raw images smaller than the crop's draw:
    for ``which`` = "first" (rank 0's first ``crops`` of a run) and "all" (the whole run) only
    when they are most of them; for "some", whenever there are any."""
    if crops < 1 or enlarged < 1 or (which != "some" and 2 * enlarged <= crops):
        return None
    pct = 100 * enlarged / crops
    if which == "first":
        head = f"{enlarged} of the first {crops} training crops ({pct:.0f}%, rank 0's) were"
    elif which == "all":
        head = f"{enlarged} of the run's {crops} training crops ({pct:.0f}%) were"
    else:
        head = f"{enlarged} of the {crops} training crops so far ({pct:.0f}%) were"
    return (
        f"{head} ENLARGED (bicubic): their raw images are smaller than image_size x max_scale = "
        f"{cfg.image_size * cfg.max_scale:.0f} px, so the tokenizer learns to reconstruct blurred "
        f"upscales; LlamaGen's tokenizer crops full-size images (downscaled). data={cfg.data}: "
        "train on raw shards stored larger, raw/laion-hq (512 px, configs/data/download_hq.yaml) "
        "rather than raw/laion-coco (256 px centre crops), or set max_scale=1.0 for shards stored "
        "at image_size (enlarged_crops in metrics.jsonl counts them)"
    )


def _data_notes(row: dict[str, Any], crops: int) -> str:
    """The log line's tail for skipped and enlarged images, when there are any."""
    out = ""
    if row["enlarged_crops"]:
        out += f" | enlarged crops {100 * row['enlarged_crops'] / max(crops, 1):.0f}%"
    if row["broken_images"]:
        out += f" | broken images {row['broken_images']}"
    return out


def _start_at_step(opt: torch.optim.Optimizer, steps: int) -> None:
    """Give an Adam(W) that has not stepped yet the state of one that took ``steps`` steps on
    zero gradients (zero moments, the step count): what LlamaGen's discriminator optimizer holds
    when its GAN loss starts. Its first updates then get Adam's late-step bias correction, not
    the full-size early one. A no-op once the optimizer has state (a later step, a resume)."""
    for group in opt.param_groups:
        for p in group["params"]:
            if not opt.state[p]:
                opt.state[p] = {
                    "step": torch.tensor(float(steps)),
                    "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                }


def _checkpoint(
    d: _Dist,
    cfg: TokenizerTrainConfig,
    step: int,
    model: VQModel,
    disc: torch.nn.Module,
    opt: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer,
    stream: RawImageStream,
    used: torch.Tensor,
    local: str,
    remote: str | None,
    metrics: _Metrics | None,
) -> None:
    ranks = d.gather(
        {"rng": capture_rng_state(), "data": stream.state_dict(), "used": used.cpu().clone()}
    )
    if d.rank == 0:
        state = {
            "model": model.state_dict(),
            "disc": disc.state_dict(),
            "opt": opt.state_dict(),
            "opt_disc": opt_d.state_dict(),
            "step": step,
            "ranks": ranks,
            # the shard set fixes the data order: a resume reads exactly these
            "shards": [u.rsplit("/", 1)[-1] for u in stream.tar_uris],
            "config": json.dumps(to_dict(cfg)),
        }
        # the metrics first: a checkpoint complete on S3 before its steps' metrics were mirrored
        # (a kill in between) would resume with the history of those steps lost
        if metrics:
            metrics.mirror()
        ckpt.save_checkpoint(state, step, local, remote, cfg.keep_checkpoints)
    if d.world > 1:
        dist.barrier()  # nobody runs ahead into a step that a crash could leave unsaved


def _training_shards(data: str, state: dict[str, Any] | None) -> list[str]:
    """The shards to read: all complete ones, or on resume exactly the checkpoint's set."""
    current = list_complete_shards(data, required=True)
    if state is None:
        return nonempty_shards(current)
    uris = [storage.join(data, name) for name in state["shards"]]
    missing = sorted(set(uris) - set(current))
    if missing:
        raise RuntimeError(
            f"{len(missing)} shard(s) the run was reading are gone or incomplete (first: "
            f"{missing[0]}): an exact resume needs the same data"
        )
    if len(current) > len(uris):
        log.warning(
            "%d shard(s) were completed after this run started; a resumed run keeps its data "
            "order and does not read them (start a new run to include them)",
            len(current) - len(uris),
        )
    return uris


def _save_config(cfg: TokenizerTrainConfig) -> None:
    uri = storage.join(cfg.run_dir, "config.yaml")
    if storage.exists(uri):
        old = yaml.safe_load(storage.read_text(uri)) or {}
        new = to_dict(cfg)
        changed = sorted(k for k in new if old.get(k) != new[k])
        if changed:
            log.warning("config differs from the one saved in %s in: %s", uri, ", ".join(changed))
    save_config(cfg, uri)
