"""Generated LAION-COCO-like data: coloured shapes on plain backgrounds, captions that name them.

Simple enough for a tiny tokenizer and GPT to learn on two CPU cores, yet real images behind real
URLs: the demo and the tests write JPEGs to a folder, serve it over loopback HTTP and hand the
download stage a parquet with LAION-COCO's columns. ``check_image`` reads the colour and shape
back from an image so the demo can score its samples against their prompts.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import random
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 220, 40),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle")


@dataclass(frozen=True)
class ShapeSample:
    """One generated picture: what it shows and its caption."""

    colour: str
    shape: str
    background: str
    caption: str


def caption_for(colour: str, shape: str, background: str, rng: random.Random | None = None) -> str:
    templates = (
        "a {c} {s} on a {b} background",
        "a photo of a {c} {s} on {b}",
        "{c} {s}, {b} background",
        "a simple {c} {s} in front of a {b} wall",
    )
    t = templates[0] if rng is None else rng.choice(templates)
    return t.format(c=colour, s=shape, b=background)


def draw_shape(
    colour: str, shape: str, background: str, size: int = 256, rng: random.Random | None = None
) -> Image.Image:
    """An RGB image of one shape; position and scale jitter with ``rng``."""
    rng = rng or random.Random(0)
    img = Image.new("RGB", (size, size), BACKGROUNDS[background])
    d = ImageDraw.Draw(img)
    r = size * rng.uniform(0.22, 0.32)
    cx = size / 2 + size * rng.uniform(-0.1, 0.1)
    cy = size / 2 + size * rng.uniform(-0.1, 0.1)
    fill = COLOURS[colour]
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return img


def make_samples(n: int, seed: int = 0) -> list[ShapeSample]:
    """``n`` samples cycling through every colour x shape x background, captions varied."""
    rng = random.Random(seed)
    combos = [(c, s, b) for c in COLOURS for s in SHAPES for b in BACKGROUNDS]
    out = []
    for i in range(n):
        c, s, b = combos[i % len(combos)] if i < len(combos) else rng.choice(combos)
        out.append(ShapeSample(c, s, b, caption_for(c, s, b, rng)))
    return out


def write_images(
    samples: list[ShapeSample], folder: str, size: int = 256, seed: int = 0, quality: int = 95
) -> list[str]:
    """Write each sample as ``{i:06d}.jpg`` under ``folder``; returns the file names."""
    os.makedirs(folder, exist_ok=True)
    names = []
    for i, s in enumerate(samples):
        name = f"{i:06d}.jpg"
        img = draw_shape(s.colour, s.shape, s.background, size, random.Random(seed * 1_000_003 + i))
        img.save(os.path.join(folder, name), quality=quality)
        names.append(name)
    return names


def laion_coco_table(samples: list[ShapeSample], urls: list[str], size: int = 256):
    """A pandas DataFrame with LAION-COCO's metadata columns for these samples.

    In LAION-COCO, ``top_caption`` is the BLIP caption (what the shipped download config
    reads) and ``TEXT`` the page's original alt-text, which ``similarity`` scores the image
    against; a generated picture has no alt-text of its own, so both hold its caption."""
    import pandas as pd

    return pd.DataFrame(
        {
            "URL": urls,
            "TEXT": [s.caption for s in samples],
            "top_caption": [s.caption for s in samples],
            "all_captions": [[s.caption] for s in samples],
            "all_similarities": [[0.35] for _ in samples],
            "WIDTH": [size] * len(samples),
            "HEIGHT": [size] * len(samples),
            "similarity": [0.35] * len(samples),
            # stable across processes (Python's hash() of a str is salted per process)
            "hash": [zlib.crc32(u.encode()) for u in urls],
            "pwatermark": [0.05] * len(samples),
            "punsafe": [0.01] * len(samples),
        }
    )


# --- checking what an image shows ------------------------------------------------------------


def check_image(img: Image.Image) -> tuple[str | None, str | None]:
    """(colour, shape) read back from an image, ``None`` where it cannot tell.

    Made to read blurry decodes of a tiny tokenizer, with halos and smeared edges, as well as
    sharp pictures:

    - background: the median border colour; "far" pixels: those whose distance from it is over
      half the image's contrast (its 99th percentile distance), so an edge sits where a blur
      puts it, not where a fixed threshold would;
    - the object: the connected region of far pixels that covers most of the image's central
      box (generated objects always cover it, with 8% clear of the edges); a ring or smear of
      other colour around it is another region;
    - colour: the palette entry nearest the median of the object's core (its farther half);
      ``None`` if that is nearer a background colour;
    - shape: within the object's bounding box (rows and columns at least 5% as full as the
      fullest), how full its four corner cells are (square ~1, triangle: the bottom two only,
      circle ~0) and how full its top quarter is against its bottom quarter (triangle ~0.15,
      the others ~1).
    """
    from scipy import ndimage

    a = np.asarray(img.convert("RGB"), dtype=np.float32)
    h, w, _ = a.shape
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    bg = np.median(border, axis=0)
    dist = np.linalg.norm(a - bg, axis=-1)
    contrast = float(np.percentile(dist, 99))
    if contrast < 60:
        return None, None
    far = dist > 0.5 * contrast
    m = max(1, round(0.06 * min(h, w)))
    far[:m], far[-m:], far[:, :m], far[:, -m:] = False, False, False, False
    labels, n = ndimage.label(far)
    if n == 0:
        return None, None
    cy, cx, r = h // 2, w // 2, max(1, round(0.1 * min(h, w)))
    central = np.bincount(labels[cy - r : cy + r, cx - r : cx + r].ravel(), minlength=n + 1)
    central[0] = 0
    if central.max() == 0:
        return None, None
    mask = labels == int(central.argmax())
    if mask.sum() < 0.01 * h * w:
        return None, None
    core = mask & (dist >= np.median(dist[mask]))
    obj = np.median(a[core], axis=0)
    palette = {**COLOURS, **{f"bg:{k}": v for k, v in BACKGROUNDS.items()}}
    colour = min(palette, key=lambda c: float(np.linalg.norm(obj - np.array(palette[c]))))
    colour = None if colour.startswith("bg:") else colour
    mask = ndimage.binary_fill_holes(mask)  # a blotchy inside is still the inside

    rows, cols = mask.sum(1), mask.sum(0)  # rows/columns with a few stray pixels don't count
    ys = np.nonzero(rows >= max(1.0, 0.05 * rows.max()))[0]
    xs = np.nonzero(cols >= max(1.0, 0.05 * cols.max()))[0]
    if min(ys[-1] - ys[0], xs[-1] - xs[0]) < 3:
        return colour, None
    box = mask[ys[0] : ys[-1] + 1, xs[0] : xs[-1] + 1].astype(np.float32)
    ch, cw = max(1, box.shape[0] // 5), max(1, box.shape[1] // 5)
    corners = [
        box[:ch, :cw].mean(),
        box[:ch, -cw:].mean(),
        box[-ch:, :cw].mean(),
        box[-ch:, -cw:].mean(),
    ]
    q = max(1, box.shape[0] // 4)
    top, bottom = box[:q].mean(), box[-q:].mean()
    taper = top / max(bottom, 1e-6)
    if taper < 0.6 and corners[2] + corners[3] > corners[0] + corners[1] + 0.5:
        shape = "triangle"
    elif min(corners) > 0.5:
        shape = "square"
    elif max(corners) < 0.35 and taper > 0.6:
        shape = "circle"
    else:
        shape = None
    return colour, shape


def parse_caption(caption: str) -> tuple[str | None, str | None]:
    """(colour, shape) named by a caption."""
    words = caption.lower().replace(",", " ").split()
    colour = next((w for w in words if w in COLOURS), None)
    shape = next((w for w in words if w in SHAPES), None)
    return colour, shape


# --- serving over loopback -------------------------------------------------------------------


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep test and demo output readable
        pass


@contextlib.contextmanager
def serve_folder(
    folder: str, handler: type[http.server.BaseHTTPRequestHandler] | None = None
) -> Iterator[str]:
    """Serve ``folder`` on 127.0.0.1 (a free port) in a thread; yields the base URL."""
    h = handler or functools.partial(_QuietHandler, directory=folder)
    # the default listen backlog (5) drops connections under img2dataset's many threads
    server_cls = type("Server", (http.server.ThreadingHTTPServer,), {"request_queue_size": 256})
    server = server_cls(("127.0.0.1", 0), h)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
