"""The driver: phases, one subprocess per section with a time limit, the merged JSON and the summary."""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import math
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch

from gpu.correctness import section_compile, section_correctness
from gpu.helpers import free_memory
from gpu.record import Run, _timing_line
from gpu.settings import BUDGET_S, PHASES, SECTION_GRACE_S, SECTION_LIMIT_S, SECTIONS
from gpu.step_checks import section_fused_step, section_host_sync
from gpu.timing_kernels import section_timing_linear, section_timing_memory
from gpu.timing_step import section_timing_step, section_timing_step_compiled


def load_kernels() -> SimpleNamespace:
    """The modules under test (imported after TRITON_INTERPRET is settled)."""
    import nup
    import nup_kernels.apply_update as apply
    import nup_kernels.gram_norm as gram
    import nup_kernels.linear_act as la
    import nup_kernels.multi_tensor as mt
    import nup_kernels.reference as ref
    import nup_kernels.traffic as traffic
    from nup_kernels.activations import get_activation

    return SimpleNamespace(
        la=la,
        gram=gram,
        apply=apply,
        mt=mt,
        ref=ref,
        traffic=traffic,
        get_activation=get_activation,
        NuMLP=nup.NuMLP,
        NuP=nup.NuP,
        make_schedule=nup.make_schedule,
    )


def plan(run: Run) -> list[tuple[str, Callable[[], str | None], str | None]]:
    """``(section, function, reason to skip)`` in running order."""
    gpu_only = None if run.cuda else "needs CUDA (TF32 and bf16 are not checked in the CPU interpreter)"
    return [
        ("compile", lambda: section_compile(run), None),
        ("correctness_fp32", lambda: section_correctness(run, "fp32"), None),
        ("correctness_tf32", lambda: section_correctness(run, "tf32"), gpu_only),
        ("correctness_bf16", lambda: section_correctness(run, "bf16"), gpu_only),
        ("fused_step", lambda: section_fused_step(run), None),
        ("host_sync", lambda: section_host_sync(run), None),
        ("timing_memory", lambda: section_timing_memory(run), None),
        ("timing_step", lambda: section_timing_step(run, "fp32", run.sizes.depths), None),
        ("timing_step_compiled", lambda: section_timing_step_compiled(run), None),
        ("timing_linear", lambda: section_timing_linear(run), None),
        ("timing_step_bf16", lambda: section_timing_step(run, "bf16", run.sizes.bf16_depths), gpu_only),
    ]


def run_section(run: Run, name: str) -> None:
    """Run one section in this process; its entry and every check reach ``run.path`` as they happen."""
    fn, reason = next((f, r) for n, f, r in plan(run) if n == name)
    if reason is None:
        reason = run.budget_reason()
    print(f"[{run.elapsed():7.1f} s] {name}" + (f": skipped ({reason})" if reason else ""), flush=True)
    if reason is not None:
        run.data["sections"][name] = {"status": "skipped", "reason": reason, "seconds": 0.0}
        run.write()
        return
    t = time.perf_counter()
    entry: dict[str, Any] = {"status": "ok", "reason": None}
    try:
        if (skipped := fn()) is not None:
            entry.update(status="skipped", reason=skipped)
    except Exception:
        entry.update(status="error", error=traceback.format_exc())
        print(f"  ERROR in {name}:\n{entry['error']}", flush=True)
    entry["seconds"] = round(time.perf_counter() - t, 2)
    run.data["sections"][name] = entry
    run.write()  # before freeing memory: after a sticky CUDA error, freeing may raise too
    free_memory(run)


def _child_args(args: argparse.Namespace, name: str, part: str, steps: str) -> list[str]:
    out = [sys.executable, os.path.abspath(sys.argv[0]), "--out", args.out, "--section", name, "--part", part,
           "--steps", steps, "--budget-s", str(args.budget_s), "--started", repr(args.started)]  # fmt: skip
    return out + (["--tiny"] if args.tiny else [])


