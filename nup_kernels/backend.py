"""Which path runs: the Triton kernels or the PyTorch reference.

CUDA tensors get the Triton kernels and CPU tensors the reference path. ``NUP_BACKEND=triton``
forces the kernels (on CPU that needs ``TRITON_INTERPRET=1``); ``NUP_BACKEND=reference``
forces the reference path everywhere.

Triton is optional (CUDA builds of torch bring it): without it every tensor takes the reference
path, and the kernel modules import the stand-ins :data:`triton` and :data:`tl` from here, which
define the kernels but refuse to launch them.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any

import torch

BACKENDS = ("triton", "reference")
TRITON_MISSING = "triton is not installed: pip install triton (CUDA builds of torch bring it), or unset NUP_BACKEND"


class _Unlaunchable:
    """A ``@triton.jit`` function where triton is missing: defined, but ``kernel[grid](...)`` raises."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def __getitem__(self, grid: Any) -> Any:
        raise RuntimeError(TRITON_MISSING)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(TRITON_MISSING)


class _MissingTriton:
    """Stands for ``triton`` and ``triton.language`` at import time of the kernel modules."""

    def jit(self, fn: Any = None, **kwargs: Any) -> Any:
        return _Unlaunchable(fn) if fn is not None else _Unlaunchable

    def autotune(self, *args: Any, **kwargs: Any) -> Any:
        return lambda fn: fn

    heuristics = autotune

    @staticmethod
    def cdiv(a: int, b: int) -> int:
        return -(-a // b)

    @staticmethod
    def next_power_of_2(n: int) -> int:
        return 1 << max(0, math.ceil(math.log2(max(n, 1))))

    def __getattr__(self, name: str) -> Any:  # Config, constexpr, dtypes, ...: placeholders
        return lambda *args, **kwargs: None


try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = _MissingTriton()


def triton_available() -> bool:
    """True when the triton package imported."""
    return not isinstance(triton, _MissingTriton)


# The switches below are read once per layer per step, so they go to the dict that ``os.environ``
# wraps (kept current by every write to ``os.environ``) with one lookup, not the mapping's encode and
# decode: that had cost 1.5% of a depth-16, batch-32 forward + backward on one CPU thread.
_ENVIRON = getattr(os.environ, "_data", None)


@functools.lru_cache(maxsize=16)
def _env_key(name: str) -> str | bytes:
    return os.environ.encodekey(name)


@functools.lru_cache(maxsize=64)
def _env_text(raw: str | bytes) -> str:
    return os.fsdecode(raw) if isinstance(raw, bytes) else raw


def env_value(name: str, default: str = "") -> str:
    """``os.environ.get(name, default)`` in one dict lookup."""
    if _ENVIRON is None:
        return os.environ.get(name, default)
    raw = _ENVIRON.get(_env_key(name))
    return default if raw is None else _env_text(raw)


def requested_backend() -> str | None:
    """The value of ``NUP_BACKEND``, validated, or None when unset."""
    raw = env_value("NUP_BACKEND")
    return _parse_backend(raw) if raw else None


@functools.lru_cache(maxsize=8)
def _parse_backend(raw: str) -> str | None:
    value = raw.strip().lower()
    if not value:
        return None
    if value not in BACKENDS:
        raise ValueError(f"NUP_BACKEND={value!r} is not one of {BACKENDS}; unset it or pick one")
    return value


def interpreter_active() -> bool:
    return env_value("TRITON_INTERPRET", "0") == "1"


def fp32_dot_precision() -> str:
    """``tl.dot``'s ``input_precision`` for fp32 operands: ``"tf32"`` where torch allows TF32 matmuls, else ``"ieee"``.

    The one TF32 policy of the kernels, read once per launch, so a kernel rounds as the torch
    matmul it replaces. It reads torch's new per-backend setting
    (``torch.backends.cuda.matmul.fp32_precision``, then the global ``torch.backends.fp32_precision``)
    and falls back to ``torch.get_float32_matmul_precision()`` only when both are ``"none"``: once
    the new API is used, the legacy getters (``allow_tf32``, ``get_float32_matmul_precision``) raise.
    """
    for owner in (getattr(torch.backends.cuda, "matmul", None), torch.backends):
        value = getattr(owner, "fp32_precision", "none")
        if value in ("tf32", "ieee"):
            return value
    try:
        return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    except RuntimeError:  # mixed legacy and new settings, none of them decisive
        return "ieee"


def use_triton(tensor: torch.Tensor) -> bool:
    """True when ops on ``tensor`` should run the Triton kernels."""
    forced = requested_backend()
    if forced == "reference":
        return False
    if not triton_available():
        if forced == "triton":
            raise RuntimeError(f"NUP_BACKEND=triton: {TRITON_MISSING}")
        return False
    if tensor.is_cuda:
        return True
    if forced == "triton":
        if not interpreter_active():
            raise RuntimeError(
                "NUP_BACKEND=triton on CPU tensors needs TRITON_INTERPRET=1 (set it before "
                "importing triton), or move the tensors to CUDA"
            )
        return True
    return False


def check_inputs(op: str, *tensors: torch.Tensor | None, ndims: tuple[int, ...] | None = None) -> None:
    """Raise a clear error when tensors of one op differ in device or are not floating point."""
    present = [t for t in tensors if t is not None]
    devices = {t.device for t in present}
    if len(devices) > 1:
        raise ValueError(f"{op}: tensors are on different devices {sorted(map(str, devices))}; move them to one device")
    for i, t in enumerate(present):
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise TypeError(f"{op}: input {i} has dtype {t.dtype}; use float32, float16 or bfloat16")
        if ndims is not None and i < len(ndims) and t.dim() != ndims[i]:
            raise ValueError(f"{op}: input {i} must be {ndims[i]}-D, got shape {tuple(t.shape)}")
