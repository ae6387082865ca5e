"""The pretokenize stage: raw shards -> token shards of VQ codes and T5 caption features.

For raw shard ``i`` the worker takes the kept samples (per the score parquet ``{i:05d}.parquet``
when ``scores`` is set, else all), decodes each image (PIL, RGB), resizes its short side to the
stage resolution and centre-crops it, encodes it with the VQ tokenizer (and its mirror image when
``flip``), encodes the caption with T5 (valid tokens only, fp16) and writes token shard
``{i:05d}.tar`` plus its done marker (``pipeline.data.shards``). A background thread reads and
decodes the next batch while the models run on this one.

An image whose shorter side is below the resolution is dropped (``too_small``), as LlamaGen's
t2i dataset skips it (``min(img.size) < image_size``): enlarged, it would teach the GPT blurry
codes. ``upscale_small`` keeps it, enlarged. The check is on the image as the raw shard holds it:
one img2dataset already enlarged at download (``resize_only_if_bigger: false``) passes, and is
the score stage's ``min_image_size`` (on the original size) to catch.

With ``short_captions`` (stage 2), T5 also encodes the caption's first sentence, cut from the
caption as it came exactly as LlamaGen's ``--trunc-caption`` cuts it (``caption.split('.')[0]``)
and then cleaned like the caption; stored as ``t5_short.npy`` for the loader's
``short_caption_p`` (LlamaGen trains on it 30% of the time in stage 2). A first sentence that is
the whole caption (the same text for T5) is not encoded again: the sample is marked to reuse
``t5`` (``shards``). One that is empty for T5 (a caption starting with '.') reuses ``t5`` too,
counted (``short_captions_empty``): LlamaGen would train on the bare EOS token there, an
unconditional caption 30% of the time for that image.

Every sample that does not make it is counted by reason in the shard's stats (``not_scored``,
``filtered_<score reason>``, ``low_aesthetic``, ``empty_caption``,
``empty_caption_after_cleaning`` (nothing left for T5, e.g. a bare URL), ``missing_image``,
``undecodable_image``, ``too_small``, ``unprocessable_image`` (resize or crop failed),
``t5_error``, ``encode_error``, ``duplicate_key``, ``bad_key``, ``nonfinite_t5``, and with
``label_field`` ``label_missing``, ``label_not_integer``, ``label_out_of_range``): one bad sample
never fails its shard. A damaged raw tar is flagged (``corrupt_tar``) and what was intact before
the damage is kept. What was mended is counted too: ``caption_not_utf8`` (bad bytes or lone
surrogates replaced with U+FFFD), ``converted_16bit`` and ``converted_transparent``
(``raw.to_rgb``); with ``short_captions``, the samples by their short caption
(``short_captions``: features of their own, ``short_captions_whole``, ``short_captions_empty``,
``short_captions_truncated``). Raw shards without a score parquet yet are left for a later run
and listed in the manifest (``unscored_shards``); so are those downloaded again after they were
scored, whose parquet holds the old download's decisions (listed in ``stale_score_shards`` too:
scoring again redoes them).
A rerun redoes only the shards without a done marker, and gives the same bytes. A done marker
records what its shard was made from (``raw_shard``: the raw shard's identity,
``shards.raw_shard_identity``; ``score_parquet``: its score parquet's, ``score_parquet_identity``);
a shard made from another download of its raw shard, or another score parquet, than is there at a
rerun's start is removed and redone (``redone_changed_input`` in the manifest), and one whose raw
shard is gone (raw images deleted after tokenizing, or fewer shards downloaded) is kept, with a
warning (``kept_without_raw_shard``): neither the manifest nor training (which reads the done
markers) mixes in samples of a raw shard or score parquet that was replaced.
Markers written before this was recorded are kept as they are, said once. The scores folder's
settings (its ``score_config.yaml``: filters, aesthetic model) count as content settings too: an
output is not continued from scores made again with other ones.

For a class-conditional model (``configs/train/class_cond.yaml``), ``label_field`` names the raw
sample json field holding each image's class id (an ``extra_columns`` column of the metadata,
carried there by the download, e.g. ImageNet's ``label``); each token sample's json then gets
``"label": int``, which the loader's class-conditional batches read. The value must be a whole
number: an int, a float with no fraction (3.0: int and float files of one column are promoted
to float64), or a string of ASCII digits (a label column stored as text); anything else (null,
absent, true/false, 3.5, "n01440764", "") is dropped as ``label_missing`` or
``label_not_integer``, and one below 0 (or not below ``num_classes``, when set) as
``label_out_of_range``: trained as it is, a label counted from 1 or from another class list
would silently teach the wrong class (or the CFG null class).

Class-conditional shards need no caption features: ``text: null`` (``configs/data/
pretokenize_c2i.yaml``) loads no T5 anywhere and writes no ``t5.npy``; captions are neither
cleaned nor required (an empty one is no drop reason), and stored as ``txt`` as they came. It
needs ``label_field`` (shards with neither captions nor labels train nothing), and, being a
content setting, an output made with text is not continued without it, nor the other way round.
A text-conditional loader refuses such shards at their first sample.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import re
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import numpy as np
import torch
import yaml

from pipeline import storage
from pipeline.cluster_paths import check_paths_for_ray_job
from pipeline.config import ConfigError, doc
from pipeline.data import shards
from pipeline.data.filter import (
    SCORE_CONFIG_NAME,
    aesthetic_reason,
    read_scores,
    replaced_raw_shards,
    sample_caption,
    sample_meta,
    score_settings,
    score_uri,
    storable_text,
)
from pipeline.data.raw import center_crop as resize_center_crop
from pipeline.data.raw import decode_rgb
from pipeline.data.raw import to_tensor as to_pixels
from pipeline.errortext import poisons_process
from pipeline.executor import (
    ExecutorConfig,
    check_gpu_devices,
    prefetch,
    run_units,
)
from pipeline.log import get_logger
from pipeline.models.text_encoder import (
    EncodedCaptions,
    TextEncoder,
    TextEncoderConfig,
    clean_caption,
)
from pipeline.models.vq import VQModel, codes_to_uint16
from pipeline.precision import exact_fp32_on_cuda, torch_dtype, warn_if_slow

log = get_logger(__name__)

CONFIG_NAME = "pretokenize_config.yaml"
# Fields that decide the content of a shard: an output folder must not mix two settings of them
# (devices and batch sizes do not: a rerun on other hardware adds to the same output).
_CONTENT_FIELDS = (
    "input",
    "scores",
    "min_aesthetic",
    "resolution",
    "flip",
    "vq.uri",
    "vq.preset",
    "vq.dtype",
    "text.uri",
    "text.max_length",
    "text.dtype",
    "text.clean_captions",
    "short_captions",
    "upscale_small",
    "label_field",
    "num_classes",
)
# What the code did before a content field existed: a config saved then, without the field, is
# read with this value (claim_output), so an output made before small images were dropped is
# not continued with the new default, which would mix enlarged and dropped images in it
# (an output saved before labels existed was made without them)
_SAVED_BEFORE = {
    "short_captions": False,
    "upscale_small": True,
    "label_field": None,
    "num_classes": None,
}
# (text: null, no caption features, needs no entry: every config saved before it could be null
# holds its text section, so such an output counts as made with text, and 'text.uri' etc. differ)
INPUTS_NAME = "pretokenize_inputs.json"
# The model URIs whose content decides the shards too (weights replaced at the same URI change
# them as much as another URI does): their fingerprints are saved as INPUTS_NAME.
_WEIGHTS = {"vq": "vq.uri", "text": "text.uri"}
# The scores folder's content settings (its score_config.yaml's filters, aesthetic model and raw
# input) decide which samples the shards hold: saved in INPUTS_NAME under this name, and an
# output made from scores of other settings is not continued (claim_output's ``derived``)
_SCORE_SETTINGS = "score_config"
# Done-marker stats: what a token shard was made from, checked at every run start (a shard made
# from another download of its raw shard, or from another score parquet, is redone)
RAW_SHARD_STAT = "raw_shard"  # shards.raw_shard_identity of the raw shard read
SCORES_STAT = "score_parquet"  # score_parquet_identity of the score parquet read (with scores)
# ... and that parquet's size and version (storage.FileEntry: its ETag on S3) when it was read:
# a run start whose listing shows the same reads no footer (one read per done shard otherwise)
SCORES_ENTRY_STAT = "score_parquet_entry"
# a score parquet's footer is a few KB: read with its end in one request
_FOOTER_READ = 64 << 10


@dataclasses.dataclass(frozen=True)
class VQRunConfig:
    """Which VQ tokenizer encodes the images, and where it runs."""

    uri: str = doc("VQ weights: a save_pretrained dir or a LlamaGen .pt (local or s3://)", "")
    preset: str | None = doc("Preset of a LlamaGen .pt file (e.g. VQ-16); null for our dirs", None)
    device: str = doc("torch device, e.g. 'cuda' or 'cpu'", "cpu")
    dtype: Literal["float32", "bfloat16"] = doc("Compute dtype of the encoder", "float32")


@dataclasses.dataclass(frozen=True)
class PretokenizeConfig:
    """The pretokenize stage: raw shards (+ score parquets) in, token shards + manifest out."""

    input: str = doc("Raw shards (img2dataset output): local dir or s3:// URI")
    output: str = doc("Token shards go here: local dir or s3:// URI")
    scores: str | None = doc("Score parquets of the score stage; null: take every sample", None)
    min_aesthetic: float | None = doc("Also require aesthetic >= this (stage-2 selection)", None)
    resolution: int = doc("Image side after resize + centre crop (stage 1: 256, stage 2: 512)", 256)
    flip: bool = doc("Also store codes of the horizontally flipped image (codes_flip.npy)", False)
    short_captions: bool = doc(
        "Also store T5 features of each caption's first sentence (t5_short.npy; LlamaGen's "
        "stage-2 --trunc-caption), which training uses data.short_caption_p of the time",
        False,
    )
    upscale_small: bool = doc(
        "Keep images whose shorter side is below resolution, enlarged to it (false: dropped and "
        "counted as too_small, as LlamaGen's t2i dataset skips them)",
        False,
    )
    label_field: str | None = doc(
        "Class-conditional shards: the raw sample json field holding the integer class id (a "
        "metadata extra_columns column, e.g. 'label'), stored as each token sample's json "
        "'label'; a sample without a whole-number one is dropped and counted. null: no labels",
        None,
    )
    num_classes: int | None = doc(
        "With label_field: labels must be below this (the model's num_classes); others are "
        "dropped as label_out_of_range. null: only checked to be >= 0",
        None,
    )
    batch_size: int = doc("Images per VQ forward pass", 32)
    decode_threads: int = doc("Threads decoding images while the models run", 2)
    max_shards: int | None = doc("Only the first N complete raw shards (null: all)", None)
    vq: VQRunConfig = doc("The VQ tokenizer", default_factory=VQRunConfig)
    text: TextEncoderConfig | None = doc(
        "The T5 text encoder; null: no caption features (t5.npy), for class-conditional shards "
        "(needs label_field)",
        default_factory=TextEncoderConfig,
    )
    executor: ExecutorConfig = doc("Ray settings", default_factory=ExecutorConfig)

    def __post_init__(self) -> None:
        # caught here, not as a failure of every shard on every worker after both models load
        for name, value in (
            ("resolution", self.resolution),
            ("batch_size", self.batch_size),
            ("decode_threads", self.decode_threads),
            *([("text.batch_size", self.text.batch_size)] if self.text is not None else []),
        ):
            if value < 1:
                raise ValueError(f"{name} is {value}: it must be at least 1")
        if self.max_shards is not None and self.max_shards < 1:
            raise ValueError(f"max_shards is {self.max_shards}: at least 1, or null for all")
        if self.min_aesthetic is not None and not self.scores:
            raise ValueError("min_aesthetic needs the score parquets (scores: ...)")
        if self.label_field is not None and not self.label_field.strip():
            raise ValueError(
                "label_field is empty: name the raw json field of the class id, or null"
            )
        if self.num_classes is not None:
            if self.label_field is None:
                raise ValueError("num_classes checks the class labels: it needs label_field")
            if self.num_classes < 1:
                raise ValueError(f"num_classes is {self.num_classes}: it must be at least 1")
        if self.text is None:
            if self.label_field is None:
                raise ValueError(
                    "text is null (no caption features) but label_field is not set: such shards "
                    "hold nothing to condition on. Set label_field (class-conditional: "
                    "configs/data/pretokenize_c2i.yaml), or give a text section"
                )
            if self.short_captions:
                raise ValueError("short_captions are T5 features of a caption: they need text")
        devices = {"vq.device": self.vq.device}
        if self.text is not None:
            devices["text.device"] = self.text.device
        check_gpu_devices(self.executor, devices)
        if self.text is not None and not 1 <= self.text.max_length <= shards.MAX_T5_TOKENS:
            raise ValueError(
                f"text.max_length is {self.text.max_length}: token shards hold at most "
                f"{shards.MAX_T5_TOKENS} caption tokens"
            )


# --- the worker ---------------------------------------------------------------------------------


@dataclasses.dataclass
class _Batch:
    keys: list[str]
    pixels: torch.Tensor  # (B, 3, S, S) in [-1, 1]
    captions: list[str]  # as they came: the shards' txt
    texts: list[str]  # what T5 reads: cleaned once (text.clean_captions), else the captions
    metas: list[dict[str, Any]]
    shorts: list[str]  # what T5 reads of the first sentence (short_captions; else empty)


# stats keys: stored samples by what their short caption is (see _short_kind)
_SHORT_STATS = {
    "own": "short_captions",
    "whole": "short_captions_whole",
    "empty": "short_captions_empty",
}


def first_sentence(caption: str) -> str:
    """The caption up to its first '.', as LlamaGen's ``--trunc-caption`` cuts it
    (``caption.split('.')[0]``, on the caption as it came, before any cleaning): a '.' that
    cleaning would remove still cuts, so "3.5 inch disk" gives "3" there and here alike."""
    return caption.split(".", 1)[0]


def _short_kind(short: str, text: str) -> Literal["own", "whole", "empty"]:
    """Whether the first sentence needs features of its own: not when T5 would read the same
    text as for the whole caption, nor when it reads nothing (the whole caption's are used)."""
    if not short.strip():
        return "empty"
    return "whole" if short == text else "own"


_WHOLE_NUMBER = re.compile(r"[0-9]+")


def class_label(value: Any, num_classes: int | None) -> tuple[int | None, str | None]:
    """(label, None) for a raw json value holding a class id, else (None, the drop reason).

    A whole number only: an int, a float without a fraction (3.0), or a string of ASCII
    digits ("3"); not a bool (json true is no class), "3.0", " 3" or "n01440764". It must be
    at least 0 and, with ``num_classes``, below it."""
    if value is None:
        return None, "label_missing"
    if isinstance(value, bool):
        label = None
    elif isinstance(value, int):
        label = value
    elif isinstance(value, float) and value.is_integer():  # nan and inf are not
        label = int(value)
    elif isinstance(value, str) and _WHOLE_NUMBER.fullmatch(value):
        label = int(value)
    else:
        label = None
    if label is None:
        return None, "label_not_integer"
    if label < 0 or (num_classes is not None and label >= num_classes):
        return None, "label_out_of_range"
    return label, None


def _out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says the device or host ran out of memory: the shard is retried, no
    caption or image is dropped for it (a caption that fails alone for want of memory is not a
    bad caption)."""
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or (
        "out of memory" in str(exc).lower()
    )


class PretokenizeWorker:
    """Loads the VQ tokenizer and T5 (unless ``text`` is null) once; ``worker(index)``
    pretokenizes raw shard ``index``."""

    def __init__(
        self,
        cfg: PretokenizeConfig,
        vq: VQModel | None = None,
        text: TextEncoder | None = None,
    ) -> None:
        """Load the models named in ``cfg`` (or use the ones given, e.g. built in memory)."""
        self.cfg = cfg
        if vq is None:
            if not cfg.vq.uri:
                raise ConfigError("vq.uri is empty: set it to the VQ tokenizer's dir or .pt file")
            vq = VQModel.from_pretrained(cfg.vq.uri, cfg.vq.preset)
        dtype = torch_dtype(cfg.vq.dtype)
        warn_if_slow(dtype, cfg.vq.device, "the VQ encoder")
        exact_fp32_on_cuda(cfg.vq.device)
        # the encoder runs in dtype; the rest (the last 1x1 conv and the code search) in fp32:
        # in bf16 the latent and the codebook are rounded before the nearest-code search (0.9%
        # of codes changed on random unit vectors). Only the encoder is cast: casting the whole
        # model and widening the rest again would keep the rounded codebook
        self.vq = vq.to(cfg.vq.device).float().eval()
        self.vq.encoder.to(dtype)
        ds = vq.config.downsample
        if cfg.resolution % ds:
            raise ConfigError(f"resolution {cfg.resolution} is not a multiple of the VQ's {ds}")
        self.text: TextEncoder | None = None
        if cfg.text is not None:
            self.text = text if text is not None else TextEncoder.from_config(cfg.text)
        self._vq_rows: int | None = None  # images per VQ forward after running out of memory

    def __call__(self, index: int) -> dict[str, Any]:
        cfg = self.cfg
        t0 = time.perf_counter()
        # what the shard is made from, taken before it is read: a raw shard or score parquet
        # replaced meanwhile is recorded as the older one, and the shard redone by the next run
        stats: dict[str, Any] = {
            "unit": index,
            "source": shards.raw_tar_uri(cfg.input, index),
            RAW_SHARD_STAT: shards.raw_shard_identity(cfg.input, index),
        }
        scores = None
        if cfg.scores:
            stats[SCORES_STAT], entry = score_parquet_identity(cfg.scores, index)
            stats[SCORES_ENTRY_STAT] = _entry_stat(entry)
            scores = read_scores(cfg.scores, index)
        # reading and decoding run in a background thread: it counts into its own counters
        read_dropped: collections.Counter[str] = collections.Counter()
        mended: collections.Counter[str] = collections.Counter()  # kept, but changed on the way
        dropped: collections.Counter[str] = collections.Counter()
        vq_s = t5_s = wait_s = 0.0
        n_tokens = truncated = 0
        # stored samples by what their short caption is (only with short_captions: the loader
        # takes a done marker without these keys for a shard made without short captions)
        short_stats: collections.Counter[str] = collections.Counter(
            dict.fromkeys([*_SHORT_STATS.values(), "short_captions_truncated"], 0)
            if cfg.short_captions
            else {}
        )
        with shards.TokenShardWriter(cfg.output, index) as writer:
            # closed on an error too: its reader thread, decode pool and open tar stop at once
            batches = prefetch(self._batches(index, scores, stats, read_dropped, mended), depth=2)
            with contextlib.closing(batches):
                while True:
                    t = time.perf_counter()
                    batch = next(batches, None)
                    wait_s += time.perf_counter() - t
                    if batch is None:
                        break
                    t = time.perf_counter()
                    codes, codes_flip = self._encode_images(batch.pixels)
                    vq_s += time.perf_counter() - t
                    t = time.perf_counter()
                    n = len(batch.keys)
                    if self.text is None:  # class labels only: no caption features
                        features: list[torch.Tensor | None] = [None] * n
                        lengths, ok = [0] * n, [True] * n
                        shorts: list[torch.Tensor | Literal["t5"] | None] = ["t5"] * n
                    else:
                        enc = self._encode_captions(batch.keys, batch.texts, dropped)
                        features, lengths = list(enc.features), list(enc.lengths)
                        bad = set(enc.nonfinite)
                        for _ in bad:
                            dropped["nonfinite_t5"] += 1
                        # the samples T5 gave finite features for; counted drops otherwise
                        ok = [f is not None and i not in bad for i, f in enumerate(features)]
                        shorts = self._encode_short_captions(batch, ok, dropped, short_stats)
                        truncated += enc.n_truncated
                    t5_s += time.perf_counter() - t
                    for i, key in enumerate(batch.keys):
                        if not ok[i] or shorts[i] is None:  # counted: t5_error, nonfinite_t5
                            continue
                        meta = dict(batch.metas[i])
                        feats = features[i]
                        if feats is not None:
                            meta["t5_tokens"] = lengths[i]
                        short = shorts[i]
                        if isinstance(short, torch.Tensor):
                            meta["t5_short_tokens"] = len(short)
                            short = short.numpy()
                        try:
                            sample = shards.encode_token_sample(
                                key,
                                codes[i],
                                feats.numpy() if feats is not None else None,
                                batch.captions[i],
                                meta,
                                codes_flip[i] if codes_flip is not None else None,
                                t5_short=short if cfg.short_captions else None,
                            )
                        except ValueError as exc:  # what the shard format cannot hold: this sample
                            log.warning("shard %d: sample %s not stored: %s", index, key, exc)
                            dropped["encode_error"] += 1
                            continue
                        writer.write(sample)
                        n_tokens += lengths[i]
                        if cfg.short_captions:
                            kind = _short_kind(batch.shorts[i], batch.texts[i])
                            short_stats[_SHORT_STATS[kind]] += 1
            wall = time.perf_counter() - t0
            stats.update(
                mended,
                **short_stats,
                written=len(writer),
                dropped=dict(sorted((dropped + read_dropped).items())),
                t5_tokens_sum=n_tokens,
                t5_tokens_mean=n_tokens / len(writer) if len(writer) else 0.0,
                t5_truncated=truncated,
                vq_s=round(vq_s, 4),
                t5_s=round(t5_s, 4),
                wait_s=round(wait_s, 4),
                wall_s=round(wall, 4),
            )
            writer.close(stats)
        return stats

    def _encode_short_captions(
        self,
        batch: _Batch,
        ok: list[bool],
        dropped: collections.Counter[str],
        short_stats: collections.Counter[str],
    ) -> list[torch.Tensor | Literal["t5"] | None]:
        """Per sample of ``batch``: T5 features of its first sentence; ``"t5"`` where the whole
        caption's serve (:func:`_short_kind`, or ``short_captions`` off); None where T5 failed on
        it, counted as for a caption (``t5_error``, ``nonfinite_t5``): the sample is dropped, not
        stored without what a stage-2 run would draw 30% of the time. Only the samples still
        ``ok`` are encoded, so none is counted twice."""
        out: list[torch.Tensor | Literal["t5"] | None] = ["t5"] * len(batch.keys)
        if not self.cfg.short_captions:
            return out
        own = [
            i
            for i in range(len(batch.keys))
            if ok[i] and _short_kind(batch.shorts[i], batch.texts[i]) == "own"
        ]
        if not own:
            return out
        enc = self._encode_captions(
            [batch.keys[i] for i in own], [batch.shorts[i] for i in own], dropped
        )
        short_stats["short_captions_truncated"] += enc.n_truncated
        bad = set(enc.nonfinite)
        for j, i in enumerate(own):
            if j in bad:
                dropped["nonfinite_t5"] += 1
            out[i] = None if enc.features[j] is None or j in bad else enc.features[j]
        return out

    def _encode_captions(
        self, keys: list[str], texts: list[str], dropped: collections.Counter[str]
    ) -> EncodedCaptions:
        """T5 features of ``texts`` (the captions of samples ``keys``). When the batch fails, it
        is encoded caption by caption (the same features up to rounding: padding is masked, but
        a GEMM over fewer rows may round a last fp16 bit differently), and a caption T5 cannot
        take gets None, counted as ``t5_error``. Every caption of a batch failing is raised:
        that is the encoder, not the captions, and the shard is retried. So is an error that
        leaves the process's CUDA context broken (the executor's sticky pattern) wherever it
        comes: a one-caption batch cannot tell the two apart by count, and its caption would
        otherwise be dropped and the shard marked done."""
        try:
            assert self.text is not None  # only called with a text encoder
            return self.text.encode(texts, clean=False)
        except Exception as exc:  # noqa: BLE001 - narrowed down caption by caption below
            if poisons_process(str(exc)) or _out_of_memory(exc):
                raise  # a broken CUDA context or no memory: no caption is to blame, retried
            # without its traceback, whose frames would hold the failed forward's activations
            # through the captions' retries below
            error = exc.with_traceback(None)
        features: list[torch.Tensor | None] = []
        lengths: list[int] = []
        nonfinite: list[int] = []
        truncated = 0
        for i, text in enumerate(texts):
            try:
                one = self.text.encode([text], clean=False)
            except Exception as exc:  # noqa: BLE001 - this caption alone: counted, dropped
                if poisons_process(str(exc)) or _out_of_memory(exc):
                    raise  # as above: every later caption would fail too, and be dropped
                log.warning("T5 failed on the caption of %s: %s", keys[i], exc)
                features.append(None)
                lengths.append(0)
                continue
            features.append(one.features[0])
            lengths.append(one.lengths[0])
            truncated += one.n_truncated
            nonfinite += [i] if one.nonfinite else []
        failed = sum(f is None for f in features)
        if failed == len(features) > 1:
            raise error
        dropped["t5_error"] += failed
        return EncodedCaptions(features, lengths, truncated, nonfinite)  # type: ignore[arg-type]

    def _encode_images(self, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """Codes (B, h, w) uint16, and those of the mirrored images when ``flip``.

        Out of memory, the images go through the VQ in halves, and from then on in chunks of
        the size that fit (every batch has the same shape, so the same batch would fail on
        every retry of every shard); a single image out of memory is raised."""
        rows = self._vq_rows or len(pixels)
        while True:
            try:
                parts = [
                    self._encode_chunk(pixels[i : i + rows]) for i in range(0, len(pixels), rows)
                ]
                break
            except torch.OutOfMemoryError:
                if rows == 1:
                    raise
                rows = max(1, rows // 2)
                self._vq_rows = rows
                log.warning("VQ out of memory: %d images per forward pass from now on", rows)
                if torch.device(self.cfg.vq.device).type == "cuda":
                    torch.cuda.empty_cache()
        codes = np.concatenate([c for c, _ in parts])
        flipped = None if parts[0][1] is None else np.concatenate([f for _, f in parts])
        return codes, flipped

    @torch.inference_mode()
    def _encode_chunk(self, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        x = pixels.to(self.cfg.vq.device, next(self.vq.encoder.parameters()).dtype)
        if not self.cfg.flip:
            return codes_to_uint16(self.vq.encode(x)), None
        both = codes_to_uint16(self.vq.encode(torch.cat([x, x.flip(-1)])))
        return both[: len(x)], both[len(x) :]

    def _batches(
        self,
        index: int,
        scores: dict[str, dict[str, Any]] | None,
        stats: dict[str, Any],
        dropped: collections.Counter[str],
        mended: collections.Counter[str],
    ) -> Iterator[_Batch]:
        """Kept samples of the raw shard, decoded and cropped, ``batch_size`` at a time."""
        cfg = self.cfg
        seen: set[str] = set()
        pending: list[tuple[str, dict[str, Any], str, str, str, dict[str, Any], int | None]] = []
        with ThreadPoolExecutor(cfg.decode_threads) as pool:
            for sample in shards.iter_raw_shard(cfg.input, index, stats):
                key = str(sample["__key__"])
                meta = sample_meta(sample)
                caption, caption_problem = sample_caption(sample, meta)
                reason = self._select(key, caption, scores, seen, str(meta.get("url") or ""))
                seen.add(key)
                label = None
                if reason is None and cfg.label_field is not None:
                    # missing and null alike: img2dataset writes a missing column as null
                    label, reason = class_label(meta.get(cfg.label_field), cfg.num_classes)
                # what T5 reads, cleaned once here (the encoder is told not to clean it again)
                text = caption
                if reason is None and cfg.text is not None and cfg.text.clean_captions:
                    text = clean_caption(caption)
                    if not text:
                        reason = "empty_caption_after_cleaning"  # a bare URL or file name
                if reason is not None:
                    dropped[reason] += 1
                    continue
                if caption_problem is not None:
                    mended[caption_problem] += 1
                short = ""
                if cfg.short_captions:
                    # cut first, as LlamaGen cuts the caption it reads, then cleaned like it
                    short = first_sentence(caption)
                    short = clean_caption(short) if cfg.text and cfg.text.clean_captions else short
                pending.append((key, sample, caption, text, short, meta, label))
                if len(pending) == cfg.batch_size:
                    batch = self._decode(pending, pool, index, scores, dropped, mended)
                    pending = []
                    if batch is not None:
                        yield batch
            if pending:
                batch = self._decode(pending, pool, index, scores, dropped, mended)
                if batch is not None:
                    yield batch

    def _select(
        self,
        key: str,
        caption: str,
        scores: dict[str, dict[str, Any]] | None,
        seen: set[str],
        url: str,
    ) -> str | None:
        """Why this sample is left out, or None to keep it."""
        if key in seen:
            return "duplicate_key"
        if not shards.valid_key(key):
            return "bad_key"
        if scores is not None:
            row = scores.get(key)
            if row is None:
                return "not_scored"
            # a key is a place in the shard, not an image: a raw folder downloaded again from
            # other metadata while its scores stayed would take another image's scores
            if row.get("url") is not None and row["url"] != storable_text(url):
                return "score_of_another_image"
            if not row["keep"]:
                return f"filtered_{row['reason'] or 'unknown'}"
            reason = aesthetic_reason(row["aesthetic"], self.cfg.min_aesthetic)
            if reason is not None:
                return reason
        if not caption and self.cfg.text is not None:  # text-free: labels only, kept as they are
            return "empty_caption"
        return None

    def _decode(
        self,
        pending: list[tuple[str, dict[str, Any], str, str, str, dict[str, Any], int | None]],
        pool: ThreadPoolExecutor,
        index: int,
        scores: dict[str, dict[str, Any]] | None,
        dropped: collections.Counter[str],
        mended: collections.Counter[str],
    ) -> _Batch | None:
        size = self.cfg.resolution

        def prepare(item) -> tuple[torch.Tensor | None, str | None, tuple[str, ...]]:
            img, problem, conversions = decode_rgb(item[1])
            if img is None:
                return None, problem, conversions
            if min(img.size) < size and not self.cfg.upscale_small:
                return None, "too_small", conversions
            try:
                return to_pixels(resize_center_crop(img, size)), None, conversions
            except Exception as exc:  # noqa: BLE001 - one image that will not crop: one drop
                log.warning("shard %d: sample %s: resize / crop failed: %r", index, item[0], exc)
                return None, "unprocessable_image", conversions

        keys, pixels, captions, texts, shorts, metas = [], [], [], [], [], []
        for (key, _, caption, text, short, meta, label), (px, problem, conversions) in zip(
            pending, pool.map(prepare, pending)
        ):
            mended.update(conversions)
            if problem is not None:
                dropped[problem] += 1
                continue
            keys.append(key)
            pixels.append(px)
            captions.append(caption)
            texts.append(text)
            shorts.append(short)
            metas.append(_token_meta(key, meta, index, scores, label))
        if not keys:
            return None
        return _Batch(keys, torch.stack(pixels), captions, texts, metas, shorts)


def _token_meta(
    key: str,
    meta: dict[str, Any],
    index: int,
    scores: dict[str, dict[str, Any]] | None,
    label: int | None = None,
) -> dict[str, Any]:
    """The token sample's json: url, original size, scores, where it came from; the class
    ``label`` when pretokenized with ``label_field``."""
    row = (scores or {}).get(key, {})
    score_fields = ("aesthetic", "punsafe", "pwatermark", "similarity")
    found = {f: row.get(f, meta.get(f)) for f in score_fields}
    return {
        "url": meta.get("url"),
        "width": meta.get("original_width", meta.get("width")),
        "height": meta.get("original_height", meta.get("height")),
        "scores": {k: v for k, v in found.items() if v is not None and v == v},  # drop NaN
        "source_shard": index,
        **({"label": label} if label is not None else {}),
    }


@dataclasses.dataclass(frozen=True)
class _WorkerFactory:
    """Picklable ``make_worker`` for the executor (the actor builds the worker and its models)."""

    cfg: PretokenizeConfig

    def __call__(self) -> PretokenizeWorker:
        return PretokenizeWorker(self.cfg)


# --- the stage ------------------------------------------------------------------------------------


def score_parquet_identity(scores: str, index: int) -> tuple[str, storage.FileEntry]:
    """Which score parquet ``index`` under ``scores`` is there: a digest of its footer, which
    holds what the score stage recorded in it (the raw shard identity it scored, its drop counts
    by reason and kept count) and each column's byte sizes and min / max. A rescore that changes
    decisions or scores changes it; the same rows written again, or copied to another store,
    keep it. The footer alone (a few KB, as ``filter.read_raw_identity`` reads it), not the
    whole parquet, in one suffix read (one GET on S3). Returned with the entry of the file read
    (``storage.read_tail``: on S3 its size and ETag, as a listing shows them), which a done
    marker records (``SCORES_ENTRY_STAT``) so that a run start reads no footer of a parquet a
    listing shows unchanged. (Settings that change the decisions are also refused as a whole:
    :func:`pipeline.data.filter.score_settings`.)"""
    uri = score_uri(scores, index)
    n = _FOOTER_READ
    while True:
        tail, entry = storage.read_tail(uri, n)
        length = int.from_bytes(tail[-8:-4], "little") if len(tail) >= 8 else 0
        if tail[-4:] != b"PAR1" or length <= 0 or length + 8 > entry.size:
            raise ValueError(f"{uri} is not a parquet file (no footer)")
        if length + 8 <= len(tail):
            return hashlib.sha256(tail[-(8 + length) : -8]).hexdigest()[:20], entry
        n = length + 8  # a footer longer than the first read: read again, as long as it says


def _entry_stat(entry: storage.FileEntry) -> str | None:
    """How a done marker records a file's listing entry (None: the store shows no version)."""
    return f"{entry.size} {entry.version}" if entry.version is not None else None


