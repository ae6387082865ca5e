"""FLAN-T5 text encoder: captions -> per-token features for the GPT's text-conditioning prefix.

The paper conditions on FLAN-T5-XL encoder features (2048-d), at most 120 tokens per caption.
``TextEncoder.from_pretrained(uri)`` loads a ``T5EncoderModel`` and its tokenizer from a local
directory or an ``s3://`` URI (copied once into the local cache); there is no model hub access.
``encode`` returns only the valid tokens of each caption (no padding): the token shards store
``L x D`` per sample and the loader pads at batch time.

A full ``T5ForConditionalGeneration`` checkpoint (e.g. google/flan-t5-xl as published) also loads:
``T5EncoderModel`` takes the encoder weights and ignores the decoder's.

Captions are cleaned before tokenising (``clean_captions``, on by default), as LlamaGen's
``T5Embedder`` does for both feature extraction and sampling (:func:`clean_caption`): FLAN-T5 is
case-sensitive, and a model trained on lowercased, URL-free captions sees a prompt such as
"A Photo Of ..." as other tokens. The token shards keep the caption as it came.

``build_tiny_text_encoder`` writes a tiny random-weight T5 with a byte-level tokenizer for tests
and the offline demo; it is marked as random in its config and loading it logs a warning.
"""

from __future__ import annotations

import dataclasses
import html
import os
import re
import urllib.parse
from html.parser import HTMLParser
from typing import Literal

import torch

from pipeline import precision, storage
from pipeline.config import doc
from pipeline.log import get_logger

log = get_logger(__name__)

# Written into config.json of models built here; the loader warns when it sees it.
RANDOM_WEIGHTS_KEY = "t2i_random_weights"


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig:
    """Where the T5 encoder lives and how to run it (embedded in the pretokenize config)."""

    uri: str = doc("Local dir or s3:// URI holding config.json, weights and tokenizer files", "")
    max_length: int = doc("Most tokens per caption, EOS included (the paper: 120)", 120)
    batch_size: int = doc("Captions per forward pass", 64)
    device: str = doc("torch device, e.g. 'cuda', 'cuda:1' or 'cpu'", "cpu")
    dtype: Literal["float32", "bfloat16"] = doc(
        "Compute dtype: float32 or bfloat16 (not float16: T5 overflows there, and HF's T5 clamps "
        "the infinities inside each block, so the features come out finite but wrong)",
        "float32",
    )
    cache_dir: str | None = doc("Local cache for s3:// models (default $T2I_CACHE)", None)
    clean_captions: bool = doc(
        "Clean captions before T5 as LlamaGen does (lowercase; URLs, HTML, handles, file names "
        "and CJK removed; dashes, quotes and spaces unified): clean_caption in text_encoder.py",
        True,
    )


# --- caption cleaning ---------------------------------------------------------------------------
# LlamaGen (from PixArt and DeepFloyd IF) runs its cleaning twice on every caption before T5, in
# training and at sampling. These are its normalisations, written here anew and not byte for
# byte: a URL goes with its whole path (LlamaGen's pattern can leave a tail such as ".jpg"), and
# the rules aimed at shop listings (product codes, "free shipping", "page 3", sizes such as
# 1920x1080) are left out, since they would edit ordinary captions too.

_TLDS = r"(?:com|co|ru|net|org|edu|gov|it)"
_URL = re.compile(
    r"\b(?:(?:https?|www):(?:/{1,3}|[a-z0-9%])\S*|[a-z0-9.\-]+\." + _TLDS + r"[\w/\-]*\b/?(?!@))"
)
_CJK = re.compile(r"[\u31c0-\u33ff\u3400-\u4dbf\u4dc0-\u4dff\u4e00-\u9fff]+")
_DASHES = re.compile(
    "[\u002d\u058a\u05be\u1400\u1806\u2010-\u2015\u2e17\u2e1a\u2e3a\u2e3b\u2e40"
    "\u301c\u3030\u30a0\ufe31\ufe32\ufe58\ufe63\uff0d]+"
)
_FILE = re.compile(r"\S+\.(?:png|jpe?g|bmp|webp|eps|pdf|apk|mp4)")
_JUNK_PUNCT = re.compile(r"[#®•©™&@·º½¾¿¡§~()\[\]{}|\\/*]+")
_SEPARATORS = re.compile(r"[-_]")


