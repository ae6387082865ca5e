"""Reconstruction quality of a VQ tokenizer: PSNR, SSIM, codebook usage and rFID.

Images are center crops from raw shards; reconstructions are clamped and rounded to 8 bits (what
a saved PNG holds) before scoring, as LlamaGen's evaluation does. PSNR and SSIM are per-image
means on [0, 1] images. PSNR floors the MSE at 1e-10, so a pixel-exact reconstruction scores
100 dB instead of inf (an inf would make the mean inf and the JSON non-standard ``Infinity``).
Codebook usage is the fraction of codes that occur at least once over the evaluation set.

SSIM is the standard one (Wang et al. 2004): an 11-px Gaussian window (sigma 1.5) with
data_range 1 on [0, 1] images. It is not directly comparable with the SSIM of LlamaGen's
``reconstruction_vq_ddp.py``, which calls skimage's ``structural_similarity`` with its default
7x7 uniform window and ``data_range=2.0`` on [0, 1] images (stabilising constants four times
those of the images' real range, which pushes the score towards 1).

rFID uses torchmetrics' ``FrechetInceptionDistance`` (torch-fidelity's InceptionV3) with weights
from a LOCAL file or s3:// URI only (torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``).
Without one, rFID is reported as unavailable rather than downloaded. rFID is only comparable to
published numbers on the same set at scale (LlamaGen: 50k ImageNet validation images).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torchmetrics.functional.image import structural_similarity_index_measure

from pipeline import storage
from pipeline.config import doc, to_dict
from pipeline.data.raw import iter_eval_images, list_complete_shards
from pipeline.log import get_logger, progress
from pipeline.models.vq import VQModel
from pipeline.precision import exact_fp32_on_cuda

log = get_logger(__name__)

RFID_UNAVAILABLE = (
    "rFID unavailable: no InceptionV3 weights given (set inception_weights to a local or s3:// "
    "copy of torch-fidelity's weights-inception-2015-12-05-6726825d.pth; nothing is downloaded)"
)


# the MSE floor of psnr: a pixel-exact image scores 10 * log10(1 / 1e-10) = 100 dB, not inf
MIN_MSE = 1e-10


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [0, 1], shapes (B, C, H, W) -> (B,).

    The MSE is floored at :data:`MIN_MSE`, so identical images give 100 dB rather than inf (which
    would turn the mean over a set into inf). Images that differ score below 100 dB unless the
    difference is tiny: one 8-bit level in one sample of a 256 px image (MSE 7.8e-11) reads
    100 dB too."""
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(1.0 / mse.clamp_min(MIN_MSE))


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (Gaussian window 11, sigma 1.5, data_range 1) of images in [0, 1] -> (B,).

    The standard SSIM; LlamaGen's figures use skimage's 7x7 uniform window with data_range 2.0
    on [0, 1] images and are not directly comparable (module docstring)."""
    return structural_similarity_index_measure(
        x.double(), y.double(), data_range=1.0, reduction="none"
    )


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> uint8 (B, 3, H, W), clamped and rounded."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def build_fid(inception_weights: str | None) -> tuple[Any | None, str]:
    """(FrechetInceptionDistance or None, a note saying which weights or why not)."""
    if not inception_weights:
        return None, RFID_UNAVAILABLE
    from torchmetrics.image.fid import FrechetInceptionDistance

    path = storage.local_copy(inception_weights)
    # torch-fidelity loads with weights_only=False; refuse anything that is not plain tensors
    torch.load(path, map_location="cpu", weights_only=True)
    # antialias=False: torch-fidelity's TF1-style bilinear resize to 299 px, the standard FID
    # (torchmetrics' default antialiased resize moves 256/512 px images by 0.5/1.3 grey levels
    # on average, and the score with them; it could not be compared with published FIDs)
    fid = FrechetInceptionDistance(
        feature=2048, feature_extractor_weights_path=path, antialias=False
    )
    return fid, f"rFID with InceptionV3 weights from {inception_weights}"


def _batches(items: Iterator[tuple[str, torch.Tensor]], size: int) -> Iterator[torch.Tensor]:
    batch: list[torch.Tensor] = []
    for _, img in items:
        batch.append(img)
        if len(batch) == size:
            yield torch.stack(batch)
            batch = []
    if batch:
        yield torch.stack(batch)


@torch.no_grad()
def evaluate_model(
    model: VQModel,
    tar_uris: list[str],
    image_size: int,
    num_images: int,
    batch_size: int = 16,
    inception_weights: str | None = None,
    fid: Any | None = None,
) -> dict[str, Any]:
    """Reconstruct up to ``num_images`` center crops; return PSNR, SSIM, usage and rFID, with
    ``images`` (those evaluated: fewer where the shards hold fewer, with a warning),
    ``images_requested`` and ``broken_images`` (undecodable images skipped on the way, with a
    warning naming the first few: the evaluated set is not the first ``images`` samples then).

    ``fid`` may be a ready FrechetInceptionDistance (e.g. with an injected feature extractor);
    otherwise one is built from ``inception_weights`` when given.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model.eval()
    device = next(model.parameters()).device
    note = "rFID with the given feature extractor"
    if fid is None:
        fid, note = build_fid(inception_weights)
    if fid is not None:
        fid = fid.to(device)
    else:
        log.warning(note)
    k = model.config.codebook_size
    used = torch.zeros(k, dtype=torch.bool)
    psnrs, ssims = [], []
    read: dict[str, Any] = {}
    images = iter_eval_images(tar_uris, image_size, num_images, read)
    total = (num_images + batch_size - 1) // batch_size
    for x in progress(_batches(images, batch_size), "evaluate tokenizer", total=total):
        x = x.to(device)
        codes = model.encode(x)
        recon = model.decode(codes)
        real, fake = to_uint8(x), to_uint8(recon)
        psnrs.append(psnr(real / 255.0, fake / 255.0).cpu())
        ssims.append(ssim(real / 255.0, fake / 255.0).cpu())
        used[codes.flatten().cpu()] = True
        if fid is not None:
            fid.update(real, real=True)
            fid.update(fake, real=False)
    n = int(sum(len(p) for p in psnrs))
    broken = int(read.get("broken_images", 0))
    if broken:
        log.warning(
            "tokenizer evaluation skipped %d undecodable image(s) (first: %s); they are left "
            "out of the %d evaluated (broken_images in the results)",
            broken,
            ", ".join(read["broken_examples"]),
            n,
        )
    if n == 0:
        raise RuntimeError(
            "no decodable evaluation images in the given shards"
            + (f" ({broken} undecodable)" if broken else "")
        )
    if n < num_images:
        log.warning(
            "tokenizer evaluated on %d images, fewer than the %d asked for: the shards hold no "
            "more decodable images",
            n,
            num_images,
        )
    out: dict[str, Any] = {
        "images": n,
        "images_requested": num_images,
        "broken_images": broken,
        "image_size": image_size,
        "psnr": float(torch.cat(psnrs).mean()),
        "ssim": float(torch.cat(ssims).mean()),
        "codebook_usage": float(used.float().mean()),
        "codes_used": int(used.sum()),
        "codebook_size": k,
        "rfid": None,
        "rfid_note": note,
    }
    if fid is not None:
        if n < 2:
            out["rfid_note"] = "rFID unavailable: needs at least 2 images"
        else:
            out["rfid"] = float(fid.compute())
    log.info(
        "tokenizer eval on %d images: PSNR %.2f dB, SSIM %.4f, codebook usage %.1f%%, rFID %s",
        n,
        out["psnr"],
        out["ssim"],
        100 * out["codebook_usage"],
        "n/a" if out["rfid"] is None else f"{out['rfid']:.2f}",
    )
    return out


