"""Run a resumable grid of training runs from a TOML config.

[base] holds fixed TrainConfig fields; [grid] holds lists, and the sweep is their cartesian
product. Run RUN_ID writes into OUT/runs/RUN_ID/: config.json first, summary.json last. A run
is finished iff its summary.json exists, so a sweep killed at any moment and started again with
--resume skips the finished runs and continues the others from their last checkpoint
(--checkpoint-every steps, bit for bit as if never interrupted) or, without one, from scratch. OUT/results.csv (one row
per run) and OUT/sweep.json (the resolved config and grid) are rebuilt from the run directories.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import hashlib
import io
import itertools
import json
import multiprocessing
import os
import re
import signal
import sys
import threading
import time
import traceback
import typing
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

try:
    import fcntl
except ImportError:  # Windows: no lock against two sweeps in one directory
    fcntl = None

from nup.cli import CLIError
from nup.io import (
    inside,
    open_lock_file,
    read_json_object,
    remove_tree,
    safe_name,
    write_json_atomic,
    write_text_atomic,
)

METRICS = ("train_loss", "train_acc", "test_loss", "test_acc", "wall_time_s")
EXAMPLE = """example config:
  name = "depth-transfer"
  [base]                 # fixed TrainConfig fields (the `nup train` flags, with underscores)
  steps = 200
  [grid]                 # lists: the sweep is their cartesian product
  parameterization = ["nup", "sp", "sp_inv_depth"]
  depth = [4, 8]
  lr = [0.01, 0.1]
  seed = [0, 1]
"""


@dataclass(frozen=True)
class Sweep:
    """A parsed sweep config: fixed ``base`` fields and ``grid`` lists (TrainConfig field names)."""

    name: str
    base: dict[str, Any]
    grid: dict[str, list[Any]]
    source: str | None = None


@dataclass(frozen=True)
class RunSpec:
    """One grid point: its directory name, its grid values and its full TrainConfig."""

    run_id: str
    params: dict[str, Any]
    config: Any  # nup.train.TrainConfig


def _config_fields() -> list[str]:
    from nup.train import TrainConfig

    return TrainConfig.fields()


def _suggest(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _parse_override(item: str) -> tuple[list[str], Any]:
    """``"grid.lr=[0.1,0.3]"`` -> (["grid", "lr"], [0.1, 0.3]); an unparsable value stays a string."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. base.steps=50 or grid.lr=[0.1,0.3]")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    return key.strip().split("."), value


def _apply_override(raw: dict[str, Any], item: str) -> None:
    path, value = _parse_override(item)
    if path == ["name"]:
        raw["name"] = value
        return
    if len(path) != 2 or path[0] not in ("base", "grid"):
        raise ValueError(f"--set {item!r}: the key must be name, base.FIELD or grid.FIELD")
    section, key = path
    other = raw.get("grid" if section == "base" else "base")
    if isinstance(other, dict):  # an override moves the field between the tables
        other.pop(key, None)
    raw.setdefault(section, {})[key] = value


def load_sweep(path: str | Path, overrides: Sequence[str] = ()) -> Sweep:
    """Parse and check a sweep TOML file, after applying ``--set`` style ``overrides``.

    Raises ValueError (one line, prefixed by the path) for unknown tables or keys, a grid that
    is empty or holds a non-list or empty list, and a list in [base]. Field values are checked
    by :func:`expand_grid`.
    """
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: invalid TOML: {err}") from None
    for item in overrides:
        _apply_override(raw, item)
    for key in raw:
        if key not in ("name", "base", "grid"):
            hint = _suggest(key, ["name", "base", "grid"])
            raise ValueError(f"{path}: unknown top-level key {key!r}{hint}; expected name, [base], [grid]")
    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{path}: name must be a non-empty string, got {name!r}")
    try:
        safe_name(name, "sweep name")  # the default output directory is sweeps/NAME
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    base, grid = raw.get("base", {}), raw.get("grid", {})
    fields = _config_fields()
    for section, table in (("base", base), ("grid", grid)):
        if not isinstance(table, dict):
            raise ValueError(f"{path}: {section} must be a table ([{section}]), got {table!r}")
        for key in table:
            if key not in fields:
                hint = _suggest(key, fields)
                raise ValueError(f"{path}: unknown key {section}.{key}: not a TrainConfig field{hint}")
    both = sorted(set(base) & set(grid))
    if both:
        raise ValueError(f"{path}: {', '.join(both)} set in both [base] and [grid]")
    for key, value in base.items():
        if isinstance(value, (list, dict)):
            raise ValueError(f"{path}: base.{key} must be a single value (lists go in [grid]), got {value!r}")
    if not grid:
        raise ValueError(f"{path}: empty grid: [grid] needs at least one field with a list of values")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"{path}: grid.{key} must be a non-empty list, got {values!r}")
        for value in values:
            if isinstance(value, (list, dict)):
                raise ValueError(f"{path}: grid.{key} must list single values, got {value!r}")
    return Sweep(name=name, base=dict(base), grid={k: list(v) for k, v in grid.items()}, source=str(path))