def _score_parquets(scores: str) -> dict[int, storage.FileEntry]:
    """The score parquets under ``scores`` by shard index, with their listing entries: one
    listing (``filter.scored_indices``'s, with sizes and versions)."""
    suffix = ".parquet"
    files = storage.list_files(scores, suffix=suffix)
    return {int(n[: -len(suffix)]): e for n, e in files.items() if n[: -len(suffix)].isdigit()}


def _saved_score_config(scores: str) -> dict[str, Any] | None:
    """The score_config.yaml the score stage saved in ``scores`` (None: nothing scored yet)."""
    uri = storage.join(scores, SCORE_CONFIG_NAME)
    if not storage.exists(uri):
        return None
    return yaml.safe_load(storage.read_text(uri)) or {}


def _check_scores_have_aesthetic(scores: str, saved: dict[str, Any] | None) -> None:
    """``min_aesthetic`` against score parquets made without an aesthetic model would drop every
    sample (``aesthetic_nan``) and mark every shard done, empty: refused before any work."""
    if saved is None:
        return  # nothing scored yet: the shards wait for their parquets
    if not saved.get("aesthetic"):
        raise ConfigError(
            f"min_aesthetic is set but {scores} was scored without an aesthetic model "
            f"({SCORE_CONFIG_NAME}: aesthetic null): every sample would be dropped. Score with "
            "one (score.yaml's aesthetic section) or drop min_aesthetic"
        )


