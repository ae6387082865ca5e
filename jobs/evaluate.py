"""Evaluate a GPT export on a caption set: CLIP score, FID, tokenizer metrics -> JSON + markdown.

    python jobs/evaluate.py --config configs/evaluate/coco.yaml checkpoint=s3://b/runs/s1/export \
        vq=s3://b/models/vq16 text_encoder=s3://b/models/flan-t5-xl captions=coco_captions.tsv \
        reference_images=s3://b/coco/val2014 output=s3://b/eval/s1 \
        clip_weights=/models/clip-vit-l14.bin inception_weights=/models/pt_inception.pth

Weights are read from local paths or s3:// only; a metric without its weights is reported as
unavailable. Rerunning samples only the images that are missing. Under a launcher of several
ranks (``torchrun --nproc_per_node 8 jobs/evaluate.py ... device=cuda``, ``srun``, ``mpirun``)
each rank samples its part on its own GPU and rank 0 then scores them all.
"""

from __future__ import annotations

from pipeline.cli import parse_job, run_main
from pipeline.evaluate import EvalConfig, run_evaluation
from pipeline.launch_env import run_in_parts


def main(argv: list[str] | None = None) -> None:
    cfg, _ = parse_job(EvalConfig, __doc__.splitlines()[0], argv)
    # several ranks of a launcher: a part each (scoring images made earlier: rank 0 alone)
    run_in_parts(cfg, run_evaluation, split=not cfg.generated)


if __name__ == "__main__":
    run_main(main)
