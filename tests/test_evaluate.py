"""Evaluation: captions in, samples scored (CLIP score, FID, tokenizer metrics), JSON + markdown."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torchmetrics.image.fid import FrechetInceptionDistance

from jobs.evaluate import main as evaluate_main
from pipeline.config import load_config, to_dict
from pipeline.data import synthetic
from pipeline.evaluate import (
    EvalConfig,
    ReferenceCounts,
    clip_scores,
    compute_fid,
    fid_input,
    format_report,
    iter_reference_images,
    load_clip,
    read_captions,
    run_evaluation,
    update_fid,
)
from pipeline.models.aesthetic import build_tiny_aesthetic
from tests.rawshards import write_raw_shards
from tests.test_sample_job import build_sampling_models


class TinyFeatures(torch.nn.Module):
    """A fixed random conv feature extractor standing in for InceptionV3 (uint8 images in)."""

    num_features = 6

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 6, 4, stride=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.float() / 255).mean((2, 3))


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("eval")
    m = build_sampling_models(root)
    clip = build_tiny_aesthetic(str(root / "clip"))
    samples = synthetic.make_samples(12)
    synthetic.write_images(samples, str(root / "real"), size=48)
    (root / "captions.tsv").write_text(
        "id\tcaption\n" + "".join(f"{i}\t{s.caption}\n" for i, s in enumerate(samples[:3]))
    )
    write_raw_shards(str(root / "raw"), 1, 4, size=64)
    return {
        **m,
        "clip_weights": clip.clip_weights,
        "clip_config": clip.clip_model_config,
        "clip_model": clip.clip_model,
        "real": str(root / "real"),
        "captions": str(root / "captions.tsv"),
        "raw": str(root / "raw"),
    }


def test_read_captions_formats(tmp_path):
    (tmp_path / "c.txt").write_text("a  cat\n\nA dog\n")
    (tmp_path / "c.csv").write_text('id,caption\n1,"a cat, sitting"\n2,\n3,a dog\n')
    (tmp_path / "c.json").write_text(
        json.dumps({"annotations": [{"image_id": 1, "caption": "a cat\n"}, {"caption": "a dog"}]})
    )
    assert read_captions(str(tmp_path / "c.txt")) == ["a cat", "A dog"]
    assert read_captions(str(tmp_path / "c.csv")) == ["a cat, sitting", "a dog"]
    assert read_captions(str(tmp_path / "c.json"), limit=1) == ["a cat"]
    # COCO's ~5 captions per image: the first of each image, in the order of "images" (the first
    # N annotations were N/5 images 5 times); an image not listed there follows
    coco = {
        "images": [{"id": 7}, {"id": 3}],
        "annotations": [
            {"image_id": 3, "caption": "a cat"},
            {"image_id": 7, "caption": " "},
            {"image_id": 3, "caption": "a cat again"},
            {"image_id": 9, "caption": "a bird"},
            {"image_id": 7, "caption": "a dog"},
            {"image_id": 7, "caption": "a dog again"},
        ],
    }
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    assert read_captions(str(tmp_path / "coco.json")) == ["a dog", "a cat", "a bird"]
    assert read_captions(str(tmp_path / "coco.json"), limit=2) == ["a dog", "a cat"]
    with pytest.raises(ValueError, match="no column 'text'"):
        read_captions(str(tmp_path / "c.csv"), column="text")
    # LlamaGen's coco_captions.csv: one column, captions with commas and no quoting. They were
    # cut at the first comma (the rest of the line was dropped silently)
    (tmp_path / "llamagen.csv").write_text(
        'Prompt\nA man, a dog, and a cat.\n"unclosed quote, here\nA red bus\n"quoted, whole"\n'
    )
    assert read_captions(str(tmp_path / "llamagen.csv"), column="Prompt") == [
        "A man, a dog, and a cat.",
        '"unclosed quote, here',  # a stray quote stays the caption's: it swallows no lines
        "A red bus",
        "quoted, whole",
    ]
    # with several columns an unquoted comma is ambiguous: refused with the line
    (tmp_path / "bad.csv").write_text("id,caption\n1,a cat, sitting\n")
    with pytest.raises(ValueError, match=r"bad.csv:2: 3 fields for 2 columns"):
        read_captions(str(tmp_path / "bad.csv"))


def test_read_captions_refuses_json_entries_that_are_not_captions(tmp_path, caplog):
    """Numbers, lists and objects without "caption" became "1", "['a']" captions or KeyError
    tracebacks: each is now an error naming the file, the entry and its type; null and empty
    captions are skipped and counted."""

    def read(name: str, data) -> list[str]:
        (tmp_path / name).write_text(json.dumps(data))
        return read_captions(str(tmp_path / name))

    got = read("ok.json", [None, "a  cat", "", {"caption": "a dog"}, {"caption": None}, " "])
    assert got == ["a cat", "a dog"]
    assert "ok.json: 4 null or empty captions of 6 skipped" in caplog.text
    bad = {
        "num.json": (["a cat", 1], r"num.json: entry 1 is of type int, not a string"),
        "list.json": ([["a cat"]], r"list.json: entry 0 is of type list"),
        "nokey.json": ([{"text": "a"}], r"nokey.json: entry 0 has no 'caption' \(keys: \['text'\]"),
        "capnum.json": ([{"caption": 3}], r"capnum.json: entry 0's caption is of type int"),
        "str.json": ("a cat", r"str.json: JSON str, not a list of captions"),
        "coco.json": (
            {"images": [{"id": 1}], "info": {}},
            r"coco.json: a JSON object without an 'annotations' list \(keys: \['images', 'info'\]",
        ),
        "cocobad.json": (
            {"annotations": [{"image_id": 1, "caption": None}, {"image_id": 2, "caption": 5}]},
            r"cocobad.json: annotation 1's caption is of type int",
        ),
        "cocolist.json": ({"annotations": ["a cat"]}, r"cocolist.json: annotation 0 is a str"),
    }
    for name, (data, match) in bad.items():
        with pytest.raises(ValueError, match=match):
            read(name, data)
    # a COCO caption of null is skipped as an empty one is: the image's next caption is taken
    coco = {"annotations": [{"image_id": 1, "caption": None}, {"image_id": 1, "caption": "a"}]}
    assert read("coco_null.json", coco) == ["a"]
    (tmp_path / "broken.json").write_text('["a cat",')
    with pytest.raises(ValueError, match=r"broken.json: not valid JSON"):
        read_captions(str(tmp_path / "broken.json"))


def test_read_captions_names_a_file_that_is_not_utf8(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("a cat\ncafé au lait\n".encode("latin-1"))
    want = r"latin1.txt: not UTF-8 text \(byte b'\\xe9' at offset 9\); re-encode it as UTF-8"
    with pytest.raises(ValueError, match=want):
        read_captions(str(tmp_path / "latin1.txt"))


def test_read_captions_reads_a_csv_with_a_byte_order_mark(tmp_path):
    """Spreadsheets export "UTF-8 CSV" with a BOM: the first column's name must still match."""
    (tmp_path / "c.csv").write_bytes("caption,id\na red bus,1\n".encode("utf-8-sig"))
    assert read_captions(str(tmp_path / "c.csv")) == ["a red bus"]


