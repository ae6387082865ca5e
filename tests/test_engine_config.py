"""A ds_config JSON that sets what the training config owns is refused, not overridden."""

import json
from pathlib import Path

import pytest

from pipeline.train.engine import build_ds_config
from pipeline.train.optim import OptimConfig

REPO = Path(__file__).resolve().parents[1]


def _build(tmp_path, ds: dict, **kw):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    args = dict(
        micro_batch=4, grad_accum=2, world=2, precision="fp32", optim=OptimConfig(), lr=1e-4
    )
    return build_ds_config(str(path), **{**args, **kw})


def test_json_values_that_agree_pass_and_others_are_refused(tmp_path):
    base = {"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW", "params": {}}}
    # the same values as the training config: accepted
    same = {
        **base,
        "gradient_accumulation_steps": 2,
        "train_batch_size": 16,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": False},
    }
    assert _build(tmp_path, same)["train_batch_size"] == 16
    cases = {
        "gradient_accumulation_steps = 8": {"gradient_accumulation_steps": 8},
        "gradient_clipping = 0.5": {"gradient_clipping": 0.5},
        "bf16.enabled = True": {"bf16": {"enabled": True}},
        "fp16.enabled = True": {"fp16": {"enabled": True}},
        "optimizer.type = 'Lamb'": {"optimizer": {"type": "Lamb", "params": {}}},
        "optimizer.params.lr": {"optimizer": {"type": "AdamW", "params": {"lr": 3e-4}}},
        "optimizer.params.weight_decay = 0.1": {
            "optimizer": {"type": "AdamW", "params": {"weight_decay": 0.1}}
        },
        "scheduler": {"scheduler": {"type": "WarmupLR", "params": {}}},
    }
    for what, extra in cases.items():
        with pytest.raises(ValueError, match="sets what the training config owns") as e:
            _build(tmp_path, {**base, **extra})
        assert what in str(e.value), (what, str(e.value))
    # the YAML key to use instead is named
    with pytest.raises(ValueError, match=r"set grad_accum instead"):
        _build(tmp_path, {**base, "gradient_accumulation_steps": 8})


def test_a_visible_gpu_does_not_override_the_cpu_accelerator(monkeypatch):
    """DS_ACCELERATOR=cpu (the demo, the tests) on a GPU machine: DeepSpeed keeps the model on
    the CPU, so the process group must be gloo and the precision fp32, whatever
    torch.cuda.is_available() says (NCCL on CPU tensors failed in deepspeed.initialize)."""
    import types

    import torch

    from pipeline.train import engine

    def accelerator(name):  # what deepspeed.accelerator.get_accelerator() reports
        return lambda: types.SimpleNamespace(device_name=lambda: name)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(engine, "get_accelerator", accelerator("cpu"))
    assert not engine.on_cuda()
    assert engine.resolve_precision("auto") == "fp32"
    monkeypatch.setattr(engine, "get_accelerator", accelerator("cuda"))
    assert engine.on_cuda() and engine.resolve_precision("auto") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not engine.on_cuda()


def test_zero1_bf16_with_fp32_accumulation_is_refused_before_training(tmp_path):
    """DeepSpeed turns ZeRO-1 + bf16 + fp32 accumulation into its BF16_Optimizer, whose
    checkpoints its zero_to_fp32 cannot consolidate: the run's export would fail at its end.
    The shipped ZeRO-1 JSON leaves accumulation to DeepSpeed (bf16), ZeRO-2 and -3 ask fp32."""
    z1 = {
        "zero_optimization": {"stage": 1},
        "data_types": {"grad_accum_dtype": "fp32"},
        "optimizer": {"type": "AdamW", "params": {}},
    }
    with pytest.raises(ValueError, match="BF16_Optimizer.*use ZeRO-2"):
        _build(tmp_path, z1, precision="bf16")
    assert _build(tmp_path, z1, precision="fp32")["data_types"]  # fp32: nothing to swap
    # with the optimizer offloaded to CPU DeepSpeed keeps its ZeRO optimizer: allowed
    offloaded = {**z1, "zero_optimization": {"stage": 1, "offload_optimizer": {"device": "cpu"}}}
    assert _build(tmp_path, offloaded, precision="bf16")["bf16"]["enabled"]
    z2 = {**z1, "zero_optimization": {"stage": 2}}
    assert _build(tmp_path, z2, precision="bf16")["bf16"]["enabled"]
    accum = {
        name: json.loads((REPO / "configs" / "deepspeed" / f"{name}.json").read_text()).get(
            "data_types", {}
        )
        for name in ("zero1", "zero2", "zero3", "zero3_offload")
    }
    assert accum == {
        "zero1": {},
        "zero2": {"grad_accum_dtype": "fp32"},
        "zero3": {"grad_accum_dtype": "fp32"},
        "zero3_offload": {"grad_accum_dtype": "fp32"},
    }
