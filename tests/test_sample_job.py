"""The sampling job end to end on tiny random models: export -> PNGs, grid, manifest, config."""

from __future__ import annotations

import io
import json
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from jobs.sample import main as sample_main
from pipeline import storage
from pipeline.config import load_config
from pipeline.models.gpt import GPT, GPTConfig
from pipeline.models.text_encoder import build_tiny_text_encoder
from pipeline.models.vq import VQConfig, VQModel
from pipeline.sample_job import (
    SampleConfig,
    image_seed,
    load_exported_gpt,
    load_manifest,
    read_prompts,
    run_sampling,
    save_exported_gpt,
)

PROMPTS = "a red circle on a blue background\n\n  a green square  \nan orange triangle, small\n"


def tiny_gpt(cond: str = "text") -> GPT:
    cfg = GPTConfig.from_name(
        "debug",
        caption_dim=64,
        max_text_tokens=16,
        grid_size=4,
        vocab_size=512,
        cond=cond,
        num_classes=10,
    )
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    torch.nn.init.normal_(model.head.weight, std=0.5)  # peaked but not degenerate
    return model


def build_sampling_models(root) -> dict[str, str]:
    """Tiny random T5, VQ (downsample 8) and GPT exports (text and class) under ``root``."""
    build_tiny_text_encoder(str(root / "t5"), d_model=64)
    torch.manual_seed(1)
    VQModel(VQConfig.from_name("tiny")).save_pretrained(str(root / "vq"))
    save_exported_gpt(tiny_gpt(), str(root / "gpt"))
    save_exported_gpt(tiny_gpt("class"), str(root / "gpt_class"))
    (root / "prompts.txt").write_text(PROMPTS)
    return {
        "t5": str(root / "t5"),
        "vq": str(root / "vq"),
        "gpt": str(root / "gpt"),
        "gpt_class": str(root / "gpt_class"),
        "prompts": str(root / "prompts.txt"),
    }


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    return build_sampling_models(tmp_path_factory.mktemp("models"))


def args(models, out, *extra) -> list[str]:
    return [
        "--config",
        "configs/sample/tiny_cpu.yaml",
        f"checkpoint={models['gpt']}",
        f"vq={models['vq']}",
        f"text_encoder={models['t5']}",
        f"output={out}",
        f"prompts_file={models['prompts']}",
        "threads=1",
        *extra,
    ]


def pixels(uri: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(storage.read_bytes(uri))))


def test_export_round_trip(tmp_path):
    model = tiny_gpt()
    save_exported_gpt(model, str(tmp_path / "e"))
    back = load_exported_gpt(str(tmp_path / "e"))
    assert back.cfg == model.cfg
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    os.remove(tmp_path / "e" / "gpt_config.json")
    with pytest.raises(FileNotFoundError, match="gpt_config.json"):
        load_exported_gpt(str(tmp_path / "e"))