def _outdated_done_shards(
    cfg: PretokenizeConfig,
    done: list[shards.ShardInfo],
    raw: Mapping[int, str],
    parquets: Mapping[int, storage.FileEntry],
) -> tuple[list[int], list[int], dict[int, str | None]]:
    """(gone, changed, seen) among the ``done`` token shards: those whose raw shard is no
    longer among the complete ones (``raw``: their identities by index, as
    ``shards.raw_shard_identities`` lists them), those made from another download of their raw
    shard, or another score parquet, than is there now (their done markers' ``RAW_SHARD_STAT``
    and ``SCORES_STAT``), and, by index, the listing entry (``_entry_stat``) of the unchanged
    score parquets whose footer was read because their markers record another entry, or none
    (markers written before entries were): :func:`_record_score_entries` records it, so the next
    start reads none of them. A done shard whose score parquet is gone (not in ``parquets``) is
    checked against its raw shard only, and kept: scores made again with the settings it was
    made with (others are refused: ``filter.score_settings``) decide the same.

    No request per shard where nothing changed: the raw shards' identities come with the
    listing that finds them, and a parquet's footer is read (one GET, 32 at a time) only when
    the scores folder's listing shows it with another size or version than its marker records
    (rewritten, or copied to another store)."""
    gone = [s.index for s in done if s.index not in raw]
    present = [s for s in done if s.index in raw]
    # markers written before what a shard was made from was recorded: there is nothing to
    # compare, so they are taken as made from the raw shards and parquets there now (as every
    # done shard was before), and said once: refusing or redoing every older output would cost
    # a whole pretokenize run for a change that most of them never had
    unchecked = [s.index for s in present if s.stats.get(RAW_SHARD_STAT) is None]
    if unchecked:
        log.warning(
            "pretokenize: %d done token shards under %s were made before their inputs were "
            "recorded: they cannot be checked against the raw shards (and score parquets) there "
            "now, and are kept as made from them (pretokenize into a new folder to be sure): %s",
            len(unchecked),
            cfg.output,
            unchecked[:20],
        )
    seen: dict[int, str | None] = {}

    def changed(shard: shards.ShardInfo) -> bool:
        raw_made_from = shard.stats.get(RAW_SHARD_STAT)
        if raw_made_from is None:
            return False  # unchecked, above
        if raw_made_from != raw[shard.index]:
            return True
        scores_made_from = shard.stats.get(SCORES_STAT)
        if not cfg.scores or scores_made_from is None or shard.index not in parquets:
            return False
        listed = _entry_stat(parquets[shard.index])
        if listed is not None and shard.stats.get(SCORES_ENTRY_STAT) == listed:
            return False  # the parquet whose footer the marker records, as it was read
        identity, entry = score_parquet_identity(cfg.scores, shard.index)
        if identity != scores_made_from:
            return True
        seen[shard.index] = _entry_stat(entry)
        return False

    with ThreadPoolExecutor(32) as pool:
        flags = list(pool.map(changed, present))
    changed_ = [s.index for s, c in zip(present, flags, strict=True) if c]
    return gone, changed_, seen


