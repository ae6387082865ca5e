"""Evaluation: FID and CLIP score of generated images over a caption set, plus tokenizer metrics.

The captions (a .txt file with one per line, a .csv/.tsv with a caption column, or a COCO
``captions_*.json``: its first caption of each image) are sampled through the sampling job (``pipeline.sample_job``: resumable,
under ``{output}/samples``), or an earlier sampling output is given as ``generated``. Then:

- CLIP score: the CLIPScore paper's (Hessel et al., 2021) per-image ``100 * max(cos(image,
  caption), 0)`` averaged over images (torchmetrics' ``CLIPScore`` clamps the mean instead: the
  same number whenever no image scores below 0, as real image-caption pairs practically never do), computed with open_clip (as ``pipeline.models.aesthetic``) from a LOCAL or s3:// state
  dict; OpenAI's ViT-L/14 (``ViT-L-14-quickgelu``) is the usual choice.
- FID: torchmetrics' ``FrechetInceptionDistance`` against ``reference_images`` (a folder of image
  files, sub-folders included, or of raw img2dataset shards), with torch-fidelity's InceptionV3
  weights from a LOCAL or s3:// file. ``fid_protocol`` says how both sides are brought to
  Inception's 299 px (:func:`fid_input`): "llamagen" as LlamaGen's evaluations/t2i (clean-fid), or
  "torch-fidelity", this pipeline's earlier protocol, whose numbers do not compare with theirs.
- Tokenizer reconstruction (PSNR, SSIM, codebook usage, rFID) from
  ``pipeline.tokenizer.evaluate`` on raw shards, when ``tokenizer_data`` is given.

Nothing is downloaded: a metric whose weights are not given is reported as ``unavailable: pass
...`` and the rest of the report is still written (``report.json`` and ``report.md``). FID on a
few thousand images is biased upwards; compare only runs with the same caption set and count
(the paper's COCO numbers use 30k captions).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import yaml
from PIL import Image

from pipeline import storage
from pipeline.config import doc, save_config, to_dict
from pipeline.data.raw import PIL_FORMATS, center_crop, to_rgb
from pipeline.log import get_logger, progress
from pipeline.sample import SamplingParams
from pipeline.sample_job import SAMPLE_NAME, SampleConfig, load_manifest, run_sampling

log = get_logger(__name__)

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# the decoders of IMAGE_EXTS, and no more: sniffing every format would let EPS start Ghostscript
IMAGE_FORMATS = (*PIL_FORMATS, "BMP")
# InceptionV3's input size: torch-fidelity resizes any other size to it (TF1-style bilinear)
INCEPTION_SIZE = 299


@dataclass(frozen=True)
class EvalConfig:
    """Sample a caption set and score it: CLIP score, FID, tokenizer reconstruction."""

    output: str = doc("report folder: report.json, report.md, samples/ (local or s3://)")
    captions: str = doc("captions file: .txt (one per line), .csv/.tsv, or COCO captions .json", "")
    caption_column: str = doc("caption column of a .csv/.tsv", "caption")
    max_captions: int = doc("use the first N captions (0: all; COCO .json: one per image)", 0)
    generated: str | None = doc(
        "an earlier sampling output (with images.json) to score instead of sampling", None
    )
    checkpoint: str = doc("GPT export folder (when sampling)", "")
    vq: str = doc("VQ tokenizer export or LlamaGen .pt (for sampling and tokenizer metrics)", "")
    vq_preset: str | None = doc("VQ preset for a bare checkpoint file", None)
    text_encoder: str = doc("T5 encoder folder (when sampling)", "")
    text_dtype: Literal["float32", "bfloat16"] = doc(
        "T5 compute dtype: the one pretokenize used (text.dtype)", "float32"
    )
    clean_captions: bool = doc(
        "clean the captions as LlamaGen does before T5: the setting pretokenize used "
        "(text.clean_captions), so the GPT is scored on its kind of text",
        True,
    )
    images_per_caption: int = doc("images sampled per caption", 1)
    batch_size: int = doc("images sampled together", 8)
    seed: int = doc("base sampling seed", 0)
    sampling: SamplingParams = doc("cfg_scale, temperature, top_k, top_p", SamplingParams())
    dtype: Literal["float32", "bfloat16"] = doc("GPT compute dtype", "float32")
    device: str = doc("torch device", "cpu")
    compile_mode: str | None = doc("torch.compile mode for decoding (null: eager)", None)
    threads: int = doc("torch CPU threads (0: default)", 0)
    overwrite: bool = doc(
        "delete samples made with other settings in output/samples instead of refusing", False
    )
    num_parts: int = doc(
        "sample in this many processes (one per GPU, each with its own part; no metrics), then "
        "run once with num_parts=1 for the report. Under a launcher of several ranks (torchrun, "
        "srun, mpirun) the ranks are the parts and rank 0 writes the report: leave it out",
        1,
    )
    part: int = doc("the part of the images this process samples (i % num_parts == part)", 0)
    clip_model: str = doc("open_clip model name for CLIP score", "ViT-L-14-quickgelu")
    clip_weights: str = doc("open_clip state dict (local or s3://); empty: no CLIP score", "")
    clip_model_config: str | None = doc("open_clip model-config JSON to register first", None)
    reference_images: str | None = doc(
        "folder of real images (sub-folders included) or raw shards for FID", None
    )
    max_reference_images: int = doc("at most this many reference images (0: all)", 0)
    fid_protocol: Literal["llamagen", "torch-fidelity"] = doc(
        "how images reach Inception's 299 px. llamagen: as LlamaGen's evaluations/t2i with "
        "clean-fid (centre square, PIL LANCZOS to fid_image_size, PIL bicubic to 299); "
        "torch-fidelity: this pipeline's earlier FID (references bicubic-cropped to the generated "
        "size, torch-fidelity's bilinear resize to 299), for comparisons with earlier reports",
        "llamagen",
    )
    fid_image_size: int = doc("llamagen protocol: the size both sides are resized to first", 256)
    inception_weights: str | None = doc(
        "torch-fidelity InceptionV3 weights (weights-inception-2015-12-05-6726825d.pth)", None
    )
    tokenizer_data: str | None = doc("raw shards for tokenizer reconstruction metrics", None)
    tokenizer_images: int = doc("images for tokenizer metrics", 1000)
    tokenizer_image_size: int = doc("center crop for tokenizer metrics", 256)
    metrics_batch_size: int = doc("images per CLIP / Inception forward pass", 32)

    def __post_init__(self) -> None:
        # 0 means "all" for the max_ limits alone: tokenizer_images is a count, and reading 0
        # as "all" could mean a pass over a whole data set nobody asked for
        if self.tokenizer_images < 1:
            raise ValueError(f"tokenizer_images must be >= 1, got {self.tokenizer_images}")
        if self.fid_image_size < 1:
            raise ValueError(f"fid_image_size must be >= 1, got {self.fid_image_size}")
        for name in ("max_captions", "max_reference_images"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0: all), got {getattr(self, name)}")


# --- inputs -----------------------------------------------------------------------------------


def read_captions(uri: str, column: str = "caption", limit: int = 0) -> list[str]:
    """Captions from .txt / .csv / .tsv / COCO .json; whitespace collapsed, empty ones dropped."""
    try:
        text = storage.read_text(uri)
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{uri}: not UTF-8 text (byte {exc.object[exc.start : exc.start + 1]!r} at offset "
            f"{exc.start}); re-encode it as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from exc
    text = text.removeprefix("\ufeff")  # the byte-order mark spreadsheet exports begin with
    low = uri.lower()
    if low.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{uri}: not valid JSON ({exc})") from exc
        caps = _json_captions(data, uri)
    elif low.endswith((".csv", ".tsv")):
        delim = "\t" if low.endswith(".tsv") else ","
        first, _, body = text.partition("\n")
        header = next(csv.reader([first], delimiter=delim), [])
        if column not in header:
            raise ValueError(f"{uri}: no column {column!r} (columns: {header})")
        if len(header) == 1:
            # one column: each line is a caption. Files written without quoting (LlamaGen's
            # coco_captions.csv) hold the delimiter and stray quotes as the caption's own; a
            # line that is one quoted field is unquoted
            caps = []
            for line in body.splitlines():
                row = next(csv.reader([line], delimiter=delim), [])
                quoted = line.startswith('"') and line.rstrip().endswith('"') and len(row) == 1
                caps.append(row[0] if quoted else line)
        else:
            reader = csv.reader(io.StringIO(body), delimiter=delim)
            i, caps = header.index(column), []
            for row in reader:
                if len(row) > len(header):
                    raise ValueError(
                        f"{uri}:{reader.line_num + 1}: {len(row)} fields for {len(header)} "
                        f"columns (a caption with an unquoted {delim!r}?)"
                    )
                caps.append(row[i] if i < len(row) else "")
    else:
        caps = text.splitlines()
    caps = [" ".join(str(c).split()) for c in caps]
    caps = [c for c in caps if c]
    return caps[:limit] if limit else caps


def _caption_of(entry: Any, uri: str, where: str) -> str | None:
    """A JSON entry's caption (a string, or an object's string "caption"); None for null."""
    if isinstance(entry, dict):
        if "caption" not in entry:
            raise ValueError(f"{uri}: {where} has no 'caption' (keys: {sorted(entry)[:10]})")
        entry, where = entry["caption"], f"{where}'s caption"
    if entry is None or isinstance(entry, str):
        return entry
    raise ValueError(f"{uri}: {where} is of type {type(entry).__name__}, not a string")


def _json_captions(data: Any, uri: str) -> list[str]:
    """The captions of a JSON list (strings, or objects with "caption") or COCO captions file;
    null and empty captions are dropped (counted in a warning), any other entry is an error."""
    if isinstance(data, dict):
        if not isinstance(data.get("annotations"), list):
            raise ValueError(
                f"{uri}: a JSON object without an 'annotations' list (keys: {sorted(data)[:10]}); "
                "expected COCO captions or a list of captions"
            )
        # COCO holds ~5 captions per image, one after another: the first N annotations were
        # N/5 images described 5 times. One caption per image, as 30k-caption FID protocols
        # sample: each image's first (non-empty) caption, in the order of "images"
        first: dict[Any, str] = {}
        for i, r in enumerate(data["annotations"]):
            if not isinstance(r, dict):
                raise ValueError(f"{uri}: annotation {i} is a {type(r).__name__}, not an object")
            cap = _caption_of(r, uri, f"annotation {i}")
            if cap and cap.strip():
                first.setdefault(r.get("image_id", ("annotation", i)), cap)
        order = {
            im["id"]: n
            for n, im in enumerate(data.get("images") or [])
            if isinstance(im, dict) and "id" in im
        }
        # stable: images missing from "images" follow, in annotation order
        return [first[k] for k in sorted(first, key=lambda k: order.get(k, len(order)))]
    if not isinstance(data, list):
        raise ValueError(
            f"{uri}: JSON {type(data).__name__}, not a list of captions or COCO captions"
        )
    caps = [_caption_of(r, uri, f"entry {i}") for i, r in enumerate(data)]
    empty = sum(not (c and c.strip()) for c in caps)
    if empty:
        log.warning("%s: %d null or empty captions of %d skipped", uri, empty, len(caps))
    return [c for c in caps if c]


def _load_image(data: bytes, name: str) -> Image.Image | None:
    try:
        img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        img.load()
        # as raw shards are read: 16-bit PNGs scaled, not clipped; transparency on white
        return to_rgb(img)[0]
    except Exception as exc:  # noqa: BLE001 - a bad file is a counted skip
        log.warning("unreadable image %s skipped: %s", name, exc)
        return None


@dataclass
class ReferenceCounts:
    """What :func:`iter_reference_images` passed over on its way to the images it yielded."""

    unreadable: int = 0  # image files (or shard images) that did not decode
    skipped_files: int = 0  # files that are not images by their extension


def iter_reference_images(
    uri: str, limit: int = 0, counts: ReferenceCounts | None = None
) -> Iterator[Image.Image]:
    """Reference images as RGB PIL images, whole (:func:`fid_input` crops them): the image files
    under ``uri``, in sub-folders too (sorted), or raw shards (their broken images skipped, as
    ``pipeline.data.raw.iter_eval_images`` does). ``counts`` is filled with what was skipped."""
    from pipeline.data.raw import decode_image, iter_raw_samples, list_complete_shards

    counts = counts if counts is not None else ReferenceCounts()
    shards = list_complete_shards(uri)
    if shards:
        decoded = (decode_image(s) for s in iter_raw_samples(shards))
    else:
        decoded = (_load_image(storage.read_bytes(p), p) for p in _reference_files(uri, counts))
    n = 0
    for img in decoded:
        if img is None:
            counts.unreadable += 1
            continue
        yield img
        n += 1
        if limit and n >= limit:
            return


def _reference_files(uri: str, counts: ReferenceCounts) -> Iterator[str]:
    for rel in storage.walk_files(uri):
        if rel.lower().endswith(IMAGE_EXTS):
            yield storage.join(uri, rel)
        else:
            counts.skipped_files += 1


def fid_input(img: Image.Image, protocol: str, size: int) -> torch.Tensor:
    """``img`` (generated or reference) as the uint8 (3, H, W) image the FID metric is given.

    "llamagen": as LlamaGen's evaluations/t2i/evaluation.py (``compute_fid``: clean-fid's
    ``compute_fid`` in its default "clean" mode, with their ``custom_image_tranform``), so that
    FIDs compare with the ones they report: the centre square of the short side (torchvision's
    ``center_crop``, their ``CenterCropLongEdge``: offsets rounded half to even, not floored), PIL
    LANCZOS to ``size`` (their eval_res, 256), then clean-fid's resize to 299 x 299: PIL BICUBIC
    on each channel as a float ("F") image, which keeps the fractions an 8-bit resize would round.
    clean-fid feeds that float image to Inception; torchmetrics takes uint8 only, so it is rounded
    here, and clipped to 0..255 (bicubic overshoots at hard edges): the one step that differs from
    clean-fid's input, 0.25 grey levels on average (at most 0.5 where nothing clips) on 1/f-noise
    images, 0.02 on flat synthetic shapes, whose few clipped edge pixels move up to ~20 levels
    (tests/test_evaluate.py checks the bound). At 299 px already, torch-fidelity's own resize to
    299 leaves the image as it is.

    "torch-fidelity": this pipeline's FID before ``fid_protocol`` (kept to compare with the reports
    of that time): the short side resized bicubic to ``size`` (the generated size) and the centre
    square cropped (:func:`pipeline.data.raw.center_crop`), a no-op on the generated ``size`` px
    squares; torch-fidelity then resizes to 299 with TF1-style bilinear without antialiasing. On
    1/f-noise images Inception's input is 2.4 (256 px) to 6.0 (512 px) grey levels on average from
    clean-fid's: FIDs that do not compare with LlamaGen's.
    """
    if protocol == "torch-fidelity":
        return pil_to_uint8(center_crop(img, size))
    if protocol != "llamagen":
        raise ValueError(f"unknown fid_protocol {protocol!r}")
    w, h = img.size
    s = min(w, h)
    left, top = int(round((w - s) / 2.0)), int(round((h - s) / 2.0))
    img = img.convert("RGB").crop((left, top, left + s, top + s))
    img = img.resize((size, size), Image.Resampling.LANCZOS)
    a = np.asarray(img, dtype=np.float32)
    # one float32 ("F" mode) image per channel: PIL resizes 8-bit RGB with 8-bit results
    chans = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(a[..., c])).resize(
                (INCEPTION_SIZE, INCEPTION_SIZE), Image.Resampling.BICUBIC
            )
        )
        for c in range(3)
    ]
    return torch.from_numpy(np.rint(np.stack(chans)).clip(0, 255).astype(np.uint8))


def pil_to_uint8(img: Image.Image) -> torch.Tensor:
    """A PIL image as uint8 (3, H, W)."""
    return torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1)


def _batched(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for x in items:
        batch.append(x)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# --- CLIP score -------------------------------------------------------------------------------


def unavailable(what: str, how: str, missing: str | None = None) -> str:
    """The report note of a metric that cannot be computed here."""
    where = f"{missing} does not exist; " if missing else ""
    return (
        f"unavailable: {where}pass {how} ({what} uses local or s3:// weights only; nothing "
        "is downloaded)"
    )


def _missing(uri: str | None) -> str | None:
    """``uri`` when it is given but absent, else None."""
    return uri if uri and not storage.exists(uri) else None


def load_clip(
    name: str, weights: str, model_config: str | None = None, device: str = "cpu"
) -> tuple[torch.nn.Module, Any, Any]:
    """(open_clip model, image preprocess, tokenizer) from a local or s3:// state dict."""
    import open_clip

    from pipeline.models.aesthetic import _check_not_torchscript

    if model_config:
        open_clip.add_model_config(storage.local_copy(model_config))
    if name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {name!r}; pass clip_model_config")
    path = storage.local_copy(weights)
    _check_not_torchscript(path, weights)
    model, _, preprocess = open_clip.create_model_and_transforms(
        name, pretrained=path, require_pretrained=True
    )
    return model.to(device).eval(), preprocess, open_clip.get_tokenizer(name)