def test_fid_is_zero_on_identical_sets_and_grows_with_a_shift(setup):
    real = [fid_input(im, "torch-fidelity", 32) for im in iter_reference_images(setup["real"])]
    assert len(real) == 12 and real[0].shape == (3, 32, 32) and real[0].dtype == torch.uint8
    same, n_real, n_fake, _ = compute_fid(
        FrechetInceptionDistance(feature=TinyFeatures()), iter(real), iter(real), batch_size=5
    )
    assert (n_real, n_fake) == (12, 12)
    assert abs(same) < 1e-2
    darker = [(x // 2) for x in real]
    shifted, *_ = compute_fid(
        FrechetInceptionDistance(feature=TinyFeatures()), iter(real), iter(darker)
    )
    assert shifted > same + 0.01


def test_clip_score_matches_its_definition(setup):
    model, preprocess, tok = load_clip(
        setup["clip_model"], setup["clip_weights"], setup["clip_config"]
    )
    images = [
        synthetic.draw_shape("red", "circle", "white", 48),
        synthetic.draw_shape("blue", "square", "black", 48),
    ]
    caps = ["a red circle", "a blue square"]
    got = clip_scores(model, preprocess, tok, images, caps, batch_size=1)
    with torch.no_grad():
        a = model.encode_image(torch.stack([preprocess(i) for i in images]))
        b = model.encode_text(tok(caps))
    want = 100 * torch.nn.functional.cosine_similarity(a, b).clamp_min(0)
    assert torch.allclose(got, want, atol=1e-4)


def test_evaluation_report_end_to_end(setup, tmp_path):
    out = tmp_path / "eval"
    cfg = load_config(
        EvalConfig,
        "configs/evaluate/tiny_cpu.yaml",
        [
            f"output={out}",
            f"captions={setup['captions']}",
            f"checkpoint={setup['gpt']}",
            f"vq={setup['vq']}",
            f"text_encoder={setup['t5']}",
            "threads=1",
            f"clip_weights={setup['clip_weights']}",
            f"clip_model_config={setup['clip_config']}",
            f"reference_images={setup['real']}",
            f"tokenizer_data={setup['raw']}",
            "tokenizer_images=4",
            "tokenizer_image_size=32",
        ],
    )
    report = run_evaluation(cfg, fid=FrechetInceptionDistance(feature=TinyFeatures()))
    assert report["images"] == 6 and report["prompts"] == 3  # 3 captions x 2 images
    assert 0 <= report["clip_score"]["value"] <= 100 and report["clip_score"]["images"] == 6
    assert report["fid"]["real_images"] == 12 and report["fid"]["generated_images"] == 6
    assert report["fid"]["value"] >= 0
    # the default protocol, LlamaGen's: both sides at fid_image_size, then 299
    fid = report["fid"]
    assert fid["protocol"] == "llamagen" and fid["image_size"] == cfg.fid_image_size == 256
    assert fid["generated_image_size"] == [32, 32] and fid["inception_size"] == 299
    tok = report["tokenizer"]
    assert tok["images"] == 4 and 0 < tok["codebook_usage"] <= 1 and tok["psnr"] > 0
    assert tok["rfid"] is None and "unavailable" in tok["rfid_note"]
    saved = json.loads((out / "report.json").read_text())
    assert saved["clip_score"]["value"] == pytest.approx(report["clip_score"]["value"])
    md = (out / "report.md").read_text()
    for field in ("CLIP score", "FID", "tokenizer PSNR", "codebook usage", "sampling images/s"):
        assert field in md
    assert "llamagen protocol at 256 px" in md
    # what was evaluated: the GPT, the captions, the sampling settings (tiny_cpu.yaml's)
    assert f"- Checkpoint: `{setup['gpt']}`" in md
    assert f"- Captions: `{setup['captions']}` (3 captions)" in md
    assert (
        "- Sampling: cfg_scale 3.0, temperature 1.0, top_k 100, top_p 1.0, cfg_interval -1, "
        "seed 0, images_per_caption 2, dtype float32" in md
    )
    assert saved["evaluated"]["captions_count"] == 3
    assert saved["fid"]["protocol"] == "llamagen" and saved["config"]["fid_protocol"] == "llamagen"
    assert (out / "samples" / "grid.png").exists() and (out / "config.yaml").exists()


def _sampling_eval(setup, out) -> EvalConfig:
    """An evaluation that samples one image per caption from the tiny models."""
    return EvalConfig(
        output=str(out),
        captions=setup["captions"],
        checkpoint=setup["gpt"],
        vq=setup["vq"],
        text_encoder=setup["t5"],
        images_per_caption=1,
        threads=1,
    )


def test_missing_weights_are_reported_not_fatal(setup, tmp_path):
    # score an earlier sampling output (no sampling here) with every weight file missing
    first = tmp_path / "first"
    run_evaluation(_sampling_eval(setup, first))
    out = tmp_path / "second"
    evaluate_main(
        [
            f"output={out}",
            f"generated={first / 'samples'}",
            f"clip_weights={tmp_path / 'nope.bin'}",
            f"reference_images={setup['real']}",
            f"inception_weights={tmp_path / 'nope.pth'}",
        ]
    )
    report = json.loads((out / "report.json").read_text())
    assert report["images"] == 3
    assert report["clip_score"]["value"] is None
    assert (
        "unavailable" in report["clip_score"]["note"]
        and "nope.bin does not exist" in report["clip_score"]["note"]
        and "pass clip_weights=" in report["clip_score"]["note"]
    )
    assert report["fid"]["value"] is None and "pass inception_weights=" in report["fid"]["note"]
    assert "pass tokenizer_data=" in report["tokenizer"]["note"]
    md = (out / "report.md").read_text()
    assert "unavailable" in md
    # the earlier run's GPT and settings (EvalConfig's defaults there), from its config.yaml
    assert f"- Generated: `{first / 'samples'}` (sampled from `{setup['gpt']}`)" in md
    assert f"- Captions: `{first / 'captions.txt'}` (3 captions)" in md
    assert "cfg_scale 7.5, temperature 1.0, top_k 1000" in md and "images_per_caption 1" in md


def test_a_failing_tokenizer_metric_keeps_the_report(setup, tmp_path, monkeypatch):
    """The tokenizer metrics come last: their failure is the report's note, not a lost report."""
    import pipeline.evaluate as evaluate

    def broken(cfg):
        raise RuntimeError("no decodable evaluation images")

    monkeypatch.setattr(evaluate, "tokenizer_metrics", broken)
    out = tmp_path / "out"
    run_evaluation(_sampling_eval(setup, out))
    report = json.loads((out / "report.json").read_text())
    assert report["images"] == 3
    assert report["tokenizer"]["note"] == "failed: RuntimeError: no decodable evaluation images"


def test_reports_of_earlier_versions_still_format():
    """format_report also formats report.json files of earlier versions, without the fields
    added since (evaluated, the reference counts, images_requested; even config and sampling)."""
    oldest = {
        "samples": "s3://b/eval/samples",
        "images": 4,
        "unreadable_images": 0,
        "prompts": 2,
        "clip_score": {"value": 30.0},
        "fid": {"value": None, "note": "unavailable"},
        "tokenizer": {"note": "unavailable"},
    }
    md = format_report(oldest)
    assert "- Samples: `s3://b/eval/samples`" in md and "- Sampling: not recorded" in md
    assert "| CLIP score | 30.000 |" in md
    config = to_dict(EvalConfig(output="o", checkpoint="ckpt", captions="c.txt"))
    config["sampling"] = {"cfg_scale": 4.0, "top_k": 10}
    md = format_report({**oldest, "config": config})
    assert "- Checkpoint: `ckpt`" in md and "- Captions: `c.txt`" in md
    assert "- Sampling: cfg_scale 4.0, top_k 10, seed 0, images_per_caption 1" in md
    # the fields of this version: the reference images skipped, the tokenizer images short
    new = {
        **oldest,
        "fid": {"value": None, "note": "n/a", "unreadable_reference_images": 2},
        "tokenizer": {"psnr": 30.0, "images": 3, "images_requested": 5},
    }
    md = format_report(new)
    assert "n/a (2 unreadable reference images skipped)" in md
    assert "3 of the 5 images asked for" in md and "undecodable" not in md
    new["tokenizer"]["broken_images"] = 2
    md = format_report(new)
    assert "3 of the 5 images asked for: the shards hold no more; 2 undecodable images" in md


def test_shipped_evaluate_configs_load():
    for name in ("coco", "tiny_cpu"):
        cfg = load_config(EvalConfig, f"configs/evaluate/{name}.yaml", ["output=o"])
        assert cfg.images_per_caption >= 1
    coco = load_config(EvalConfig, "configs/evaluate/coco.yaml", ["output=o"])
    assert (coco.fid_protocol, coco.fid_image_size) == ("llamagen", 256)  # LlamaGen's eval_res


def test_update_fid_moves_images_to_the_metrics_device():
    """The images are built on the CPU; FID's Inception runs where the metric was moved
    (``device: cuda`` in the COCO config) and does not move its inputs itself."""

    class Metric:
        device = torch.device("meta")
        seen: list = []

        def update(self, imgs, real):
            self.seen.append((imgs.device, imgs.shape, real))

    m = Metric()
    images = (torch.zeros(3, 8, 8, dtype=torch.uint8) for _ in range(5))
    assert update_fid(m, images, real=False, batch_size=2) == 5
    assert [s[0].type for s in m.seen] == ["meta"] * 3
    assert [s[1][0] for s in m.seen] == [2, 2, 1] and not m.seen[0][2]


def test_image_files_open_only_as_image_formats(caplog):
    """An EPS file is an image to PIL's unrestricted open (which runs Ghostscript on it where
    installed); evaluation reads JPEG/PNG/WebP/BMP only and counts anything else as unreadable,
    naming the file."""
    import io

    from PIL import Image

    from pipeline.evaluate import _load_image

    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n%%EOF\n"
    assert Image.open(io.BytesIO(eps)).format == "EPS"  # what an unrestricted open takes it for
    assert _load_image(eps, "refs/figure.png") is None
    assert "unreadable image refs/figure.png skipped" in caplog.text
    for fmt in ("PNG", "BMP"):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (10, 20, 30)).save(buf, fmt)
        assert _load_image(buf.getvalue(), f"x.{fmt}").getpixel((0, 0)) == (10, 20, 30), fmt


def test_reference_folders_read_as_raw_shards_do(tmp_path):
    """16-bit PNGs scaled to 8 bits (not clipped to white), transparency on white (not the
    black stored under it), BMP read (its extension is listed): as pipeline.data.raw reads."""
    import numpy as np
    from PIL import Image

    Image.fromarray(np.full((40, 40), 32896, np.uint16)).save(tmp_path / "grey16.png")
    Image.fromarray(np.zeros((40, 40, 4), np.uint8), "RGBA").save(tmp_path / "clear.png")
    Image.fromarray(np.full((40, 40, 3), 60, np.uint8)).save(tmp_path / "flat.bmp")
    got = {
        name: float(np.asarray(im, np.float64).mean())
        for name, im in zip(sorted(os.listdir(tmp_path)), iter_reference_images(str(tmp_path)))
    }
    assert got == {"clear.png": 255.0, "flat.bmp": 60.0, "grey16.png": 128.0}


def _nested_references(write) -> None:
    """A reference set split into folders: 0.png, a/1.png, a/b/2.png (grey levels 0, 1, 2),
    a broken a/broken.jpg and a notes.txt."""
    import io

    from PIL import Image

    for level, rel in enumerate(("0.png", "a/1.png", "a/b/2.png")):
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (level,) * 3).save(buf, "PNG")
        write(rel, buf.getvalue())
    write("a/broken.jpg", b"\xff\xd8 not a jpeg")
    write("notes.txt", b"COCO val, split in folders")