def test_job_writes_images_grid_and_config_and_resumes(models, tmp_path, monkeypatch, caplog):
    import pipeline.sample_job as sj

    encoded: list[list[str]] = []
    real_encode = sj.encode_prompts

    def counting_encode(uri, prompts, *a, **k):
        encoded.append(list(prompts))
        return real_encode(uri, prompts, *a, **k)

    monkeypatch.setattr(sj, "encode_prompts", counting_encode)
    rows: list[int] = []
    real_sampler = sj.Sampler

    def recording_sampler(model, batch_size, *a, **k):
        rows.append(batch_size)
        return real_sampler(model, batch_size, *a, **k)

    monkeypatch.setattr(sj, "Sampler", recording_sampler)
    out = tmp_path / "out"
    sample_main(args(models, out, "batch_size=4"))
    names = sorted(os.listdir(out))
    pngs = [n for n in names if n.endswith(".png") and n != "grid.png"]
    # 3 prompts (the blank line is dropped) x 2 images, deterministic names
    assert pngs == [
        "00000_000.png",
        "00000_001.png",
        "00001_000.png",
        "00001_001.png",
        "00002_000.png",
        "00002_001.png",
    ]
    assert {"grid.png", "images.json", "summary.json", "config.yaml"} <= set(names)
    assert pixels(str(out / "00000_000.png")).shape == (32, 32, 3)  # 4x4 codes x downsample 8
    grid = Image.open(out / "grid.png")
    assert grid.width >= 2 * 32 and grid.height >= 3 * 32  # 3 rows of 2 images, plus captions
    manifest = json.loads((out / "images.json").read_text())
    assert [m["prompt"] for m in manifest][::2] == [
        "a red circle on a blue background",
        "a green square",
        "an orange triangle, small",
    ]
    assert manifest[3]["seed"] == image_seed(0, 1, 1)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sampled"] == 6 and summary["images"] == 6
    saved = load_config(SampleConfig, str(out / "config.yaml"))
    assert saved.batch_size == 4 and saved.sampling.cfg_scale == 3.0
    # images differ from one another (seeds differ), and are not blank
    a, b = pixels(str(out / "00000_000.png")), pixels(str(out / "00000_001.png"))
    assert not np.array_equal(a, b) and a.std() > 0

    # kill-and-rerun: only the missing image is sampled, and it comes back identical
    before = (out / "00001_001.png").read_bytes()
    os.remove(out / "00001_001.png")
    encoded.clear()
    sample_main(args(models, out, "batch_size=4"))
    assert json.loads((out / "summary.json").read_text())["sampled"] == 1
    assert (out / "00001_001.png").read_bytes() == before
    assert encoded == [["a green square"]]  # only the prompt with an image to make
    # the one missing image is decoded in as many rows as the first run used (padded)
    assert rows == [4, 4]
    sample_main(args(models, out, "batch_size=4"))  # nothing to do: no T5 loaded at all
    assert encoded == [["a green square"]]
    assert json.loads((out / "summary.json").read_text())["images"] == 6
    # another batch size changes only rounding: the images stay, with a warning
    sample_main(args(models, out, "batch_size=3"))
    assert json.loads((out / "summary.json").read_text())["sampled"] == 0
    assert "batch_size: 4 -> 3" in caplog.text and "round differently" in caplog.text
    # the T5's dtype changes the features, so the images; so does cleaning the prompts
    with pytest.raises(ValueError, match=r"text_dtype: 'float32' -> 'bfloat16'"):
        sample_main(args(models, out, "batch_size=4", "text_dtype=bfloat16"))
    with pytest.raises(ValueError, match=r"clean_captions: True -> False"):
        sample_main(args(models, out, "batch_size=4", "clean_captions=false"))
    # an output saved before prompts were cleaned holds images of uncleaned prompts
    saved = (out / "config.yaml").read_text()
    (out / "config.yaml").write_text(saved.replace("clean_captions: true\n", ""))
    with pytest.raises(ValueError, match=r"clean_captions: False -> True"):
        sample_main(args(models, out, "batch_size=4"))
    sample_main(args(models, out, "batch_size=4", "clean_captions=false"))  # what it was
    (out / "config.yaml").write_text(saved)

    # a rerun with other sampling settings must not keep the old images as its own
    # 6 images: grid.png beside them is not a sample
    with pytest.raises(
        ValueError, match=r"holds 6 images .* settings \(sampling: .*overwrite=true"
    ):
        sample_main(args(models, out, "batch_size=4", "sampling.cfg_scale=5.0"))
    sample_main(args(models, out, "batch_size=2", "sampling.cfg_scale=5.0", "overwrite=true"))
    assert json.loads((out / "summary.json").read_text())["sampled"] == 6
    assert (out / "00001_001.png").read_bytes() != before
    # images sampled on another kind of device came from other random draws
    saved = (out / "config.yaml").read_text()
    assert "device: cpu" in saved
    (out / "config.yaml").write_text(saved.replace("device: cpu", "device: cuda:1"))
    with pytest.raises(ValueError, match=r"device: 'cuda:1' -> 'cpu'"):
        sample_main(args(models, out, "batch_size=2", "sampling.cfg_scale=5.0"))