@torch.no_grad()
def clip_scores(
    model: torch.nn.Module,
    preprocess: Any,
    tokenizer: Any,
    images: list[Image.Image],
    captions: list[str],
    batch_size: int = 32,
) -> torch.Tensor:
    """Per-image CLIP score ``100 * max(cos(image, caption), 0)`` (the CLIPScore paper's)."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        ims = torch.stack([preprocess(im) for im in images[start : start + batch_size]]).to(device)
        txt = tokenizer(captions[start : start + batch_size]).to(device)
        a = model.encode_image(ims).float()
        b = model.encode_text(txt).float()
        cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
        out.append(100 * cos.clamp_min(0).cpu())
    return torch.cat(out) if out else torch.zeros(0)


# --- FID --------------------------------------------------------------------------------------


def build_fid(inception_weights: str | None) -> tuple[Any | None, str]:
    """torchmetrics FID with InceptionV3 weights from a local / s3:// file, or (None, why)."""
    if not inception_weights or _missing(inception_weights):
        return None, unavailable(
            "FID",
            "inception_weights=<torch-fidelity weights-inception-2015-12-05-6726825d.pth>",
            _missing(inception_weights),
        )
    from pipeline.tokenizer.evaluate import build_fid as build_tokenizer_fid

    fid, _ = build_tokenizer_fid(inception_weights)
    return fid, f"InceptionV3 weights from {inception_weights}"


