"""Capture and restore every random number generator a training process draws from.

An exact resume needs the same random draws after a restart as in an uninterrupted run: Python's
``random``, NumPy's global generator, torch's CPU generator and, where present, the generator of
the CUDA device the process draws on (its current device: a rank's own GPU). The captured state is a plain dict of tensors, lists and ints, so it can be
stored with ``torch.save`` and read back with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def capture_rng_state() -> dict[str, Any]:
    """Every RNG state of this process (python, numpy, torch CPU, its current CUDA device)."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        # tuple -> list: weights_only loading accepts lists and ints, not arbitrary objects
        "python": _to_lists(random.getstate()),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np.asarray(np_state["state"]["key"], dtype=np.uint32).copy()),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # only this process's own device: the others are other ranks' (and a launcher that shows
        # each process one GPU, e.g. Slurm's --gpus-per-task=1, must still resume)
        state["cuda_device"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put back what :func:`capture_rng_state` captured.

    A CUDA state is restored into the current device; one where this process has no CUDA
    device (say, resuming a GPU run on CPU) is an error rather than a silent reseed. States
    written before (``cuda``: every visible device's) give the current device's entry.
    """
    random.setstate(_to_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": n["bit_generator"],
            "state": {"key": np.asarray(n["key"].numpy(), dtype=np.uint32), "pos": int(n["pos"])},
            "has_gauss": int(n["has_gauss"]),
            "gauss": float(n["gauss"]),
        }
    )
    torch.set_rng_state(state["torch"].cpu())
    own, every = state.get("cuda_device"), state.get("cuda")
    if own is None and every is None:
        return
    if not torch.cuda.is_available():
        raise RuntimeError("checkpoint holds a CUDA RNG state; this process has no CUDA device")
    dev = torch.cuda.current_device()
    if own is None:  # every visible device's, as states were once saved: this device's entry
        if dev >= len(every):
            raise RuntimeError(
                f"checkpoint holds RNG states of {len(every)} CUDA devices, none for device {dev}"
            )
        own = every[dev]
    torch.cuda.set_rng_state(own.cpu(), dev)


def _to_lists(x: Any) -> Any:
    if isinstance(x, (tuple, list)):
        return [_to_lists(v) for v in x]
    return x


def _to_tuples(x: Any) -> Any:
    if isinstance(x, list):
        return tuple(_to_tuples(v) for v in x)
    return x
