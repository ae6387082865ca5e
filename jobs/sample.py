"""Sample images from an exported GPT: PNGs, a captioned grid and the resolved config.

    python jobs/sample.py --config configs/sample/t2i.yaml checkpoint=s3://b/runs/stage1/export \
        vq=s3://b/models/vq16 text_encoder=s3://b/models/flan-t5-xl output=s3://b/samples/run1 \
        prompt="a red apple on a wooden table"
    python jobs/sample.py --config configs/sample/t2i.yaml ... prompts_file=prompts.txt \
        sampling.cfg_scale=7.5 sampling.top_k=1000 images_per_prompt=4 compile_mode=default

Rerunning the same command samples only the images that are missing.
"""

from __future__ import annotations

from pipeline.cli import parse_job, run_main
from pipeline.sample_job import SampleConfig, run_sampling


def main(argv: list[str] | None = None) -> None:
    cfg, _ = parse_job(SampleConfig, __doc__.splitlines()[0], argv)
    run_sampling(cfg)


if __name__ == "__main__":
    run_main(main)