def _levels(uri: str, counts: ReferenceCounts) -> list[int]:
    return [im.getpixel((0, 0))[0] for im in iter_reference_images(uri, counts=counts)]


def test_reference_images_in_sub_folders_are_read_and_skips_counted(tmp_path, caplog):
    """Images in sub-folders of reference_images were ignored; now read, in sorted order. The
    unreadable images and other files skipped are counted, logged and in the report."""

    def write(rel: str, data: bytes) -> None:
        (tmp_path / "refs" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "refs" / rel).write_bytes(data)

    _nested_references(write)
    # a link to a folder is not followed: a loop gave the images again until ELOOP
    (tmp_path / "refs" / "again").symlink_to(".")
    counts = ReferenceCounts()
    assert _levels(str(tmp_path / "refs"), counts) == [0, 1, 2]
    assert counts == ReferenceCounts(unreadable=1, skipped_files=1)
    cfg = EvalConfig(
        output=str(tmp_path / "out"),
        generated=_synthetic_generated(tmp_path / "gen"),
        reference_images=str(tmp_path / "refs"),
    )
    fid = run_evaluation(cfg, fid=FrechetInceptionDistance(feature=TinyFeatures()))["fid"]
    assert fid["real_images"] == 3
    assert (fid["unreadable_reference_images"], fid["skipped_reference_files"]) == (1, 1)
    assert "1 unreadable images and 1 files that are not images" in caplog.text
    md = (tmp_path / "out" / "report.md").read_text()
    assert "1 unreadable reference images; 1 reference files not images skipped" in md