def test_the_same_uris_with_other_content_do_not_keep_the_old_images(models, tmp_path):
    """A prompts file rewritten, or a model exported again, at the same URI: the images made
    from the old content are not taken as the new run's (refused, or cleared by overwrite)."""
    import shutil

    prompts, gpt = tmp_path / "prompts.txt", tmp_path / "gpt"
    prompts.write_text(Path(models["prompts"]).read_text())
    shutil.copytree(models["gpt"], gpt)
    out = tmp_path / "out"
    run = args({**models, "prompts": str(prompts), "gpt": str(gpt)}, out, "batch_size=4")
    sample_main(run)
    sample_main(run)  # nothing changed: every image is kept
    assert json.loads((out / "summary.json").read_text())["sampled"] == 0
    original = prompts.read_text()
    prompts.write_text("a purple hexagon\n" + original)
    with pytest.raises(ValueError, match=r"the content of prompts_file .*overwrite=true"):
        sample_main(run)
    prompts.write_text(original)  # the same text again (a newer file): the images stand
    sample_main(run)
    assert json.loads((out / "summary.json").read_text())["sampled"] == 0
    model = load_exported_gpt(str(gpt))
    with torch.no_grad():
        model.head.weight.add_(1.0)
    save_exported_gpt(model, str(gpt))
    with pytest.raises(ValueError, match=r"the content of checkpoint"):
        sample_main(run)
    sample_main([*run, "overwrite=true"])
    assert json.loads((out / "summary.json").read_text())["sampled"] == 6


def test_batched_equals_one_by_one_and_seed_matters(models, tmp_path):
    cfg = load_config(
        SampleConfig,
        "configs/sample/tiny_cpu.yaml",
        args(models, tmp_path / "b3")[2:] + ["batch_size=3"],
    )
    run_sampling(cfg)
    one = load_config(
        SampleConfig,
        "configs/sample/tiny_cpu.yaml",
        args(models, tmp_path / "b1")[2:] + ["batch_size=1"],
    )
    run_sampling(one)
    other = load_config(
        SampleConfig,
        "configs/sample/tiny_cpu.yaml",
        args(models, tmp_path / "s7")[2:] + ["batch_size=3", "seed=7"],
    )
    run_sampling(other)
    for name in ("00000_000.png", "00001_001.png", "00002_000.png"):
        x = pixels(str(tmp_path / "b3" / name))
        assert np.array_equal(x, pixels(str(tmp_path / "b1" / name))), name
        assert not np.array_equal(x, pixels(str(tmp_path / "s7" / name))), name


def test_class_labels_and_s3_in_and_out(models, s3_bucket):
    storage.put_dir(models["gpt_class"], f"{s3_bucket}/gpt_class")
    out = f"{s3_bucket}/samples"
    sample_main(
        [
            "--config",
            "configs/sample/tiny_cpu.yaml",
            f"checkpoint={s3_bucket}/gpt_class",
            f"vq={models['vq']}",
            f"output={out}",
            "class_labels=[3,7]",
            "images_per_prompt=1",
            "sampling.top_k=0",
            "sampling.top_p=0.9",
            "threads=1",
        ]
    )
    names = storage.list_dir(out)
    assert {"00000_000.png", "00001_000.png", "grid.png", "images.json", "config.yaml"} <= set(
        names
    )
    assert storage.read_json(f"{out}/images.json")[1]["prompt"] == "class 7"


def test_bad_inputs_are_clear(models, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="no prompts"):
        run_sampling(
            load_config(
                SampleConfig,
                "configs/sample/tiny_cpu.yaml",
                args(models, tmp_path / "o")[2:] + [f"prompts_file={empty}"],
            )
        )
    with pytest.raises(ValueError, match="text-conditioned"):
        run_sampling(
            SampleConfig(
                checkpoint=models["gpt"],
                vq=models["vq"],
                output=str(tmp_path / "o2"),
                class_labels=[1],
            )
        )
    with pytest.raises(ValueError, match="exactly one of"):
        SampleConfig(checkpoint="x", vq="y", output="z", prompt="a", prompts_file="b")
    # an empty prompt is not sampled as the unconditional caption, cleaned or not
    for clean in (True, False):
        with pytest.raises(ValueError, match="prompt is empty"):
            SampleConfig(
                checkpoint="x",
                vq="y",
                output="z",
                text_encoder="t",
                prompt="  ",
                clean_captions=clean,
            )


