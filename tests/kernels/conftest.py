"""Fixtures over every cache layout and dtype of ``kv_caches``."""

from __future__ import annotations

import pytest
import torch
from kv_caches import DTYPES, MAKERS


@pytest.fixture(params=sorted(MAKERS))
def layout_name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(params=DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def dtype(request: pytest.FixtureRequest) -> torch.dtype:
    return request.param
