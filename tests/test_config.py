import importlib.util
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest
import yaml

from pipeline.config import ConfigError, doc, load_config, parse_overrides, save_config
from pipeline.models.gpt import GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def test_errors_say_whether_a_file_or_an_override_set_the_key(tmp_path):
    """A bad value typed on the command line is named as the override, not blamed on the file;
    a key from a file with a base chain names the chain."""
    path = write(tmp_path, {"name": "s1", "optim": {"lr": 1e-3}})
    with pytest.raises(ConfigError, match=r"^override steps: expected an integer, got 'ten'$"):
        load_config(Stage, path, ["steps=ten"])
    with pytest.raises(ConfigError, match=r"^override optim\.lr: expected a number, got 'x'$"):
        load_config(Stage, path, ["optim.lr=x"])  # optim also has keys from the file
    with pytest.raises(ConfigError, match=r"^override optim\.learning_rate: unknown key"):
        load_config(Stage, path, ["optim.learning_rate=1"])
    with pytest.raises(ConfigError, match=r"^override model\.n_layer: expected an integer"):
        load_config(Stage, None, ["name=a", "model=debug", "model.n_layer=x"])
    # the file's own mistakes still name the file, next to a good override
    bad = write(tmp_path, {"name": "s1", "optim": {"lr": "fast"}}, "bad.yaml")
    with pytest.raises(ConfigError, match=rf"^{bad}: optim: lr: expected a number"):
        load_config(Stage, bad, ["steps=3"])
    write(tmp_path, {"name": "base", "steps": "ten"}, "base.yaml")
    child = write(tmp_path, {"base": "base.yaml", "name": "child"}, "child.yaml")
    with pytest.raises(ConfigError, match=r"child\.yaml \(with its base .*base\.yaml\): steps"):
        load_config(Stage, child)


def test_missing_required_and_bad_preset(tmp_path):
    with pytest.raises(ConfigError, match="missing required key 'name'"):
        load_config(Stage, write(tmp_path, {"steps": 1}))
    with pytest.raises(ConfigError, match=r"missing required key 'a' \(and 'b', 'c'\) for Three"):
        load_config(Three)  # all of them at once, not one per try
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


def test_a_file_uri_config_resolves_its_base_beside_it(tmp_path):
    write(tmp_path, {"name": "base", "steps": 3}, "base.yaml")
    path = write(tmp_path, {"base": "base.yaml", "name": "child"})
    assert load_config(Stage, f"file://{path}").steps == 3
    # a slash lost (file:/tmp/...) is a config error that shows the right spelling
    with pytest.raises(ConfigError, match=f"write file://{path}"):
        load_config(Stage, f"file:{path}")


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_overrides(["steps"])
    # the values' text: each field's type decides how to read it
    assert parse_overrides(["a.b=1", "a.c=x"]) == {"a": {"b": "1", "c": "x"}}


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
    with pytest.raises(ConfigError, match="mode: 'yes' is not one of"):  # as typed, not True
        load_config(Resize, None, ["mode=yes"])


def test_base_on_s3_resolves_relative_paths(s3_bucket):
    from pipeline import storage

    storage.write_text(f"{s3_bucket}/configs/base.yaml", "name: base\nsteps: 7\n")
    storage.write_text(f"{s3_bucket}/configs/train/child.yaml", "base: ../base.yaml\nname: child\n")
    cfg = load_config(Stage, f"{s3_bucket}/configs/train/child.yaml")
    assert (cfg.name, cfg.steps) == ("child", 7)


@dataclass(frozen=True)
class Three:
    a: str = doc("first")
    b: int = doc("second")
    c: float = doc("third")


@dataclass(frozen=True)
class Texts:
    prompt: str | None = doc("a prompt", None)
    name: str = doc("run name", "run")
    out: str = doc("file, or '-' for stdout", "out.txt")
    steps: int = doc("steps", 1)
    lr: float = doc("learning rate", 1e-4)
    shards: list[str] = doc("shards", [])
    mode: Literal["no", "border"] = doc("resize", "border")
    limit: int | None = doc("a limit, or null", 3)
    extra: dict[str, Any] = doc("free-form", {})