def test_shipped_sample_configs_load():
    for name in ("t2i", "c2i", "tiny_cpu"):
        extra = ["checkpoint=c", "vq=v", "output=o"]
        if name != "c2i":
            extra += ["prompt=a cat", "text_encoder=t"]
        cfg = load_config(SampleConfig, f"configs/sample/{name}.yaml", extra)
        assert cfg.sampling.temperature == 1.0


def test_parts_sample_disjoint_images_that_a_final_run_collects(models, tmp_path, monkeypatch):
    """One process per GPU: each samples its part; the final run (num_parts=1) samples nothing,
    loads no weights, and writes the grid and summary. The images equal a single process's,
    byte for byte."""
    whole = tmp_path / "whole"
    sample_main(args(models, whole, "batch_size=4"))
    out = tmp_path / "parts"
    made = []
    for part in range(2):
        sample_main(args(models, out, "batch_size=4", "num_parts=2", f"part={part}"))
        pngs = {n for n in os.listdir(out) if n.endswith(".png")}
        made.append(pngs - set().union(*made) if made else pngs)
        summary = json.loads((out / f"summary.part-{part:03d}-of-002.json").read_text())
        assert summary["sampled"] == len(made[-1]) == 3
    assert not (out / "summary.json").exists() and not (out / "grid.png").exists()
    # each part recorded the settings it sampled with, for the others and the collecting run
    assert sorted(p.name for p in out.glob("settings.part-*")) == [
        "settings.part-000-of-002.json",
        "settings.part-001-of-002.json",
    ]
    assert made[0] == {"00000_000.png", "00001_000.png", "00002_000.png"}  # i % 2 == 0
    # not collected yet: the evaluation (generated=...) is told how to collect, not "no file"
    with pytest.raises(FileNotFoundError, match=r"no images.json at .*once more with num_parts=1"):
        load_manifest(str(out))
    with pytest.raises(FileNotFoundError, match="not the output of a finished sampling run"):
        load_manifest(str(tmp_path))

    def no_weights(*a, **k):
        raise AssertionError("the collecting run loaded weights")

    with monkeypatch.context() as m:
        m.setattr("pipeline.sample_job.load_exported_gpt", no_weights)
        m.setattr("pipeline.models.vq.VQModel.from_pretrained", no_weights)
        m.setattr("pipeline.sample_job.encode_prompts", no_weights)
        sample_main(args(models, out, "batch_size=4"))
    final = json.loads((out / "summary.json").read_text())
    assert final["sampled"] == 0 and final["images"] == 6 and (out / "grid.png").exists()
    # its speed is the parts': their 6 images over their summed seconds
    assert final["parts"]["count"] == 2 and final["parts"]["sampled"] == 6
    assert final["images_per_second"] == pytest.approx(
        6 / final["parts"]["sample_seconds"], rel=1e-3
    )
    for name in made[0] | made[1]:
        assert (out / name).read_bytes() == (whole / name).read_bytes(), name
    # overwritten with other settings by one process: the parts' summaries go with their images
    # (a collecting run summed them into its speed), and images.json / summary.json are its own
    sample_main(args(models, out, "batch_size=4", "sampling.cfg_scale=5.0", "overwrite=true"))
    final = json.loads((out / "summary.json").read_text())
    assert final["sampled"] == final["images"] == 6 and "parts" not in final, final
    assert sorted(out.glob("summary.part-*")) == sorted(out.glob("settings.part-*")) == []
    base = args(models, out)[2:]
    with pytest.raises(ValueError, match="part 2 is not in"):
        load_config(SampleConfig, "configs/sample/tiny_cpu.yaml", [*base, "num_parts=2", "part=2"])
    with pytest.raises(ValueError, match="parts would delete one another's images"):
        load_config(
            SampleConfig, "configs/sample/tiny_cpu.yaml", [*base, "num_parts=2", "overwrite=true"]
        )