@torch.no_grad()
def update_fid(fid: Any, images: Iterator[torch.Tensor], real: bool, batch_size: int = 32) -> int:
    """Feed uint8 (3, H, W) images to the FID metric; returns how many."""
    n = 0
    for batch in _batched(images, batch_size):
        fid.update(torch.stack(batch).to(fid.device), real=real)  # the metric's device
        n += len(batch)
    return n


def finish_fid(fid: Any, n_real: int, n_fake: int) -> tuple[float | None, str]:
    """(FID or None, note) once both sides are in."""
    if min(n_real, n_fake) < 2:
        return None, "unavailable: FID needs at least 2 real and 2 generated images"
    n = min(n_real, n_fake)
    note = (
        ""
        if n >= 2048
        else (f"only {n} images: FID is biased upwards at this size; compare like with like")
    )
    return float(fid.compute()), note


def compute_fid(
    fid: Any, real: Iterator[torch.Tensor], fake: Iterator[torch.Tensor], batch_size: int = 32
) -> tuple[float | None, int, int, str]:
    """(FID or None, real count, fake count, note) from uint8 (3, H, W) image streams."""
    n_real = update_fid(fid, real, True, batch_size)
    n_fake = update_fid(fid, fake, False, batch_size)
    value, note = finish_fid(fid, n_real, n_fake)
    return value, n_real, n_fake, note


