"""Image preprocessing of ``pipeline.data.raw``: LlamaGen's centre crop, and decoding to RGB."""

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.data.raw import center_crop, decode_rgb


def llamagen_center_crop_arr(pil_image, image_size):
    """LlamaGen's ``center_crop_arr`` (``dataset/augmentation.py``, from ADM's
    ``image_datasets.py``), restated from its code: what its code extraction
    (``autoregressive/train/extract_codes_t2i.py``) and tokenizer evaluation apply."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)

    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(
        tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC
    )

    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size])


def _natural_like(w, h, seed):
    """Smooth structure at several scales plus fine grain: where a box pre-shrink and a
    single bicubic resize visibly differ."""
    rng = np.random.default_rng(seed)
    acc = np.zeros((h, w, 3), np.float64)
    for cells, amp in ((4, 90.0), (32, 50.0), (256, 30.0)):
        cw, ch = max(1, min(w, cells)), max(1, min(h, cells))
        small = Image.fromarray(rng.integers(0, 256, (ch, cw, 3), dtype=np.uint8))
        big = np.asarray(small.resize((w, h), Image.Resampling.BICUBIC), np.float64)
        acc += (big - 127.5) * amp / 127.5
    acc += rng.normal(0, 12, (h, w, 3))
    return Image.fromarray((127.5 + acc).clip(0, 255).astype(np.uint8))


@pytest.mark.parametrize(
    ("w", "h", "size"),
    [
        (512, 512, 256),
        (1024, 768, 256),
        (300, 1447, 256),  # tall: Pillow picks its own order of passes
        (1447, 300, 256),
        (2000, 3000, 512),
        (256, 256, 256),  # no resize at all
        (257, 300, 256),
        (1024, 1024, 512),  # short side exactly 2 * size: halved once
        (1023, 1500, 512),  # just under: not halved
        (2100, 1700, 256),  # halved twice
    ],
)
def test_center_crop_is_llamagens_center_crop_arr(w, h, size):
    """The pretokenize (and evaluation) centre crop gives LlamaGen's pixels exactly: its box
    halving, its bicubic resize of the whole image with its rounding of the new size, its
    crop offsets. A single bicubic resize of the cropped region, as before, was sharper
    (2-3 levels off on average on images like these) and differed in the order of passes."""
    for img in (_natural_like(w, h, seed=w * 7 + h), _natural_like(h, w, seed=h)):
        want = np.asarray(llamagen_center_crop_arr(img, size))
        got = np.asarray(center_crop(img, size))
        assert got.shape == want.shape == (size, size, 3)
        assert np.array_equal(got, want), (img.size, size, np.abs(got - want.astype(int)).max())


def _png16(values, **kw):
    buf = io.BytesIO()
    Image.fromarray(values.astype(np.uint16)).save(buf, "PNG", **kw)
    return buf.getvalue()


def test_16bit_grey_png_colour_key_is_transparent_and_counted():
    """A 16-bit greyscale PNG with a colour key (tRNS) keeps its transparency through the
    scaling to 8 bits: the keyed pixels are composited over white and counted as
    ``converted_transparent``, as every other transparent image; they were grey level 4
    before, uncounted."""
    data = _png16(np.full((30, 40), 1000), transparency=1000)
    assert Image.open(io.BytesIO(data)).info.get("transparency") == 1000  # the file has tRNS
    img, problem, notes = decode_rgb({"__key__": "k", "png": data})
    assert problem is None and img.mode == "RGB" and img.size == (40, 30)
    assert np.all(np.asarray(img) == 255)
    assert notes == ("converted_16bit", "converted_transparent")

    # the key is matched at 16 bits: 1001 rounds to the same 8-bit level (4) and stays opaque
    a = np.full((30, 40), 1001)
    a[:, :20] = 1000
    img, problem, notes = decode_rgb({"__key__": "k", "png": _png16(a, transparency=1000)})
    px = np.asarray(img)
    assert problem is None and notes == ("converted_16bit", "converted_transparent")
    assert np.all(px[:, :20] == 255) and np.all(px[:, 20:] == 4)

    # a key no pixel has: opaque, nothing but the scaling to count
    img, _, notes = decode_rgb({"__key__": "k", "png": _png16(a, transparency=7)})
    assert notes == ("converted_16bit",)
    assert np.all(np.asarray(img)[:, :20] == 4) and np.all(np.asarray(img)[:, 20:] == 4)

    # no key: scaled, not clipped (as before)
    img, _, notes = decode_rgb({"__key__": "k", "png": _png16(np.full((8, 8), 65535))})
    assert notes == ("converted_16bit",) and np.all(np.asarray(img) == 255)