def test_parts_started_together_with_other_settings_are_not_mixed(models, tmp_path, monkeypatch):
    """Parts started at once all pass the check on config.yaml (none yet, or another part's,
    and no images), then each writes its own. Each part records the settings it samples with
    (settings.part-*.json) before it samples: a part started later, and the collecting run,
    compare every record with their own settings and refuse, naming the part and what differs;
    overwrite=true on the collecting run deletes that part's images and keeps the others'."""
    import pipeline.sample_job as sj

    whole = tmp_path / "whole"
    sample_main(args(models, whole, "batch_size=4"))

    def part(out, k, *extra):
        return args(models, out, "batch_size=4", "num_parts=2", f"part={k}", *extra)

    # part 1 (seed 5) starts while part 0 (seed 0) is about to sample: no image there yet
    out = tmp_path / "late"
    refused: list[str] = []
    real_sampler = sj.Sampler

    def start_part_1(*a, **k):
        try:
            sample_main(part(out, 1, "seed=5"))
        except ValueError as e:
            refused.append(str(e))
        return real_sampler(*a, **k)

    with monkeypatch.context() as m:
        m.setattr(sj, "Sampler", start_part_1)
        sample_main(part(out, 0))
    assert len(refused) == 1
    assert re.search(r"part 0 of 2 \(settings.part-000-of-002.json, 0 images there\) with "
                     r"seed: 0 -> 5", refused[0]), refused[0]  # fmt: skip
    assert len([n for n in os.listdir(out) if n.endswith(".png")]) == 3  # part 0's alone

    # part 1 wrote its record and sampled while part 0 loaded: part 0 checks again once its
    # inputs are loaded, before its first image, and stops
    out = tmp_path / "together"
    real_save = sj.save_config

    def part_1_meanwhile(cfg, uri):
        monkeypatch.setattr(sj, "save_config", real_save)
        sample_main(part(out, 1, "seed=5"))  # part 0 has written nothing yet
        real_save(cfg, uri)

    monkeypatch.setattr(sj, "save_config", part_1_meanwhile)
    with pytest.raises(ValueError, match=r"part 1 of 2 \(settings.part-001-of-002.json, 3 images"):
        sample_main(part(out, 0))
    assert len([n for n in os.listdir(out) if n.endswith(".png")]) == 3  # part 1's alone
    # both checked before either wrote (at the same instant): both sample; the collecting
    # run sees the records
    with monkeypatch.context() as m:
        m.setattr(sj, "_check_parts", lambda cfg, inputs: None)
        sample_main(part(out, 0))
    assert len([n for n in os.listdir(out) if n.endswith(".png")]) == 6
    with pytest.raises(
        ValueError,
        match=r"part 1 of 2 \(settings.part-001-of-002.json, 3 images there\) with seed: 5 -> 0"
        r".* a run with overwrite=true to delete them",
    ):
        sample_main(args(models, out, "batch_size=4"))
    assert not (out / "images.json").exists()
    with pytest.raises(ValueError, match=r"part 1 of 2 .*seed: 5 -> 0.*num_parts=1 and overwrite"):
        sample_main(part(out, 0))  # part 0 again: config.yaml is its own, part 1's record is not
    sample_main(args(models, out, "batch_size=4", "overwrite=true"))
    final = json.loads((out / "summary.json").read_text())
    assert final["sampled"] == 3 and final["images"] == 6  # part 0's three kept
    assert sorted(p.name for p in out.glob("*.part-*")) == [
        "settings.part-000-of-002.json",
        "summary.part-000-of-002.json",
    ]
    for name in (n for n in os.listdir(whole) if n.endswith(".png") and n != "grid.png"):
        assert (out / name).read_bytes() == (whole / name).read_bytes(), name