# --- the job ----------------------------------------------------------------------------------


def _sample(cfg: EvalConfig, captions: list[str]) -> str:
    samples = storage.join(cfg.output, "samples")
    prompts = storage.join(cfg.output, "captions.txt")
    # built first: a config the sampling job refuses leaves captions.txt as it was
    sample_cfg = SampleConfig(
        checkpoint=cfg.checkpoint,
        vq=cfg.vq,
        vq_preset=cfg.vq_preset,
        output=samples,
        text_encoder=cfg.text_encoder,
        text_dtype=cfg.text_dtype,
        clean_captions=cfg.clean_captions,
        prompts_file=prompts,
        images_per_prompt=cfg.images_per_caption,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        sampling=cfg.sampling,
        dtype=cfg.dtype,
        device=cfg.device,
        compile_mode=cfg.compile_mode,
        threads=cfg.threads,
        overwrite=cfg.overwrite,
        num_parts=cfg.num_parts,
        part=cfg.part,
    )
    _write_captions(cfg, prompts, samples, captions)
    run_sampling(sample_cfg)
    return samples


def _write_captions(cfg: EvalConfig, uri: str, samples: str, captions: list[str]) -> None:
    """Write the captions file the sampling job reads, when its content changes. Other captions
    under images sampled from the earlier ones are refused unless ``overwrite`` (the sampling job
    then deletes those images): caught here, before the file changes, so that a refused rerun
    leaves the file matching its images and a rerun with the earlier captions still goes on."""
    text = "\n".join(captions) + "\n"
    old = storage.read_text(uri) if storage.exists(uri) else None
    if old == text:
        return
    if old is not None and not cfg.overwrite:
        sampled = [n for n in storage.list_dir(samples, ".png") if SAMPLE_NAME.fullmatch(n)]
        if sampled:
            before = old.splitlines()
            grown = len(captions) > len(before) and captions[: len(before)] == before
            raise ValueError(
                f"{cfg.output}: the captions changed since the {len(sampled)} images in "
                f"{samples} were sampled ({len(before)} captions before, {len(captions)} now: "
                "another captions file, max_captions or caption_column); use a new output, or "
                "overwrite=true to delete those images and sample again"
                + (
                    f" (max_captions grown: overwrite=true samples the images of all "
                    f"{len(captions)} captions again, the first {len(before)} unchanged ones' "
                    "included)"
                    if grown
                    else ""
                )
            )
    storage.write_text(uri, text)


