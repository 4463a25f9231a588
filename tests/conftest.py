"""Test set-up: Triton's interpreter on CPU, and NaN-poisoned ``torch.empty``.

``TRITON_INTERPRET=1`` must be set before triton is first imported, so it is set here when no
GPU is present. ``poison_empty`` makes every ``torch.empty``/``empty_like`` return NaN-filled
buffers (fla's trick), so an output a kernel forgot to write fails loudly.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_empty, _empty_like = torch.empty, torch.empty_like


def _nan_fill(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point():
        t.fill_(float("nan"))
    elif t.dtype in (torch.int32, torch.int64):
        t.fill_(-(2**30))
    return t


@pytest.fixture
def poison_empty(monkeypatch):
    """Make torch.empty and torch.empty_like return poisoned buffers for this test."""
    monkeypatch.setattr(torch, "empty", lambda *a, **k: _nan_fill(_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _nan_fill(_empty_like(*a, **k)))
    yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
