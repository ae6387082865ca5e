"""The end-to-end local demo: generated data -> download -> score -> tokenizer -> pretokenize
-> stage 1 -> stage 2 -> samples, all on this machine (local Ray, local storage).

    python jobs/demo.py [--config configs/demo.yaml] [out=outputs/demo stage1_steps=800 ...]
"""

from __future__ import annotations

import json
import os
import sys

from pipeline.cli import parse_job, run_main
from pipeline.demo import DemoConfig, run_demo


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--config" not in args and not any(a.startswith("--config=") for a in args):
        args = [
            "--config",
            os.path.join(os.path.dirname(__file__), "..", "configs", "demo.yaml"),
            *args,
        ]
    cfg, _ = parse_job(DemoConfig, __doc__.splitlines()[0], args)
    report = run_demo(cfg)
    out = os.path.abspath(cfg.out)
    check = report["steps"]["sample and check against the prompts"]
    print(f"\nDemo finished in {report['seconds']:.0f} s. Outputs:")
    for stage in ("stage1", "stage2"):
        print(f"  sample grid ({stage}):  {check[stage]['grid']}")
        print(
            f"  loss curve ({stage}):   {os.path.join(out, 'train', stage, 'metrics', 'loss.png')}"
        )
    print(f"  report:                {os.path.join(out, 'report.json')}")
    print("\nPrompt match rate (colour and shape both right), against chance:")
    for stage in ("stage1", "stage2"):
        c = check[stage]
        print(
            f"  {stage}: colour {c['match_colour']:.0%}, shape {c['match_shape']:.0%}, "
            f"both {c['match_both']:.0%}  (chance: colour {check['chance']['match_colour']:.0%}, "
            f"shape {check['chance']['match_shape']:.0%}, both {check['chance']['match_both']:.0%}; "
            f"the tokenizer's own reconstructions: both "
            f"{check['tokenizer_ceiling'][stage]['match_both']:.0%})"
        )
    print("\nCounts per stage:")
    for name, step in report["steps"].items():
        small = {k: v for k, v in step.items() if isinstance(v, (int, float, str)) and k != "note"}
        print(f"  {name}: {json.dumps(small)}")
    return 0


if __name__ == "__main__":  # img2dataset's worker processes re-import this file
    run_main(main)