def tokenizer_metrics(cfg: EvalConfig) -> dict[str, Any]:
    """PSNR / SSIM / codebook usage / rFID of the VQ on raw shards, or why not."""
    if not cfg.tokenizer_data or not cfg.vq or _missing(cfg.tokenizer_data) or _missing(cfg.vq):
        return {
            "note": unavailable(
                "tokenizer reconstruction",
                "tokenizer_data=<raw shards> and vq=<tokenizer>",
                _missing(cfg.tokenizer_data) or _missing(cfg.vq),
            )
        }
    try:
        from pipeline.data.raw import list_complete_shards
        from pipeline.models.vq import VQModel
        from pipeline.precision import exact_fp32_on_cuda
        from pipeline.tokenizer.evaluate import evaluate_model
    except ImportError as exc:
        return {"note": f"unavailable: tokenizer evaluation module missing ({exc})"}
    exact_fp32_on_cuda(cfg.device)  # the codes pretokenize writes (as jobs/eval_tokenizer.py)
    model = VQModel.from_pretrained(cfg.vq, cfg.vq_preset).to(cfg.device)
    return evaluate_model(
        model,
        list_complete_shards(cfg.tokenizer_data),
        cfg.tokenizer_image_size,
        cfg.tokenizer_images,
        cfg.metrics_batch_size,
        cfg.inception_weights,
    )


