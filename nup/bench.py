"""Run a benchmark suite and write JSON, CSV, a Markdown table and a PNG bar chart of the ratios.

Suites: ``kernels`` (each kernel against the PyTorch a user would write; Triton on CUDA, the
reference implementation on CPU) and ``steps`` (full training steps of νP MLPs at depth × batch:
plain PyTorch SGD, NuP with statistics, the unfused statistics step, its torch.compile, and
the fused path on CUDA). The suites run under pytest-benchmark (the ``dev`` extra) in a
subprocess; every ratio divides by the plain-PyTorch median of the same run. Results go to
``runs/bench/<machine>-<date>/`` (relative to the working directory) unless ``--out`` says
otherwise; the committed results under ``benchmarks/results/`` change only when ``--out`` names
them. ``--quick`` runs tiny shapes with few rounds, to check that everything works, and its
outputs say so in their titles.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import importlib.util
import io
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

from nup.cli import CLIError
from nup.io import write_bytes_atomic, write_text_atomic

REPO = Path(__file__).resolve().parents[1]
SUITES = {"kernels": ("bench_kernels.py",), "steps": ("bench_steps.py",)}
SUITES["all"] = SUITES["kernels"] + SUITES["steps"]
#: provider -> label in tables and plots
LABELS = {
    "plain_torch": "plain torch (SGD, no stats)",
    "numlp_sgd": "NuMLP + torch SGD",
    "nup_dropin": "nup drop-in (NuP)",
    "nup_dropin_compiled": "nup drop-in, torch.compile(opt.step)",
    "nup_fused": "nup fused",
    "adam": "NuMLP + torch Adam",
    "nup_wrapper_adam": "NuP(base=Adam)",
    "adam_fused": "NuMLP + torch Adam(fused=True)",
    "nup_wrapper_adam_fused": "NuP(base=Adam(fused=True))",
    "unfused_stats": "unfused torch stats",
    "compiled_stats": "torch.compile stats",
    "nup": "nup (Triton on CUDA, reference on CPU)",
    "torch": "torch",
}
CSV_COLUMNS = (
    "suite", "case", "provider", "impl", "median_ms", "iqr_ms", "min_ms", "rounds", "ratio_vs_torch",
    "reference", "ratio_vs_reference", "paired_ratio_vs_reference", "rival", "paired_ratio_vs_rival",
    "paired_ratio_vs_torch", "min_ratio_vs_torch", "bytes_per_s", "tflops", "traffic_path", "device_name",
    "cores", "torch", "triton",
)  # fmt: skip
HEADLINE_DEPTH = 16
#: DESIGN.md's step targets: NuP's statistics add ≤ 10% on CPU; the fused step ≤ 1.05× plain on GPU
STEP_TARGETS = {"cpu": 1.10, "cuda": 1.05}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--suite", choices=sorted(SUITES), default="all", help="which suite to run (default: all)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny shapes and few rounds: proves the suites work"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output directory (default: runs/bench/<machine>-<date>; the committed results in "
        "benchmarks/results/ are written only when --out names them)",
    )
    parser.add_argument(
        "--depths", default="", help="comma-separated depths of the step suite (default: all)"
    )
    parser.add_argument(
        "--batches", default="", help="comma-separated batch sizes of the step suite (default: all)"
    )
    parser.add_argument(
        "--skip", default="", help="comma-separated DEPTHxBATCH step cases to leave out, e.g. 64x2048"
    )
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch CPU threads in the benchmarks (default: torch's own; recorded with the results)",
    )  # fmt: skip
    parser.add_argument(
        "--budget", type=float, default=None,
        help="timed seconds per benchmark; rounds are chosen to fit (default: 3, quick: 0.05)",
    )  # fmt: skip


def main(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("pytest_benchmark") is None:
        raise CLIError("pytest-benchmark is not installed; install the dev extra: pip install -e '.[dev]'")
    if args.threads is not None and args.threads < 1:
        raise CLIError(f"--threads must be >= 1, got {args.threads}")
    if args.budget is not None and not (math.isfinite(args.budget) and args.budget > 0):
        raise CLIError(f"--budget must be a positive number of seconds, got {args.budget}")
    bench_dir = REPO / "benchmarks"
    files = [bench_dir / f for f in SUITES[args.suite]]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise CLIError(
            f"benchmark files not found: {', '.join(missing)}; run nup bench from a source checkout"
        )
    with tempfile.TemporaryDirectory(prefix="nup-bench-") as tmp:
        raw_path, skips_path = Path(tmp) / "pytest-benchmark.json", Path(tmp) / "skipped.json"
        cmd = [
            sys.executable, "-m", "pytest", *map(str, files), "-v", "-rs", "-p", "no:cacheprovider",
            f"--benchmark-json={raw_path}", "--benchmark-columns=median,iqr,rounds", "--benchmark-sort=name",
            f"--nup-skips-json={skips_path}", f"--nup-depths={args.depths}", f"--nup-batches={args.batches}",
            f"--nup-skip={args.skip}",
        ]  # fmt: skip
        if args.quick:
            cmd.append("--nup-quick")
        if args.threads is not None:
            cmd.append(f"--nup-threads={args.threads}")
        if args.budget is not None:
            cmd.append(f"--nup-budget={args.budget}")
        rc = subprocess.run(cmd, cwd=REPO).returncode
        if rc not in (0, 1) or not raw_path.exists():
            raise CLIError(f"the benchmark run failed (pytest exit code {rc}); see its output above")
        raw = json.loads(raw_path.read_text())
        skipped = json.loads(skips_path.read_text()) if skips_path.exists() else []
        result = summarize(raw, skipped, suite=args.suite, quick=args.quick, command=cmd[3:])
        result["code_version"] = code_version()
        counted = [p for p in dict.fromkeys(r["provider"] for r in result["records"] if r["suite"] == "steps")
                   if not any(r["provider"] == p and r["impl"] == "torch.compile" for r in result["records"])]
        if counted:
            result["launches"] = count_launches(counted)
        out = args.out or Path("runs") / "bench" / f"{machine_slug(result['machine'])}-{result['date']}"
        write_results(result, out, raw)
    print(f"nup bench: wrote {out}/results.{{json,csv,md,png}}")
    for line in headline_lines(result["records"]):
        print(f"nup bench: {line}")
    return rc


def code_version() -> str | None:
    """``git describe --always --dirty`` of the checkout the benchmarks ran from, or None."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True
        )
    except OSError:
        return None
    return out.stdout.strip() or None