def _merge(run: Run, name: str, part: str) -> dict[str, Any] | None:
    """Copy a section process's records into the run; None when it wrote nothing readable."""
    try:
        with open(part) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    for key in ("checks", "timings", "skipped"):
        run.data[key] += data.get(key, [])
    run.data["settings"]["step_variants"] |= data["settings"]["step_variants"]
    for k, v in data.get("steps", {}).items():
        run.steps[tuple(json.loads(k))] = v
    return data["sections"].get(name)


def run_sections(run: Run, args: argparse.Namespace, selected: list[str]) -> None:
    """Each section in its own process (a sticky CUDA error costs one section), within its time limit."""
    parts = os.path.join(args.out, "sections")
    os.makedirs(parts, exist_ok=True)
    reasons = {n: r for n, _, r in plan(run)}
    for name in selected:
        if (reason := reasons[name] or run.budget_reason()) is not None:  # decided here: no process needed
            print(f"[{run.elapsed():7.1f} s] {name}: skipped ({reason})", flush=True)
            run.data["sections"][name] = {"status": "skipped", "reason": reason, "seconds": 0.0}
            run.write()
            continue
        part, steps = os.path.join(parts, f"{name}.json"), os.path.join(parts, "steps.json")
        with open(steps, "w") as f:
            json.dump({json.dumps(list(k)): v for k, v in run.steps.items()}, f)
        limit = max(1.0, min(args.section_limit_s, args.budget_s + SECTION_GRACE_S - run.elapsed()))
        limit = None if math.isinf(limit) else limit
        t = time.perf_counter()
        try:
            proc = subprocess.run(_child_args(args, name, part, steps), timeout=limit, check=False)
            status = None if proc.returncode == 0 else f"section process exited with status {proc.returncode}"
        except subprocess.TimeoutExpired:
            status = f"time limit of {limit:.3g} s reached; the checks it had finished are kept"
        entry = _merge(run, name, part)
        if entry is None or status is not None:
            entry = {"status": "error", "reason": status or "the section process wrote no record",
                     "error": status or "no record", "seconds": round(time.perf_counter() - t, 2)}  # fmt: skip
            print(f"  ERROR in {name}: {entry['reason']}", flush=True)
        run.data["sections"][name] = entry
        run.write()
    run.data["sections"] = {n: run.data["sections"][n] for n in SECTIONS if n in run.data["sections"]}


