"""The sampling job: an exported GPT + VQ decoder + T5 encoder -> PNG images and a captioned grid.

Conditions are one prompt, a prompts file (one per line, blank lines skipped) or class labels.
Image ``j`` of prompt ``p`` is ``{p:05d}_{j:03d}.png`` and is drawn with its own seed, derived
from (``seed``, p, j) alone, so it comes out the same at any batch size, and a rerun after a kill
only samples the images that are missing. Beside the images: ``grid.png`` (one row per prompt,
its caption above), ``images.json`` (file, prompt, seed per image), ``summary.json`` (counts,
speed) and ``config.yaml`` (the resolved config).

The GPT export is training's layout (``pipeline.train.checkpoint.export_weights``):
``model.safetensors`` + ``gpt_config.json`` (+ ``export.json``, written last); read here without
importing the training engine.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import yaml
from PIL import Image, ImageDraw, ImageFont

from pipeline import storage
from pipeline.config import doc, save_config, to_dict
from pipeline.export_stamp import ID_KEY, begin_export, check_export
from pipeline.export_stamp import MARKER as EXPORT_MARKER
from pipeline.log import get_logger, progress
from pipeline.models.gpt import GPT, GPTConfig
from pipeline.precision import torch_dtype, warn_if_slow
from pipeline.sample import Sampler, SamplingParams

log = get_logger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAMES = ("gpt_config.json", "config.json")  # training's export; a plain config.json also


# --- the GPT export ---------------------------------------------------------------------------


def save_exported_gpt(model: GPT, uri: str) -> str:
    """Write ``model`` in the export layout (fp32 ``model.safetensors`` + ``gpt_config.json``)."""
    from safetensors.torch import save

    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    export_id = begin_export(uri)
    storage.write_bytes(storage.join(uri, WEIGHTS_NAME), save(state, {ID_KEY: export_id}))
    storage.write_json(storage.join(uri, CONFIG_NAMES[0]), dataclasses.asdict(model.cfg))
    info = {ID_KEY: export_id, "num_tensors": len(state)}
    storage.write_json(storage.join(uri, EXPORT_MARKER), info)
    return uri


def read_exported_config(uri: str) -> GPTConfig:
    """The :class:`GPTConfig` of the GPT export at ``uri``, its weights not read."""
    names = set(storage.list_dir(uri))
    if WEIGHTS_NAME not in names:
        raise FileNotFoundError(f"{uri}: no {WEIGHTS_NAME} (expected a GPT export folder)")
    cfg_name = next((n for n in CONFIG_NAMES if n in names), None)
    if cfg_name is None:
        raise FileNotFoundError(f"{uri}: no {' or '.join(CONFIG_NAMES)} beside the weights")
    raw = storage.read_json(storage.join(uri, cfg_name))
    known = {f.name for f in dataclasses.fields(GPTConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{uri}/{cfg_name}: unknown GPTConfig keys {unknown}")
    return GPTConfig(**raw)


def load_exported_gpt(uri: str, map_location: str = "cpu") -> GPT:
    """An exported GPT from a local dir or s3:// URI, in eval mode."""
    from safetensors.torch import load_file

    cfg = read_exported_config(uri)
    local = storage.local_copy(uri)
    path = os.path.join(local, WEIGHTS_NAME)
    marker = os.path.join(local, EXPORT_MARKER)
    check_export(uri, path, storage.read_json(marker) if os.path.exists(marker) else None)
    state = load_file(path, device=map_location)
    # wrappers add prefixes: DDP/DeepSpeed "module.", torch.compile "_orig_mod."
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    model = GPT(cfg)
    model.load_state_dict(state, strict=True)
    log.info(
        "loaded GPT (%d layers, dim %d, %s-conditioned, grid %d) from %s",
        cfg.n_layer,
        cfg.dim,
        cfg.cond,
        cfg.grid_size,
        uri,
    )
    return model.to(map_location).eval()