def test_a_parts_launch_that_failed_before_its_first_image_blocks_no_relaunch(models, tmp_path):
    """A part that fails loading (a mistyped checkpoint) leaves no settings record: the
    corrected relaunch of every part goes on. A record of a part with no images (one that died
    after writing it) is named in the refusal, with what to do."""
    out = tmp_path / "out"

    def part(k, *extra):
        return args(models, out, "batch_size=4", "num_parts=2", f"part={k}", *extra)

    typo = str(tmp_path / "exprot")
    for k in (0, 1):
        with pytest.raises(Exception, match="exprot"):
            sample_main(part(k, f"checkpoint={typo}"))
    assert not list(out.glob("settings.part-*"))
    sample_main(part(0, "seed=5"))
    sample_main(part(1, "seed=5"))
    assert len(list(out.glob("0*.png"))) == 6
    # part 1's record with no image of part 1 there: named, and deleting it is the way on
    (out / "settings.part-001-of-002.json").write_text(
        (out / "settings.part-001-of-002.json").read_text().replace('"seed": 5', '"seed": 7')
    )
    for png in list(out.glob("0*.png")):
        p, j = int(png.name[:5]), int(png.name[6:9])
        if (p * 2 + j) % 2 == 1:
            png.unlink()
    with pytest.raises(ValueError, match=r"delete its record \(.*settings.part-001-of-002.json\)"):
        sample_main(part(0, "seed=5"))


def test_a_part_killed_midway_and_rerun_keeps_its_images(models, tmp_path, monkeypatch):
    """Its own record (written before it sampled) is its settings: a rerun resumes."""
    import pipeline.sample_job as sj

    out = tmp_path / "out"
    run = args(models, out, "batch_size=1", "num_parts=2", "part=0")
    real_png = sj.png_bytes
    written: list[int] = []

    def killed_after_one(arr):
        if written:
            raise RuntimeError("killed")
        written.append(1)
        return real_png(arr)

    with monkeypatch.context() as m:
        m.setattr(sj, "png_bytes", killed_after_one)
        with pytest.raises(RuntimeError, match="killed"):
            sample_main(run)
    first = (out / "00000_000.png").read_bytes()
    assert (out / "settings.part-000-of-002.json").exists()
    sample_main(run)
    assert json.loads((out / "summary.part-000-of-002.json").read_text())["sampled"] == 2
    assert (out / "00000_000.png").read_bytes() == first


