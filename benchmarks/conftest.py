"""pytest set-up of the benchmark suites: collection of ``bench_*.py``, options, skip records.

Run them with ``pytest benchmarks/`` (the root config only collects ``tests/``) or through
``nup bench``. Options:

- ``--nup-quick``: tiny shapes and few rounds, to prove the suites work (CI);
- ``--nup-depths 4,16`` / ``--nup-batches 32,256``: restrict the step grid;
- ``--nup-skip 64x2048``: drop ``depth x batch`` step cases (comma-separated);
- ``--nup-budget SECONDS``: timed seconds per benchmark (rounds are chosen to fit);
- ``--nup-threads N``: torch CPU threads (with other work on a small machine, one thread per
  process avoids the stalls of a descheduled OpenMP thread);
- ``--nup-skips-json PATH``: write every skipped benchmark and its reason to PATH.
"""

from __future__ import annotations

import json
from pathlib import Path

import common
import pytest
import torch


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("nup", "nup benchmark suites")
    group.addoption("--nup-quick", action="store_true", help="tiny shapes and few rounds (CI smoke run)")
    group.addoption("--nup-depths", default="", help="comma-separated depths of the step suite")
    group.addoption("--nup-batches", default="", help="comma-separated batch sizes of the step suite")
    group.addoption("--nup-skip", default="", help="comma-separated DEPTHxBATCH step cases to leave out")
    group.addoption("--nup-budget", type=float, default=None, help="timed seconds per benchmark")
    group.addoption("--nup-skips-json", default=None, help="write skipped benchmarks and reasons here")
    group.addoption("--nup-threads", type=int, default=None, help="torch CPU threads (default: torch's own)")


def pytest_configure(config: pytest.Config) -> None:
    threads = config.getoption("--nup-threads", default=None)
    if threads:
        torch.set_num_threads(threads)


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Module | None:
    """Collect ``bench_*.py`` as test modules (paths passed explicitly are collected by pytest itself)."""
    is_bench = file_path.suffix == ".py" and file_path.name.startswith("bench_")
    if is_bench and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture(scope="session")
def bench_options(pytestconfig: pytest.Config) -> dict:
    """Timing options and the step grid: see :func:`common.options_from`."""
    return common.options_from(pytestconfig)


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    machine_info["nup"] = common.machine_info()


_SKIPPED: list[dict[str, str]] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _SKIPPED.append({"test": report.nodeid, "reason": reason.removeprefix("Skipped: ")})


def pytest_sessionfinish(session: pytest.Session) -> None:
    path = session.config.getoption("--nup-skips-json")
    if path:
        Path(path).write_text(json.dumps(_SKIPPED, indent=1))
