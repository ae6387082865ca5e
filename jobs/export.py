"""Export consolidated fp32 weights (safetensors + gpt_config.json) from a training checkpoint.

    python jobs/export.py --checkpoint s3://bucket/runs/stage1 --out s3://bucket/models/stage1
    python jobs/export.py --checkpoint outputs/train/tiny/checkpoints/step_00000050 --out out/
    python jobs/export.py --llamagen t2i_XL_stage1_256.pt --out models/llamagen-t2i-xl model.preset=XL

``--checkpoint`` is a run dir (its newest complete checkpoint is used) or one checkpoint folder.
Needs no process group: DeepSpeed's ZeRO consolidation runs in this one process.

``--llamagen`` imports a released or trained LlamaGen GPT checkpoint (``.pt``, local or s3://)
instead; the model it holds is given as dotted overrides of ``GPTConfig`` (``model.preset=XL``,
``model.grid_size=32`` for 512 px, ``model.cond=class``), checked against the weights' shapes.
"""

from __future__ import annotations

import argparse

from pipeline import storage
from pipeline.cli import EXIT_STATUS, run_main
from pipeline.config import load_config
from pipeline.log import get_logger, setup_logging
from pipeline.models.gpt_import import ImportConfig, load_llamagen_gpt
from pipeline.sample_job import save_exported_gpt
from pipeline.train.checkpoint import export_checkpoint

log = get_logger("export")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="example:\n  python jobs/export.py --checkpoint s3://b/runs/stage1 "
        "--out s3://b/runs/stage1/export\n\n" + EXIT_STATUS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="run dir or checkpoint folder (local/s3)")
    src.add_argument("--llamagen", help="a LlamaGen GPT .pt checkpoint (local/s3) to import")
    p.add_argument("--out", required=True, help="export folder (local or s3://)")
    p.add_argument(
        "overrides", nargs="*", help="with --llamagen: model.preset=XL model.grid_size=32 ..."
    )
    args = p.parse_args(argv)
    setup_logging()
    if args.checkpoint:
        if args.overrides:
            p.error("model overrides go with --llamagen only (a checkpoint knows its model)")
        export_checkpoint(storage.normalize(args.checkpoint), args.out)
        return
    cfg = load_config(ImportConfig, None, args.overrides)
    model = load_llamagen_gpt(args.llamagen, cfg.model)
    save_exported_gpt(model, args.out)
    log.info("imported %s (%s) -> %s", args.llamagen, model.cfg, args.out)


if __name__ == "__main__":
    run_main(main)
