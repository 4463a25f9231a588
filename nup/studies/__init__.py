"""Run one of the studies of SPEC §5, or all of them, and write results.json, PNG figures and README.md.

Studies: depth_transfer (η* against depth under sp, sp_inv_depth, νP with offset widths and νP +
harmonic normalizer, with seeds, bootstrap CIs and SPEC's T(L) prediction; its default is the
longest: about 30 minutes for both tasks on a 2-core machine with two worker processes),
coord_check (each layer's move and the change at fixed ℓ/L against SPEC's prediction), catapult
(lazy / catapult / divergent phases of plain GD on MSE, for the uv model and an EOC ReLU MLP),
schedule (the geometry-aware controllers against a tuned constant-lr sweep, an open-loop replay
and warm-up + decay on a νP model, MSE, full batch, several seeds: η·S, η·λ₀ and the catapult
duration with confidence intervals) and eos (sharpness against 2/η under
full-batch GD). Every other default runs on two CPU cores in under 10 minutes; --quick runs a tiny
version in seconds (its figures and README say so); the study options below scale a study up
(e.g. on a GPU with --device cuda).
Options a study does not use are refused. Outputs go to runs/studies/NAME unless --out names a
folder; the committed results under studies/ are rewritten only with an explicit --out studies/NAME.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from nup.studies._common import Flag, quick_mode

STUDIES = ("depth_transfer", "coord_check", "catapult", "schedule", "eos")
COMMON = ("seed", "device")


def _module(name: str):
    return importlib.import_module(f"nup.studies.{name}")


def _parser_for(kind: str, flag: str):
    def split(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"{flag}: expected a comma-separated list, got {text!r}")
        return items

    def parse(text: str) -> Any:
        try:
            if kind == "ints":
                return tuple(int(t) for t in split(text))
            if kind == "floats":
                return tuple(float(t) for t in split(text))
            if kind == "strs":
                return tuple(split(text))
            if kind == "width":  # 0 stands for None (no cap); make_config maps it
                value = int(text)
                if value < 0:
                    raise ValueError(text)
                return value
            if kind == "bool":
                return {"yes": True, "true": True, "1": True, "no": False, "false": False, "0": False}[text.lower()]
            return {"int": int, "float": float, "str": str}[kind](text)
        except (ValueError, KeyError):
            raise argparse.ArgumentTypeError(f"{flag}: cannot read {text!r} as {kind}") from None

    return parse


def _flags() -> dict[str, tuple[Flag, list[str]]]:
    """Every study option (declared in some study's FLAGS), once, with the studies whose Config has it."""
    declared: dict[str, Flag] = {}
    for name in STUDIES:
        for flag in _module(name).FLAGS:
            declared.setdefault(flag.field, flag)
    users = {name: {f.name for f in fields(_module(name).Config)} for name in STUDIES}
    return {field: (flag, [n for n in STUDIES if field in users[n]]) for field, flag in declared.items()}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """NAME, the common options and every study's own options (default: the study's default)."""
    parser.add_argument("name", metavar="NAME", help=f"the study: {' | '.join((*STUDIES, 'all'))}")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="output directory (default: runs/studies/NAME; for all: runs/studies, one folder per "
                             "study); the committed studies/ folders change only when --out names them")
    parser.add_argument("--seed", type=int, default=None, help="base seed of the study (default: 0)")
    parser.add_argument("--device", default=None, help="torch device: cpu, cuda, cuda:1, ... (default: cpu)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny settings that run in seconds (for CI); titles and READMEs say quick mode")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch intra-op threads (default: torch's own; 1 is fastest on a busy machine)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no summary line")
    group = parser.add_argument_group("study options (default: the study's own; see each study's README)")
    for field, (flag, users) in _flags().items():
        name = "--" + field.replace("_", "-")
        group.add_argument(name, dest=f"opt_{field}", default=None, metavar=flag.kind.upper(),
                           type=_parser_for(flag.kind, name), help=f"[{', '.join(users)}] {flag.help}")


def make_config(name: str, args: argparse.Namespace):
    """The study's Config: its defaults, then --quick's, then every option given on the command line."""
    from nup.cli import CLIError

    module = _module(name)
    cfg = module.Config()
    if args.quick:
        cfg = replace(cfg, **module.QUICK)
    names = {f.name for f in fields(cfg)}
    widths = {field for field, (flag, _) in _flags().items() if flag.kind == "width"}
    given = {k.removeprefix("opt_"): v for k, v in vars(args).items() if k.startswith("opt_") and v is not None}
    given = {k: None if k in widths and v == 0 else v for k, v in given.items()}
    for key in COMMON:
        if getattr(args, key, None) is not None:
            given[key] = getattr(args, key)
    unused = sorted(k for k in given if k not in names)
    if unused:
        flags = ", ".join("--" + k.replace("_", "-") for k in unused)
        raise CLIError(f"{flags} does not apply to study {name}")
    cfg = replace(cfg, **given)
    _check_device(cfg.device)
    return cfg


def _check_device(device: str) -> None:
    import torch

    from nup.cli import CLIError

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise CLIError(f"unknown device {device!r}; write cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"device {device!r}: no CUDA available")


def run_study(name: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Build the config of study ``name`` from ``args``, run it into ``out`` and return its results."""
    cfg = make_config(name, args)
    with quick_mode(args.quick):
        return _module(name).run(cfg, out, progress=not args.quiet)


def main(args: argparse.Namespace) -> int:
    """Dispatch to the study (or every study, for ``all``) and print one summary line per study."""
    from nup.cli import CLIError

    if args.name != "all" and args.name not in STUDIES:
        raise CLIError(f"unknown study {args.name!r}; choose one of {', '.join((*STUDIES, 'all'))}")
    if args.threads is not None:
        if args.threads < 1:
            raise CLIError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    names = STUDIES if args.name == "all" else (args.name,)
    root = Path(args.out) if args.out else Path("runs") / "studies" / ("" if args.name == "all" else args.name)
    if args.name == "all":
        given = [k for k, v in vars(args).items() if k.startswith("opt_") and v is not None]
        if given:
            raise CLIError("study options do not apply to all (it runs every study at its default); "
                           "run the studies one by one to change them")
    for name in names:
        start = time.perf_counter()
        out = root / name if args.name == "all" else root
        results = run_study(name, args, out)
        if not args.quiet:
            line = _module(name).summary_line(results)
            print(f"{name}: {line} ({time.perf_counter() - start:.0f} s) -> {out}", file=sys.stdout)
    if args.name == "all":
        write_index(root)
    return 0


def write_index(root: str | Path) -> Path:
    """``ROOT/README.md``: one line per study found under ``ROOT`` (its summary and run time)."""
    import json

    from nup.io import write_text_atomic

    root = Path(root)
    lines = ["# Studies", "", "Each folder holds results.json, PNG figures and a README.md; "
             "rerun one with `nup study NAME --out studies/NAME` (or all with `nup study all --out studies`).", ""]
    for name in STUDIES:
        path = root / name / "results.json"
        if path.is_file():
            results = json.loads(path.read_text(encoding="utf-8"))
            env = results.get("runs_environment") or results["environment"]  # a reanalysis keeps the runs' time
            lines.append(f"- [{name}]({name}/README.md): {_module(name).summary_line(results)} "
                         f"({env['wall_time_s']:.0f} s on {env['device']}, {env['torch_threads']} thread(s))")
    for sweep in sorted(d for d in root.iterdir() if (d / "sweep.json").is_file() and (d / "README.md").is_file()):
        lines.append(f"- [{sweep.name}]({sweep.name}/README.md): a `nup sweep`, not a study; the command that "
                     "remakes it is in its README")
    out = root / "README.md"
    write_text_atomic(out, "\n".join(lines) + "\n")
    return out
