"""Compile one recorded launch for sm_90 without a GPU, and read its resources.

``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32))``
runs the whole pipeline down to a cubin with the ``ptxas`` inside the wheel. Registers and spill
bytes come from ``ptxas -v`` (Triton prints its log when ``knobs.nvidia.dump_ptxas_log`` is set),
shared memory from the kernel's metadata, tensor-core use from the PTX (``wgmma`` / ``mma``).

Specialization mirrors Triton's launcher: an integer argument equal to 1 becomes a constant, and
in the ``aligned`` variant every pointer and every integer divisible by 16 gets
``tt.divisibility = 16``; the ``unaligned`` variant keeps that on pointers only (strides and sizes
of odd shapes). ``UPCAST``, the interpreter's workaround for 16-bit ``tl.dot``, is compiled as on a
GPU (False).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import re
import time
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.autotuner import Autotuner

TARGET = GPUTarget("cuda", 90, 32)
SHARED_LIMIT = 232448  # bytes of shared memory one sm_90 block may use (227 KB)
INTERPRETER_ONLY = {"UPCAST": False}


@dataclass
class Result:
    """One compiled (launch, config, variant)."""

    kernel: str
    dtypes: str
    precision: str
    constexprs: str
    config: str
    variant: str
    seconds: float = 0.0
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack: int | None = None
    shared: int | None = None
    tensor_core: str = ""  # "wgmma", "mma" or ""
    matmul: bool = False
    error: str = ""
    failures: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _kernel_object(launch: dict[str, Any]) -> Any:
    return getattr(importlib.import_module(launch["module"]), launch["kernel"])


def configs_of(launch: dict[str, Any]) -> list[tuple[dict[str, Any], int, int]]:
    """``(constexprs, num_warps, num_stages)`` of every config the dispatcher can pick for this launch.

    Autotuned kernels: the autotuner's configs that its ``early_config_prune`` keeps for the
    recorded dtypes and constexprs (tensors are passed as objects with ``.dtype`` only, constexprs
    as keyword arguments, as the autotuner does).
    """
    obj = _kernel_object(launch)
    if not isinstance(obj, Autotuner):
        return [({}, launch["num_warps"], launch["num_stages"])]
    named = {k: SimpleNamespace(dtype=getattr(torch, v)) for k, v in launch["dtypes"].items()}
    named |= {k: v for k, v in launch["values"].items() if k not in named}
    named |= launch["constexprs"]
    kept = obj.early_config_prune(obj.configs, named, **launch["constexprs"]) if obj.early_config_prune else obj.configs
    return [(dict(c.kwargs), c.num_warps, c.num_stages) for c in kept]


def _constexpr_value(value: Any) -> Any:
    if isinstance(value, str) and value.startswith("tl."):
        return triton.language.dtype(value[3:])
    return value


def _parse_ptxas(log: str) -> dict[str, int]:
    def grab(pattern: str) -> int | None:
        m = re.search(pattern, log)
        return int(m.group(1)) if m else None

    return {
        "registers": grab(r"Used (\d+) registers"),
        "spill_stores": grab(r"(\d+) bytes spill stores"),
        "spill_loads": grab(r"(\d+) bytes spill loads"),
        "stack": grab(r"(\d+) bytes stack frame"),
    }


def compile_inputs(launch: dict[str, Any], tuned: dict[str, Any], aligned: bool) -> tuple[Any, dict, dict, dict]:
    """``(JITFunction, signature, constexprs, attrs)`` for ``ASTSource``, specialized as the launcher would."""
    fn = _kernel_object(launch)
    fn = fn.fn if isinstance(fn, Autotuner) else fn
    signature, constexprs, attrs = {}, {}, {}
    for name, kind in launch["signature"].items():
        value = launch["values"][name]
        if kind in ("i32", "i64") and value == 1:
            signature[name], constexprs[name] = "constexpr", 1
            continue
        signature[name] = kind
        if kind.startswith("*") or (aligned and kind in ("i32", "i64") and value % 16 == 0):
            attrs[(fn.arg_names.index(name),)] = [["tt.divisibility", 16]]
        if kind == "constexpr":
            constexprs[name] = None
    for name, value in {**launch["constexprs"], **tuned}.items():
        signature[name] = "constexpr"
        constexprs[name] = INTERPRETER_ONLY.get(name, _constexpr_value(value))
    return fn, {name: signature[name] for name in fn.arg_names}, constexprs, attrs


def compile_one(launch: dict[str, Any], tuned: dict[str, Any], num_warps: int, num_stages: int,
                aligned: bool) -> tuple[dict[str, Any], float]:  # fmt: skip
    """Compile for :data:`TARGET`; return (resources, seconds). Raises what Triton raises."""
    fn, signature, constexprs, attrs = compile_inputs(launch, tuned, aligned)
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    log = io.StringIO()
    knobs = triton.knobs.nvidia
    old = knobs.dump_ptxas_log
    knobs.dump_ptxas_log = True
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(src, target=TARGET, options={"num_warps": num_warps, "num_stages": num_stages})
    finally:
        knobs.dump_ptxas_log = old
    seconds = time.perf_counter() - start
    ptx = kernel.asm["ptx"]
    resources = _parse_ptxas(log.getvalue())
    resources["shared"] = int(kernel.metadata.shared)
    mma = "mma" if re.search(r"\bmma\.sync", ptx) else ""
    resources["tensor_core"] = "wgmma" if "wgmma.mma_async" in ptx else mma
    resources["matmul"] = "tt.dot" in kernel.asm["ttir"]
    return resources, seconds


def judge(result: Result) -> list[str]:
    """Why this result fails the check (empty when it passes)."""
    out = []
    if result.error:
        out.append("compile error")
        return out
    if result.shared is not None and result.shared > SHARED_LIMIT:
        out.append(f"shared {result.shared} B > {SHARED_LIMIT} B")
    if result.variant == "aligned" and (result.spill_stores or result.spill_loads):
        out.append(f"spills {result.spill_stores}/{result.spill_loads} B at aligned shapes")
    if result.matmul and result.variant == "aligned" and {"bfloat16", "float16"} & set(result.dtypes.split(",")):
        if not result.tensor_core:
            out.append("16-bit matmul kernel without tensor-core instructions")
    return out