# --- config -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleConfig:
    """Generate images from an exported GPT."""

    checkpoint: str = doc("GPT export folder: model.safetensors + gpt_config.json (local or s3://)")
    vq: str = doc("VQ tokenizer export folder or LlamaGen .pt (local or s3://)")
    output: str = doc("folder for the PNGs, grid.png, images.json, summary.json (local or s3://)")
    text_encoder: str = doc("T5 encoder folder (local or s3://); needed for text prompts", "")
    text_dtype: Literal["float32", "bfloat16"] = doc(
        "T5 compute dtype: the one pretokenize used (text.dtype), so the GPT sees the features "
        "it was trained on",
        "float32",
    )
    clean_captions: bool = doc(
        "clean prompts before T5 as LlamaGen does (pipeline.models.text_encoder.clean_caption): "
        "the setting pretokenize used (text.clean_captions), so the GPT sees its kind of text",
        True,
    )
    vq_preset: str | None = doc("VQ preset for a bare checkpoint file (e.g. VQ-16)", None)
    prompt: str | None = doc("one prompt", None)
    prompts_file: str | None = doc("a text file, one prompt per line (local or s3://)", None)
    class_labels: list[int] = doc("class labels, for a class-conditioned model", [])
    images_per_prompt: int = doc("images per prompt (or class label)", 4)
    batch_size: int = doc("images sampled together (CFG doubles the rows)", 8)
    seed: int = doc("base seed; each image's seed is derived from (seed, prompt, index)", 0)
    sampling: SamplingParams = doc("cfg_scale, temperature, top_k, top_p", SamplingParams())
    grid_size: int | None = doc("token grid side (default: the model's)", None)
    dtype: Literal["float32", "bfloat16"] = doc(
        "GPT compute dtype (VQ decodes in fp32). On a GPU only float32 gives the same image for a "
        "seed every time (a rerun, a resumed run or another split into parts): measured on an "
        "H200, bf16 decoding of the same batch twice parted ways after 169-172 of 256 tokens",
        "float32",
    )
    device: str = doc("torch device", "cpu")
    compile_mode: str | None = doc(
        "torch.compile mode for the decode step (default, reduce-overhead, max-autotune); "
        "null: eager. Falls back to eager if compiling fails. bf16 on CPU in 'default' compiles "
        "the weights in as constants (inductor freezing: faster, one more copy of them)",
        None,
    )
    threads: int = doc(
        "torch CPU threads (0: torch's default). On a shared CPU box 1 can be much faster: "
        "OpenMP threads stall whenever another process holds a core",
        0,
    )
    overwrite: bool = doc(
        "delete images made with other settings in output instead of refusing to mix them", False
    )
    num_parts: int = doc(
        "split the images among this many processes (one per GPU), each run with its own part; "
        "a final run with num_parts=1 finds every image there and writes the grid and summary. "
        "Under a launcher of several ranks (torchrun, srun, mpirun) the ranks are the parts and "
        "rank 0 makes the final run: leave num_parts and part out",
        1,
    )
    part: int = doc("which part this process samples: images i with i % num_parts == part", 0)
    grid_max_prompts: int = doc("at most this many prompt rows in grid.png", 16)
    grid_caption_chars: int = doc("caption characters per line in grid.png", 60)

    def __post_init__(self) -> None:
        given = sum(
            x is not None and x != []
            for x in (self.prompt, self.prompts_file, self.class_labels or None)
        )
        if given != 1:
            raise ValueError("give exactly one of prompt, prompts_file, class_labels")
        if not self.class_labels and not self.text_encoder:
            # found here, not after the GPT and VQ are loaded (minutes for XL from S3)
            raise ValueError("text prompts need text_encoder (a local dir or s3:// URI of the T5)")
        if self.prompt is not None and not self.prompt.strip():
            # with clean_captions=false it would be encoded as the EOS token alone: the
            # unconditional caption, images of no prompt at all
            raise ValueError("prompt is empty: give the text to draw (or prompts_file)")
        if self.images_per_prompt < 1 or self.batch_size < 1:
            raise ValueError("images_per_prompt and batch_size must be >= 1")
        if not 0 <= self.part < self.num_parts:
            raise ValueError(f"part {self.part} is not in [0, num_parts={self.num_parts})")
        if self.overwrite and self.num_parts > 1:
            raise ValueError(
                "overwrite=true with num_parts > 1: parts would delete one another's images; "
                "clear the output first (or use a new one), then run the parts"
            )

    def mine(self, prompt_index: int, sample_index: int) -> bool:
        """Whether image ``(prompt_index, sample_index)`` is this part's to sample."""
        return (prompt_index * self.images_per_prompt + sample_index) % self.num_parts == self.part