def test_reference_images_in_s3_sub_folders_are_read(s3_bucket):
    from pipeline import storage

    uri = f"{s3_bucket}/refs"
    _nested_references(lambda rel, data: storage.write_bytes(f"{uri}/{rel}", data))
    counts = ReferenceCounts()
    assert _levels(uri, counts) == [0, 1, 2]
    assert counts == ReferenceCounts(unreadable=1, skipped_files=1)


def test_counts_of_images_below_one_are_refused():
    """tokenizer_images=0 evaluated one image; the max_ limits keep 0 as "all"."""
    base = {"output": "o"}
    with pytest.raises(ValueError, match="tokenizer_images must be >= 1, got 0"):
        EvalConfig(**base, tokenizer_images=0)
    with pytest.raises(ValueError, match="max_reference_images must be >= 0"):
        EvalConfig(**base, max_reference_images=-1)
    assert EvalConfig(**base, max_captions=0, max_reference_images=0).max_captions == 0


def test_rerun_with_other_sampling_settings_refused_or_overwritten(setup, tmp_path):
    """The refusal names overwrite=true: an option the evaluation config must then have."""
    import dataclasses

    from pipeline.sample import SamplingParams

    out = tmp_path / "eval"
    first = _sampling_eval(setup, out)
    run_evaluation(first)
    before = (out / "samples" / "00000_000.png").read_bytes()
    other = dataclasses.replace(first, sampling=SamplingParams(cfg_scale=2.0))
    with pytest.raises(ValueError, match="overwrite=true"):
        run_evaluation(other)
    again = load_config(
        EvalConfig,
        None,
        ["overwrite=true", "sampling.cfg_scale=2.0"],
        **{
            k: getattr(first, k)
            for k in (
                "output",
                "captions",
                "checkpoint",
                "vq",
                "text_encoder",
                "images_per_caption",
            )
        },
    )
    report = run_evaluation(again)
    assert report["images"] == 3
    assert (out / "samples" / "00000_000.png").read_bytes() != before


