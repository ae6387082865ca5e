import random
import urllib.request

from pipeline.data import synthetic


def test_checker_reads_back_every_combination():
    for c in synthetic.COLOURS:
        for s in synthetic.SHAPES:
            for b in synthetic.BACKGROUNDS:
                for seed in range(3):
                    img = synthetic.draw_shape(c, s, b, 64, random.Random(seed))
                    assert synthetic.check_image(img) == (c, s), (c, s, b, seed)


def test_caption_names_what_is_drawn():
    for sample in synthetic.make_samples(50, seed=1):
        assert synthetic.parse_caption(sample.caption) == (sample.colour, sample.shape)


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
