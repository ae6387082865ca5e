"""Training metrics on rank 0: a log line per interval, a per-step jsonl, TensorBoard, a progress
bar, and a loss-curve PNG at the end.

``metrics/steps.jsonl`` holds one record per optimizer step (step, loss, lr, grad norm, samples,
seconds, seconds spent waiting for data, and optionally the sample keys of every rank): the ground truth that resume tests
compare. On resume the file is cut back to the checkpoint's step, so it always tells one story.

Throughput counts image tokens (the ``grid**2`` predicted per sample). MFU is the matmul FLOPs of
forward + backward (``train_flops_per_sample``, activation recomputation not counted) per second,
over ``peak_flops`` per device times the number of devices.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

from pipeline import storage
from pipeline.log import get_logger, progress

log = get_logger(__name__)


def read_steps(path: str) -> list[dict[str, Any]]:
    """The records of a steps.jsonl (a half-written last line is ignored)."""
    out = []
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return out


class MetricsLogger:
    """Collects per-step numbers; writes only on rank 0 (``enabled``)."""

    def __init__(
        self,
        out_dir: str,
        *,
        enabled: bool,
        start_step: int,
        total_steps: int,
        log_every: int,
        flops_per_sample: float,
        tokens_per_sample: int,
        peak_flops: float,
        world: int,
        tensorboard: bool = True,
    ):
        self.enabled = enabled
        self.out_dir = out_dir
        self.log_every = max(1, log_every)
        self.flops_per_sample, self.tokens_per_sample = flops_per_sample, tokens_per_sample
        self.peak_total = peak_flops * world
        self.steps_path = os.path.join(out_dir, "steps.jsonl")
        self._window: list[dict[str, Any]] = []
        self._tb = None
        self._bar = None
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        kept = [r for r in read_steps(self.steps_path) if r["step"] <= start_step]
        # cut back to the resumed step, atomically: a kill meanwhile leaves the old file whole
        storage.write_text(self.steps_path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(self.steps_path, "a")  # noqa: SIM115 - open for the whole run
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(
                os.path.join(out_dir, "tensorboard"), purge_step=start_step + 1
            )
        self._bar = iter(
            progress(
                range(start_step, total_steps),
                desc="train",
                total=total_steps,
                unit="step",
                initial=start_step,
            )
        )

    def step(
        self,
        step: int,
        *,
        loss: float,
        lr: float,
        grad_norm: float,
        samples: int,
        seconds: float,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """Record optimizer step ``step`` (``samples``: global samples in this step)."""
        if not self.enabled:
            return
        rec = {
            "step": step,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "samples": samples,
            "seconds": seconds,
            **(extra or {}),
        }
        # strict JSON: a non-finite number is null (json.dumps would write NaN, which jq and
        # other readers refuse); the log line and TensorBoard still show the step
        self._file.write(json.dumps(_finite_or_null(rec)) + "\n")
        self._file.flush()
        if self._tb is not None:
            self._tb.add_scalar("train/loss", loss, step)
            self._tb.add_scalar("train/lr", lr, step)
            if math.isfinite(grad_norm):
                self._tb.add_scalar("train/grad_norm", grad_norm, step)
        next(self._bar, None)
        self._window.append(rec)
        if step % self.log_every == 0:
            self._log_interval(step)

    def _log_interval(self, step: int) -> None:
        w, self._window = self._window, []
        if not w:
            return
        secs = sum(r["seconds"] for r in w) or float("nan")
        samples = sum(r["samples"] for r in w)
        tok_s = samples * self.tokens_per_sample / secs
        # peak_flops <= 0: no peak configured, no MFU
        mfu = (
            samples * self.flops_per_sample / secs / self.peak_total
            if self.peak_total > 0
            else float("nan")
        )
        loss = sum(r["loss"] for r in w) / len(w)
        wait = (
            sum(r.get("data_seconds", 0.0) for r in w) / secs
        )  # the loader kept the model waiting
        log.info(
            "step %d loss %.4f lr %.3g grad_norm %.3g tokens/s %.0f MFU %.2f%% data wait %.1f%%",
            step,
            loss,
            w[-1]["lr"],
            w[-1]["grad_norm"],
            tok_s,
            100 * mfu,
            100 * wait,
        )
        if self._tb is not None:
            self._tb.add_scalar("perf/tokens_per_s", tok_s, step)
            self._tb.add_scalar("perf/mfu", mfu, step)
            self._tb.add_scalar("perf/data_wait", wait, step)

    def flush(self) -> None:
        if self.enabled and self._tb is not None:
            self._tb.flush()

    def close(self) -> str | None:
        """Log the last, partial interval; close files and draw ``loss.png`` from the whole
        steps.jsonl; returns its path."""
        if not self.enabled:
            return None
        if self._window:
            self._log_interval(self._window[-1]["step"])
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        return plot_loss(read_steps(self.steps_path), os.path.join(self.out_dir, "loss.png"))


def plot_loss(records: list[dict[str, Any]], path: str) -> str | None:
    """A loss-vs-step PNG (with a moving average when there are many steps)."""
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # non-finite losses (null in steps.jsonl) are left out, not averaged into their neighbours
    kept = [
        r for r in records if isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])
    ]
    if not kept:
        return None
    steps = [r["step"] for r in kept]
    losses = [r["loss"] for r in kept]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, losses, lw=0.8, alpha=0.6, label="loss")
    k = max(1, len(losses) // 50)
    if k > 1:
        avg = [
            sum(losses[max(0, i - k + 1) : i + 1]) / len(losses[max(0, i - k + 1) : i + 1])
            for i in range(len(losses))
        ]
        ax.plot(steps, avg, lw=1.5, label=f"moving average ({k})")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.set_title(f"training loss: {losses[0]:.3f} -> {losses[-1]:.3f}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _finite_or_null(rec: dict[str, Any]) -> dict[str, Any]:
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in rec.items()
    }


def timer() -> float:
    return time.perf_counter()