def _report_files(out: Path) -> dict[str, tuple[bytes, int, int]]:
    """config.yaml, captions.txt, report.json, report.md: content, and what a rewrite changes."""
    files = {}
    for name in ("config.yaml", "captions.txt", "report.json", "report.md"):
        st = (out / name).stat()
        files[name] = ((out / name).read_bytes(), st.st_mtime_ns, st.st_ino)
    return files


def test_a_refused_rerun_leaves_the_report_and_captions_as_they_were(setup, tmp_path):
    """config.yaml was saved and captions.txt written before the sampling job refused the rerun:
    both then described another evaluation than the samples and report beside them. Other
    captions are now refused in evaluate's terms before anything is written, and config.yaml
    is written with the report only."""
    import dataclasses

    from pipeline.sample import SamplingParams

    out = tmp_path / "eval"
    first = _sampling_eval(setup, out)
    run_evaluation(first)
    files = _report_files(out)
    with pytest.raises(ValueError, match="3 captions before, 2 now") as refused:
        run_evaluation(dataclasses.replace(first, max_captions=2))
    msg = str(refused.value)
    assert "max_captions or caption_column" in msg and "overwrite=true" in msg
    assert "prompts_file" not in msg and "grown" not in msg
    assert _report_files(out) == files
    # a config the sampling job refuses outright (overwrite in parts): captions.txt kept
    with pytest.raises(ValueError, match="overwrite=true with num_parts > 1"):
        run_evaluation(dataclasses.replace(first, max_captions=2, overwrite=True, num_parts=2))
    assert _report_files(out) == files
    # refused by the sampling job (other settings): nothing written either
    with pytest.raises(ValueError, match="overwrite=true"):
        run_evaluation(dataclasses.replace(first, sampling=SamplingParams(cfg_scale=2.0)))
    assert _report_files(out) == files
    # the first settings again: nothing to sample, and captions.txt not rewritten
    report = run_evaluation(first)
    assert report["images"] == 3 and report["sampling"]["sampled"] == 0
    assert _report_files(out)["captions.txt"] == files["captions.txt"]