def test_override_values_are_read_by_field_type(tmp_path):
    """Text fields take an override as typed, where YAML would read these as 'a cat', None, a
    mapping, False, True, 1000, 493, a list and [None]; other fields read it as YAML; values
    from a YAML file keep their YAML types (its author quotes what they mean)."""
    texts = ["a cat # on a mat", "#1 dog", "a cat: sitting", "no", "yes", "1000", "0755", "[a, b]"]
    for text in [*texts, "-"]:
        cfg = load_config(Texts, None, [f"prompt={text}", f"name={text}", f"out={text}"])
        assert cfg.prompt == cfg.name == cfg.out == text
        assert type(cfg.prompt) is str and type(cfg.name) is str  # plain str: YAML can save it
        save_config(cfg, str(tmp_path / "config.yaml"))
        assert load_config(Texts, str(tmp_path / "config.yaml")) == cfg

    cfg = load_config(
        Texts,
        None,
        ["steps=5", "lr=2e-4", "shards=[a, b]", "mode=no", "limit=7", "extra.k=1", "extra.s=x"],
    )
    assert (cfg.steps, cfg.lr, cfg.shards, cfg.mode, cfg.limit) == (5, 2e-4, ["a", "b"], "no", 7)
    assert cfg.extra == {"k": 1, "s": "x"}
    for null in ("null", "~", "None"):
        assert load_config(Texts, None, [f"prompt={null}", f"limit={null}"]) == Texts(limit=None)
    assert load_config(Texts, None, ["prompt="]).prompt == ""
    with pytest.raises(ConfigError, match="steps: expected an integer, got 'five'"):
        load_config(Texts, None, ["steps=five"])
    # integers in base 10 as typed (YAML 1.1 reads 010 as octal 8 and 1:30 as 90)
    cfg = load_config(Texts, None, ["steps=010", "limit=0100"])
    assert (cfg.steps, cfg.limit) == (10, 100)
    with pytest.raises(ConfigError, match="steps: expected an integer, got '1:30'"):
        load_config(Texts, None, ["steps=1:30"])
    assert load_config(Texts, None, ["steps=1_000", "lr=010"]).steps == 1000
    assert load_config(Texts, None, ["lr=010"]).lr == 10.0  # a float field too
    with pytest.raises(ConfigError, match="lr: expected a number, got '1:30'"):
        load_config(Texts, None, ["lr=1:30"])
    # YAML's own reading of other underscores (no bare ValueError from int())
    assert load_config(Texts, None, ["steps=10_"]).steps == 10

    with pytest.raises(ConfigError, match="name: expected a string, got 2024"):
        load_config(Texts, write(tmp_path, {"name": 2024}))
    assert load_config(Texts, write(tmp_path, {"name": "2024"})).name == "2024"


def test_hostfile_out_dash_means_stdout():
    spec = importlib.util.spec_from_file_location("hostfile_job", f"{ROOT}/jobs/hostfile.py")
    job = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = job  # dataclasses look their module up while being created
    try:
        spec.loader.exec_module(job)
        assert load_config(job.HostfileConfig, None, ["out=-"]).out == "-"
    finally:
        del sys.modules[spec.name]


@pytest.mark.parametrize(
    "overrides", [["model=debug", "model.n_layer=3"], ["model.n_layer=3", "model=debug"]]
)
def test_preset_and_a_key_below_it_combine_in_either_order(overrides, tmp_path):
    cfg = load_config(Stage, None, ["name=a", *overrides])
    assert (cfg.model.dim, cfg.model.n_layer) == (64, 3)  # debug's width, the layer count given
    # over a file that names another preset: the overrides' preset and key both win
    cfg = load_config(Stage, write(tmp_path, {"name": "a", "model": "B"}), overrides)
    assert (cfg.model.dim, cfg.model.n_layer) == (64, 3)


def test_a_preset_override_keeps_the_files_fields_of_that_section(tmp_path):
    """``model=debug`` over a file's ``model: {preset: B, grid_size: 8}`` changes the preset
    and keeps the file's own fields, as ``model.preset=debug`` does (it used to replace the
    whole section: stage 2's grid size and activation checkpointing were silently lost)."""
    path = write(tmp_path, {"name": "a", "model": {"preset": "B", "grid_size": 8, "n_layer": 5}})
    for override in ("model=debug", "model.preset=debug"):
        cfg = load_config(Stage, path, [override])
        assert (cfg.model.dim, cfg.model.grid_size, cfg.model.n_layer) == (64, 8, 5)
    # and through a base file: the child's preset over the base's section
    child = tmp_path / "child.yaml"
    child.write_text(f"base: {path}\nmodel: debug\n")
    cfg = load_config(Stage, str(child))
    assert (cfg.model.dim, cfg.model.grid_size, cfg.model.n_layer) == (64, 8, 5)
    # an optional section set to null is still null, not a preset named "null"
    from pipeline.data.filter import ScoreConfig

    score = load_config(
        ScoreConfig, f"{ROOT}/configs/data/score.yaml", ["input=a", "aesthetic=null"]
    )
    assert score.aesthetic is None


def test_a_preset_override_that_a_saved_config_leaves_nothing_to_change_is_refused(tmp_path):
    """A saved resolved config spells out every field and no preset: ``model=XL`` over it
    changed nothing (the file's dim, n_layer and n_head won) and the run was GPT-B without a
    word. Refused, naming the fields; given as overrides too, they apply."""
    saved = str(tmp_path / "saved.yaml")
    save_config(load_config(Stage, None, ["name=a", "model=B"]), saved)
    for override in ("model=XL", "model.preset=XL"):
        with pytest.raises(ConfigError, match=r"model=XL on the command line changes nothing"):
            load_config(Stage, saved, [override])
    with pytest.raises(ConfigError, match=r"dim=768 \(the preset's 1280\), n_layer=12"):
        load_config(Stage, saved, ["model=XL"])
    spelt = ["model=XL", "model.dim=1280", "model.n_layer=36", "model.n_head=20"]
    assert load_config(Stage, saved, spelt).model == GPTConfig.from_name("XL")
    # a preset that sets what the file leaves to it is no conflict (stage 2 over stage 1)
    stage = write(tmp_path, {"name": "a", "model": {"preset": "XL", "grid_size": 32}}, "s.yaml")
    cfg = load_config(Stage, stage, ["model=L"]).model
    assert (cfg.dim, cfg.grid_size) == (1024, 32)