def summarize(run: Run) -> int:
    """Print the table, fill in the summary; return the exit status."""
    d = run.data
    failed = [c for c in d["checks"] if not c["passed"]]
    errors = [n for n, s in d["sections"].items() if s["status"] == "error"]
    targets = [t for t in d["timings"] if t["target"] is not None]
    d["summary"] = {
        "checks": len(d["checks"]),
        "checks_failed": len(failed),
        "sections_error": errors,
        "targets": len(targets),
        "targets_passed": sum(bool(t["passed"]) for t in targets),
        "timings_meaningful": d["timings_meaningful"],
        "seconds": round(run.elapsed(), 1),
    }
    d["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    d["complete"] = True
    run.write()
    print("\n==== gpu_check summary " + "=" * 60)
    print(
        f"device {d['env']['device']}  torch {d['env']['torch']}  triton {d['env']['triton']}  "
        f"mode {d['mode']}  {run.elapsed():.0f} s"
    )
    for name, s in d["sections"].items():
        n = [c for c in d["checks"] if c["section"] == name]
        bad = sum(not c["passed"] for c in n)
        print(
            f"  {name:<22} {s['status']:<8} {s['seconds']:7.1f} s  checks {len(n) - bad}/{len(n)} passed"
            + (f"  ({s['reason']})" if s.get("reason") else "")
        )
    for c in failed[:25]:
        print(
            f"  FAILED {c['section']}/{c['name']} [{c['shape']}, {c['dtype']}] {c['metric']}={c['error']:.3g}"
            f" tol={c['tolerance']:g}"
        )
    if len(failed) > 25:
        print(f"  ... and {len(failed) - 25} more failed checks (see the JSON)")
    if d["timing_note"]:
        print(f"  timings: {d['timing_note']}")
    if d["timings_meaningful"]:
        print(f"  targets passed {d['summary']['targets_passed']}/{len(targets)}")
    for t in d["timings"]:
        if t["target"] is not None or t["name"] in ("device_copy",) or t.get("error"):
            print("  " + _timing_line(t) + ("  ERROR" if t.get("error") else ""))
    print(f"  JSON: {run.path}")
    return 1 if failed or errors else 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for gpu_check.json (and sections/, one record per section)")
    p.add_argument("--phase", choices=("all", *PHASES), default="all",
                   help="correctness: compile, correctness_*, fused_step, host_sync; timing: timing_* (default all)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="no section or timing item starts after this many seconds (default 270 on CUDA; "
                        "unlimited in the CPU interpreter)")
    p.add_argument("--section-limit-s", type=float, default=None,
                   help=f"a section process is stopped after this many seconds (default {SECTION_LIMIT_S:g} on "
                        "CUDA; unlimited in the CPU interpreter)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes, 1-2 repeats; runs on CPU via the interpreter")
    p.add_argument("--only", default="", help="comma-separated sections to run (default: all of the phase)")
    p.add_argument("--skip", default="", help="comma-separated sections to skip")
    p.add_argument("--section", help=argparse.SUPPRESS)  # internal: run one section in this process
    p.add_argument("--part", help=argparse.SUPPRESS)
    p.add_argument("--steps", help=argparse.SUPPRESS)
    p.add_argument("--started", type=float, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)  # fmt: skip


def _names(text: str) -> set[str]:
    names = {n.strip() for n in text.split(",") if n.strip()}
    unknown = names - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown section(s) {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    return names


def check_dependencies() -> str | None:
    """Why torch, triton or numpy cannot be used, or None (checked before anything else runs)."""
    missing = []
    for module in ("torch", "triton", "numpy"):
        try:
            importlib.import_module(module)
        except Exception as e:  # noqa: BLE001 - a broken install is as fatal as a missing one
            missing.append(f"{module} ({type(e).__name__}: {e})")
    return f"cannot import {', '.join(missing)}; install torch, triton and numpy" if missing else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if (problem := check_dependencies()) is not None:
        print(f"gpu_check: {problem}", file=sys.stderr)
        return 2

    try:
        chosen = _names(args.only) or set(SECTIONS if args.phase == "all" else PHASES[args.phase])
        selected = [n for n in SECTIONS if n in chosen - _names(args.skip)]
    except ValueError as e:
        print(f"gpu_check: {e}", file=sys.stderr)
        return 2
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        print(
            "gpu_check: no CUDA device found. This script checks and times the Triton kernels on a GPU; "
            "use --tiny to exercise it on CPU through Triton's interpreter.",
            file=sys.stderr,
        )
        return 2
    if not cuda:  # before triton is first imported
        os.environ.setdefault("TRITON_INTERPRET", "1")
        os.environ.setdefault("NUP_BACKEND", "triton")
    # the limits fit one H200's 5 minutes per phase; the interpreter is orders of magnitude slower
    args.budget_s = args.budget_s if args.budget_s is not None else (BUDGET_S if cuda else math.inf)
    args.section_limit_s = args.section_limit_s or (SECTION_LIMIT_S if cuda else math.inf)
    os.makedirs(args.out, exist_ok=True)
    if args.started is None:
        args.started = time.time()
    torch.manual_seed(0)
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    run = Run(args, device, load_kernels())
    if args.section is not None:  # a section process
        if args.steps and os.path.exists(args.steps):
            with open(args.steps) as f:
                run.steps = {tuple(json.loads(k)): v for k, v in json.load(f).items()}
        run_section(run, args.section)
        run.data["steps"] = {json.dumps(list(k)): v for k, v in run.steps.items()}
        run.write()
        return 0
    run.data["phase"] = args.phase
    for name in SECTIONS:
        if name not in selected:
            run.data["sections"][name] = {"status": "skipped", "reason": "not selected (--phase / --only / --skip)",
                                          "seconds": 0.0}  # fmt: skip
    run.write()
    run_sections(run, args, selected)
    return summarize(run)
