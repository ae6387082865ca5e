"""The jobs' shared command line: exit statuses and one-line errors, ``--show-config``, ``--help``
and the log level from the environment."""

from __future__ import annotations

import glob
import importlib.util
import logging
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml

from pipeline import storage
from pipeline.cli import JOB_EXAMPLES, job_parser, parse_job, run_main
from pipeline.config import ConfigError, doc, load_config, to_dict
from pipeline.log import setup_logging
from tests.conftest import free_port
from tests.rawshards import write_raw_shards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Optim:
    lr: float = doc("peak learning rate", 1e-4)
    schedule: Literal["constant", "cosine"] = doc("after warmup", "constant")


@dataclass(frozen=True)
class Job:
    name: str = doc("run name")
    steps: int = doc("optimizer steps", 10)
    optim: Optim = field(default_factory=lambda: Optim(lr=3e-4), metadata={"doc": "optimizer"})


@pytest.fixture
def root_logger():
    """Leave the root logger as it was (setup_logging changes its level and handlers)."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield root
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)


# --- run_main: one line and an exit status for the mistakes a person can fix ----------------


def _raises(exc: BaseException):
    def main():
        raise exc

    return main


@pytest.mark.parametrize(
    "exc, status, line",
    [
        (ConfigError("c.yaml: unknown key 'x'"), 2, "config error: c.yaml: unknown key 'x'"),
        (FileNotFoundError("no shards under s3://b/raw"), 1, "error: not found: no shards"),
        (PermissionError(13, "Permission denied", "/out"), 1, "error: permission denied: "),
        (ConnectionError("the S3 endpoint cannot be reached"), 1, "error: cannot connect: "),
    ],
    ids=["config", "not-found", "permission", "connection"],
)
def test_run_main_turns_fixable_errors_into_one_line(exc, status, line, capsys, caplog):
    caplog.set_level(logging.DEBUG, logger="pipeline.cli")
    with pytest.raises(SystemExit) as e:
        run_main(_raises(exc))
    assert e.value.code == status
    err = capsys.readouterr().err
    assert err.startswith(line) and err.count("\n") == 1 and "Traceback" not in err
    # the traceback is still there for whoever asks for DEBUG
    assert any(r.levelno == logging.DEBUG and r.exc_info for r in caplog.records)


def test_run_main_passes_the_status_through_and_bugs_as_tracebacks():
    for returned, status in [(None, 0), (0, 0), (3, 3)]:
        with pytest.raises(SystemExit) as e:
            run_main(lambda r=returned: r)
        assert e.value.code == status
    with pytest.raises(ZeroDivisionError):  # a bug: the usual traceback
        run_main(lambda: 1 / 0)


def test_missing_s3_credentials_end_in_a_hint(monkeypatch, capsys):
    """No AWS credentials anywhere: botocore's NoCredentialsError becomes one line that says
    where credentials come from."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-role lookup
    # a fresh endpoint: no cached filesystem with credentials; nothing is sent unsigned
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(SystemExit) as e:
        run_main(lambda: storage.read_text("s3://bucket/configs/train.yaml"))
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no AWS credentials found") and err.count("\n") == 1
    assert "AWS_PROFILE" in err and "credential environment variables" in err
    assert "instance role" in err


# --- the jobs themselves, as a person runs them ------------------------------------------------