def _record_score_entries(
    cfg: PretokenizeConfig, done: list[shards.ShardInfo], seen: Mapping[int, str | None]
) -> None:
    """Record in the done markers of ``seen`` (:func:`_outdated_done_shards`) the entries of
    their score parquets, read unchanged: one write per marker, once, where every later start
    would read the parquet's footer again."""
    todo = [
        dataclasses.replace(s, stats={**s.stats, SCORES_ENTRY_STAT: seen[s.index]})
        for s in done
        if s.index in seen and seen[s.index] is not None
    ]
    if not todo:
        return
    log.info("pretokenize: recording %d score parquets' entries in done markers", len(todo))

    def record(info: shards.ShardInfo) -> None:
        storage.write_json(storage.join(cfg.output, shards.done_name(info.index)), info.to_dict())

    with ThreadPoolExecutor(32) as pool:
        list(pool.map(record, todo))


def _remove_outdated(cfg: PretokenizeConfig, gone: list[int], changed: list[int]) -> None:
    """Act on :func:`_outdated_done_shards`: the ``changed`` token shards (and done markers) are
    removed, to be redone (kept, they would mix samples of inputs that are no longer there into
    the manifest and into training, which reads every done marker, and a rerun would skip them
    for good); the ``gone`` ones are kept, with a warning (raw images are deleted after
    tokenizing to save storage)."""
    if gone:
        log.warning(
            "pretokenize: %d token shards under %s have no complete raw shard under %s any more "
            "(raw images deleted after tokenizing, or downloaded again with fewer shards, or "
            "being downloaded again): kept as they are; if the raw folder was downloaded again, "
            "pretokenize it into a new output: %s",
            len(gone),
            cfg.output,
            cfg.input,
            gone[:20],
        )
    if changed:
        log.warning(
            "pretokenize: %d token shards were made from another download of their raw shard, "
            "or another score parquet, than is there now: removed and redone (those this run "
            "covers and can score: within max_shards, with fresh scores): %s",
            len(changed),
            changed[:20],
        )
        with ThreadPoolExecutor(32) as pool:
            list(pool.map(lambda i: shards.remove_shard(cfg.output, i), changed))


