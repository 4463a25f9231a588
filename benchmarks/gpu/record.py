"""The run record: one JSON file, rewritten after every check and timing, and the environment."""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import time
import traceback
from types import SimpleNamespace
from typing import Any

import torch

from gpu.settings import GPU_SIZES, STEP_TOLERANCE, STEP_VARIANT_DOCS, TARGETS, TINY_SIZES, TOLERANCE


def _jsonable(value: Any) -> Any:
    """Non-finite floats become strings, so the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _fmt(x: Any, spec: str = "9.4g") -> str:
    return format(x, spec) if isinstance(x, (int, float)) and not isinstance(x, bool) else f"{str(x):>9}"


class Run:
    """State of one run: device, sizes, time budget and the JSON being written."""

    def __init__(self, args: argparse.Namespace, device: torch.device, kernels: SimpleNamespace) -> None:
        # elapsed time counts from the parent's start (``--started``), so every section process shares one budget
        started = getattr(args, "started", None)
        self.t0 = time.perf_counter() - (time.time() - started if started else 0.0)
        self.device, self.k, self.tiny = device, kernels, args.tiny
        self.cuda = device.type == "cuda"
        self.sizes = TINY_SIZES if args.tiny else GPU_SIZES
        self.budget_s = args.budget_s
        self.path = getattr(args, "part", None) or os.path.join(args.out, "gpu_check.json")
        self.steps: dict[tuple[str, int, int], dict[str, Any]] = {}  # (dtype, depth, batch) -> step results
        self.copy_gbps: float | None = None
        meaningful = self.cuda and not self.tiny
        self.data: dict[str, Any] = {
            "schema": 1,
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "finished": None,
            "complete": False,
            "mode": ("tiny-" if self.tiny else "") + ("cuda" if self.cuda else "cpu-interpreter"),
            "timings_meaningful": meaningful,
            "timing_note": None
            if meaningful
            else (
                "tiny shapes"
                + ("" if self.cuda else " in Triton's CPU interpreter")
                + ": not performance figures"
            ),
            "env": environment(device),
            "settings": {
                "budget_s": self.budget_s,
                "tolerance_rel_rms": TOLERANCE,
                "step_tolerance": STEP_TOLERANCE,
                "targets": {k: f"{op} {v}" for k, (op, v) in TARGETS.items()},
                "sizes": self.sizes.__dict__,
                "step_variants": dict(STEP_VARIANT_DOCS),
            },
            "sections": {},
            "checks": [],
            "timings": [],
            "skipped": [],
        }

    # time budget -------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def budget_reason(self) -> str | None:
        """Why a timing item must not start, or None."""
        if self.elapsed() > self.budget_s:
            return f"time budget --budget-s {self.budget_s:g} exceeded ({self.elapsed():.0f} s elapsed)"
        return None

    # records -----------------------------------------------------------------------------
    def check(
        self,
        section: str,
        name: str,
        shape: str,
        dtype: str,
        error: float,
        tolerance: float,
        metric: str = "rel_rms",
        **extra: Any,
    ) -> bool:
        error = float(error)
        ok = math.isfinite(error) and error <= tolerance
        self.data["checks"].append(
            dict(
                section=section,
                name=name,
                shape=shape,
                dtype=dtype,
                metric=metric,
                error=error,
                tolerance=tolerance,
                passed=ok,
                **extra,
            )
        )
        if not ok:
            print(
                f"  FAIL {section}/{name} [{shape}, {dtype}]: {metric} {error:.3g} > {tolerance:g}",
                flush=True,
            )
        self.write()  # flushed after every check: a crash loses at most the check in flight
        return ok

    def check_raised(self, section: str, name: str, shape: str, dtype: str) -> None:
        text = traceback.format_exc()
        self.data["checks"].append(
            dict(
                section=section,
                name=name,
                shape=shape,
                dtype=dtype,
                metric="raised",
                error=float("inf"),
                tolerance=0.0,
                passed=False,
                traceback=text,
            )
        )
        print(
            f"  FAIL {section}/{name} [{shape}, {dtype}] raised: {text.strip().splitlines()[-1]}", flush=True
        )
        self.write()

    def timing(
        self, section: str, name: str, shape: str, dtype: str, ms: float | None, **fields: Any
    ) -> dict:
        entry = dict(
            section=section,
            name=name,
            shape=shape,
            dtype=dtype,
            ms=ms,
            baseline=None,
            baseline_ms=None,
            gbps=None,
            tflops=None,
            ratio=None,
            ratio_def=None,
            target=None,
            passed=None,
            meaningful=self.data["timings_meaningful"],
        )
        kind = fields.pop("target_kind", None)
        entry.update(fields)
        if kind is not None and entry["ratio"] is not None:
            op, bound = TARGETS[kind]
            entry["target"] = f"{kind} {op} {bound}"
            verdict = _compare(entry["ratio"], op, bound)
            entry["passed"] = verdict if entry["meaningful"] else None
        self.data["timings"].append(entry)
        self.write()
        print("  " + _timing_line(entry), flush=True)
        return entry

    def skip(self, section: str, name: str, reason: str) -> None:
        self.data["skipped"].append(dict(section=section, name=name, reason=reason))
        self.write()
        print(f"  skip {section}/{name}: {reason}", flush=True)

    def write(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(_jsonable(self.data), f, indent=1)
        os.replace(tmp, self.path)


def _compare(x: float, op: str, bound: float) -> bool:
    return {"<=": x <= bound, ">=": x >= bound, ">": x > bound}[op]


def _timing_line(e: dict) -> str:
    verdict = "" if e["passed"] is None else ("PASS" if e["passed"] else "FAIL")
    rate = f"{e['tflops']:.1f} TF/s" if e.get("tflops") else f"{e['gbps']:.0f} GB/s" if e.get("gbps") else ""
    return (
        f"{e['name']:<30} {e['shape']:<24} {e['dtype']:<10} {_fmt(e['ms'], '9.4f')} ms  "
        f"base {_fmt(e['baseline_ms'], '9.4f')}  ratio {_fmt(e['ratio'], '6.3f')}  {rate:>12} "
        f"{e['target'] or '':<26} {verdict}"
    )


def environment(device: torch.device) -> dict[str, Any]:
    import numpy
    import triton

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "numpy": numpy.__version__,
        "cuda_runtime": torch.version.cuda,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "env": {k: os.environ.get(k) for k in ("NUP_BACKEND", "TRITON_INTERPRET", "NUP_UPDATE_PATH")},
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            device=props.name,
            capability=list(torch.cuda.get_device_capability(device)),
            memory_gib=round(props.total_memory / 2**30, 1),
            sm_count=props.multi_processor_count,
        )
    else:
        env.update(device="cpu", capability=None)
    return env