def _sampling_settings(
    sampling: dict[str, Any], seed: Any, images_per_caption: Any, dtype: Any
) -> dict[str, Any]:
    """The sampling settings a report names: cfg_scale, temperature, top_k, top_p, ..., dtype."""
    return {**sampling, "seed": seed, "images_per_caption": images_per_caption, "dtype": dtype}


def _evaluated(
    cfg: EvalConfig, samples: str, n_captions: int | None, summary: dict[str, Any]
) -> dict[str, Any]:
    """What the report scores: the GPT, the captions and the sampling settings. For an earlier
    sampling output (``generated``) they are that run's, from its config.yaml (None without)."""
    if not cfg.generated:
        return {
            "checkpoint": cfg.checkpoint,
            "generated": None,
            "captions": cfg.captions,
            "captions_count": n_captions,
            "sampling": _sampling_settings(
                to_dict(cfg.sampling), cfg.seed, cfg.images_per_caption, cfg.dtype
            ),
        }
    uri = storage.join(samples, "config.yaml")
    saved = yaml.safe_load(storage.read_text(uri)) if storage.exists(uri) else None
    if not isinstance(saved, dict):
        saved = {}
    settings = saved and _sampling_settings(
        saved.get("sampling") or {},
        saved.get("seed"),
        saved.get("images_per_prompt"),
        saved.get("dtype"),
    )
    return {
        "checkpoint": saved.get("checkpoint"),
        "generated": cfg.generated,
        "captions": saved.get("prompts_file") or saved.get("prompt"),
        "captions_count": summary.get("prompts"),
        "sampling": settings or None,
    }


