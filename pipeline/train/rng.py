"""Capture and restore every random number generator a training process draws from.

An exact resume needs the same random draws after a restart as in an uninterrupted run: Python's
``random``, NumPy's global generator, torch's CPU generator and, where present, every CUDA
device's generator. The captured state is a plain dict of tensors, lists and ints, so it can be
stored with ``torch.save`` and read back with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def capture_rng_state() -> dict[str, Any]:
    """Every RNG state of this process (python, numpy, torch CPU, all CUDA devices if any)."""
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
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put back what :func:`capture_rng_state` captured.

    CUDA states are restored only when this process sees the same number of devices; a
    mismatch (say, resuming a GPU run on CPU) is an error rather than a silent reseed.
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
    cuda = state.get("cuda")
    if cuda is not None:
        if not torch.cuda.is_available() or torch.cuda.device_count() != len(cuda):
            have = torch.cuda.device_count() if torch.cuda.is_available() else 0
            raise RuntimeError(
                f"checkpoint holds RNG states of {len(cuda)} CUDA devices, this process sees {have}"
            )
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


def _to_lists(x: Any) -> Any:
    if isinstance(x, (tuple, list)):
        return [_to_lists(v) for v in x]
    return x


def _to_tuples(x: Any) -> Any:
    if isinstance(x, list):
        return tuple(_to_tuples(v) for v in x)
    return x
