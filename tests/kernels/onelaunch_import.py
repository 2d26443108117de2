"""Import ``kvnode.kernels.onelaunch`` so its kernel runs here: compiled on a GPU host,
under Triton's interpreter (CPU tensors) elsewhere. ``onelaunch`` is None, with
``reason`` saying why, where triton does not import.

Without a GPU, ``TRITON_INTERPRET=1`` stays set for the rest of the process: triton
reads it when a kernel is decorated and again while the interpreter runs it. Compiled
triton cannot run on such a host anyway, so nothing else loses by it."""

from __future__ import annotations

import os
from types import ModuleType

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
reason = ""


def _import() -> ModuleType | None:
    global reason
    if DEVICE == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        from kvnode.kernels import onelaunch as module
    except ImportError as exc:
        reason = f"triton does not import: {exc}"
        return None
    return module


onelaunch = _import()
