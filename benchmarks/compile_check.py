"""Ahead-of-time compile check for sm_90: every kernel × config × dtype/precision the dispatcher can pick.

No GPU is needed. The launches come from running the package's public launchers and a fused
NuMLP + NuP step under Triton's interpreter (:mod:`compile_check_launches`, in a subprocess); each
is compiled for ``GPUTarget("cuda", 90, 32)`` in every config its autotuner keeps for the dtype, at
aligned and unaligned shapes (:mod:`compile_check_aot`)::

    PYTHONPATH=. python benchmarks/compile_check.py --out DIR [--check] [--quick]

Writes ``DIR/compile_check.json`` (every compile: registers, spill bytes, stack, shared memory,
tensor-core instructions, compile seconds) and ``DIR/compile_check.md`` (per kernel, then per
config). ``--check`` exits 1 when anything fails: a compile error, shared memory over 227 KB, spills
at aligned shapes, or a 16-bit matmul kernel without ``mma``/``wgmma``. ``--quick`` compiles one
config of the first launch per kernel, precision and dtype, aligned only (the pytest smoke test).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="nup-compile-check-"))  # cold: ptxas runs
os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, str(Path(__file__).resolve().parent))

import compile_check_aot as aot  # noqa: E402
import triton  # noqa: E402

HERE = Path(__file__).resolve().parent


def discover_launches() -> list[dict[str, Any]]:
    """The launch records of :mod:`compile_check_launches`, run in a fresh interpreter process."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(HERE / "compile_check_launches.py")], capture_output=True,
                          text=True, env=env, check=False)  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"compile_check: launch discovery failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout)["launches"]


def _label(d: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(d.items()))


_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4}


def _group(launch: dict[str, Any]) -> tuple:
    """(kernel, precision, narrowest float dtype): the launches whose configs are swept together."""
    floats = [d for d in launch["dtypes"].values() if d in _ITEMSIZE]
    narrow = min(floats, key=_ITEMSIZE.get) if floats else ""
    return launch["kernel"], launch["constexprs"].get("INPUT_PRECISION", launch["constexprs"].get("PREC")), narrow


def units(launches: list[dict[str, Any]], quick: bool) -> list[tuple[dict[str, Any], tuple, str]]:
    """Distinct ``(launch, (config, num_warps, num_stages), variant)`` compile units.

    Per kernel, precision and narrowest dtype, the first launch recorded (the default activation)
    is compiled in every config the dispatcher keeps at aligned shapes, and in its first config (the
    largest tiles) at unaligned ones; the other launches of that group (other activations, bias, δ
    given or stored, block sizes) in their first config at aligned shapes. ``quick``: the first
    launch of each group only, in its first config, aligned.
    """
    seen, out, swept = set(), [], set()
    for launch in launches:
        configs = aot.configs_of(launch)
        first = _group(launch) not in swept
        swept.add(_group(launch))
        if quick and not first:
            continue
        sweep = first and not quick
        plan = [(c, "aligned") for c in (configs if sweep else configs[:1])]
        plan += [(configs[0], "unaligned")] if sweep else []
        for config, variant in plan:
            fn, signature, constexprs, attrs = aot.compile_inputs(launch, config[0], variant == "aligned")
            key = (launch["module"], launch["kernel"], json.dumps(signature, sort_keys=True),
                   _label(constexprs), str(sorted(attrs.items())), config[1], config[2])  # fmt: skip
            if key not in seen:  # an unaligned variant with nothing to misalign is the aligned one
                seen.add(key)
                out.append((launch, config, variant))
    return out


def run_unit(launch: dict[str, Any], config: tuple, variant: str) -> aot.Result:
    tuned, warps, stages = config
    constexprs = launch["constexprs"]
    precision = constexprs.get("INPUT_PRECISION", constexprs.get("PREC", ""))
    dtypes = sorted(set(launch["dtypes"].values()) | {v[3:] for v in constexprs.values()
                                                      if isinstance(v, str) and v.startswith("tl.")})  # fmt: skip
    result = aot.Result(
        kernel=launch["kernel"], dtypes=",".join(dtypes), precision=str(precision),
        constexprs=_label({k: aot.INTERPRETER_ONLY.get(k, v) for k, v in constexprs.items()
                           if k not in ("INPUT_PRECISION", "PREC")}),  # fmt: skip
        config=_label(tuned | {"warps": warps, "stages": stages}), variant=variant,
    )  # fmt: skip
    try:
        resources, result.seconds = aot.compile_one(launch, tuned, warps, stages, variant == "aligned")
    except Exception as e:  # noqa: BLE001 - a compile error is a result
        result.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
    else:
        for k, v in resources.items():
            setattr(result, k, v)
    result.failures = aot.judge(result)
    return result


def _dtype_name(d: str) -> str:
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "int64": "i64"}.get(d, d)