def run_evaluation(cfg: EvalConfig, fid: Any | None = None) -> dict[str, Any]:
    """Sample (or take ``generated``), score, and write report.json + report.md.

    ``fid`` may be a ready FrechetInceptionDistance (e.g. with an injected feature extractor);
    otherwise one is built from ``inception_weights`` when given.
    """
    n_captions = None
    if cfg.generated:
        samples = cfg.generated
    else:
        if not cfg.captions:
            raise ValueError("give captions=<file> to sample, or generated=<sampling output>")
        captions = read_captions(cfg.captions, cfg.caption_column, cfg.max_captions)
        if not captions:
            raise ValueError(f"no captions in {cfg.captions}")
        samples = _sample(cfg, captions)
        n_captions = len(captions)
        if cfg.num_parts > 1:
            log.info(
                "part %d/%d sampled; the report comes from a run with num_parts=1", cfg.part,
                cfg.num_parts,
            )  # fmt: skip
            return {"samples": samples, "part": cfg.part, "num_parts": cfg.num_parts}
    manifest = load_manifest(samples)
    summary = (
        storage.read_json(storage.join(samples, "summary.json"))
        if storage.exists(storage.join(samples, "summary.json"))
        else {}
    )
    report: dict[str, Any] = {
        "samples": samples,
        "images": len(manifest),
        "prompts": len({m["prompt_index"] for m in manifest}),
        "sampling": summary,
        "evaluated": _evaluated(cfg, samples, n_captions, summary),
        "config": to_dict(cfg),
    }
    # what can be computed: a missing weight file is a report entry, not a crash
    clip = None
    if not cfg.clip_weights or _missing(cfg.clip_weights):
        report["clip_score"] = {
            "value": None,
            "note": unavailable(
                "CLIP score",
                "clip_weights=<open_clip state dict, e.g. of ViT-L-14-quickgelu>",
                _missing(cfg.clip_weights),
            ),
        }
    else:
        clip = load_clip(cfg.clip_model, cfg.clip_weights, cfg.clip_model_config, cfg.device)
    fid_note = "the given feature extractor"
    if not cfg.reference_images:
        fid, fid_note = (
            None,
            "unavailable: pass reference_images=<folder of real images or raw shards>",
        )
    elif not storage.list_dir(cfg.reference_images):
        fid, fid_note = (
            None,
            f"unavailable: reference_images={cfg.reference_images} is empty or absent",
        )
    elif fid is None:
        fid, fid_note = build_fid(cfg.inception_weights)
    if fid is None:
        report["fid"] = {"value": None, "note": fid_note}
    else:
        fid = fid.to(cfg.device)

    # one streaming pass over the samples: memory stays bounded at 30k images
    scores: list[torch.Tensor] = []
    n_fake = unreadable = 0
    # the square size both sides of FID are brought to before 299: fid_image_size, or for the
    # torch-fidelity protocol the generated size (the first sample's)
    size = cfg.fid_image_size if cfg.fid_protocol == "llamagen" else None
    generated_size = None
    batches = _batched(iter(manifest), cfg.metrics_batch_size)
    total = -(-len(manifest) // cfg.metrics_batch_size)
    for batch in progress(batches, "score samples", total=total, unit="batch"):
        images, caps = [], []
        for m in batch:
            path = storage.join(samples, m["file"])
            img = _load_image(storage.read_bytes(path), path)
            if img is None:
                unreadable += 1
                continue
            images.append(img)
            caps.append(m["prompt"])
        if not images:
            continue
        generated_size = generated_size or images[0].size
        size = size or images[0].width
        if clip is not None:
            scores.append(clip_scores(*clip, images, caps, cfg.metrics_batch_size))
        if fid is not None:
            fake = (fid_input(im, cfg.fid_protocol, size) for im in images)
            n_fake += update_fid(fid, fake, False, len(images))
    report["unreadable_images"] = unreadable

    if clip is not None:
        sc = torch.cat(scores) if scores else torch.zeros(0)
        report["clip_score"] = {
            "value": float(sc.mean()) if len(sc) else None,
            "std": float(sc.std()) if len(sc) > 1 else 0.0,
            "images": len(sc),
            "model": cfg.clip_model,
            "note": "" if len(sc) else "unavailable: no images",
        }
    if fid is not None:
        size = size or 256
        ref_counts = ReferenceCounts()
        refs = iter_reference_images(cfg.reference_images, cfg.max_reference_images, ref_counts)
        real = (fid_input(im, cfg.fid_protocol, size) for im in refs)
        n_real = update_fid(fid, real, True, cfg.metrics_batch_size)
        if ref_counts.unreadable or ref_counts.skipped_files:
            log.warning(
                "reference images %s: %d unreadable images and %d files that are not images "
                "(by their extension) skipped; FID is over the %d images read",
                cfg.reference_images, ref_counts.unreadable, ref_counts.skipped_files, n_real,
            )  # fmt: skip
        value, why = finish_fid(fid, n_real, n_fake)
        report["fid"] = {
            "value": value,
            "real_images": n_real,
            "generated_images": n_fake,
            "protocol": cfg.fid_protocol,
            "image_size": size,  # both sides' square size before the resize to 299
            "generated_image_size": list(generated_size) if generated_size else None,
            "inception_size": INCEPTION_SIZE,
            "features": fid_note,
            "unreadable_reference_images": ref_counts.unreadable,
            "skipped_reference_files": ref_counts.skipped_files,
            "note": why,
        }

    try:  # the metrics above took the longest: a failure here must not lose them
        report["tokenizer"] = tokenizer_metrics(cfg)
    except Exception as exc:  # noqa: BLE001 - reported in the note, the rest is written
        log.exception("tokenizer metrics failed")
        report["tokenizer"] = {"note": f"failed: {type(exc).__name__}: {exc}"}
    # config.yaml, report.json and report.md describe one finished evaluation: none is written
    # by a run that is refused or fails before its report
    save_config(cfg, storage.join(cfg.output, "config.yaml"))
    storage.write_json(storage.join(cfg.output, "report.json"), report)
    storage.write_text(storage.join(cfg.output, "report.md"), format_report(report))
    log.info(
        "evaluation: CLIP score %s, FID %s -> %s",
        report["clip_score"]["value"],
        report["fid"]["value"],
        cfg.output,
    )
    return report


def _fmt(x: Any, digits: int = 3) -> str:
    return "n/a" if x is None else (f"{x:.{digits}f}" if isinstance(x, float) else str(x))


def _evaluated_of(r: dict[str, Any]) -> dict[str, Any]:
    """``r["evaluated"]``, or for a report from before it what its config says (scoring an
    earlier sampling output, that output's sampling settings were not recorded)."""
    if "evaluated" in r:
        return r["evaluated"]
    c = r.get("config") or {}
    if not c or c.get("generated"):
        return {"generated": c.get("generated")}
    return {
        "checkpoint": c.get("checkpoint"),
        "captions": c.get("captions"),
        "sampling": _sampling_settings(
            c.get("sampling") or {}, c.get("seed"), c.get("images_per_caption"), c.get("dtype")
        ),
    }


def _describe(r: dict[str, Any]) -> list[str]:
    """The report's header lines: what was sampled from what, and how."""
    ev = _evaluated_of(r)
    lines = [f"- Samples: `{r['samples']}`"]
    if ev.get("generated"):
        made = f" (sampled from `{ev['checkpoint']}`)" if ev.get("checkpoint") else ""
        lines.append(f"- Generated: `{ev['generated']}`{made}")
    elif ev.get("checkpoint"):
        lines.append(f"- Checkpoint: `{ev['checkpoint']}`")
    if ev.get("captions"):
        count = ev.get("captions_count")
        lines.append(f"- Captions: `{ev['captions']}`" + (f" ({count} captions)" if count else ""))
    settings = ev.get("sampling")
    lines.append(
        "- Sampling: "
        + (", ".join(f"{k} {v}" for k, v in settings.items()) if settings else "not recorded")
    )
    return lines


def format_report(r: dict[str, Any]) -> str:
    """The report as markdown: what was evaluated, one table of metrics, then notes. Reports
    written by earlier versions (fewer fields) format too."""
    tok = r["tokenizer"]
    samp = r.get("sampling", {})
    skipped = [
        f"{r['fid'][k]} {what}"
        for k, what in (
            ("unreadable_reference_images", "unreadable reference images"),
            ("skipped_reference_files", "reference files not images"),
        )
        if r["fid"].get(k)
    ]
    tok_notes = [tok["note"]] if tok.get("note") else []
    if tok.get("images_requested") and tok.get("images", 0) < tok["images_requested"]:
        tok_notes.append(
            f"{tok['images']} of the {tok['images_requested']} images asked for: the shards hold "
            "no more"
        )
    if tok.get("broken_images"):
        tok_notes.append(f"{tok['broken_images']} undecodable images skipped")
    tok_note = "; ".join(tok_notes)
    rows = [
        ("images scored", r["images"] - r["unreadable_images"], f"{r['prompts']} captions"),
        ("CLIP score", _fmt(r["clip_score"]["value"]), r["clip_score"].get("note", "")),
        (
            "FID",
            _fmt(r["fid"]["value"]),
            r["fid"].get("note", "")
            + (f" ({'; '.join(skipped)} skipped)" if skipped else "")
            + (
                # reports from before fid_protocol have no protocol: theirs was torch-fidelity
                f" ({r['fid'].get('protocol', 'torch-fidelity')} protocol at "
                f"{r['fid'].get('image_size')} px; {r['fid'].get('real_images')} real, "
                f"{r['fid'].get('generated_images')} generated)"
                if r["fid"]["value"] is not None
                else ""
            ),
        ),
        ("tokenizer PSNR (dB)", _fmt(tok.get("psnr")), tok_note),
        ("tokenizer SSIM", _fmt(tok.get("ssim"), 4), ""),
        ("tokenizer codebook usage", _fmt(tok.get("codebook_usage")), ""),
        ("tokenizer rFID", _fmt(tok.get("rfid")), tok.get("rfid_note", "")),
        (
            "sampling images/s",
            _fmt(samp.get("images_per_second")),
            f"{samp.get('dtype', '')} on {samp.get('device', '')}, compile "
            f"{samp.get('compile_mode')}"
            if samp
            else "",
        ),
    ]
    lines = [
        "# Evaluation report",
        "",
        *_describe(r),
        "",
        "| metric | value | note |",
        "|---|---:|---|",
    ]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines) + "\n"