def test_more_captions_are_refused_then_all_resampled_with_overwrite(setup, tmp_path):
    import dataclasses

    out = tmp_path / "eval"
    first = dataclasses.replace(_sampling_eval(setup, out), max_captions=2)
    assert run_evaluation(first)["images"] == 2
    grown = dataclasses.replace(first, max_captions=0)
    with pytest.raises(ValueError, match="2 captions before, 3 now") as refused:
        run_evaluation(grown)
    assert "max_captions grown: overwrite=true samples the images of all 3 captions" in str(
        refused.value
    )
    assert len((out / "captions.txt").read_text().splitlines()) == 2
    report = run_evaluation(dataclasses.replace(grown, overwrite=True))
    assert report["images"] == 3 and report["sampling"]["sampled"] == 3
    assert len((out / "captions.txt").read_text().splitlines()) == 3


def test_evaluation_sampled_in_parts(setup, tmp_path):
    import dataclasses

    out = tmp_path / "eval"
    cfg = _sampling_eval(setup, out)
    for part in range(2):
        got = run_evaluation(dataclasses.replace(cfg, num_parts=2, part=part))
        assert got == {"samples": str(out / "samples"), "part": part, "num_parts": 2}
        assert not (out / "report.json").exists()
    assert len([n for n in os.listdir(out / "samples") if n.endswith("0.png")]) == 3
    # the parts scored before they are collected: how to collect them, not a bare "no file"
    uncollected = dataclasses.replace(
        cfg, output=str(tmp_path / "early"), generated=str(out / "samples")
    )
    with pytest.raises(FileNotFoundError, match=r"no images.json at .*once more with num_parts=1"):
        run_evaluation(uncollected)
    report = run_evaluation(cfg)
    assert report["images"] == 3 and report["sampling"]["sampled"] == 0
    assert (out / "report.json").exists()


