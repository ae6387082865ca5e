"""LAION aesthetic predictor v2: CLIP ViT-L/14 image embedding -> MLP head -> score (about 1-10).

The published predictor (``sac+logos+ava1-l14-linearMSE.pth``) is an MLP on the L2-normalised
768-d image embedding of OpenAI's CLIP ViT-L/14. Here CLIP runs through open_clip; for OpenAI's
weights use the model name ``ViT-L-14-quickgelu`` (OpenAI trained with QuickGELU) and an open_clip
state dict such as ``open_clip_pytorch_model.bin`` from ``timm/vit_large_patch14_clip_224.openai``
(OpenAI's own ``ViT-L-14.pt`` is a TorchScript archive: convert it once with
``torch.save(open_clip.load_openai_model(path).state_dict(), out)``).

All weights come from local paths or ``s3://`` URIs (copied once into the local cache). The score
is the head's raw output: it is not clipped, so values slightly outside 1-10 can occur.

``build_tiny_aesthetic`` writes a tiny open_clip config, random CLIP weights and a random head for
tests and the offline demo, with a ``RANDOM_WEIGHTS`` marker: loading them logs a warning.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile

import numpy as np
import torch
from PIL import Image
from torch import nn

from pipeline import storage
from pipeline.config import doc
from pipeline.log import get_logger
from pipeline.precision import torch_dtype, warn_if_slow

log = get_logger(__name__)

RANDOM_MARKER = "RANDOM_WEIGHTS"  # a file beside weights written by build_tiny_aesthetic
TINY_MODEL_NAME = "t2i-tiny-ViT-16"


@dataclasses.dataclass(frozen=True)
class AestheticConfig:
    """Where the CLIP model and the aesthetic head live and how to run them."""

    clip_model: str = doc(
        "open_clip model name (OpenAI weights: ViT-L-14-quickgelu)", "ViT-L-14-quickgelu"
    )
    clip_weights: str = doc("Local path or s3:// URI of the open_clip state dict", "")
    head_weights: str = doc("Local path or s3:// URI of sac+logos+ava1-l14-linearMSE.pth", "")
    clip_model_config: str | None = doc(
        "Optional open_clip model-config JSON to register first (its file stem is the name)", None
    )
    embed_dim: int = doc("Head input size: the CLIP embedding size (ViT-L/14: 768)", 768)
    batch_size: int = doc("Images per forward pass", 64)
    device: str = doc("torch device, e.g. 'cuda' or 'cpu'", "cpu")
    dtype: str = doc("CLIP compute dtype: float32, bfloat16 or float16 (GPU)", "float32")
    cache_dir: str | None = doc("Local cache for s3:// weights (default $T2I_CACHE)", None)


class AestheticHead(nn.Module):
    """The published MLP; module indices match the state-dict keys ``layers.0`` ... ``layers.7``."""

    def __init__(self, in_dim: int = 768) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.layers = nn.Sequential(
            nn.Linear(in_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def load_head(uri: str, in_dim: int = 768, cache_dir: str | None = None) -> AestheticHead:
    """Load the head from a state-dict file (local or s3://), with a clear error on a mismatch."""
    path = storage.local_copy(uri, cache_dir)
    state = torch.load(path, map_location="cpu", weights_only=True)
    expected = AestheticHead(in_dim).state_dict()
    if set(state) != set(expected):
        raise ValueError(
            f"{uri}: not an aesthetic-head state dict; keys {sorted(state)} != {sorted(expected)}"
        )
    got_dim = state["layers.0.weight"].shape[1]
    if got_dim != in_dim:
        raise ValueError(f"{uri}: head takes {got_dim}-d embeddings, config says {in_dim}")
    head = AestheticHead(in_dim)
    head.load_state_dict(state)
    return head.eval().requires_grad_(False)


@torch.inference_mode()
def score_embeddings(head: AestheticHead, embeddings: torch.Tensor) -> torch.Tensor:
    """Scores ``(B,)`` from CLIP image embeddings ``(B, D)``: L2-normalise, then the head.

    The predictor was trained on normalised embeddings, so the scale of the input is irrelevant.
    """
    x = embeddings.float()
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return head(x.to(next(head.parameters()).device)).squeeze(-1)


def _is_random(uri: str) -> bool:
    parent = uri.rstrip("/").rsplit("/", 1)[0] if storage.is_remote(uri) else os.path.dirname(uri)
    return storage.exists(storage.join(parent, RANDOM_MARKER))


def _check_not_torchscript(path: str, uri: str) -> None:
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            if any(n.endswith("constants.pkl") for n in z.namelist()):
                raise ValueError(
                    f"{uri} is a TorchScript archive (OpenAI's ViT-L-14.pt?): convert it once with "
                    "torch.save(open_clip.load_openai_model(path).state_dict(), out)"
                )


class AestheticScorer:
    """CLIP image tower + aesthetic head. ``score(images)`` -> ``np.ndarray`` of shape ``(N,)``."""

    def __init__(
        self,
        clip_model: nn.Module,
        preprocess,
        head: AestheticHead,
        batch_size: int = 64,
        input_dtype: torch.dtype | None = None,
    ) -> None:
        self.clip = clip_model.eval().requires_grad_(False)
        # the pixels' dtype: the tower's compute dtype (its LayerNorms may hold fp32 weights)
        self.input_dtype = input_dtype or next(clip_model.parameters()).dtype
        self.preprocess = preprocess  # PIL image -> (3, H, W) tensor; picklable for workers
        self.head = head.eval().requires_grad_(False)
        self.batch_size = batch_size

    @property
    def device(self) -> torch.device:
        return next(self.clip.parameters()).device

    @classmethod
    def from_config(cls, cfg: AestheticConfig) -> AestheticScorer:
        """Load CLIP and the head from local paths or s3:// URIs (see the module docstring)."""
        import open_clip

        if not cfg.clip_weights or not cfg.head_weights:
            raise ValueError("aesthetic scorer needs both clip_weights and head_weights")
        if cfg.clip_model_config:
            open_clip.add_model_config(storage.local_copy(cfg.clip_model_config, cfg.cache_dir))
        if cfg.clip_model not in open_clip.list_models():
            raise ValueError(f"unknown open_clip model {cfg.clip_model!r}; set clip_model_config")
        clip_path = storage.local_copy(cfg.clip_weights, cfg.cache_dir)
        _check_not_torchscript(clip_path, cfg.clip_weights)
        dtype = torch_dtype(cfg.dtype)
        warn_if_slow(dtype, cfg.device, "the aesthetic scorer (CLIP)")
        # open_clip's own low precision is OpenAI's: matmul weights in fp16/bf16, LayerNorms
        # computed in fp32 (a plain .to(fp16) would run them in fp16 too, and the embeddings,
        # so the scores, drift from the published predictor's)
        precision = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
        model, _, preprocess = open_clip.create_model_and_transforms(
            cfg.clip_model,
            pretrained=clip_path,
            require_pretrained=True,
            precision=precision,
            device=cfg.device,
        )
        # The text tower is kept: a later CLIP-score needs it.
        clip_dim = model.visual.output_dim
        if clip_dim != cfg.embed_dim:
            raise ValueError(
                f"{cfg.clip_model} embeds to {clip_dim}-d, head expects {cfg.embed_dim}"
            )
        head = load_head(cfg.head_weights, cfg.embed_dim, cfg.cache_dir).to(cfg.device)
        for uri in (cfg.clip_weights, cfg.head_weights):
            if _is_random(uri):
                log.warning("%s holds RANDOM weights (a tiny test model): scores mean nothing", uri)
        log.info(
            "aesthetic scorer: %s (%d-d) on %s, %s", cfg.clip_model, clip_dim, cfg.device, cfg.dtype
        )
        return cls(model, preprocess, head, cfg.batch_size, dtype)

    @torch.inference_mode()
    def embed_tensors(self, pixels: torch.Tensor) -> torch.Tensor:
        """L2-normalised CLIP image embeddings ``(B, D)`` (float32) of preprocessed pixels."""
        emb = self.clip.encode_image(pixels.to(self.device, self.input_dtype)).float()
        return emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    @torch.inference_mode()
    def score_and_embed(self, images: list[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
        """Scores ``(N,)`` and normalised embeddings ``(N, D)``, both float32, in input order.

        An image that fails preprocessing (e.g. truncated data) gets NaN in both, with a warning
        naming how many: the caller records it as a skip instead of losing the batch.
        """
        dim = self.head.in_dim
        scores = np.full(len(images), np.nan, dtype=np.float32)
        embeddings = np.full((len(images), dim), np.nan, dtype=np.float32)
        failed = 0
        for start in range(0, len(images), self.batch_size):
            pixels, rows = [], []
            for i in range(start, min(start + self.batch_size, len(images))):
                try:
                    pixels.append(self.preprocess(images[i]))
                    rows.append(i)
                except Exception as exc:  # noqa: BLE001 - one bad image must not sink the batch
                    failed += 1
                    log.debug("image %d failed preprocessing: %s", i, exc)
            if not rows:
                continue
            emb = self.embed_tensors(torch.stack(pixels))
            scores[rows] = score_embeddings(self.head, emb).float().cpu().numpy()
            embeddings[rows] = emb.cpu().numpy()
        if failed:
            log.warning(
                "%d of %d images could not be preprocessed (scored NaN)", failed, len(images)
            )
        return scores, embeddings

    def score(self, images: list[Image.Image]) -> np.ndarray:
        """Aesthetic scores ``(N,)`` float32 (NaN where an image could not be read)."""
        return self.score_and_embed(images)[0]


def tiny_clip_config(embed_dim: int = 64) -> dict:
    """An open_clip model config small enough for CPU tests (64 px, patch 16, 2 layers)."""
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {
            "image_size": 64,
            "layers": 2,
            "width": 64,
            "head_width": 32,
            "patch_size": 16,
        },
        "text_cfg": {
            "context_length": 77,
            "vocab_size": 49408,
            "width": 64,
            "heads": 2,
            "layers": 2,
        },
    }


def build_tiny_aesthetic(out_dir: str, seed: int = 0, embed_dim: int = 64) -> AestheticConfig:
    """Write a tiny random CLIP + random head under ``out_dir`` (local or s3://).

    Returns the config that loads them through the same path as the real model. A
    ``RANDOM_WEIGHTS`` marker is written beside the weights so that loading warns.
    """
    import tempfile

    import open_clip

    with tempfile.TemporaryDirectory() as tmp:
        cfg_path = os.path.join(tmp, f"{TINY_MODEL_NAME}.json")
        with open(cfg_path, "w") as f:
            json.dump(tiny_clip_config(embed_dim), f, indent=2)
        torch.manual_seed(seed)
        # Built from the dict directly: nothing registered in open_clip's global table here.
        model = open_clip.model.CLIP(**tiny_clip_config(embed_dim))
        torch.save(model.state_dict(), os.path.join(tmp, "clip.pt"))
        torch.save(AestheticHead(embed_dim).state_dict(), os.path.join(tmp, "head.pth"))
        with open(os.path.join(tmp, RANDOM_MARKER), "w") as f:
            f.write("random weights for tests; not CLIP ViT-L/14 nor the LAION aesthetic head\n")
        storage.makedirs(out_dir)
        storage.put_dir(tmp, out_dir)
    log.warning("wrote a tiny RANDOM-weight CLIP + aesthetic head to %s", out_dir)
    return AestheticConfig(
        clip_model=TINY_MODEL_NAME,
        clip_weights=storage.join(out_dir, "clip.pt"),
        head_weights=storage.join(out_dir, "head.pth"),
        clip_model_config=storage.join(out_dir, f"{TINY_MODEL_NAME}.json"),
        embed_dim=embed_dim,
        batch_size=8,
    )