class _Text(HTMLParser):
    """The text of an HTML fragment, tags dropped, entities decoded."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []

    def handle_data(self, data: str) -> None:
        self.parts.append(data)


def _html_text(s: str) -> str:
    parser = _Text()
    parser.feed(s)
    parser.close()
    return "".join(parser.parts)


def _clean_once(c: str) -> str:
    import ftfy

    c = urllib.parse.unquote_plus(c).strip().lower()
    c = c.replace("<person>", "person")
    c = _URL.sub("", c)
    c = _html_text(c)
    c = re.sub(r"@[\w]+\b", "", c)  # @handles
    c = _CJK.sub("", c)
    c = _DASHES.sub("-", c)
    c = re.sub(r"[`´«»“”¨]", '"', c)
    c = re.sub(r"[‘’]", "'", c)
    c = re.sub(r"&quot;?|&amp", "", c)  # entities left escaped twice
    c = re.sub(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " ", c)  # IP addresses
    c = re.sub(r"\d:\d\d\s+$", "", c)
    c = c.replace("\\n", " ")  # a literal backslash-n left by scrapers
    c = re.sub(r"#(?:\d{1,3}|\d{5,})\b", "", c)  # "#12", "#123456"
    c = re.sub(r"\b\d{6,}\b", "", c)  # long ids
    c = _FILE.sub("", c)
    c = re.sub(r"[\"']{2,}", '"', c)
    c = re.sub(r"\.{2,}", " ", c)
    c = _JUNK_PUNCT.sub(" ", c)
    c = re.sub(r"\s+\.\s+", " ", c)
    if len(_SEPARATORS.findall(c)) > 3:  # this-is-a-slug / this_is_a_slug
        c = _SEPARATORS.sub(" ", c)
    c = html.unescape(html.unescape(ftfy.fix_text(c))).strip()
    c = re.sub(r"\b\s+:\s+", ": ", c)
    c = re.sub(r"(\D[,./])\b", r"\1 ", c)  # a space after punctuation glued to a word
    c = re.sub(r"\s+", " ", c).strip()
    c = re.sub(r"^[\"']([\w\W]+)[\"']$", r"\1", c)  # surrounding quotes
    c = re.sub(r"^['_,\-:;]", "", c)
    c = re.sub(r"['_,\-:+]$", "", c)
    c = re.sub(r"^\.\S+$", "", c)
    return c.strip()


def clean_caption(caption: str) -> str:
    """A web caption as LlamaGen's T5 saw it: lowercased, URL-decoded, with URLs, HTML tags,
    @handles, file names, long numbers and CJK ideographs removed, dashes, quotes and spaces
    unified, and mojibake fixed (ftfy). Run twice, as LlamaGen does (one pass can leave a
    pattern the next removes)."""
    return _clean_once(_clean_once(caption))


@dataclasses.dataclass
class EncodedCaptions:
    """Features of a list of captions, in input order."""

    features: list[torch.Tensor]  # each (L_i, D) on the CPU, L_i <= max_length
    lengths: list[int]  # L_i: valid tokens, EOS included
    n_truncated: int  # captions cut at max_length
    nonfinite: list[int]  # indices whose features hold inf/nan (after the output cast)


class TextEncoder:
    """A T5 encoder plus tokenizer; ``encode(captions)`` gives valid-length features."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        max_length: int = 120,
        batch_size: int = 64,
        random_weights: bool = False,
        clean_captions: bool = True,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        # features are read as the first `length` rows of each caption: padding must follow them
        # (a tokenizer_config.json may say padding_side: left); and a long caption keeps its
        # start, as LlamaGen's T5 does (one saying truncation_side: left kept the end)
        self.tokenizer.padding_side = "right"
        self.tokenizer.truncation_side = "right"
        self.max_length = max_length
        self.batch_size = batch_size
        self.random_weights = random_weights
        self.clean_captions = clean_captions

    @property
    def dim(self) -> int:
        """Feature size D, read from the model config (2048 for FLAN-T5-XL)."""
        return int(self.model.config.d_model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @classmethod
    def from_pretrained(
        cls,
        uri: str,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        max_length: int = 120,
        batch_size: int = 64,
        cache_dir: str | None = None,
        clean_captions: bool = True,
    ) -> TextEncoder:
        """Load model and tokenizer from a local dir or an s3:// URI (copied to the cache)."""
        # Never reach for a hub: everything must be in the directory.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoTokenizer, T5EncoderModel

        if not uri:
            raise ValueError("text encoder uri is empty: set it to a local dir or s3:// URI")
        local_dir = storage.local_copy(uri, cache_dir)
        if not os.path.isfile(os.path.join(local_dir, "config.json")):
            raise FileNotFoundError(f"{uri}: no config.json; expected a save_pretrained directory")
        dtype = precision.torch_dtype(dtype)
        precision.warn_if_slow(dtype, device, "the text encoder (T5)")
        if dtype == torch.float16:
            raise ValueError(
                "T5 in float16 overflows, and HF's T5 clamps the infinities inside each block: "
                "the features come out finite but wrong. Use bfloat16 or float32"
            )
        # AutoTokenizer reads tokenizer_config.json; T5Tokenizer(vocab_file=...) would silently
        # ignore the file (see ENVIRONMENT.md).
        tokenizer = AutoTokenizer.from_pretrained(local_dir, local_files_only=True)
        model = T5EncoderModel.from_pretrained(local_dir, dtype=dtype, local_files_only=True).to(
            device
        )
        random_weights = bool(getattr(model.config, RANDOM_WEIGHTS_KEY, False))
        if random_weights:
            log.warning(
                "text encoder at %s has RANDOM weights (a tiny test model), not FLAN-T5: "
                "its features carry no meaning",
                uri,
            )
        log.info(
            "text encoder %s: %d-d, %d layers, %s on %s, max_length %d",
            uri,
            model.config.d_model,
            model.config.num_layers,
            dtype,
            device,
            max_length,
        )
        return cls(model, tokenizer, max_length, batch_size, random_weights, clean_captions)

    @classmethod
    def from_config(cls, cfg: TextEncoderConfig) -> TextEncoder:
        return cls.from_pretrained(
            cfg.uri,
            cfg.device,
            cfg.dtype,
            cfg.max_length,
            cfg.batch_size,
            cfg.cache_dir,
            cfg.clean_captions,
        )

    @torch.inference_mode()
    def encode(
        self,
        captions: list[str],
        out_dtype: torch.dtype = torch.float16,
        clean: bool | None = None,
    ) -> EncodedCaptions:
        """Encode captions; each gets its valid tokens only, as ``(L_i, D)`` CPU tensors.

        Captions are cleaned first when ``clean`` (None: ``clean_captions``;
        :func:`clean_caption`; False for captions a caller has cleaned already). Captions
        longer than ``max_length`` tokens are truncated (the EOS token is kept) and counted. An
        empty caption still encodes: it is the EOS token alone (L = 1), which is also what an
        unconditional caption looks like to T5.
        """
        bad = [i for i, c in enumerate(captions) if not isinstance(c, str)]
        if bad:
            raise TypeError(f"captions must be str; not at indices {bad[:10]}")
        if not captions:
            return EncodedCaptions([], [], 0, [])
        if self.clean_captions if clean is None else clean:
            captions = [clean_caption(c) for c in captions]
        # Token counts without truncation, to count the captions that get cut.
        full_lengths = [
            len(ids)
            for ids in self.tokenizer(captions, truncation=False, verbose=False)["input_ids"]
        ]
        n_truncated = sum(n > self.max_length for n in full_lengths)
        # Longest first, so each batch pads little; results go back to input order.
        order = sorted(range(len(captions)), key=lambda i: -full_lengths[i])
        features: list[torch.Tensor | None] = [None] * len(captions)
        lengths = [0] * len(captions)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            batch = self.tokenizer(
                [captions[i] for i in idx],
                max_length=self.max_length,
                truncation=True,
                padding="longest",
                return_tensors="pt",
            ).to(self.device)
            hidden = self.model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).last_hidden_state  # (B, T, D)
            valid = batch["attention_mask"].sum(dim=1).tolist()
            hidden = hidden.to(out_dtype).cpu()
            for row, (i, n) in enumerate(zip(idx, valid, strict=True)):
                # clone: a slice would keep the whole padded batch alive
                features[i] = hidden[row, :n].clone()
                lengths[i] = int(n)
        nonfinite = [i for i, f in enumerate(features) if not torch.isfinite(f).all()]
        if nonfinite:
            log.warning("%d of %d captions gave non-finite features", len(nonfinite), len(captions))
        return EncodedCaptions(features, lengths, n_truncated, nonfinite)  # type: ignore[arg-type]


def build_tiny_text_encoder(
    out_dir: str,
    d_model: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
) -> str:
    """Write a tiny random-weight T5 encoder + byte-level tokenizer to ``out_dir`` (local or s3).

    The result loads through ``TextEncoder.from_pretrained(out_dir)`` like a real model, and is
    marked as random so that loading it logs a warning. Returns ``out_dir``.
    """
    import tempfile

    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    tokenizer = ByT5Tokenizer()  # bytes as tokens: needs no vocabulary file
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=d_model // num_heads,
        d_ff=2 * d_model,
        num_layers=num_layers,
        num_heads=num_heads,
        feed_forward_proj="gated-gelu",  # as FLAN-T5
        dropout_rate=0.0,
        is_encoder_decoder=False,
        **{RANDOM_WEIGHTS_KEY: True},
    )
    torch.manual_seed(seed)
    model = T5EncoderModel(config).eval()
    with tempfile.TemporaryDirectory() as tmp:
        target = tmp if storage.is_remote(out_dir) else out_dir
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)
        if storage.is_remote(out_dir):
            storage.put_dir(tmp, out_dir)
    log.warning("wrote a tiny RANDOM-weight T5 encoder (%d-d) to %s: not FLAN-T5", d_model, out_dir)
    return out_dir