def test_evaluation_samples_with_the_caption_cleaning_pretokenize_used(setup, tmp_path):
    """The sampling under an evaluation always cleaned captions (SampleConfig's default); a
    model whose shards were made with text.clean_captions=false was scored on text unlike its
    training text. EvalConfig.clean_captions is passed through."""
    import dataclasses

    from pipeline.evaluate import _sample

    for clean in (False, True):
        cfg = dataclasses.replace(
            _sampling_eval(setup, tmp_path / f"e{clean}"), clean_captions=clean
        )
        samples = _sample(cfg, ["A Red Circle", "a blue square"])
        saved = (Path(samples) / "config.yaml").read_text()
        assert f"clean_captions: {str(clean).lower()}" in saved


def _cleanfid_llamagen(img, eval_res: int = 256):
    """LlamaGen's FID input restated from their evaluation.py and clean-fid: CenterCropLongEdge
    (torchvision's center_crop), PIL LANCZOS to eval_res, then clean-fid's "clean" resizer
    (make_resizer("PIL", False, "bicubic", (299, 299))): float32 (3, 299, 299), not rounded."""
    import numpy as np
    from PIL import Image
    from torchvision.transforms.functional import center_crop

    img = center_crop(img, min(img.size)).resize((eval_res, eval_res), Image.LANCZOS)
    x = np.array(img)
    chans = [
        np.asarray(
            Image.fromarray(x[:, :, i].astype(np.float32), mode="F").resize(
                (299, 299), resample=Image.BICUBIC
            )
        )
        for i in range(3)
    ]
    return np.stack(chans).astype(np.float32)


