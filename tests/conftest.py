"""Shared fixtures: real services on loopback only (an S3 server), tiny offline models."""

from __future__ import annotations

import os
import socket
import uuid

import pytest

# Settings every test process (and the subprocesses it starts) should see.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault(
    "TORCH_EXTENSIONS_DIR",
    os.path.join(os.path.dirname(os.path.dirname(__file__)), ".cache", "torch_extensions"),
)


# Tests that legitimately run past the suite's 600 s timeout (pyproject.toml), by node id
# prefix, with the timeout each gets (it counts the test's fixture setup too: a module fixture
# that launches training runs is paid by the first test that asks for it). A test or module
# that sets its own timeout marker keeps it.
LONG_TESTS = {
    # every test launches 2-rank DeepSpeed / torchrun runs (up to 240 s each) or shares a
    # module fixture that launches three
    "tests/test_train_launch.py::": 1200,
    # torchrun: a reference and a killed run side by side, then the resume (up to 300 s each)
    "tests/test_tokenizer_train.py::test_kill_and_resume_reproduces_uninterrupted_losses": 1200,
    "tests/test_tokenizer_train.py::test_train_tiny_improves_psnr_and_exports": 900,
    # torchrun training through a faulty S3 proxy (the run itself may take 300 s)
    "tests/test_faults.py::test_training_checkpoints_through_s3_faults_are_complete_and_resumable": 900,
    # the GPU benchmark script in a subprocess (up to 300 s)
    "tests/test_bench_gpu.py::": 900,
    # a Ray head, then units that wait up to 240 s for their actors
    "tests/test_ray_job.py::": 900,
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("timeout") is not None:
            continue
        for prefix, seconds in LONG_TESTS.items():
            if item.nodeid.startswith(prefix):
                item.add_marker(pytest.mark.timeout(seconds))
                break


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports: the sockets stay bound until all are drawn (drawn one
    at a time, the kernel can hand the same port out twice, and Ray refuses a port given to two
    of its components)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 for the whole session; yields its endpoint URL.

    The standard AWS variables point every client (boto3, s3fs, subprocesses) at it.
    """
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in _AWS_ENV}
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
    )
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


_AWS_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "AWS_EC2_METADATA_DISABLED",
)


@pytest.fixture()
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket on the loopback S3 server; yields ``s3://name``."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"