def run_pretokenize(cfg: PretokenizeConfig) -> dict[str, Any]:
    """Pretokenize every complete raw shard not done yet (or done from inputs that changed
    since); returns the merged manifest."""
    check_paths_for_ray_job({"input": cfg.input, "output": cfg.output, "scores": cfg.scores})
    raw_ids = shards.raw_shard_identities(cfg.input)
    raw = list(raw_ids)
    indices = raw[: cfg.max_shards] if cfg.max_shards is not None else raw
    unscored: list[int] = []
    stale: list[int] = []
    score_config = _saved_score_config(cfg.scores) if cfg.scores else None
    if cfg.min_aesthetic is not None:
        _check_scores_have_aesthetic(cfg.scores, score_config)
    # one listing: which shards are scored, and each parquet's size and version
    parquets = _score_parquets(cfg.scores) if cfg.scores else {}
    scored = set(parquets)
    # a done marker counts only for the inputs the shard was made from: one whose raw shard was
    # downloaded again, or whose score parquet changed, is outdated (removed below, once the
    # output is claimed, and redone); one whose raw shard is gone is kept
    done_shards = shards.list_done_shards(cfg.output)
    gone, changed, seen = _outdated_done_shards(cfg, done_shards, raw_ids, parquets)
    done = {s.index for s in done_shards} - set(changed)
    if cfg.scores:
        missing = [i for i in indices if i not in scored]
        if missing:
            log.warning(
                "%d raw shards have no score parquet yet; left for a later run (score them, "
                "then rerun): %s",
                len(missing),
                missing[:20],
            )
        # a score parquet of an earlier download of its raw shard holds another download's
        # decisions: such a shard waits for its scores like one with none. A done shard was
        # checked against its parquet above
        stale = replaced_raw_shards(
            cfg.input, cfg.scores, [i for i in indices if i in scored and i not in done]
        )
        if stale:
            log.warning(
                "%d raw shards were downloaded again after they were scored: their score "
                "parquets are the old download's; left for a later run (score again: the score "
                "stage redoes them, then rerun): %s",
                len(stale),
                stale[:20],
            )
        unscored = sorted(missing + stale)
        skip = set(unscored)
        indices = [i for i in indices if i not in skip]
    if not indices:
        raise FileNotFoundError(f"no complete (and scored) raw shards under {cfg.input}")
    shards.claim_output(
        cfg.output,
        cfg,
        CONFIG_NAME,
        INPUTS_NAME,
        _CONTENT_FIELDS,
        _WEIGHTS,
        has_results=lambda: bool(shards.done_indices(cfg.output)),
        missing_as=_SAVED_BEFORE,
        # scores made again into the same folder with other filters or another aesthetic model
        # would keep their old decisions in the done shards and the new ones in the rest
        derived={_SCORE_SETTINGS: score_settings(score_config)} if cfg.scores else None,
    )
    _remove_outdated(cfg, gone, changed)
    _record_score_entries(cfg, done_shards, seen)
    report = run_units(
        indices,
        _WorkerFactory(cfg),
        cfg.executor,
        is_done=done.__contains__,
        desc="pretokenize",
        # the manifest is merged from the done markers this driver sees
        done_marker=lambda i: storage.join(cfg.output, shards.done_name(i)),
    )
    manifest = shards.merge_manifest(
        cfg.output,
        extra={
            "resolution": cfg.resolution,
            "flip": cfg.flip,
            # only when on: a manifest of an output made without them reads as before
            **({"short_captions": True} if cfg.short_captions else {}),
            **({"text": False} if cfg.text is None else {}),  # no t5.npy in these shards
            **(
                {"label_field": cfg.label_field, "num_classes": cfg.num_classes}
                if cfg.label_field is not None
                else {}
            ),
            "failed_shards": {str(k): v for k, v in sorted(report.failed.items())},
            # raw shards not pretokenized because they have no score parquet yet, or only one
            # of an earlier download of the shard (those are stale_score_shards too)
            "unscored_shards": unscored,
            "stale_score_shards": stale,
            # done shards of this run's start made from inputs that changed since (removed,
            # redone where this run could), and those whose raw shard is gone (kept)
            "redone_changed_input": len(changed),
            "kept_without_raw_shard": len(gone),
        },
    )
    log.info(
        "pretokenize: %d shards, %d samples, %.1f MB; dropped %s",
        manifest["num_shards"],
        manifest["num_samples"],
        manifest["num_bytes"] / 1e6,
        manifest["dropped"],
    )
    return manifest
