from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml

from pipeline.config import ConfigError, doc, load_config, parse_overrides, save_config
from pipeline.models.gpt import GPTConfig


@dataclass(frozen=True)
class Optim:
    lr: float = doc("peak learning rate", 1e-4)
    betas: tuple[float, float] = doc("AdamW betas", (0.9, 0.95))


@dataclass(frozen=True)
class Stage:
    name: str = doc("run name")
    steps: int = doc("optimizer steps", 10)
    precision: Literal["fp32", "bf16"] = doc("compute dtype", "fp32")
    shards: list[str] = doc("input shards", [])
    resume: str | None = doc("checkpoint to resume", None)
    optim: Optim = field(default_factory=Optim, metadata={"doc": "optimizer"})
    model: GPTConfig = field(default_factory=GPTConfig, metadata={"doc": "model"})


def write(tmp_path, data, name="c.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return str(p)


def test_yaml_overrides_and_types(tmp_path):
    path = write(tmp_path, {"name": "s1", "optim": {"lr": "2e-4"}, "model": "debug"})
    cfg = load_config(Stage, path, ["steps=5", "optim.betas=[0.8, 0.9]", "model.n_layer=3"])
    assert cfg.optim.lr == 2e-4 and cfg.steps == 5 and cfg.optim.betas == (0.8, 0.9)
    assert cfg.model.dim == 64 and cfg.model.n_layer == 3  # preset name, then override


def test_unknown_key_names_key_and_file(tmp_path):
    path = write(tmp_path, {"name": "s1", "optim": {"learning_rate": 1e-3}})
    with pytest.raises(ConfigError) as e:
        load_config(Stage, path)
    assert "learning_rate" in str(e.value) and path in str(e.value) and "Optim" in str(e.value)


def test_wrong_type_is_clear(tmp_path):
    path = write(tmp_path, {"name": "s1", "steps": "ten"})
    with pytest.raises(ConfigError, match=r"steps: expected an integer, got 'ten'"):
        load_config(Stage, path)
    with pytest.raises(ConfigError, match="not one of"):
        load_config(Stage, write(tmp_path, {"name": "a", "precision": "fp16"}))
    with pytest.raises(ConfigError, match="expected true/false"):
        load_config(GPTConfig, None, ["grad_checkpointing=yes please"])


def test_missing_required_and_bad_preset(tmp_path):
    with pytest.raises(ConfigError, match="missing required key 'name'"):
        load_config(Stage, write(tmp_path, {"steps": 1}))
    with pytest.raises(ConfigError, match="unknown GPT preset"):
        load_config(Stage, write(tmp_path, {"name": "a", "model": "Huge"}))
    with pytest.raises(ConfigError, match="not divisible"):
        load_config(GPTConfig, None, ["dim=100", "n_head=3"])


def test_base_file_and_round_trip(tmp_path):
    write(tmp_path, {"name": "base", "steps": 3, "optim": {"lr": 1e-3}}, "base.yaml")
    path = write(tmp_path, {"base": "base.yaml", "name": "child"})
    cfg = load_config(Stage, path)
    assert (cfg.name, cfg.steps, cfg.optim.lr) == ("child", 3, 1e-3)
    save_config(cfg, str(tmp_path / "out" / "config.yaml"))
    again = load_config(Stage, str(tmp_path / "out" / "config.yaml"))
    assert again == cfg


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_overrides(["steps"])
    assert parse_overrides(["a.b=1", "a.c=x"]) == {"a": {"b": 1, "c": "x"}}


@dataclass(frozen=True)
class Resize:
    mode: Literal["no", "border", "center_crop"] = doc("img2dataset's resize_mode", "border")
    tmp_dir: str | None = doc("a folder, or null", "/tmp")


def test_yaml_words_read_as_booleans_and_python_none(tmp_path):
    """YAML 1.1 reads ``no`` as False: a Literal naming the word still takes it (in a file and
    as an override); ``None`` as Python spells it is null for an optional field."""
    path = write(tmp_path, {"mode": False})  # what `mode: no` in a YAML file loads as
    assert load_config(Resize, path).mode == "no"
    assert load_config(Resize, None, ["mode=no", "tmp_dir=None"]) == Resize(mode="no", tmp_dir=None)
    with pytest.raises(ConfigError, match="not one of"):
        load_config(Resize, None, ["mode=yes"])


def test_base_on_s3_resolves_relative_paths(s3_bucket):
    from pipeline import storage

    storage.write_text(f"{s3_bucket}/configs/base.yaml", "name: base\nsteps: 7\n")
    storage.write_text(f"{s3_bucket}/configs/train/child.yaml", "base: ../base.yaml\nname: child\n")
    cfg = load_config(Stage, f"{s3_bucket}/configs/train/child.yaml")
    assert (cfg.name, cfg.steps) == ("child", 7)
