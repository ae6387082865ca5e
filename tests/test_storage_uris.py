"""URIs the storage layer would misread, and S3 mistakes that must not look like "no data"."""

import os
import time

import fsspec
import pytest

from pipeline import storage
from tests.conftest import free_port


def test_a_uri_that_lost_a_slash_or_has_an_upper_case_scheme_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"one slash .* write s3://bucket/run"):
        storage.write_text("s3:/bucket/run/config.yaml", "x")
    with pytest.raises(ValueError, match=r"lower case \(s3://\)"):
        storage.list_dir("S3://bucket/run")
    assert not os.path.exists("s3:")  # nothing was written to a local folder named "s3:"
    # local paths, with or without file://, and colons inside a name are fine
    storage.write_text(str(tmp_path / "a:b.txt"), "ok")
    assert storage.read_text(f"file://{tmp_path}/a:b.txt") == "ok"
    assert storage.normalize(f"file://{tmp_path}/run") == f"{tmp_path}/run"
    assert storage.normalize("s3://b/run") == "s3://b/run"


def test_a_missing_bucket_is_an_error_not_an_empty_listing(s3_bucket):
    storage.write_text(f"{s3_bucket}/run/config.yaml", "x")
    assert storage.list_dir(f"{s3_bucket}/run") == ["config.yaml"]
    assert storage.list_dir(f"{s3_bucket}/nothing-yet") == []  # an absent prefix: empty
    missing = s3_bucket + "-typo"
    with pytest.raises(FileNotFoundError, match=r"bucket '.*-typo' does not exist"):
        storage.list_dir(f"{missing}/run/checkpoints")


def test_an_unreachable_endpoint_fails_fast_and_names_it(s3_server, monkeypatch):
    """Nothing listens on the port: botocore has retried the connection already, so the
    error comes at once, naming the endpoint (it took minutes of stacked retries before)."""
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    fsspec.filesystem("s3").clear_instance_cache()
    try:
        start = time.monotonic()
        with pytest.raises(ConnectionError, match=f"S3 endpoint \\({dead}\\) cannot be reached"):
            storage.list_dir("s3://any-bucket/run")
        took = time.monotonic() - start
    finally:
        fsspec.filesystem("s3").clear_instance_cache()
    assert took < 90, took  # was 265 s: 6 rounds of our retries over 8 of botocore's


def test_a_bucket_placeholder_left_in_is_refused_in_one_line():
    """The shipped stage configs name YOUR-BUCKET: used as they are, they are refused when
    loaded (a config error, exit 2), instead of an AccessDenied from S3 or a write into a
    stranger's bucket; with the bucket given, they load."""
    from pipeline.config import ConfigError, load_config
    from pipeline.train.trainer import TrainConfig

    with pytest.raises(ConfigError, match=r"'YOUR-BUCKET' is not an S3 bucket name"):
        load_config(TrainConfig, "configs/train/stage1.yaml")
    with pytest.raises(storage.BadURIError, match=r"'YOUR-BUCKET' is not an S3 bucket name"):
        storage.exists("s3://YOUR-BUCKET/t2i/runs/stage1")
    ours = ["run_dir=s3://my-bucket.v2/runs/s1", "data.shards=[s3://my-bucket.v2/tokens/s1]"]
    assert load_config(TrainConfig, "configs/train/stage1.yaml", ours).run_dir.endswith("/s1")