def _coerce(value: Any, hint: Any) -> Any:
    """TOML writes 1 for 1.0: an int given for a float (and not int) field becomes a float."""
    if type(value) is int:
        options = typing.get_args(hint) or (hint,)
        if float in options and int not in options:
            return float(value)
    return value


def config_dict(config: Any) -> dict[str, Any]:
    """A TrainConfig as a plain dict, in field order."""
    return {name: getattr(config, name) for name in type(config).fields()}


def _slug(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, bool) or value is None else str(value)
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text)


def make_run_id(config: Any, shown: Sequence[str]) -> str:
    """``depth=4_lr=0.1-1a2b3c4d``: the ``shown`` fields' values, then 8 hex digits of the full config.

    The name is stable (the same config always maps to the same directory) and filesystem-safe.
    """
    blob = json.dumps(config_dict(config), sort_keys=True, default=str)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:8]
    readable = "_".join(f"{key}={_slug(getattr(config, key))}" for key in shown)[:96].rstrip("_=-.")
    return f"{readable}-{digest}" if readable else f"run-{digest}"


def expand_grid(sweep: Sweep) -> list[RunSpec]:
    """Every grid point as a validated RunSpec, in grid order (the last key varies fastest).

    Raises ValueError naming the grid point for any ``TrainConfig.validate()`` failure (lr <= 0
    among them) or two grid points with the same config.
    """
    from nup.train import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    keys = list(sweep.grid)
    varying = [k for k in keys if len(sweep.grid[k]) > 1]
    specs: list[RunSpec] = []
    seen: dict[str, str] = {}
    for values in itertools.product(*sweep.grid.values()):
        point = dict(zip(keys, values, strict=True))
        point_text = "grid point " + ", ".join(f"{k}={v!r}" for k, v in point.items())
        where = f"{sweep.source}: {point_text}" if sweep.source else point_text
        params = {k: _coerce(v, hints[k]) for k, v in {**sweep.base, **point}.items()}
        try:
            config = TrainConfig(**params)
            config.validate()
            if config.nproc != 1:
                raise ValueError(f"nproc={config.nproc}: a sweep runs each grid point in one process; leave nproc "
                                 "unset and use --jobs N to run N grid points at once")
        except (ValueError, TypeError) as err:
            raise ValueError(f"{where}: {err}") from None
        run_id = make_run_id(config, varying)
        if run_id in seen:
            raise ValueError(f"{where}: duplicate grid point (the same config as {seen[run_id]})")
        seen[run_id] = point_text
        specs.append(RunSpec(run_id=run_id, params=point, config=config))
    return specs


def run_status(run_dir: Path) -> tuple[str, dict[str, Any]]:
    """(status, summary) of a run directory.

    status: "finished" or "diverged" (summary.json exists), "failed" (error.json exists) or
    "pending" (also for a symlink, which is never read and is replaced when the run is redone);
    summary is {} unless the run finished.
    """
    summary_path = run_dir / "summary.json"
    if run_dir.is_symlink():
        return "pending", {}
    if summary_path.is_file():
        summary = read_json_object(summary_path)
        return ("diverged" if summary.get("status") == "diverged" else "finished"), summary
    return ("failed" if (run_dir / "error.json").is_file() else "pending"), {}


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value)