@dataclass(frozen=True)
class TokenizerEvalConfig:
    """Evaluate a tokenizer export (or a LlamaGen checkpoint) on raw shards."""

    model: str = doc("exported tokenizer folder or LlamaGen .pt (local or s3://)")
    data: str = doc("folder of raw img2dataset shards (local or s3://)")
    output: str = doc("where to write the metrics JSON (local or s3://)")
    preset: str | None = doc("VQ preset for a bare checkpoint file (e.g. VQ-16)", None)
    image_size: int = doc("center crop size", 256)
    num_images: int = doc("images to evaluate", 1000)
    batch_size: int = doc("images per batch", 16)
    inception_weights: str | None = doc("InceptionV3 weights file for rFID", None)
    device: str = doc("torch device", "cpu")

    def __post_init__(self) -> None:
        for name in ("num_images", "batch_size", "image_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def evaluate_tokenizer(cfg: TokenizerEvalConfig) -> dict[str, Any]:
    """Load the tokenizer, evaluate it, write ``cfg.output`` and return the metrics."""
    exact_fp32_on_cuda(cfg.device)  # the codes pretokenize writes (TF32 convolutions are not)
    model = VQModel.from_pretrained(cfg.model, cfg.preset).to(cfg.device)
    shards = list_complete_shards(cfg.data, required=True)
    out = evaluate_model(
        model, shards, cfg.image_size, cfg.num_images, cfg.batch_size, cfg.inception_weights
    )
    out["model"] = cfg.model
    out["config"] = to_dict(cfg)  # the resolved config, with the figures it produced
    storage.write_json(cfg.output, out)
    return out