def machine_slug(machine: dict[str, Any]) -> str:
    """A directory-safe machine name, e.g. ``cpu-intel-r-xeon-r-processor-2c-2t`` (cores, torch
    threads) or ``cuda-nvidia-h200``."""
    name = re.sub(r"[^a-z0-9]+", "-", str(machine.get("device_name", "unknown")).lower()).strip("-")
    cpu = (
        f"-{machine.get('cores')}c-{machine.get('torch_threads')}t" if machine.get("device") == "cpu" else ""
    )
    return f"{machine.get('device', 'unknown')}-{name}{cpu}"


def summarize(raw: dict, skipped: list[dict], suite: str, quick: bool, command: list[str]) -> dict[str, Any]:
    """Records with medians, ratios to the same run's baseline and achieved rates, from pytest-benchmark JSON.

    ``ratio_vs_torch`` is the median over the baseline's median for the same suite and case (None
    when the baseline did not run), ``min_ratio_vs_torch`` the same for the fastest rounds, and
    ``paired_ratio_vs_torch`` the median ratio of back-to-back pairs (both less sensitive to other
    load on the machine); ``bytes_per_s`` and ``tflops`` divide the record's
    modelled bytes and FLOPs by its median.
    """
    machine = raw.get("machine_info", {}).get("nup", {})
    records = []
    for bench in raw.get("benchmarks", []):
        info, stats = bench["extra_info"], bench["stats"]
        median = stats["median"]
        records.append({
            **info,
            "median_ms": median * 1e3, "iqr_ms": stats["iqr"] * 1e3, "min_ms": stats["min"] * 1e3,
            "rounds": stats["rounds"],
            "bytes_per_s": info["bytes"] / median if info.get("bytes") else None,
            "tflops": info["flops"] / median / 1e12 if info.get("flops") else None,
            **{k: machine.get(k) for k in ("device", "device_name", "cores", "torch", "triton")},
        })  # fmt: skip
    base = {(r["suite"], r["case"]): r for r in records if r["provider"] == r["baseline"]}
    by_provider = {(r["suite"], r["case"], r["provider"]): r for r in records}
    for r in records:
        ref = by_provider.get((r["suite"], r["case"], r.get("reference")))
        r["ratio_vs_reference"] = r["median_ms"] / ref["median_ms"] if ref else None
        b = base.get((r["suite"], r["case"]))
        r["ratio_vs_torch"] = r["median_ms"] / b["median_ms"] if b else None
        r["min_ratio_vs_torch"] = r["min_ms"] / b["min_ms"] if b else None
        r["paired_ratio_vs_torch"] = r.pop("paired_ratio", None)
        r["paired_ratio_vs_reference"] = r.pop("paired_ratio_ref", None)
        r["paired_ratio_vs_rival"] = r.pop("paired_ratio_rival", None)
        r["paired_ratio_vs_rival_quartiles"] = r.pop("paired_ratio_rival_q", None)
    created = raw.get("datetime") or datetime.datetime.now(datetime.timezone.utc).isoformat()
    return {"machine": machine, "date": created[:10], "created": created, "suite": suite, "quick": quick,
            "command": command, "records": records, "skipped": skipped}  # fmt: skip