def test_llamagen_fid_input_is_clean_fids_resize_rounded():
    """The "llamagen" protocol feeds what LlamaGen's clean-fid FID feeds Inception, rounded to
    uint8 for torchmetrics: equal to the restatement rounded (0 levels), 0.25 levels on average
    from its float values; torch-fidelity's own resize is then a no-op at 299."""
    import numpy as np
    from PIL import Image
    from torch_fidelity.interpolate_compat_tensorflow import (
        interpolate_bilinear_2d_like_tensorflow1x as tf1_resize,
    )

    rng = np.random.default_rng(0)

    def smooth_noise(h, w):  # natural-image-like: low frequencies strong, no flat areas
        x = np.cumsum(np.cumsum(rng.normal(size=(h, w, 3)), 0), 1)
        x = (x - x.min((0, 1))) / (np.ptp(x, (0, 1)) + 1e-9) * 255
        return Image.fromarray(x.round().astype(np.uint8))

    images = [
        smooth_noise(512, 512),
        smooth_noise(200, 300),  # landscape
        smooth_noise(96, 64),  # portrait, upscaled to 256
        smooth_noise(100, 203),  # offset 51.5: rounded to 52 as torchvision's, not floored
        synthetic.draw_shape("red", "circle", "white", 256),  # sharp edges: bicubic overshoots
    ]
    for img in images:
        got = fid_input(img, "llamagen", 256)
        want = _cleanfid_llamagen(img)
        assert got.dtype == torch.uint8 and got.shape == (3, 299, 299)
        assert torch.equal(got, torch.from_numpy(np.rint(want).clip(0, 255).astype(np.uint8)))
        diff = np.abs(got.numpy() - want.astype(np.float64))
        inside = (want >= 0) & (want <= 255)
        assert diff[inside].max() <= 0.5  # the rounding; only clipped overshoots differ more
        if img.size != (256, 256):
            assert 0.2 < diff.mean() < 0.3, img.size  # what clean-fid's float input keeps
        x = got[None].float()
        assert torch.equal(tf1_resize(x, size=(299, 299), align_corners=False), x)


def _synthetic_generated(root: Path, n: int = 6, size: int = 40) -> str:
    """A sampling output (images.json + PNGs) of synthetic shapes: no sampler involved, so that
    the FID over it is a fixed number."""
    import random

    root.mkdir(parents=True)
    manifest = []
    for i, s in enumerate(synthetic.make_samples(n, seed=1)):
        img = synthetic.draw_shape(s.colour, s.shape, s.background, size, random.Random(i))
        img.save(root / f"{i:05d}_000.png")
        manifest.append({"file": f"{i:05d}_000.png", "prompt": s.caption, "prompt_index": i})
    (root / "images.json").write_text(json.dumps(manifest))
    return str(root)


@pytest.mark.parametrize(
    ("refs", "before"),
    # the FIDs this pipeline reported before fid_protocol, on these fixtures (TinyFeatures)
    [("real", 0.004051566123962402), ("raw", 0.00832280796021223)],
)
def test_torch_fidelity_protocol_gives_the_earlier_fid(setup, tmp_path, refs, before):
    """fid_protocol=torch-fidelity is the FID of earlier reports (references: an image folder of
    48 px JPEGs or raw shards of 64 px, bicubic-cropped to the 40 px samples); "llamagen" is
    another number. A report from before the setting (no protocol) still formats, as what it
    was."""
    gen = _synthetic_generated(tmp_path / "gen")
    values = {}
    for protocol in ("torch-fidelity", "llamagen"):
        cfg = EvalConfig(
            output=str(tmp_path / protocol),
            generated=gen,
            reference_images=setup[refs],
            fid_protocol=protocol,
        )
        fid = run_evaluation(cfg, fid=FrechetInceptionDistance(feature=TinyFeatures()))["fid"]
        values[protocol] = fid["value"]
        assert fid["protocol"] == protocol and fid["generated_image_size"] == [40, 40]
        assert fid["image_size"] == (40 if protocol == "torch-fidelity" else 256)
    assert values["torch-fidelity"] == pytest.approx(before, rel=1e-6)
    assert values["llamagen"] != pytest.approx(before, rel=1e-2)
    old = json.loads((tmp_path / "torch-fidelity" / "report.json").read_text())
    for key in ("protocol", "generated_image_size", "inception_size"):
        del old["fid"][key]
    assert "torch-fidelity protocol at 40 px" in format_report(old)