def test_duplicate_yaml_key_names_key_file_and_line(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("name: a\noptim:\n  lr: 1.0e-3\nsteps: 2\noptim:\n  betas: [0.8, 0.9]\n")
    with pytest.raises(ConfigError) as e:
        load_config(Stage, str(path))
    assert "duplicate key 'optim'" in str(e.value) and f"{path}, line 5" in str(e.value)
    path.write_text("name: a\noptim:\n  lr: 1.0e-3\n  lr: 2.0e-3\n")
    with pytest.raises(ConfigError, match=r"line 4: duplicate key 'lr'"):
        load_config(Stage, str(path))
    # a YAML merge key may repeat a key on purpose: the explicit one wins, as in YAML
    path.write_text("extra:\n  a: &a {x: 1, y: 2}\n  b:\n    <<: *a\n    x: 3\n")
    assert load_config(Texts, str(path)).extra["b"] == {"x": 3, "y": 2}


@dataclass(frozen=True)
class Optionals:
    optim: Optim | None = doc("optimizer, or null", None)
    hash: Literal["md5", "sha256"] | None = doc("hash, or null", None)
    size: int | list[int] = doc("one size or one per stage", 1)


def test_errors_inside_optional_fields_say_why():
    with pytest.raises(ConfigError) as e:
        load_config(Optionals, None, ["optim.bogus=1"])
    assert "unknown key 'bogus' for Optim" in str(e.value) and "or null" in str(e.value)
    with pytest.raises(ConfigError, match=r"hash: 'bogus' is not one of 'md5', 'sha256' \(or null"):
        load_config(Optionals, None, ["hash=bogus"])
    with pytest.raises(ConfigError) as e:
        load_config(Optionals, None, ["size=big"])
    assert "int | list[int]" in str(e.value)
    assert "expected an integer" in str(e.value) and "expected a list" in str(e.value)
    assert load_config(Optionals, None, ["hash=md5", "size=[1, 2]"]).size == [1, 2]
    with pytest.raises(ConfigError, match="Optim has no named presets, so 'null' cannot go"):
        load_config(Optionals, None, ["optim=null", "optim.lr=1"])


def test_unknown_key_in_the_shipped_score_config_is_named():
    from pipeline.data.filter import ScoreConfig

    with pytest.raises(ConfigError, match="unknown key 'bogus' for AestheticConfig"):
        load_config(ScoreConfig, f"{ROOT}/configs/data/score.yaml", ["aesthetic.bogus=1"])


def test_bad_base_and_unreadable_config_files(tmp_path):
    with pytest.raises(ConfigError, match=r"base must be one file name \(a string\)"):
        load_config(Stage, write(tmp_path, {"base": ["a.yaml"], "name": "a"}))
    with pytest.raises(ConfigError, match="is a directory, not a config file"):
        load_config(Stage, str(tmp_path))
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: a\noptim: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml, line \d+, column \d+: invalid YAML"):
        load_config(Stage, str(bad))


def test_describe_lists_nested_fields_dotted():
    from pipeline.config import describe

    text = describe(Stage)
    assert "  name: str (required)  run name" in text
    assert "    optim.lr: float = 0.0001  peak learning rate" in text
    assert "    optim.betas: tuple[float, float] = (0.9, 0.95)  AdamW betas" in text
    assert "precision: Literal['fp32', 'bf16'] = 'fp32'  compute dtype" in text
    assert "    model.n_layer: int = 12" in text and "Optim(" not in text
    assert "  hash: Literal['md5', 'sha256'] | None = None  hash, or null" in describe(Optionals)


def test_preset_and_missing_key_origins(tmp_path):
    path = write(tmp_path, {"name": "s1", "model": {"preset": "debug", "n_layer": 1}})
    with pytest.raises(ConfigError, match=r"^override model\.preset: unknown GPT preset 'XX'"):
        load_config(Stage, path, ["model.preset=XX"])
    with pytest.raises(ConfigError, match=r"^override model\.preset: unknown GPT preset 'XX'"):
        load_config(Stage, path, ["model=XX", "model.n_layer=2"])
    # a required key nobody gave is not blamed on the override that replaced the file's others
    nested = write(tmp_path, {"inner": {"b": 1}}, "n.yaml")
    with pytest.raises(ConfigError, match=rf"^{nested}: inner: missing required key 'a'"):
        load_config(Outer, nested, ["inner.b=2"])


@dataclass(frozen=True)
class Inner:
    a: int = doc("required")
    b: int = doc("optional", 0)


@dataclass(frozen=True)
class Outer:
    inner: Inner = doc("a nested config without a default for a")