def write_results(path: Path, sweep: Sweep, specs: Sequence[RunSpec], runs_dir: Path) -> None:
    """Rebuild results.csv atomically from the run directories: one row per spec.

    Columns: run_id, every grid key, the final train/test loss and accuracy, wall_time_s and
    status. Metrics of unfinished runs are empty.
    """
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["run_id", *sweep.grid, *METRICS, "status"])
    for spec in specs:
        status, summary = run_status(runs_dir / spec.run_id)
        writer.writerow([spec.run_id, *(_cell(getattr(spec.config, k)) for k in sweep.grid),
                         *(_cell(summary.get(m)) for m in METRICS), status])
    write_text_atomic(path, buf.getvalue())


def read_results(path: str | Path) -> list[dict[str, str]]:
    """The rows of a results.csv, as dicts of strings.

    Raises ValueError naming the file (and line) for a header without run_id or status, a row
    with the wrong number of fields, or a run id that is not one plain file name.
    """
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader, [])
        for column in ("run_id", "status"):
            if column not in header:
                raise ValueError(f"{path}: no {column} column in the header; regenerate it with nup sweep --resume")
        rows = []
        for row in reader:
            where = f"{path} line {reader.line_num}"
            if len(row) != len(header):
                raise ValueError(f"{where}: {len(row)} fields, the header has {len(header)}; "
                                 "regenerate it with nup sweep --resume")
            rows.append(dict(zip(header, row, strict=True)))
            try:
                safe_name(rows[-1]["run_id"], "run id")
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from None
    return rows


def _record_failure(run_dir: Path, error: str, trace: str) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / "error.json", {"error": error, "traceback": trace})


def execute_run(config: Any, run_dir: Path, checkpoint_every: int = 0, resume: bool = False) -> str:
    """Train ``config`` in ``run_dir`` (config.json first); "finished" or "failed".

    With ``resume`` and a checkpoint in ``run_dir`` (an interrupted attempt), the run continues
    from it; otherwise anything left in ``run_dir`` is removed first. An exception is recorded in
    error.json, not raised.
    """
    from nup.checkpoint import CHECKPOINT
    from nup.train import run_training

    resume = resume and (run_dir / CHECKPOINT).is_file()
    if not resume:
        remove_tree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "error.json").unlink(missing_ok=True)
    write_json_atomic(run_dir / "config.json", config_dict(config))
    try:
        run_training(config, run_dir, progress=False, checkpoint_every=checkpoint_every, resume=resume)
        if not (run_dir / "summary.json").is_file():
            raise RuntimeError("run_training returned without writing summary.json")
    except Exception as err:
        _record_failure(run_dir, f"{type(err).__name__}: {err}", traceback.format_exc())
        return "failed"
    return "finished"


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(0.2)
    os._exit(1)


def _init_worker(parent_pid: int) -> None:
    """Worker set-up: one torch thread, and die with the sweep process.

    A worker that outlived a killed sweep could still be writing into a run directory that a
    resumed sweep is redoing. On Linux the kernel kills it (PR_SET_PDEATHSIG); elsewhere a
    thread watches the parent.
    """
    import torch

    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        if os.getppid() != parent_pid:  # the sweep died before prctl
            os._exit(1)
    else:
        threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()


def _execute_all(todo: Sequence[RunSpec], runs_dir: Path, jobs: int, checkpoint_every: int = 0,
                 resume: bool = False) -> Iterator[tuple[RunSpec, str]]:
    """Run ``todo`` (in this process when jobs == 1), yielding (spec, status) as runs end."""
    if jobs == 1 or len(todo) <= 1:
        for spec in todo:
            yield spec, execute_run(spec.config, runs_dir / spec.run_id, checkpoint_every, resume)
        return
    pool = ProcessPoolExecutor(max_workers=min(jobs, len(todo)), initializer=_init_worker,
                               mp_context=multiprocessing.get_context("spawn"), initargs=(os.getpid(),))
    try:
        futures = {pool.submit(execute_run, spec.config, runs_dir / spec.run_id, checkpoint_every, resume): spec
                   for spec in todo}
        for future in as_completed(futures):
            spec = futures[future]
            try:
                status = future.result()
            except Exception as err:  # the worker process died (BrokenProcessPool)
                message = f"{type(err).__name__}: {err}"
                _record_failure(runs_dir / spec.run_id, message, traceback.format_exc())
                status = "failed"
            yield spec, status
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """Hold a lock on OUT/.sweep.lock: two sweeps never write into one directory."""
    with open_lock_file(out / ".sweep.lock") as fh:
        if fcntl is not None:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise CLIError(f"another nup sweep is running in {out}") from None
        yield