def _job(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, f"jobs/{script}", *args],
        cwd=ROOT,
        env={**os.environ, "T2I_PROGRESS": "0", "DS_ACCELERATOR": "cpu", **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def _last_line(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr.strip().splitlines()[-1]


def test_config_error_inside_a_stage_exits_2_in_one_line(tmp_path):
    """pretokenize finds vq.uri empty only when its worker starts: still status 2, one line."""
    raw = str(tmp_path / "raw")
    write_raw_shards(raw, 1, 2)
    proc = _job(
        "pretokenize.py",
        "--config",
        "configs/data/pretokenize_tiny.yaml",
        f"input={raw}",
        f"output={tmp_path / 'tokens'}",
        "executor.backend=inline",
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert (
        _last_line(proc)
        == "config error: vq.uri is empty: set it to the VQ tokenizer's dir or .pt file"
    )


def test_missing_input_exits_1_in_one_line(tmp_path):
    proc = _job(
        "pretokenize.py",
        "--config",
        "configs/data/pretokenize_tiny.yaml",
        f"input={tmp_path / 'nothing'}",
        f"output={tmp_path / 'tokens'}",
        "executor.backend=inline",
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert _last_line(proc).startswith("error: not found: no complete (and scored) raw shards")


@pytest.mark.parametrize(
    "uri, line",
    [
        ("s3:/b/meta", "config error: 's3:/b/meta' has one slash after 's3:'"),
        ("S3://b/meta", "config error: 'S3://b/meta': write the scheme in lower case (s3://)"),
    ],
)
def test_a_misspelt_uri_exits_2_in_one_line(tmp_path, uri, line):
    """A URI the jobs would misread is a mistake in a setting: one line, status 2."""
    proc = _job(
        "pretokenize.py",
        "--config",
        "configs/data/pretokenize_tiny.yaml",
        f"input={uri}",
        f"output={tmp_path / 'tokens'}",
        "executor.backend=inline",
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert _last_line(proc).startswith(line)


def test_export_override_error_exits_2(tmp_path):
    """export.py reads its overrides itself (no parse_job): a bad key is still status 2."""
    proc = _job("export.py", "--llamagen", str(tmp_path / "x.pt"), "--out", str(tmp_path / "o"),
                "model.bogus=1")  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert _last_line(proc).startswith("config error: override model.bogus: unknown key 'bogus'")


def test_train_failure_on_a_rank_exits_with_one_line(tmp_path):
    """jobs/train.py ends a failing rank with os._exit: still the status and the one line."""
    proc = _job(
        "train.py",
        "--config",
        "configs/train/tiny.yaml",
        f"data.shards=[{tmp_path / 'none'}]",
        f"run_dir={tmp_path / 'run'}",
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert _last_line(proc).startswith("error: not found: no finished token shards")


# --- --show-config and --help ------------------------------------------------------------------


def test_show_config_lists_nested_fields_dotted(capsys):
    with pytest.raises(SystemExit) as e:
        parse_job(Job, "a job", ["--show-config"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "  name: str (required)  run name" in out
    assert "  steps: int = 10  optimizer steps" in out
    # the enclosing field's default (lr 3e-4), not the class's own; Literal values shown
    assert "    optim.lr: float = 0.0003  peak learning rate" in out
    assert "    optim.schedule: Literal['constant', 'cosine'] = 'constant'  after warmup" in out
    assert "Optim(" not in out and "resolved config" not in out


def test_show_config_prints_the_resolved_config(tmp_path, capsys):
    path = tmp_path / "job.yaml"
    path.write_text("name: base\nsteps: 5\n")
    argv = ["--config", str(path), "--show-config", "optim.lr=2e-4", "name=2024 run # one"]
    with pytest.raises(SystemExit) as e:
        parse_job(Job, "a job", argv)
    assert e.value.code == 0
    out = capsys.readouterr().out
    resolved = yaml.safe_load(out.split("resolved config", 1)[1].split(":\n", 1)[1])
    expected = load_config(Job, str(path), ["optim.lr=2e-4", "name=2024 run # one"])
    assert resolved == to_dict(expected) and resolved["name"] == "2024 run # one"
    with pytest.raises(SystemExit) as e:  # a config it would refuse is refused here too
        parse_job(Job, "a job", ["--config", str(path), "--show-config", "optim.bogus=1"])
    assert e.value.code == 2
    assert "unknown key 'bogus' for Optim" in capsys.readouterr().err


def test_help_documents_the_exit_status(capsys):
    text = job_parser("a job").format_help()
    for line in ("0  success", "1  failure", "2  config error", "3  download, score, pretokenize"):
        assert line in text
    proc = _job("export.py", "--help")  # the one job with its own parser
    assert proc.returncode == 0 and "2  config error" in proc.stdout


def _load_job(name: str):
    spec = importlib.util.spec_from_file_location(f"cli_job_{name[:-3]}", f"{ROOT}/jobs/{name}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while being created
    spec.loader.exec_module(mod)
    return mod


# every job but export.py, which has its own parser
PARSE_JOB_JOBS = sorted(
    os.path.basename(p) for p in glob.glob(f"{ROOT}/jobs/*.py") if not p.endswith("export.py")
)


@pytest.mark.parametrize("job", PARSE_JOB_JOBS)
def test_help_shows_the_jobs_own_example_which_parses(job, capsys):
    mod = _load_job(job)
    with pytest.raises(SystemExit) as e:
        mod.main(["--help"])
    assert e.value.code == 0
    help_text = capsys.readouterr().out
    assert "example:\n" in help_text and "2  config error" in help_text
    example = help_text.split("example:\n", 1)[1].split("\n\n", 1)[0]
    argv = shlex.split(example.replace("\\\n", " "))
    scripts = [a for a in argv if a.startswith("jobs/")]
    assert scripts == [f"jobs/{job}"], example  # this job's example, not another's
    # the example is one the job accepts: its config file, keys and values load, once its
    # placeholder bucket (refused as it is: not a bucket name) is given a name
    (cls,) = {v for k, v in vars(mod).items() if k in JOB_EXAMPLES and isinstance(v, type)}
    args = [a.replace("s3://BUCKET/", "s3://b/") for a in argv[argv.index(scripts[0]) + 1 :]]
    config = os.path.join(ROOT, args[args.index("--config") + 1]) if "--config" in args else None
    load_config(cls, config, [a for a in args if "=" in a and not a.startswith("-")])


def test_an_example_given_to_job_parser_is_kept_and_unknown_jobs_get_none():
    p = job_parser("a job", example=("python jobs/x.py", "a=1"))
    assert "example:\n  python jobs/x.py \\\n      a=1\n" in p.format_help()
    with pytest.raises(SystemExit):
        parse_job(Job, "a job", ["--help"], parser=p)
    assert "jobs/x.py" in p.epilog
    plain = job_parser("a job")
    with pytest.raises(SystemExit):
        parse_job(Job, "a job", ["--help"], parser=plain)
    assert "example:" not in plain.format_help()


# --- T2I_LOG_LEVEL -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, level", [("debug", logging.DEBUG), ("Warning", logging.WARNING), ("10", logging.DEBUG)]
)
def test_log_level_from_the_environment_in_any_case(name, level, monkeypatch, root_logger):
    monkeypatch.setenv("T2I_LOG_LEVEL", name)
    monkeypatch.delenv("RANK", raising=False)
    setup_logging()
    assert root_logger.level == level


def test_unknown_log_level_falls_back_to_info_with_a_warning(monkeypatch, root_logger, caplog):
    monkeypatch.setenv("T2I_LOG_LEVEL", "loud")
    monkeypatch.delenv("RANK", raising=False)
    setup_logging()
    assert root_logger.level == logging.INFO
    assert any("unknown log level 'loud'" in r.getMessage() for r in caplog.records)


def test_the_deepspeed_launchers_local_rank_flag_is_accepted_by_every_job():
    """``deepspeed jobs/sample.py ...`` appends ``--local_rank=N``: not an override."""
    from pipeline.cli import parse_job
    from pipeline.sample_job import SampleConfig

    for flag in ("--local_rank=3", "--local-rank=3"):
        cfg, args = parse_job(
            SampleConfig,
            "sample",
            ["checkpoint=c", "vq=v", "output=o", "prompt=p", "text_encoder=t", flag],
        )
        assert args.local_rank == 3 and cfg.prompt == "p"
