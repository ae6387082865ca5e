"""Tell a whole model export from one killed while being written over an older one.

An export folder is the weights (``model.safetensors``), their config (a GPT's
``gpt_config.json``, a VQ tokenizer's ``config.json``) and ``export.json`` (written last).
Exporting again into the same folder replaces the files one by one: killed half-way, the folder
held the new weights beside the old config and ``export.json``, and loaded without a word. Now
each export has an id, written into the weights' safetensors metadata and into ``export.json``;
the old ``export.json`` is removed before anything else is written. A reader compares the two.
"""

from __future__ import annotations

import os
import uuid

from safetensors import safe_open

from pipeline import storage
from pipeline.log import get_logger

log = get_logger(__name__)

MARKER = "export.json"
ID_KEY = "export_id"


def begin_export(uri: str, export_id: str | None = None) -> str:
    """Remove ``uri``'s ``export.json`` (the folder is not a whole export until the new one is
    written, last) and return the new export's id: ``export_id`` when given (e.g. a digest of
    what is exported, so that the same export written again is the same bytes), else a new
    random one."""
    storage.remove(storage.join(uri, MARKER))
    return export_id or uuid.uuid4().hex


def check_export(
    uri: str, weights_path: str, info: dict | None, warn_unmarked: bool = True
) -> None:
    """Refuse weights at local ``weights_path`` that are not the export ``info`` (the folder's
    ``export.json``, None when absent) describes. Exports written before ids were recorded carry
    none on either side and pass (with a warning when ``export.json`` is missing and
    ``warn_unmarked``: off for folders whose older writers never wrote one)."""
    with safe_open(weights_path, framework="pt") as f:
        weights_id = (f.metadata() or {}).get(ID_KEY)
    info_id = (info or {}).get(ID_KEY)
    if info is None:
        if weights_id is not None:
            raise RuntimeError(
                f"{uri}: no {MARKER} beside the weights: an export into this folder did not "
                "finish (killed while writing? or it is being written now); export again"
            )
        if warn_unmarked:
            log.warning("%s has no %s: the export may be incomplete", uri, MARKER)
        return
    if weights_id != info_id:
        raise RuntimeError(
            f"{uri}: {os.path.basename(weights_path)} (export {weights_id}) is not the export "
            f"{MARKER} describes ({info_id}): an export over an older one did not finish "
            "(killed while writing? or it is being written now); export again"
        )