def test_a_launcher_of_two_ranks_samples_the_parts_and_rank0_collects(models, tmp_path):
    """``torchrun --nproc_per_node 2 jobs/sample.py ...``: the ranks are the parts (no num_parts
    given), rank 0 then writes the grid and summary; the images equal one process's."""
    import socket
    import subprocess
    import sys

    whole = tmp_path / "whole"
    sample_main(args(models, whole, "batch_size=4"))
    out = tmp_path / "ranks"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "T2I_PROGRESS": "0"}
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    cmd += ["--master_port", str(port), "jobs/sample.py", *args(models, out, "batch_size=4")]
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for part in range(2):
        summary = json.loads((out / f"summary.part-{part:03d}-of-002.json").read_text())
        assert summary["sampled"] == 3
    final = json.loads((out / "summary.json").read_text())
    assert final["sampled"] == 0 and final["images"] == 6 and (out / "grid.png").exists()
    pngs = sorted(n for n in os.listdir(whole) if n.endswith(".png") and n != "grid.png")
    assert len(pngs) == 6
    for name in pngs:
        assert (out / name).read_bytes() == (whole / name).read_bytes(), name
    # parts given by hand that disagree with the launcher are refused, not half-applied
    bad = subprocess.run(
        [*cmd[:5], "--master_port", str(port), "jobs/sample.py",
         *args(models, tmp_path / "bad", "num_parts=3", "part=1")],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert bad.returncode != 0
    assert "launch error: num_parts=3 part=1, but the launcher (env) started 2 ranks" in bad.stderr


def test_each_prompt_is_encoded_alone_so_its_features_do_not_depend_on_the_others(
    models, monkeypatch
):
    """A prompt's T5 features are the same whichever prompts a run (a resume, a part) encodes
    with it: one forward pass per prompt, at its own length."""
    from pipeline.models.text_encoder import TextEncoder
    from pipeline.sample_job import encode_prompts

    shapes: list[tuple[int, ...]] = []
    real = TextEncoder.from_pretrained

    def spying(*a, **k):
        enc = real(*a, **k)
        forward = enc.model.forward

        def recording(*fa, **fk):
            shapes.append(tuple(fk["input_ids"].shape))
            return forward(*fa, **fk)

        enc.model.forward = recording
        return enc

    monkeypatch.setattr(TextEncoder, "from_pretrained", spying)
    mcfg = tiny_gpt().cfg
    prompts = ["a red circle", "an orange triangle on a long and winding road, small"]
    both, _ = encode_prompts(models["t5"], prompts, mcfg, "cpu")
    assert [s[0] for s in shapes] == [1, 1]  # one prompt a pass
    assert shapes[0][1] != shapes[1][1]  # each at its own length, no padding to the other's
    alone, _ = encode_prompts(models["t5"], prompts[:1], mcfg, "cpu")
    assert torch.equal(alone[0], both[0])


def test_prompts_are_cleaned_as_pretokenize_cleans_captions(models):
    """A prompt in capitals or with a URL reaches T5 as LlamaGen's cleaned text, as the
    captions the GPT was trained on did (pretokenize's text.clean_captions, on by default);
    clean_captions=false keeps it as typed. Text prompts without a T5 are refused before any
    model loads."""
    from pipeline.sample_job import encode_prompts

    mcfg = tiny_gpt().cfg
    messy = "A Red Circle http://example.com/circle.png"
    (a, b), _ = encode_prompts(models["t5"], [messy, "a red circle"], mcfg, "cpu")
    assert torch.equal(a, b)
    (raw,), _ = encode_prompts(models["t5"], ["A Red Circle"], mcfg, "cpu", clean_captions=False)
    assert raw.shape == b.shape and not torch.equal(raw, b)
    with pytest.raises(ValueError, match="text prompts need text_encoder"):
        SampleConfig(checkpoint="x", vq="y", output="z", prompt="a cat")


def test_a_prompt_that_cleaning_empties_is_skipped_not_sampled(
    models, tmp_path, monkeypatch, caplog
):
    """A prompt that LlamaGen's cleaning empties (a bare URL, HTML tags alone) would reach T5
    as the EOS token alone, the unconditional caption: it is skipped, counted, and named by its
    number in the job, as a prompt with non-finite features is. Uncleaned, it is sampled."""
    from pipeline.models.text_encoder import TextEncoder

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\nhttp://example.com/cat.png\n<b></b>\na green square\n")
    out = tmp_path / "out"
    run = args({**models, "prompts": str(prompts)}, out, "batch_size=4")
    sample_main(run)
    pngs = sorted(n for n in os.listdir(out) if n.endswith(".png") and n != "grid.png")
    assert pngs == ["00000_000.png", "00000_001.png", "00003_000.png", "00003_001.png"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_prompts"] == {"empty_after_cleaning": 2} and summary["images"] == 4
    manifest = json.loads((out / "images.json").read_text())
    assert {m["prompt"] for m in manifest} == {"a red circle", "a green square"}
    # a resumed run encodes prompts 1 to 3 only: the warnings give their numbers in the job
    os.remove(out / "00003_001.png")
    caplog.clear()
    sample_main(run)
    assert "prompt 1 is empty after cleaning" in caplog.text
    assert "prompt 2 is empty after cleaning" in caplog.text
    assert json.loads((out / "summary.json").read_text())["sampled"] == 1

    def no_t5(*a, **k):
        raise AssertionError("T5 loaded with only empty prompts to encode")

    with monkeypatch.context() as m:
        m.setattr(TextEncoder, "from_pretrained", no_t5)
        sample_main(run)  # only the empty prompts lack images: they are skipped again, no T5
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_prompts"] == {"empty_after_cleaning": 2} and summary["sampled"] == 0
    sample_main(args({**models, "prompts": str(prompts)}, tmp_path / "raw", "clean_captions=false"))
    assert json.loads((tmp_path / "raw" / "summary.json").read_text())["images"] == 8


def test_a_prompts_file_not_in_utf8_is_named_with_the_offset(models, tmp_path):
    data = "a red circle\na café table\n".encode("latin-1")
    latin = tmp_path / "prompts.txt"
    latin.write_bytes(data)
    offset = data.index(b"\xe9")
    with pytest.raises(
        ValueError,
        match=rf"{re.escape(str(latin))}: not UTF-8 text .* at offset {offset}, line 2.*"
        r"re-encode the file as UTF-8",
    ):
        sample_main(args({**models, "prompts": str(latin)}, tmp_path / "out"))
    # a byte-order mark is no part of the first prompt
    bom = tmp_path / "bom.txt"
    bom.write_bytes("a red circle\nx\n".encode("utf-8-sig"))
    assert read_prompts(str(bom)) == ["a red circle", "x"]


def test_an_input_gone_after_every_image_exists_is_not_other_settings(models, tmp_path):
    """A finished job needs no T5: its folder deleted is no reason to refuse the output (and
    advise overwrite=true, which deletes every image). A run that does need it names it."""
    import shutil

    t5 = tmp_path / "t5"
    shutil.copytree(models["t5"], t5)
    out = tmp_path / "out"
    run = args({**models, "t5": str(t5)}, out, "batch_size=4")
    sample_main(run)
    shutil.rmtree(t5)
    sample_main(run)
    assert json.loads((out / "summary.json").read_text())["sampled"] == 0
    os.remove(out / "00001_001.png")
    with pytest.raises(FileNotFoundError, match=re.escape(str(t5))):
        sample_main(run)
    assert len([n for n in os.listdir(out) if n.endswith("0.png")]) == 3  # nothing deleted


def test_one_model_named_another_way_keeps_the_images(models, tmp_path):
    """A trailing '/', file:// or a relative path names the same export: its images stand.
    Another export (other content) at another URI is still other settings."""
    out = tmp_path / "out"
    sample_main(args(models, out, "batch_size=4"))
    gpt = Path(models["gpt"])
    for uri in (f"{gpt}/", f"file://{gpt}", os.path.relpath(gpt)):
        sample_main(args({**models, "gpt": uri}, out, "batch_size=4"))
        assert json.loads((out / "summary.json").read_text())["sampled"] == 0, uri
    other = tmp_path / "other_gpt"
    model = load_exported_gpt(str(gpt))
    with torch.no_grad():
        model.head.weight.add_(1.0)
    save_exported_gpt(model, str(other))
    with pytest.raises(ValueError, match=rf"checkpoint: '.*' -> '{re.escape(str(other))}'"):
        sample_main(args({**models, "gpt": str(other)}, out, "batch_size=4"))


def test_speed_leaves_out_loading_the_models(models, tmp_path, monkeypatch):
    """images_per_second is sampling's: a GPT export that takes long to load (copied from S3)
    is load_seconds, not a slower sampler."""
    import types

    import pipeline.sample_job as sj

    clock = types.SimpleNamespace(offset=0.0)
    clock.perf_counter = lambda: time.perf_counter() + clock.offset
    real_load = sj.load_exported_gpt

    def slow_load(*a, **k):
        clock.offset += 1000.0  # 1000 s pass while the weights are fetched
        return real_load(*a, **k)

    monkeypatch.setattr(sj, "time", clock)
    monkeypatch.setattr(sj, "load_exported_gpt", slow_load)
    out = tmp_path / "out"
    sample_main(args(models, out, "batch_size=4"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["load_seconds"] >= 1000 and summary["total_seconds"] >= 1000
    assert 0 < summary["sample_seconds"] < 1000
    assert summary["images_per_second"] == pytest.approx(6 / summary["sample_seconds"], rel=1e-2)
