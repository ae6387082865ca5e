"""The training metrics logger on its own, and the training config's own checks."""

import json
import math

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.train.metrics import MetricsLogger
from pipeline.train.trainer import TrainConfig


def _logger(tmp_path, **kw) -> MetricsLogger:
    args = dict(
        enabled=True,
        start_step=0,
        total_steps=7,
        log_every=3,
        flops_per_sample=1e9,
        tokens_per_sample=16,
        peak_flops=1e12,
        world=1,
        tensorboard=False,
    )
    return MetricsLogger(str(tmp_path), **{**args, **kw})


def _steps(m: MetricsLogger, losses: list[float]) -> None:
    for i, loss in enumerate(losses, 1):
        m.step(i, loss=loss, lr=1e-3, grad_norm=loss, samples=4, seconds=0.5)


def test_every_interval_is_logged_the_last_partial_one_too(tmp_path, caplog):
    m = _logger(tmp_path)
    with caplog.at_level("INFO", logger="pipeline.train.metrics"):
        _steps(m, [4.0, 3.0, 2.0, 1.5, 1.0, 0.9, 0.8])
        png = m.close()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [ln.split()[1] for ln in lines] == ["3", "6", "7"]  # 7 % 3 != 0: logged at close
    assert "loss 0.8000" in lines[-1] and "MFU 0.80%" in lines[-1]  # 4 x 1e9 FLOP / 0.5 s / 1e12
    assert png and png.endswith("loss.png")


def test_non_finite_values_are_null_in_steps_jsonl_and_left_out_of_the_plot(tmp_path):
    m = _logger(tmp_path, peak_flops=0.0)  # no peak: no MFU, no crash
    _steps(m, [4.0, float("nan"), float("inf"), 2.0])
    png = m.close()
    text = (tmp_path / "steps.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    rows = [json.loads(line) for line in text.splitlines()]
    assert [r["loss"] for r in rows] == [4.0, None, None, 2.0]
    assert png is not None  # drawn from the finite steps

    only_nan = _logger(tmp_path / "nan")
    _steps(only_nan, [math.nan])
    assert only_nan.close() is None  # nothing finite to draw


@pytest.mark.parametrize(
    "override", ["steps=0", "grad_accum=0", "ckpt_every=0", "keep_last=0", "log_every=0",
                 "peak_flops=-1", "max_skipped_steps=-1"],
)  # fmt: skip
def test_training_config_refuses_values_that_would_fail_mid_run(override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        load_config(TrainConfig, "configs/train/tiny.yaml", [override])
