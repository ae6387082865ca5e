"""The end-to-end local demo: every stage of the pipeline, for real, on generated data.

Generated pictures (coloured shapes on plain backgrounds, captions naming them) are served over
loopback HTTP with a LAION-COCO-style parquet, then:

  download (img2dataset on a local Ray) -> score and filter (tiny random CLIP aesthetic model)
  -> tokenizer training (tiny VQ) -> pretokenize at two resolutions (tiny random T5)
  -> stage-1 training (DeepSpeed launcher, 2 ranks) -> stage-2 training from stage 1
  -> sampling, checked against the prompts.

The text encoder and the aesthetic scorer are tiny RANDOM-weight models (no model hub here); the
tokenizer and the GPT are trained by the demo itself. Each step is skipped when its output is
already complete, like every job of the pipeline, so a rerun after a kill continues.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline import storage
from pipeline.config import doc, load_config, save_config
from pipeline.data import synthetic
from pipeline.log import get_logger

log = get_logger(__name__)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


BUILT = ".built"


def _build_once(folder: str, build: Callable[[], Any]) -> None:
    """Run ``build`` (which fills ``folder``) unless an earlier run finished it: a marker is
    written after it, so a run killed while writing (a model's weights half on disk) builds the
    folder again from scratch instead of keeping the half file."""
    if os.path.exists(os.path.join(folder, BUILT)):
        return
    shutil.rmtree(folder, ignore_errors=True)
    build()
    storage.write_text(os.path.join(folder, BUILT), "")


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the local demo (the defaults finish in 9-16 minutes on 2 CPU cores)."""

    out: str = doc("output folder (local)", "outputs/demo")
    num_images: int = doc("generated image-caption pairs", 720)
    shards: int = doc("raw shards the download writes", 4)
    image_size: int = doc("downloaded image side (stage-2 resolution)", 128)
    stage1_resolution: int = doc("stage-1 pretokenize resolution", 64)
    tokenizer_config: str = doc("tokenizer training YAML", "configs/tokenizer/tiny.yaml")
    tokenizer_steps: int = doc("tokenizer training steps", 2000)
    stage1_config: str = doc("stage-1 training YAML", "configs/train/demo_stage1.yaml")
    stage2_config: str = doc("stage-2 training YAML", "configs/train/demo_stage2.yaml")
    stage1_steps: int = doc("stage-1 GPT steps", 500)
    stage2_steps: int = doc("stage-2 GPT steps", 600)
    min_aesthetic_quantile: float = doc(
        "stage 2 keeps images whose aesthetic score is above this quantile of stage 1's", 0.25
    )
    t5_dim: int = doc("width of the tiny random T5", 64)
    prompts_per_check: int = doc("prompts sampled to measure the prompt match rate", 12)
    images_per_prompt: int = doc("images per prompt in the check", 8)
    cfg_scale: float = doc("guidance scale of the demo's samples", 2.0)
    temperature: float = doc("sampling temperature of the demo's samples", 0.7)
    top_k: int = doc("sample from the k most likely codes (0: all)", 0)
    ranks: int = doc("DeepSpeed ranks (processes) for training", 2)
    seed: int = doc("seed of the generated data", 0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Demo:
    def __init__(self, cfg: DemoConfig):
        self.cfg = cfg
        self.out = os.path.abspath(cfg.out)
        self.report: dict[str, Any] = {"steps": {}}
        self.t0 = time.time()
        self.n_steps = 9
        self.k = 0

    def path(self, *parts: str) -> str:
        return os.path.join(self.out, *parts)

    def step(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        self.k += 1
        log.info(
            "=== [%d/%d] %s (%.0f s so far)", self.k, self.n_steps, name, time.time() - self.t0
        )
        t = time.time()
        result = fn()
        result["seconds"] = round(time.time() - t, 1)
        self.report["steps"][name] = result
        log.info(
            "=== %s done in %.0f s: %s",
            name,
            result["seconds"],
            json.dumps({k: v for k, v in result.items() if not isinstance(v, (dict, list))}),
        )
        return result

    # -- steps

    def models(self) -> dict[str, Any]:
        from pipeline.models.aesthetic import build_tiny_aesthetic
        from pipeline.models.text_encoder import build_tiny_text_encoder

        t5 = self.path("models", "t5-tiny-random")
        _build_once(
            t5, lambda: build_tiny_text_encoder(t5, d_model=self.cfg.t5_dim, seed=self.cfg.seed)
        )
        aes_dir = self.path("models", "aesthetic-tiny-random")
        self.aesthetic = build_tiny_aesthetic(aes_dir, seed=self.cfg.seed)
        self.t5 = t5
        return {
            "text_encoder": t5,
            "aesthetic": aes_dir,
            "note": "random weights: stand-ins for FLAN-T5-XL and CLIP ViT-L/14 + LAION head",
        }

    def data(self) -> dict[str, Any]:
        samples = synthetic.make_samples(self.cfg.num_images, seed=self.cfg.seed)
        www = self.path("www")
        _build_once(
            www,
            lambda: synthetic.write_images(
                samples, www, size=self.cfg.image_size, seed=self.cfg.seed
            ),
        )
        self.samples = samples
        return {"images": len(samples), "folder": www}

    def download(self, base_url: str) -> dict[str, Any]:
        from pipeline.data.download import DownloadConfig, run_download

        done = self.path("raw", "_demo_download.json")
        if os.path.exists(done):  # a rerun: the images are here, whatever port served them
            return storage.read_json(done)
        # an attempt cut short fetched from another port (the server's is new each run): its
        # units and partial shards would point there, so the small download starts over
        shutil.rmtree(self.path("raw"), ignore_errors=True)
        names = [f"{i:06d}.jpg" for i in range(len(self.samples))]
        table = synthetic.laion_coco_table(
            self.samples, [f"{base_url}/{n}" for n in names], size=self.cfg.image_size
        )
        meta = self.path("metadata", "part-00000.parquet")
        os.makedirs(os.path.dirname(meta), exist_ok=True)
        table.to_parquet(meta)
        cfg = load_config(
            DownloadConfig,
            os.path.join(REPO, "configs/data/download_local.yaml"),
            input=meta,
            output=self.path("raw"),
            distributor="ray",
            allow_loopback=True,
            image_size=self.cfg.image_size,
            min_image_size=32,
            threads=16,
            processes=2,
            metadata={"rows_per_unit": -(-len(self.samples) // self.cfg.shards)},
        )
        result = run_download(cfg)
        if result.failed_shards:
            raise RuntimeError(f"download left shards {result.failed_shards} unfinished; rerun")
        out = {
            "shards": result.shards_done,
            "images": result.stats["samples"]["successes"],
            "stats": result.stats,
        }
        storage.write_json(done, out)
        return out

    def score(self) -> dict[str, Any]:
        from pipeline.data.filter import ScoreConfig, run_score

        cfg = load_config(
            ScoreConfig,
            os.path.join(REPO, "configs/data/score_cpu.yaml"),
            input=self.path("raw"),
            output=self.path("scores"),
            aesthetic=dataclasses.asdict(self.aesthetic),
            filters={"min_image_size": 32, "min_similarity": 0.28},
            executor={"num_actors": 1, "local_num_cpus": 2},
        )
        summary = run_score(cfg)
        if summary.get("failed_shards"):
            raise RuntimeError(f"scoring left shards {summary['failed_shards']} unfinished; rerun")
        return {"summary": summary}

    def tokenizer(self) -> dict[str, Any]:
        from pipeline.tokenizer.train import TokenizerTrainConfig, train_tokenizer

        cfg = load_config(
            TokenizerTrainConfig,
            os.path.join(REPO, self.cfg.tokenizer_config),
            data=self.path("raw"),
            run_dir=self.path("vq"),
            max_steps=self.cfg.tokenizer_steps,
            device="cpu",
        )
        summary = train_tokenizer(cfg)
        self.vq = storage.join(self.path("vq"), "export")
        self._vq_config()
        return {k: v for k, v in summary.items() if isinstance(v, (int, float, str))}

    def _vq_config(self) -> None:
        from pipeline.models.vq import VQModel

        vq = VQModel.from_pretrained(self.vq).config
        self.codebook_size, self.downsample = vq.codebook_size, vq.downsample

    def pretokenize(self) -> dict[str, Any]:
        import pandas as pd

        from pipeline.data.pretokenize import PretokenizeConfig, run_pretokenize

        scores = pd.concat(
            pd.read_parquet(self.path("scores", n))
            for n in sorted(os.listdir(self.path("scores")))
            if n.endswith(".parquet")
        )
        kept = scores[scores["keep"]]
        threshold = float(kept["aesthetic"].quantile(self.cfg.min_aesthetic_quantile))
        out = {}
        for stage, res, min_aes in (
            ("stage1", self.cfg.stage1_resolution, None),
            ("stage2", self.cfg.image_size, threshold),
        ):
            cfg = load_config(
                PretokenizeConfig,
                os.path.join(REPO, "configs/data/pretokenize_tiny.yaml"),
                input=self.path("raw"),
                output=self.path("tokens", stage),
                scores=self.path("scores"),
                min_aesthetic=min_aes,
                resolution=res,
                vq={"uri": self.vq},
                text={"uri": self.t5},
            )
            manifest = run_pretokenize(cfg)
            if manifest.get("failed_shards"):
                raise RuntimeError(
                    f"pretokenize ({stage}) left shards {manifest['failed_shards']} unfinished; rerun"
                )
            out[stage] = {
                k: manifest[k]
                for k in ("num_shards", "num_samples", "num_bytes", "dropped")
                if k in manifest
            }
        out["stage2_min_aesthetic"] = round(threshold, 4)
        return out

    def train(self, stage: str, config: str, steps: int, extra: list[str]) -> dict[str, Any]:
        deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
        cmd = [
            deepspeed,
            "--num_gpus",
            str(self.cfg.ranks),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
            os.path.join(REPO, "jobs/train.py"),
            "--config",
            os.path.join(REPO, config),
            f"run_dir={self.path('train', stage)}",
            f"data.shards={json.dumps([self.path('tokens', stage)])}",
            f"steps={steps}",
            f"model.vocab_size={self.codebook_size}",
            f"model.caption_dim={self.cfg.t5_dim}",
            *extra,
        ]
        log.info("launching: %s", " ".join(cmd))
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
        # DeepSpeed builds its CPU communication op with the ninja pip put beside this Python:
        # run as .venv/bin/python without the venv activated, that folder is not on PATH
        env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
        proc = subprocess.run(cmd, cwd=REPO, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"{stage} training failed (exit {proc.returncode}); rerun to resume")
        export = self.path("train", stage, "export")
        return {"export": export, **storage.read_json(os.path.join(export, "export.json"))}

    def sample_and_check(self) -> dict[str, Any]:
        from PIL import Image

        from pipeline.sample import SamplingParams
        from pipeline.sample_job import SampleConfig, run_sampling

        prompts = []
        for c in synthetic.COLOURS:
            for s in synthetic.SHAPES:
                prompts.append(synthetic.caption_for(c, s, "white"))
        prompts = prompts[: self.cfg.prompts_per_check]
        prompts_file = self.path("prompts.txt")
        with open(prompts_file, "w") as f:
            f.write("\n".join(prompts) + "\n")
        out: dict[str, Any] = {}
        for stage in ("stage1", "stage2"):
            cfg = SampleConfig(
                checkpoint=self.path("train", stage, "export"),
                vq=self.vq,
                text_encoder=self.t5,
                output=self.path("samples", stage),
                prompts_file=prompts_file,
                images_per_prompt=self.cfg.images_per_prompt,
                batch_size=8,
                overwrite=True,
                sampling=SamplingParams(
                    cfg_scale=self.cfg.cfg_scale,
                    temperature=self.cfg.temperature,
                    top_k=self.cfg.top_k,
                ),
            )
            result = run_sampling(cfg)
            hits = {"colour": 0, "shape": 0, "both": 0}
            n = 0
            for rec in result.images:
                want = synthetic.parse_caption(rec["prompt"])
                got = synthetic.check_image(Image.open(os.path.join(cfg.output, rec["file"])))
                n += 1
                hits["colour"] += got[0] == want[0]
                hits["shape"] += got[1] == want[1]
                hits["both"] += got == want
            out[stage] = {
                "images": n,
                "grid": os.path.join(cfg.output, "grid.png"),
                **{f"match_{k}": round(v / max(n, 1), 3) for k, v in hits.items()},
            }
        out["tokenizer_ceiling"] = self.tokenizer_ceiling(prompts)
        nc, ns = len(synthetic.COLOURS), len(synthetic.SHAPES)
        out["chance"] = {
            "match_colour": round(1 / nc, 3),
            "match_shape": round(1 / ns, 3),
            "match_both": round(1 / (nc * ns), 3),
        }
        return out

    def tokenizer_ceiling(self, prompts: list[str]) -> dict[str, Any]:
        """The checker on the VQ's own reconstructions of fresh pictures of the prompts: the most
        a GPT sampling this tokenizer's codes could score, at each stage's resolution."""
        import random

        import numpy as np
        import torch
        from PIL import Image

        from pipeline.models.vq import VQModel
        from pipeline.sample_job import to_uint8_hwc

        vq = VQModel.from_pretrained(self.vq)
        out = {}
        for stage, size in (
            ("stage1", self.cfg.stage1_resolution),
            ("stage2", self.cfg.image_size),
        ):
            wants, pics = [], []
            for i, prompt in enumerate(prompts):
                colour, shape = synthetic.parse_caption(prompt)
                for j in range(self.cfg.images_per_prompt):
                    rng = random.Random(10_000 + i * 100 + j)
                    pics.append(synthetic.draw_shape(colour, shape, "white", size, rng))
                    wants.append((colour, shape))
            x = torch.from_numpy(np.stack([np.asarray(p, np.float32) for p in pics]))
            with torch.no_grad():
                rec = vq.decode(vq.encode(x.permute(0, 3, 1, 2) / 127.5 - 1))
            got = [synthetic.check_image(Image.fromarray(a)) for a in to_uint8_hwc(rec)]
            n = len(got)
            out[stage] = {
                "images": n,
                "match_colour": round(sum(g[0] == w[0] for g, w in zip(got, wants)) / n, 3),
                "match_shape": round(sum(g[1] == w[1] for g, w in zip(got, wants)) / n, 3),
                "match_both": round(sum(g == w for g, w in zip(got, wants)) / n, 3),
            }
        return out

    # -- the whole run

    def run(self) -> dict[str, Any]:
        os.makedirs(self.out, exist_ok=True)
        save_config(self.cfg, self.path("demo_config.yaml"))
        self.step("tiny random text encoder and aesthetic model", self.models)
        self.step("generate image-caption data", self.data)
        with synthetic.serve_folder(self.path("www")) as base_url:
            self.step("download (img2dataset, local Ray)", lambda: self.download(base_url))
        self.step("score and filter (aesthetic, basic filters)", self.score)
        self.step("train the VQ tokenizer", self.tokenizer)
        self.step("pretokenize stage 1 and stage 2", self.pretokenize)
        s1 = self.step(
            "train stage 1 (DeepSpeed)",
            lambda: self.train(
                "stage1",
                self.cfg.stage1_config,
                self.cfg.stage1_steps,
                [f"model.grid_size={self.cfg.stage1_resolution // self.downsample}"],
            ),
        )
        self.step(
            "train stage 2 from stage 1 (DeepSpeed)",
            lambda: self.train(
                "stage2",
                self.cfg.stage2_config,
                self.cfg.stage2_steps,
                [
                    f"model.grid_size={self.cfg.image_size // self.downsample}",
                    f"init_from={s1['export']}",
                ],
            ),
        )
        self.step("sample and check against the prompts", self.sample_and_check)
        self.report["seconds"] = round(time.time() - self.t0, 1)
        storage.write_json(self.path("report.json"), self.report)
        return self.report


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run every stage; returns the report (also written to <out>/report.json)."""
    return Demo(cfg).run()