@dataclass
class SampleResult:
    """What a sampling run produced."""

    output: str
    images: list[dict[str, Any]] = field(default_factory=list)  # file, prompt_index, prompt, seed
    sampled: int = 0  # images made by this run (the rest existed)
    skipped_prompts: dict[str, int] = field(default_factory=dict)  # reason -> count
    summary: dict[str, Any] = field(default_factory=dict)


# --- conditions -------------------------------------------------------------------------------


def read_prompts(uri: str) -> list[str]:
    """Prompts from a UTF-8 text file, one per line; blank lines dropped, whitespace trimmed."""
    data = storage.read_bytes(uri)
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark (spreadsheet exports) dropped
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ValueError(
            f"{uri}: not UTF-8 text (byte {data[e.start : e.start + 1]!r} at offset {e.start}, "
            f"line {line}: {e.reason}); re-encode the file as UTF-8, e.g. "
            "iconv -f latin1 -t utf-8 in.txt > out.txt"
        ) from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def image_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """A 63-bit seed for one image, independent of batching and of images_per_prompt."""
    return int(
        np.random.SeedSequence([seed, prompt_index, sample_index]).generate_state(2, np.uint64)[0]
        >> np.uint64(1)
    )


# the condition of a prompt whose images all exist: never sampled, so never encoded
_DONE = torch.empty(0)


def encode_prompts(
    uri: str,
    prompts: list[str],
    model_cfg: GPTConfig,
    device: str,
    dtype: str = "float32",
    clean_captions: bool = True,
    indices: list[int] | None = None,
) -> tuple[list[torch.Tensor | None], dict[str, int]]:
    """T5 features (L, D) float16 per prompt (None for a prompt that cannot be used), skips.

    ``indices``: the prompts' numbers in the job, for the warnings (default 0, 1, ...)."""
    from pipeline.models.text_encoder import TextEncoder, clean_caption

    if not uri:
        raise ValueError("text prompts need text_encoder (a local dir or s3:// URI of the T5)")
    numbers = list(range(len(prompts))) if indices is None else indices
    feats: list[torch.Tensor | None] = [None] * len(prompts)
    skipped: dict[str, int] = {}
    texts = prompts
    if clean_captions:
        # cleaned here, not in encode: a prompt that cleans to nothing (a bare URL, HTML tags,
        # punctuation) would encode as the EOS token alone, the unconditional caption, and its
        # images would be of no prompt at all
        texts = [clean_caption(p) for p in prompts]
        for i, t in enumerate(texts):
            if not t:
                log.warning(
                    "prompt %d is empty after cleaning: skipped (%r)", numbers[i], prompts[i][:80]
                )
                skipped["empty_after_cleaning"] = skipped.get("empty_after_cleaning", 0) + 1
    keep = [i for i, t in enumerate(texts) if t or not clean_captions]
    if not keep:  # nothing left to encode: no T5 loaded
        return feats, skipped
    # one prompt a forward pass: batched, a prompt is padded to the longest of the prompts it
    # happens to be encoded with (which a resumed run or a part chooses differently), and on a
    # GPU other shapes round differently in the low bits, so the image could change. T5 is a
    # small part of sampling's time
    enc = TextEncoder.from_pretrained(
        uri,
        device=device,
        dtype=dtype,
        max_length=model_cfg.max_text_tokens,
        batch_size=1,
        clean_captions=clean_captions,
    )
    if enc.dim != model_cfg.caption_dim:
        raise ValueError(
            f"text encoder gives {enc.dim}-d features, the GPT takes "
            f"{model_cfg.caption_dim}-d (caption_dim)"
        )
    # float16: what the token shards store, so what the model was trained on
    out = enc.encode([texts[i] for i in keep], out_dtype=torch.float16, clean=False)
    for i, f in zip(keep, out.features, strict=True):
        feats[i] = f
    for i in (keep[k] for k in out.nonfinite):
        log.warning(
            "prompt %d gives non-finite T5 features: skipped (%r)", numbers[i], prompts[i][:80]
        )
        feats[i] = None
        skipped["nonfinite_features"] = skipped.get("nonfinite_features", 0) + 1
    if out.n_truncated:
        log.warning(
            "%d prompts were cut to %d T5 tokens", out.n_truncated, model_cfg.max_text_tokens
        )
    return feats, skipped