def run_sweep(sweep: Sweep, out_dir: str | Path, jobs: int = 1, resume: bool = False,
              progress: bool = True, checkpoint_every: int = 0) -> Path:
    """Run every grid point of ``sweep`` under ``out_dir``; returns the path of results.csv.

    Every grid point is validated before any run starts. Finished runs (summary.json present)
    are skipped with ``resume``; without it, a directory that already holds finished runs is an
    error. With ``resume``, a run with a checkpoint (written every ``checkpoint_every`` steps)
    continues from it; other run directories are cleared and run again. A failed run leaves error.json and
    a "failed" row, and its error is printed to stderr; it does not stop the sweep. results.csv
    is rebuilt from the run directories when the sweep starts and when it ends.
    """
    from tqdm.auto import tqdm

    specs = expand_grid(sweep)
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    out = Path(out_dir)
    runs_dir = inside(out, "runs")
    if not resume and any(runs_dir.glob("*/summary.json")):
        raise CLIError(f"{out} already holds finished runs: pass --resume to continue that sweep, "
                       "or choose another --out")
    runs_dir.mkdir(parents=True, exist_ok=True)
    results = out / "results.csv"
    with _exclusive(out):
        for stale in out.glob(".*.tmp"):  # a write of nup.io interrupted by a kill
            stale.unlink()
        write_json_atomic(out / "sweep.json", {
            "name": sweep.name, "source": sweep.source, "base": sweep.base, "grid": sweep.grid,
            "runs": [{"run_id": s.run_id, **s.params} for s in specs]})
        write_results(results, sweep, specs, runs_dir)
        todo = [s for s in specs if run_status(runs_dir / s.run_id)[0] in ("pending", "failed")]
        failed = 0
        with tqdm(total=len(specs), initial=len(specs) - len(todo), desc=sweep.name, unit="run",
                  disable=None if progress else True) as bar:
            for spec, status in _execute_all(todo, runs_dir, jobs, checkpoint_every, resume):
                if status == "failed":
                    failed += 1
                    error = json.loads((runs_dir / spec.run_id / "error.json").read_text(encoding="utf-8"))
                    tqdm.write(f"run {spec.run_id} failed: {error['error']}", file=sys.stderr)
                    bar.set_postfix(failed=failed)
                bar.update()
        write_results(results, sweep, specs, runs_dir)
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """CONFIG and the sweep options."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EXAMPLE
    parser.add_argument("config", metavar="CONFIG", help="sweep config (TOML) with [base] and [grid] tables")
    parser.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="runs in parallel, one worker process each (default: %(default)s)")
    parser.add_argument("--resume", action="store_true",
                        help="skip finished runs; continue unfinished and failed ones from their last checkpoint "
                             "(from scratch when they have none)")
    parser.add_argument("--checkpoint-every", type=int, default=100, metavar="N",
                        help="each run writes a checkpoint every N steps, removed when it finishes; 0: none "
                             "(default: %(default)s)")
    parser.add_argument("--out", default=None, metavar="DIR", help="output directory (default: sweeps/NAME)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override a config value, as TOML: --set base.steps=50 --set 'grid.lr=[0.1,0.3]'"
                             " (repeatable)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the config and list the runs; run nothing")


def main(args: argparse.Namespace) -> int:
    """Run (or list, with --dry-run) the sweep; exit code 1 if any run failed."""
    sweep = load_sweep(args.config, args.overrides)
    out = Path(args.out) if args.out else Path("sweeps") / _slug(sweep.name)
    if args.dry_run:
        specs = expand_grid(sweep)
        for spec in specs:
            print(spec.run_id)
        print(f"{len(specs)} runs -> {out / 'runs'}")
        return 0
    if args.checkpoint_every < 0:
        raise CLIError(f"--checkpoint-every must be >= 0, got {args.checkpoint_every}")
    results = run_sweep(sweep, out, jobs=args.jobs, resume=args.resume, checkpoint_every=args.checkpoint_every)
    counts: dict[str, int] = {}
    for row in read_results(results):
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    print(", ".join(f"{n} {status}" for status, n in sorted(counts.items())) + f" -> {results}")
    return 1 if counts.get("failed") or counts.get("pending") else 0