def summary_rows(results: list[aot.Result]) -> list[dict[str, Any]]:
    """Per (kernel, data dtypes, precision): worst registers/spills/shared over configs and variants."""
    groups: dict[tuple, list[aot.Result]] = defaultdict(list)
    for r in results:
        data = [d for d in r.dtypes.split(",") if d in ("float32", "bfloat16", "float16")]
        groups[(r.kernel, "/".join(_dtype_name(d) for d in data), r.precision)].append(r)
    rows = []
    for (kernel, dtypes, precision), rs in groups.items():
        ok = [r for r in rs if not r.error]
        aligned = [r for r in ok if r.variant == "aligned"]
        unaligned = [r for r in ok if r.variant == "unaligned"]
        rows.append({
            "kernel": kernel, "dtypes": dtypes, "precision": precision, "compiles": len(rs),
            "configs": len({r.config for r in rs}),
            "registers_max": max((r.registers or 0 for r in ok), default=None),
            "spill_aligned_max": max(((r.spill_stores or 0) + (r.spill_loads or 0) for r in aligned), default=0),
            "spill_unaligned_max": max(((r.spill_stores or 0) + (r.spill_loads or 0) for r in unaligned), default=0),
            "shared_max": max((r.shared or 0 for r in ok), default=None),
            "tensor_core": "/".join(sorted({r.tensor_core for r in ok if r.matmul} - {""})) or
                           ("none" if any(r.matmul for r in ok) else "-"),
            "seconds": round(sum(r.seconds for r in rs), 2),
            "failures": sum(bool(r.failures) for r in rs),
        })  # fmt: skip
    return rows


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]], results: list[aot.Result]) -> str:
    lines = [
        f"# sm_90 compile check: Triton {meta['triton']}, {meta['date']}",
        "",
        f"`{meta['command']}`: {meta['compiles']} compiles in {meta['seconds']:.0f} s, "
        f"{meta['failed']} failing. Target `{meta['target']}`, shared-memory limit {aot.SHARED_LIMIT} B.",
        "Spills are ptxas spill stores + loads in bytes, worst over configs; `aligned` has every "
        "integer argument divisible by 16. `precision` (TF32 or IEEE) matters for fp32 operands only.",
        "",
        "| kernel | dtypes | precision | configs | compiles | max regs | spills aligned | spills unaligned "
        "| max shared B | tensor cores | compile s | failing |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['kernel']} | {r['dtypes']} | {r['precision'] or '-'} | {r['configs']} | {r['compiles']} | "
            f"{r['registers_max']} | {r['spill_aligned_max']} | {r['spill_unaligned_max']} | {r['shared_max']} | "
            f"{r['tensor_core']} | {r['seconds']} | {r['failures']} |"
        )
    failing = [r for r in results if r.failures]
    lines += ["", f"## Failures ({len(failing)})", ""]
    lines += [f"- `{r.kernel}` {r.dtypes} {r.precision} {r.constexprs} [{r.config}] {r.variant}: "
              f"{'; '.join(r.failures)} {r.error}" for r in failing] or ["none"]  # fmt: skip
    lines += ["", "## Every compile", "",
              "| kernel | dtypes | precision | constexprs | config | variant | regs | spill st/ld | stack "
              "| shared B | tc | s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        lines.append(
            f"| {r.kernel} | {r.dtypes} | {r.precision or '-'} | {r.constexprs} | {r.config} | {r.variant} | "
            f"{r.registers} | {r.spill_stores}/{r.spill_loads} | {r.stack} | {r.shared} | {r.tensor_core or '-'} | "
            f"{r.seconds:.2f} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="directory for compile_check.json and compile_check.md")
    p.add_argument("--check", action="store_true", help="exit 1 when any compile fails the check")
    p.add_argument("--quick", action="store_true", help="one compile per kernel, precision and dtype (aligned)")
    p.add_argument("--only", default="", help="comma-separated kernel names (e.g. _gram_norm_kernel); default all")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = datetime.datetime.now(datetime.timezone.utc)
    launches = discover_launches()
    only = {k for k in args.only.split(",") if k}
    unknown = only - {launch["kernel"] for launch in launches}
    if unknown:
        print(f"compile_check: no recorded launch of {sorted(unknown)}; kernels are "
              f"{sorted({launch['kernel'] for launch in launches})}", file=sys.stderr)  # fmt: skip
        return 2
    todo = units([launch for launch in launches if not only or launch["kernel"] in only], args.quick)
    print(f"compile_check: Triton {triton.__version__}, {len(todo)} compiles for sm_90", flush=True)
    results = []
    for i, (launch, config, variant) in enumerate(todo, 1):
        r = run_unit(launch, config, variant)
        results.append(r)
        mark = "FAIL " + "; ".join(r.failures) if r.failures else "ok"
        print(f"[{i}/{len(todo)}] {r.kernel} {r.dtypes} {r.precision} [{r.config}] {r.variant}: regs={r.registers} "
              f"spill={r.spill_stores}/{r.spill_loads} shared={r.shared} tc={r.tensor_core or '-'} "
              f"{r.seconds:.1f}s {mark}", flush=True)  # fmt: skip
    rows = summary_rows(results)
    meta = {
        "triton": triton.__version__, "target": str(aot.TARGET), "date": start.date().isoformat(),
        "command": " ".join(["python benchmarks/compile_check.py",
                             *("--out DIR" if a == "--out" else a for a in sys.argv[1:] if a != args.out)]),
        "compiles": len(results), "failed": sum(bool(r.failures) for r in results),
        "seconds": (datetime.datetime.now(datetime.timezone.utc) - start).total_seconds(),
        "shared_limit": aot.SHARED_LIMIT,
    }  # fmt: skip
    (out / "compile_check.json").write_text(
        json.dumps({"meta": meta, "summary": rows, "results": [r.as_dict() for r in results]}, indent=1)
    )
    (out / "compile_check.md").write_text(markdown(meta, rows, results))
    print(f"compile_check: {meta['compiles']} compiles, {meta['failed']} failing, {meta['seconds']:.0f} s; "
          f"wrote {out / 'compile_check.md'}")  # fmt: skip
    return 1 if args.check and meta["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