def batch_text(feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad features to the longest (valid tokens last, as the training loader does)."""
    L = max(f.size(0) for f in feats)
    out = torch.zeros(len(feats), L, feats[0].size(1), dtype=feats[0].dtype)
    mask = torch.zeros(len(feats), L, dtype=torch.bool)
    for i, f in enumerate(feats):
        out[i, L - f.size(0) :] = f
        mask[i, L - f.size(0) :] = True
    return out, mask


# --- images -----------------------------------------------------------------------------------


def to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """VQ output (B, 3, H, W) in about [-1, 1] -> uint8 (B, H, W, 3)."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def make_grid(rows: list[tuple[str, list[Image.Image]]], caption_chars: int = 60) -> Image.Image:
    """One row per caption: the caption (wrapped) above its images."""
    cell_w = max(im.width for _, ims in rows for im in ims)
    cell_h = max(im.height for _, ims in rows for im in ims)
    cols = max(len(ims) for _, ims in rows)
    font = ImageFont.load_default(size=12)
    line_h, pad = 14, 4
    width = max(cols * cell_w, caption_chars * 7) + 2 * pad
    wrapped = [textwrap.wrap(cap, caption_chars)[:3] or [""] for cap, _ in rows]
    height = sum(len(w) * line_h + cell_h + 2 * pad for w in wrapped) + pad
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    y = pad
    for (_, ims), lines in zip(rows, wrapped):
        for line in lines:
            draw.text((pad, y), line, fill="black", font=font)
            y += line_h
        for c, im in enumerate(ims):
            grid.paste(im.convert("RGB"), (pad + c * cell_w, y))
        y += cell_h + 2 * pad
    return grid


# --- the job ----------------------------------------------------------------------------------


def run_sampling(
    cfg: SampleConfig, model: GPT | None = None, vq: Any | None = None
) -> SampleResult:
    """Sample every missing image of ``cfg``, then write grid.png, images.json, summary.json.

    ``model`` / ``vq`` may be given already loaded (the evaluation job does); otherwise they are
    loaded from ``cfg.checkpoint`` / ``cfg.vq``.
    """
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run_sampling(cfg, model, vq)
    finally:
        torch.set_num_threads(threads)


def _run_sampling(cfg: SampleConfig, model: GPT | None, vq: Any | None) -> SampleResult:
    from pipeline.models.vq import VQModel

    t_start = time.perf_counter()
    inputs = input_fingerprints(cfg)
    _check_output(cfg, inputs)
    _check_parts(cfg, inputs)
    save_config(cfg, storage.join(cfg.output, "config.yaml"))
    storage.write_json(storage.join(cfg.output, "inputs.json"), inputs)
    dtype = torch_dtype(cfg.dtype)
    warn_if_slow(dtype, cfg.device, "sampling (GPT)")
    # the config alone until there is something to sample: a finished job, or the final run
    # that collects the parts, reads no weights (GPT-XL is 3 GB in fp32)
    mcfg = model.cfg if model is not None else read_exported_config(cfg.checkpoint)
    g = cfg.grid_size or mcfg.grid_size
    result = SampleResult(output=cfg.output)

    # conditions: captions (text) or labels (class), one per "prompt"
    if mcfg.cond == "class":
        if not cfg.class_labels:
            raise ValueError("this GPT is class-conditioned: give class_labels")
        bad = [c for c in cfg.class_labels if not 0 <= c < mcfg.num_classes]
        if bad:
            raise ValueError(f"class labels {bad} outside [0, {mcfg.num_classes})")
        captions = [f"class {c}" for c in cfg.class_labels]
        conds: list[torch.Tensor | None] = [torch.tensor(c) for c in cfg.class_labels]
    else:
        if cfg.class_labels:
            raise ValueError("this GPT is text-conditioned: give prompt or prompts_file")
        captions = (
            [cfg.prompt.strip()] if cfg.prompt is not None else read_prompts(cfg.prompts_file)
        )
        if not captions:
            raise ValueError(f"no prompts in {cfg.prompts_file}")
    existing = set(storage.list_dir(cfg.output, ".png"))
    if mcfg.cond == "text":
        # only prompts with an image still to make: a finished (or resumed) job loads no T5
        need = [
            p
            for p in range(len(captions))
            if any(
                f"{p:05d}_{j:03d}.png" not in existing and cfg.mine(p, j)
                for j in range(cfg.images_per_prompt)
            )
        ]
        conds = [_DONE] * len(captions)
        if need:
            feats, result.skipped_prompts = encode_prompts(
                cfg.text_encoder,
                [captions[p] for p in need],
                mcfg,
                cfg.device,
                cfg.text_dtype,
                cfg.clean_captions,
                indices=need,
            )
            for p, f in zip(need, feats, strict=True):
                conds[p] = f
    todo = []
    for p, cond in enumerate(conds):
        for j in range(cfg.images_per_prompt):
            item = {
                "file": f"{p:05d}_{j:03d}.png",
                "prompt_index": p,
                "prompt": captions[p],
                "sample_index": j,
                "seed": image_seed(cfg.seed, p, j),
            }
            if cond is None:
                continue
            result.images.append(item)
            if item["file"] not in existing and cfg.mine(p, j):
                todo.append(item)
    log.info(
        "%d images for %d prompts: %d to sample, %d already there",
        len(result.images),
        len(captions),
        len(todo),
        len(result.images) - len(todo),
    )

    load_seconds = elapsed = 0.0
    if todo:
        t_load = time.perf_counter()
        model = (model or load_exported_gpt(cfg.checkpoint)).to(cfg.device, dtype).eval()
        vq = (vq or VQModel.from_pretrained(cfg.vq, cfg.vq_preset)).to(cfg.device).float().eval()
        if mcfg.vocab_size > vq.config.codebook_size:
            raise ValueError(
                f"GPT vocabulary {mcfg.vocab_size} exceeds the VQ codebook "
                f"{vq.config.codebook_size}: not the tokenizer this GPT was trained on"
            )
        if cfg.num_parts > 1:
            # before the first image, once the inputs loaded (a launch that fails on a mistyped
            # path leaves no record to refuse its corrected relaunch): a part started beside
            # this one, and the collecting run, find the settings of this part's images here
            # (config.yaml is whichever part wrote it last). Checked again: a part that wrote
            # its record while this one loaded is found now, not by the collecting run only
            storage.write_json(
                storage.join(cfg.output, _part_file("settings", cfg.part, cfg.num_parts)),
                {
                    "part": cfg.part,
                    "num_parts": cfg.num_parts,
                    "config": to_dict(cfg),
                    "inputs": inputs,
                },
            )
            _check_parts(cfg, inputs)
        use_cfg = cfg.sampling.cfg_scale != 1.0
        # rows by the whole job, not by what is left: a resumed run or one part of several
        # decodes with the same number of rows as one run would (a GEMM of other rows may
        # round differently, on a GPU especially), so its images are that run's
        rows = min(cfg.batch_size, len(conds) * cfg.images_per_prompt)
        sampler = Sampler(model, rows, g, use_cfg, cfg.compile_mode)
        batches = [
            todo[i : i + sampler.batch_size] for i in range(0, len(todo), sampler.batch_size)
        ]
        # the speed is sampling's alone: copying a 3 GB export from S3 says nothing about it
        # (a compiled decoder still compiles within its first batch)
        t_sample = time.perf_counter()
        load_seconds = t_sample - t_load
        for batch in progress(batches, "sample", unit="batch"):
            rows = [conds[it["prompt_index"]] for it in batch]
            if mcfg.cond == "class":
                cond, mask = torch.stack(rows), None
            else:
                cond, mask = batch_text(rows)
            tokens = sampler.sample(cond, mask, cfg.sampling, [it["seed"] for it in batch])
            # one image per decode: a conv over a batch of 4 rounds a few pixels differently from
            # a batch of 1, and an image must not depend on what it was batched with
            codes = tokens.view(-1, 1, g, g)
            images = np.concatenate([to_uint8_hwc(vq.decode(c)) for c in codes])
            for it, arr in zip(batch, images):
                storage.write_bytes(storage.join(cfg.output, it["file"]), png_bytes(arr))
            result.sampled += len(batch)
        elapsed = time.perf_counter() - t_sample
        result.summary["compile_mode"] = sampler.compile_mode
        result.summary["frozen_weights"] = sampler.decoder.frozen
    if cfg.num_parts > 1:  # the grid, manifest and summary are the final run's (num_parts=1)
        part_summary = {
            "part": cfg.part,
            "num_parts": cfg.num_parts,
            "sampled": result.sampled,
            "sample_seconds": round(elapsed, 3),
            "load_seconds": round(load_seconds, 3),
            "skipped_prompts": result.skipped_prompts,
        }
        name = _part_file("summary", cfg.part, cfg.num_parts)
        storage.write_json(storage.join(cfg.output, name), part_summary)
        result.summary.update(part_summary)
        log.info(
            "part %d/%d: sampled %d images into %s; run once more with num_parts=1 (it samples "
            "nothing if every part finished) for grid.png, images.json and summary.json",
            cfg.part, cfg.num_parts, result.sampled, cfg.output,
        )  # fmt: skip
        return result

    _write_grid(cfg, result)
    storage.write_json(storage.join(cfg.output, "images.json"), result.images)
    # a collecting run after parts samples little or nothing: the speed is the parts' (their
    # images over their summed sampling seconds, the rate of one process)
    parts = _part_summaries(cfg.output)
    n, secs = result.sampled, elapsed
    if parts:
        result.summary["parts"] = {
            "count": len(parts),
            "sampled": sum(p["sampled"] for p in parts),
            "sample_seconds": round(sum(p["sample_seconds"] for p in parts), 3),
            "load_seconds": round(sum(p.get("load_seconds", 0.0) for p in parts), 3),
        }
        if not n:
            n, secs = result.summary["parts"]["sampled"], result.summary["parts"]["sample_seconds"]
    result.summary.update(
        {
            "images": len(result.images),
            "sampled": result.sampled,
            "prompts": len(captions),
            "skipped_prompts": result.skipped_prompts,
            "sample_seconds": round(elapsed, 3),
            "load_seconds": round(load_seconds, 3),
            "images_per_second": round(n / secs, 4) if n and secs else None,
            "tokens_per_second": round(n * g * g / secs, 2) if n and secs else None,
            "total_seconds": round(time.perf_counter() - t_start, 3),
            "grid_size": g,
            "dtype": cfg.dtype,
            "device": cfg.device,
            "batch_size": cfg.batch_size,
        }
    )
    storage.write_json(storage.join(cfg.output, "summary.json"), result.summary)
    log.info(
        "sampled %d images (%s img/s) into %s",
        result.sampled,
        result.summary["images_per_second"],
        cfg.output,
    )
    return result


def _part_summaries(output: str) -> list[dict[str, Any]]:
    """The ``summary.part-*.json`` files the parts of a job wrote into ``output``."""
    return [storage.read_json(storage.join(output, n)) for n in _part_summary_names(output)]


def _part_summary_names(output: str) -> list[str]:
    return [n for n in storage.list_dir(output, suffix=".json") if n.startswith("summary.part-")]


def _part_settings_names(output: str) -> list[str]:
    """The ``settings.part-*.json`` files: the settings each part samples with (its config and
    input fingerprints), written before it samples."""
    return [n for n in storage.list_dir(output, suffix=".json") if n.startswith("settings.part-")]


def _part_file(kind: Literal["summary", "settings"], part: int, num_parts: int) -> str:
    return f"{kind}.part-{part:03d}-of-{num_parts:03d}.json"


# the settings an image depends on: a rerun with the same ones keeps the images already there
IMAGE_SETTINGS = (
    "checkpoint",
    "vq",
    "vq_preset",
    "text_encoder",
    "text_dtype",
    "clean_captions",
    "prompt",
    "prompts_file",
    "class_labels",
    "seed",
    "sampling",
    "grid_size",
    "dtype",
    "device",  # by type: CPU and CUDA generators give other draws for the same seed
)


# settings that change only the rounding of the decode (the rows a GEMM sees, compiled kernels):
# a rerun with others is accepted, and warned about
ROUNDING_SETTINGS = ("batch_size", "compile_mode")


# settings naming files whose content decides the images: a model exported again or a prompts
# file rewritten at the same URI changes the images as much as another URI does
INPUT_FILES = ("checkpoint", "vq", "text_encoder", "prompts_file")


def _image_setting(key: str, value: Any) -> Any:
    if key == "device" and isinstance(value, str):
        return torch.device(value).type  # cuda:0 and cuda:1 draw alike
    if key in INPUT_FILES and isinstance(value, str) and value:
        # one file written several ways: a trailing '/', file://, a path relative to the cwd
        uri = storage.normalize(value).rstrip("/")
        return uri if storage.is_remote(uri) else os.path.abspath(uri)
    return value


# what the job writes for image (p, j): other PNGs there (grid.png) are not samples
SAMPLE_NAME = re.compile(r"\d{5}_\d{3}\.png")


def _sample_files(output: str) -> list[str]:
    return [n for n in storage.list_dir(output, ".png") if SAMPLE_NAME.fullmatch(n)]


def input_fingerprints(cfg: SampleConfig) -> dict[str, str | None]:
    """What the files of :data:`INPUT_FILES` hold now (:func:`pipeline.storage.fingerprint`:
    content, not times; None: not a file, e.g. a preset name)."""
    return {
        k: storage.fingerprint(getattr(cfg, k)) if getattr(cfg, k) else None for k in INPUT_FILES
    }


def _setting_changes(
    saved: dict[str, Any],
    saved_inputs: dict[str, str | None],
    now: dict[str, Any],
    inputs: dict[str, str | None],
) -> tuple[list[str], list[str]]:
    """How ``now`` (a config as :func:`to_dict` gives it, its input fingerprints ``inputs``)
    differs from an earlier run's ``saved`` config and ``saved_inputs``: the image settings
    that change the images, and the rounding settings, each as ``"key: saved -> now"``."""
    if saved and "clean_captions" not in saved:
        saved = {**saved, "clean_captions": False}  # saved before prompts were cleaned
    # an input there then and now is judged by its content, whichever URI names it. One absent
    # now is judged by its URI alone, not as changed content: a finished job reads no T5, and a
    # run that needs the input fails loading it, naming the path (where overwrite=true, the
    # advice for changed settings, would have deleted every image)
    by_content = {k for k in INPUT_FILES if saved_inputs.get(k) and inputs.get(k)}
    changed = []
    for k in IMAGE_SETTINGS:
        if k not in saved or (
            k in by_content and storage.same_content(saved_inputs[k], now[k], inputs[k])
        ):
            continue
        if _image_setting(k, saved[k]) != _image_setting(k, now[k]):
            changed.append(f"{k}: {saved[k]!r} -> {now[k]!r}")
        elif k in by_content:
            changed.append(f"the content of {k} {now[k]!r}")
    rounding = [
        f"{k}: {saved[k]!r} -> {now[k]!r}"
        for k in ROUNDING_SETTINGS
        if k in saved and saved[k] != now[k]
    ]
    return changed, rounding


def _check_output(cfg: SampleConfig, inputs: dict[str, str | None]) -> None:
    """Refuse (or with overwrite, clear) an output whose images came from other settings, or
    from other content at the same model or prompts URIs (``inputs``, saved beside them)."""
    saved_uri = storage.join(cfg.output, "config.yaml")
    if not storage.exists(saved_uri):
        return
    saved = yaml.safe_load(storage.read_text(saved_uri)) or {}
    inputs_uri = storage.join(cfg.output, "inputs.json")
    saved_inputs = storage.read_json(inputs_uri) if storage.exists(inputs_uri) else {}
    changed, rounding = _setting_changes(saved, saved_inputs, to_dict(cfg), inputs)
    if not changed and rounding and _sample_files(cfg.output):
        log.warning(
            "%s: this run's %s differ from the earlier run's; its images are drawn from the same "
            "distribution with the same seeds, but their floats round differently: they need not "
            "be the images the earlier settings would have given",
            cfg.output,
            "; ".join(rounding),
        )
    if not changed:
        return
    samples = _sample_files(cfg.output)
    if not samples:
        return
    if not cfg.overwrite:
        raise ValueError(
            f"{cfg.output} holds {len(samples)} images sampled with other settings "
            f"({'; '.join(changed)}); use a new output or overwrite=true"
        )
    log.info("overwrite: deleting %d images made with other %s", len(samples), "; ".join(changed))
    # the old grid.png with them, and what described them: images.json and summary.json (a run
    # killed before its own would leave them naming deleted images) and the parts' summaries
    # (a collecting run sums every summary.part-*.json it finds into its speed) and settings
    described = {
        "images.json",
        "summary.json",
        *_part_summary_names(cfg.output),
        *_part_settings_names(cfg.output),
    }
    for name in storage.list_dir(cfg.output):
        if name.endswith(".png") or name in described:
            storage.remove(storage.join(cfg.output, name))


def _check_parts(cfg: SampleConfig, inputs: dict[str, str | None]) -> None:
    """Refuse (or with overwrite, clear) the images of parts that sample with other settings
    than this run's. Parts started together all pass :func:`_check_output` (no config.yaml yet,
    or one another's, and no images), then each writes its own: config.yaml alone cannot tell
    that their images were mixed. So each part records its settings (settings.part-*.json)
    before it samples, and every run, part or collecting, compares them with its own."""
    now = to_dict(cfg)
    samples = _sample_files(cfg.output)
    conflicts = []  # (record name, part, num_parts, its images there, the changes)
    rounding_parts = []
    for name in _part_settings_names(cfg.output):
        rec = storage.read_json(storage.join(cfg.output, name))
        k, n, ipp = rec["part"], rec["num_parts"], rec["config"]["images_per_prompt"]
        changed, rounding = _setting_changes(rec["config"], rec["inputs"], now, inputs)
        theirs = [f for f in samples if (int(f[:5]) * ipp + int(f[6:9])) % n == k]
        if changed and (theirs or (k, n) != (cfg.part, cfg.num_parts)):
            # another part's record counts without images: it may be sampling right now (this
            # part's own, imageless, is from a try that made nothing; it is replaced)
            conflicts.append((name, k, n, theirs, changed))
        elif not changed and rounding and theirs:
            rounding_parts.append(f"part {k} of {n}: {'; '.join(rounding)}")
    if rounding_parts:
        log.warning(
            "%s: parts sampled with other %s than this run's; their images are drawn from the "
            "same distribution with the same seeds, but their floats round differently",
            cfg.output,
            " / ".join(rounding_parts),
        )
    if not conflicts:
        return
    described = "; ".join(
        f"part {k} of {n} ({name}, {len(theirs)} images there) with {'; '.join(changed)}"
        for name, k, n, theirs, changed in conflicts
    )
    if not cfg.overwrite:
        how = "num_parts=1 and overwrite=true" if cfg.num_parts > 1 else "overwrite=true"
        records = [
            storage.join(cfg.output, name) for name, _, _, theirs, _ in conflicts if not theirs
        ]
        idle = (
            ". A part with no images there that is not running (it failed before its first "
            f"image) holds nothing: delete its record ({', '.join(records)})"
            if records
            else ""
        )
        raise ValueError(
            f"{cfg.output}: parts sampled (or are sampling) with other settings than this run "
            f"(theirs -> this run's): {described}; their images are not this run's. Use a new "
            f"output, or a run with {how} to delete them{idle}"
        )
    # overwrite is a run of one (SampleConfig refuses it with parts): nothing samples beside it
    log.info("overwrite: deleting the images of parts with other settings: %s", described)
    for name, k, n, theirs, _ in conflicts:
        for f in [*theirs, name, _part_file("summary", k, n)]:
            storage.remove(storage.join(cfg.output, f))
    for f in ("grid.png", "images.json", "summary.json"):
        storage.remove(storage.join(cfg.output, f))


def _write_grid(cfg: SampleConfig, result: SampleResult) -> None:
    by_prompt: dict[int, list[dict[str, Any]]] = {}
    for it in result.images:
        by_prompt.setdefault(it["prompt_index"], []).append(it)
    rows = []
    for p in sorted(by_prompt)[: cfg.grid_max_prompts]:
        ims = [
            Image.open(io.BytesIO(storage.read_bytes(storage.join(cfg.output, it["file"]))))
            for it in by_prompt[p]
        ]
        rows.append((by_prompt[p][0]["prompt"], ims))
    if not rows:
        log.warning("no images: no grid written")
        return
    grid = make_grid(rows, cfg.grid_caption_chars)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "grid.png")
        grid.save(path)
        storage.put_file(path, storage.join(cfg.output, "grid.png"))


def load_manifest(output: str) -> list[dict[str, Any]]:
    """The images.json of a finished sampling run."""
    uri = storage.join(output, "images.json")
    if not storage.exists(uri):
        if _part_summaries(output):
            raise FileNotFoundError(
                f"no images.json at {uri}: the images there were sampled in parts and never "
                "collected; run the sampling once more with num_parts=1 (it samples nothing if "
                "every part finished) for grid.png, images.json and summary.json"
            )
        raise FileNotFoundError(
            f"no images.json at {uri}: not the output of a finished sampling run"
        )
    return json.loads(storage.read_text(uri))