def _at_headline(records: list[dict], key: str) -> list[dict]:
    """The depth-16 step records that have ``key``, by batch and provider."""
    found = [r for r in records
             if r["suite"] == "steps" and r.get("depth") == HEADLINE_DEPTH and r.get(key) is not None]
    return sorted(found, key=lambda r: (r["batch"], r["provider"]))


def headline_lines(records: list[dict]) -> list[str]:
    """The depth-16 step ratios (NuP with statistics, and fused where it ran) to plain torch, per batch,
    each provider's ratio to its own reference (fused and drop-in to NuMLP + SGD, wrapper to its base), and
    the fused step to drop-in, timed in pairs (the median and quartiles of the pairs' ratios)."""
    head = f"depth {HEADLINE_DEPTH}, batch"
    lines = [
        f"{head} {r['batch']}: {LABELS[r['provider']]} / plain torch "
        f"= {r['ratio_vs_torch']:.3f}x (medians; paired {r['paired_ratio_vs_torch']:.3f}x; "
        f"fastest rounds {r['min_ratio_vs_torch']:.3f}x)"
        for r in _at_headline(records, "ratio_vs_torch") if r["provider"] in ("nup_dropin", "nup_fused")
    ]
    lines += [
        f"{head} {r['batch']}: {LABELS[r['provider']]} / {LABELS[r['reference']]} "
        f"= {r['ratio_vs_reference']:.3f}x (medians"
        + ("" if r.get("paired_ratio_vs_reference") is None else f"; paired {r['paired_ratio_vs_reference']:.3f}x")
        + ")"
        for r in _at_headline(records, "ratio_vs_reference")
    ]
    lines += [
        f"{head} {r['batch']}: {LABELS[r['provider']]} / {LABELS[r['rival']]} "
        f"= paired {r['paired_ratio_vs_rival']:.3f}x (quartiles of the pairs "
        f"{r['paired_ratio_vs_rival_quartiles'][0]:.3f}–{r['paired_ratio_vs_rival_quartiles'][1]:.3f})"
        for r in _at_headline(records, "paired_ratio_vs_rival")
    ]
    return lines


