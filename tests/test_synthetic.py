import random
import urllib.request

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from pipeline.data import synthetic


@pytest.mark.parametrize("size", [32, 64, 128, 256])
@pytest.mark.parametrize("blur", [0.0, 2.0])
def test_checker_reads_back_every_combination(size, blur):
    # blur: a Gaussian of `blur` pixels at 64 px, like a tiny tokenizer's decode
    for c in synthetic.COLOURS:
        for s in synthetic.SHAPES:
            for b in synthetic.BACKGROUNDS:
                for seed in range(3):
                    img = synthetic.draw_shape(c, s, b, size, random.Random(seed))
                    if blur:
                        img = img.filter(ImageFilter.GaussianBlur(blur * size / 64))
                    assert synthetic.check_image(img) == (c, s), (c, s, b, seed)


def test_checker_does_not_read_shapes_into_noise():
    rng = np.random.default_rng(0)
    seen = []
    for _ in range(100):
        noise = (rng.random((8, 8, 3)) * 255).astype(np.uint8)
        seen.append(synthetic.check_image(Image.fromarray(noise).resize((64, 64), Image.BICUBIC)))
    # a blob of noise may get a colour name, but rarely a shape, and almost never both
    assert sum(shape is not None for _, shape in seen) < 0.3 * len(seen)
    assert sum(None not in got for got in seen) < 0.1 * len(seen)


def test_caption_names_what_is_drawn():
    for sample in synthetic.make_samples(50, seed=1):
        assert synthetic.parse_caption(sample.caption) == (sample.colour, sample.shape)


@pytest.mark.parametrize(
    "colour,shape", [("blue", "circle"), ("red", "square"), ("yellow", "triangle")]
)
def test_checker_ignores_a_frame_of_other_colour_around_the_object(colour, shape):
    # what the demo's stage-2 samples often show: the object, a gap, then a smeared green frame
    img = synthetic.draw_shape(colour, shape, "white", 128, random.Random(0))
    ImageDraw.Draw(img).rectangle([7, 7, 120, 120], outline=(90, 160, 60), width=6)
    assert synthetic.check_image(img) == (colour, shape)


def test_blank_image_is_not_recognised():
    img = synthetic.draw_shape("red", "circle", "white", 64).point(lambda _: 200)
    assert synthetic.check_image(img) == (None, None)


def test_serve_folder(tmp_path):
    samples = synthetic.make_samples(3)
    names = synthetic.write_images(samples, str(tmp_path), size=32)
    with synthetic.serve_folder(str(tmp_path)) as base:
        data = urllib.request.urlopen(f"{base}/{names[1]}", timeout=10).read()
    assert data == (tmp_path / names[1]).read_bytes()
    table = synthetic.laion_coco_table(samples, [f"{base}/{n}" for n in names], size=32)
    assert list(table.TEXT) == [s.caption for s in samples]
    # the BLIP-caption column the shipped download config reads
    assert list(table.top_caption) == [s.caption for s in samples]
