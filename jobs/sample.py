"""Sample images from an exported GPT: PNGs, a captioned grid and the resolved config.

    python jobs/sample.py --config configs/sample/t2i.yaml checkpoint=s3://b/runs/stage1/export \
        vq=s3://b/models/vq16 text_encoder=s3://b/models/flan-t5-xl output=s3://b/samples/run1 \
        prompt="a red apple on a wooden table"
    python jobs/sample.py --config configs/sample/t2i.yaml ... prompts_file=prompts.txt \
        sampling.cfg_scale=7.5 sampling.top_k=1000 images_per_prompt=4 compile_mode=default

Rerunning the same command samples only the images that are missing. Started by a launcher on
several ranks (``torchrun --nproc_per_node 8 jobs/sample.py ... device=cuda``, ``srun``,
``mpirun``), each rank samples its part on its own GPU and rank 0 then writes the grid and the
summary.
"""

from __future__ import annotations

from pipeline.cli import parse_job, run_main
from pipeline.launch_env import run_in_parts
from pipeline.sample_job import SampleConfig, run_sampling


def main(argv: list[str] | None = None) -> None:
    cfg, _ = parse_job(SampleConfig, __doc__.splitlines()[0], argv)
    run_in_parts(cfg, run_sampling)  # several ranks of a launcher: one part each


if __name__ == "__main__":
    run_main(main)