def count_launches(providers: list[str]) -> dict[str, dict[str, float]] | str:
    """Launches per layer and per step of each provider on the CUDA code path, counted on CPU through
    Triton's interpreter (:mod:`nup.launches`, in a subprocess); a message instead when that failed."""
    env = {**os.environ, "NUP_BACKEND": "triton", "TRITON_INTERPRET": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "nup.launches", *providers], cwd=REPO, env=env, capture_output=True, text=True
    )
    if out.returncode != 0:
        return f"launch count failed: {(out.stderr.strip().splitlines() or ['?'])[-1][:200]}"
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_results(result: dict[str, Any], out: Path, raw: dict) -> None:
    """``results.{json,csv,md,png}`` and pytest-benchmark's raw ``pytest-benchmark.json`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "results.json", json.dumps(result, indent=1) + "\n")  # atomic: never through a link
    write_text_atomic(out / "pytest-benchmark.json", json.dumps(raw, indent=1) + "\n")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(result["records"])
    write_text_atomic(out / "results.csv", buf.getvalue())
    write_text_atomic(out / "results.md", markdown(result))
    plot_ratios(result["records"], out / "results.png", STEP_TARGETS.get(result["machine"].get("device")),
                quick=result["quick"])


def _ms(r: dict | None) -> str:
    if r is None:
        return "skipped"
    if r["ratio_vs_torch"] is None:
        return f"{r['median_ms']:.3g} ms"
    paired = r.get("paired_ratio_vs_torch")
    paired = "" if paired is None or r["provider"] == r["baseline"] else f"; paired {paired:.2f}×"
    return f"{r['median_ms']:.3g} ms ({r['ratio_vs_torch']:.2f}×{paired})"


def _rate(value: float | None, scale: float) -> str:
    return "–" if value is None else f"{value / scale:.3g}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [f"| {' | '.join(row)} |" for row in [header, ["---"] * len(header), *rows]]


def markdown(result: dict[str, Any]) -> str:
    """Tables of medians and ratios (one row per case, one column per provider), rates, and skips."""
    m, records = result["machine"], result["records"]
    load = m.get("load_avg")
    loads = [r["load_avg_1m"] for r in records if r.get("load_avg_1m") is not None]
    lines = [
        f"# nup benchmarks: {m.get('device_name')} ({m.get('cores')} cores)"
        + (" — quick mode, not a measurement" if result["quick"] else ""),
        "",
        f"torch {m.get('torch')}, triton {m.get('triton')}, python {m.get('python')}, torch threads "
        f"{m.get('torch_threads')}; {result['created']}; code {result.get('code_version')}; "
        f"suite `{result['suite']}`"
        + (", **quick mode** (tiny shapes, not a measurement)" if result["quick"] else "")
        + (f"; load average at start {load[0]:.2f}" if load else "")
        + (f", highest 1-min load average after a benchmark {max(loads):.2f}" if loads else ""),
        "",
        "Cells: median time per call and, in brackets, its ratio to the plain-torch median of the same run, "
        "then the paired ratio (median of time ratios of back-to-back pairs: steadier when other work "
        "shares the machine).",
    ]
    steps = [r for r in records if r["suite"] == "steps"]
    if steps:
        providers = [p for p in LABELS if any(r["provider"] == p for r in steps)]
        by_case = defaultdict(dict)
        for r in steps:
            by_case[(r["depth"], r["batch"])][r["provider"]] = r
        rows = []
        for (depth, batch), cell in sorted(by_case.items()):
            first = next(iter(cell.values()))
            model = [
                str(depth),
                str(max(first["widths"][1:-1])),
                f"{first['n_params'] / 1e6:.3g}M",
                str(batch),
            ]
            rows.append(model + [_ms(cell.get(p)) for p in providers])
        lines += [
            "", "## Full training steps", "",
            "Forward, cross-entropy, backward and optimizer step of a νP MLP (hidden widths m·k², capped at "
            f"depth 64). Targets: nup drop-in ≤ {STEP_TARGETS['cpu']:.2f}× plain torch at depth 16 on CPU; "
            f"nup fused ≤ {STEP_TARGETS['cuda']:.2f}× on GPU.", "",
        ]  # fmt: skip
        lines += _table(["depth", "max width", "params", "batch"] + [LABELS[p] for p in providers], rows)
        lines += ["", *[f"- {line}" for line in headline_lines(records)]]
        rate_rows = [
            [r["case"], LABELS[r["provider"]], r["impl"], r["traffic_path"],
             _rate(r["bytes_per_s"], 1e9), _rate(r["tflops"], 1.0), f"{r['setup_s']:.3g}",
             str(r.get("load_avg_1m", "–"))]
            for r in steps
        ]  # fmt: skip
        lines += [
            "", "Achieved rates: modelled weight traffic of the provider's path (nup_kernels.traffic) and "
            "matmul FLOPs 6·B·P, each over the median time; setup: seconds of compilation before timing "
            "(torch.compile), not included in the times; load: the machine's 1-minute load average after the "
            "benchmark (above the core count, other work competed for the CPU).", "",
        ]  # fmt: skip
        header = ["case", "provider", "impl", "traffic path", "GB/s", "TFLOP/s", "setup s", "load"]
        lines += _table(header, rate_rows)
    launches = result.get("launches")
    if launches:
        lines += [
            "", "## Launches on the CUDA code path", "",
            "Kernel launches per step, counted on CPU through Triton's interpreter (NUP_BACKEND=triton "
            "TRITON_INTERPRET=1; torch ops that launch a kernel plus Triton launches; nup.launches), as "
            "(count at depth 8 − count at depth 4)/4 per layer and the rest per step. Budget of the fused "
            "path: ≤ 6 per layer, ≤ 40 per step.", "",
        ]  # fmt: skip
        if isinstance(launches, str):
            lines.append(launches)
        else:
            rows = [[LABELS.get(p, p), f"{v['per_layer']:.2f}", f"{v['constant']:.0f}"] for p, v in launches.items()]
            lines += _table(["provider", "per layer", "per step (constant)"], rows)
    kernels = [r for r in records if r["suite"] == "kernels"]
    if kernels:
        by_case = defaultdict(dict)
        for r in kernels:
            by_case[r["case"]][r["provider"]] = r
        rows = []
        for cell in by_case.values():
            nup, torch_ = cell.get("nup"), cell.get("torch")
            ref = nup or torch_
            rates = [
                _rate(r and r[k], scale)
                for k, scale in (("bytes_per_s", 1e9), ("tflops", 1.0))
                for r in (nup, torch_)
            ]
            shape = ref["case"].removeprefix(f"{ref['op']}-")
            rows.append([ref["op"], shape, nup["impl"] if nup else "–", _ms(nup), _ms(torch_), *rates])
        lines += [
            "", "## Kernels", "",
            "`nup` is the Triton kernel on CUDA and the reference implementation on CPU; `torch` is the "
            "plain PyTorch a user would write. Rates use the op's minimal traffic and matmul FLOPs.", "",
        ]  # fmt: skip
        header = [
            "op",
            "shape",
            "nup impl",
            "nup",
            "torch",
            "nup GB/s",
            "torch GB/s",
            "nup TFLOP/s",
            "torch TFLOP/s",
        ]
        lines += _table(header, rows)
    if result["skipped"]:
        lines += ["", "## Skipped", ""] + [f"- `{s['test']}`: {s['reason']}" for s in result["skipped"]]
    return "\n".join(lines) + "\n"


def plot_ratios(records: list[dict], path: Path, step_target: float | None = None, quick: bool = False) -> None:
    """Grouped bars of each provider's ratio to plain torch, one panel per suite, with the 1.0 line
    (and the step target line); ``quick`` marks every title as quick mode."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    suites = [s for s in ("steps", "kernels") if any(r["suite"] == s for r in records)]
    fig = Figure(figsize=(11, 4.2 * max(len(suites), 1)))
    FigureCanvasAgg(fig)
    for i, suite in enumerate(suites):
        ax = fig.add_subplot(len(suites), 1, i + 1)
        rs = [r for r in records if r["suite"] == suite and r["ratio_vs_torch"] is not None]
        cases = list(dict.fromkeys(r["case"] for r in rs))
        providers = [p for p in LABELS if any(r["provider"] == p != r["baseline"] for r in rs)]
        width = 0.8 / max(len(providers), 1)
        ratio = {(r["case"], r["provider"]): r["ratio_vs_torch"] for r in rs}
        for j, p in enumerate(providers):
            xs = [k + (j - (len(providers) - 1) / 2) * width for k in range(len(cases))]
            ax.bar(xs, [ratio.get((c, p), 0.0) for c in cases], width, label=LABELS[p])
        ax.axhline(1.0, color="black", lw=1)
        if suite == "steps" and step_target is not None:
            ax.axhline(step_target, color="gray", lw=1, ls="--", label=f"{step_target:.2f}× (target)")
        ax.set_xticks(range(len(cases)), cases, rotation=30, ha="right", fontsize=8)
        if suite == "kernels":
            ax.set_yscale("log")  # reference ops on CPU range from far faster to far slower
            ax.set_ylim(top=4 * max(ratio.values(), default=1.0))
        else:
            ax.set_ylim(0, 1.25 * max([*ratio.values(), step_target or 1.0]))
        ax.set_ylabel("time / plain torch")
        ax.set_title(f"{suite}: ratio to plain torch (same run; lower is better)"
                     + (" — QUICK MODE, not a measurement" if quick else ""))
        ax.legend(fontsize=8, loc="upper center", ncol=len(providers) + 1)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, dpi=110, format="png")
    write_bytes_atomic(path, png.getvalue())
