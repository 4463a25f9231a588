"""Render a run or sweep directory as report.md and a self-contained report.html.

A run directory holds summary.json (from nup train); a sweep directory holds results.csv (from
nup sweep). Both files come from one list of blocks (headings, paragraphs, tables, figures):
report.md links the figures by relative path, report.html embeds them as base64 PNGs and needs
no other file. A sweep whose lr varies also gets loss_vs_lr.png: the final train loss against
lr, one panel per parameterization and one curve per depth (mean over seeds).
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from nup.cli import CLIError
from nup.io import inside, read_bytes_no_follow, read_json_object, write_bytes_atomic, write_text_atomic
from nup.plots import PLOT_FILES, load_metrics
from nup.sweep import METRICS, read_results

LR_FIGURE = "loss_vs_lr.png"
STYLE = ("body{font-family:sans-serif;max-width:70em;margin:2em auto;padding:0 1em}"
         "table{border-collapse:collapse;margin:1em 0;font-size:.9em}"
         "th,td{border:1px solid #bbb;padding:.2em .5em;text-align:left}th{background:#eee}"
         "img{max-width:100%}figure{margin:1em 0}")


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Table:
    headers: list[str]
    rows: list[list[Any]]


@dataclass(frozen=True)
class Figure:
    path: Path
    caption: str


Block = Heading | Paragraph | Table | Figure


def _number(text: str) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _fmt(value: Any) -> str:
    """A table cell: floats (and float strings) to 4 significant digits, lists joined, None empty."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(_fmt(v) for v in value) if len(value) <= 20 else f"{len(value)} items"
    if isinstance(value, str) and not value.lstrip("-").isdigit() and _number(value) is not None:
        return f"{float(value):.4g}"
    return str(value)


def _sort_key(text: str) -> tuple[int, float, str]:
    number = _number(text)
    return (0, number, "") if number is not None else (1, 0.0, text)


def _figures(directory: Path, exclude: Sequence[str] = ()) -> list[Block]:
    """The PNGs of ``directory`` as figures: a run's in reading order (:data:`nup.plots.PLOT_FILES`, loss
    first), then the rest; symlinks are listed as skipped, never read."""
    order = list(PLOT_FILES.values())
    pngs = sorted((p for p in directory.glob("*.png") if p.name not in exclude),
                  key=lambda p: (order.index(p.name) if p.name in order else len(order), p.name))
    if not pngs:
        return []
    links = [p.name for p in pngs if p.is_symlink()]
    files = [p for p in pngs if not p.is_symlink()]
    blocks: list[Block] = [Heading("Figures"), *(Figure(p, p.stem.replace("_", " ")) for p in files)]
    if links:
        blocks.append(Paragraph(f"Skipped {', '.join(links)}: a symbolic link (a report embeds regular files only)."))
    return blocks


def layer_table(run_dir: Path, tail: float = 0.1) -> list[Block]:
    """End of training, per tensor: the effective lr, cos (last step and mean over the last ``tail``
    of the steps), the update norm and ‖C‖, from metrics.jsonl; nothing when it is missing."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = [r for r in load_metrics(path) if "cos" in r]
    if not records:
        return []
    names = read_json_object(run_dir / "summary.json").get("names")
    last, window = records[-1], records[-max(1, math.ceil(tail * len(records))):]
    rows = []
    for i in range(len(last["cos"])):
        mean_cos = sum(r["cos"][i] for r in window) / len(window)
        rows.append([names[i] if names and i < len(names) else f"layer {i + 1}", last["lr"][i], last["cos"][i],
                     mean_cos, last["update_norm"][i], last["c_norm"][i]])
    text = (f"After step {last['step']}: cos(new update, cumulative update) at the last step and its mean over "
            f"the last {len(window)} steps; update norm ‖ΔP‖ and ‖C‖ = ‖P − P₀‖ at the last step.")
    return [Heading("Per layer at the end of training"), Paragraph(text),
            Table(["tensor", "effective lr", "cos", f"mean cos (last {len(window)})", "update norm", "‖C‖"], rows)]


def run_blocks(run_dir: Path) -> list[Block]:
    """A run directory's report, in reading order: status, final metrics, the figures (loss first),
    the per-layer table at the end of training, the configuration and the other summary entries."""
    summary = read_json_object(run_dir / "summary.json")
    config, config_path = summary.get("config"), run_dir / "config.json"  # config.json: written by nup sweep
    if config is None and config_path.is_file():
        config = read_json_object(config_path)
    status = summary.get("status", "ok")
    if status == "diverged":
        status = f"diverged at step {summary.get('diverged_at_step')}"
    blocks: list[Block] = [Heading(f"Run {run_dir.resolve().name}", 1),
                           Paragraph(f"Status: {status}; {summary.get('steps_done', '?')} steps.")]
    blocks += [Heading("Final metrics"), Table(["metric", "value"], [[m, summary.get(m)] for m in METRICS])]
    blocks += _figures(run_dir) + layer_table(run_dir)
    if isinstance(config, dict):
        blocks += [Heading("Configuration"), Table(["field", "value"], [[k, v] for k, v in config.items()])]
    details = []
    for key, value in summary.items():
        if key in METRICS or key == "config":
            continue
        if isinstance(value, dict):
            details += [[f"{key}.{k}", v] for k, v in value.items()]
        else:
            details.append([key, value])
    return blocks + [Heading("Summary"), Table(["entry", "value"], details)]


def _plot_loss_vs_lr(rows: list[dict[str, str]], curve_keys: list[str], path: Path) -> bool:
    """Final train loss against lr (log x): a panel per parameterization, a curve per ``curve_keys``
    value (mean over the other runs, seeds among them). False when no run has a finite loss."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as MplFigure

    losses: dict[str, dict[tuple[str, ...], dict[float, list[float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list)))
    for row in rows:
        loss, lr = _number(row.get("train_loss")), _number(row["lr"])
        if loss is not None and lr is not None and math.isfinite(loss):
            losses[row.get("parameterization", "")][tuple(row[k] for k in curve_keys)][lr].append(loss)
    if not losses:
        return False
    panels = sorted(losses, key=_sort_key)
    fig = MplFigure(figsize=(4.5 * len(panels), 3.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False, sharex=True, sharey=True)[0]  # panels compare
    for ax, panel in zip(axes, panels, strict=True):
        plotted: list[float] = []
        for curve in sorted(losses[panel], key=lambda c: [_sort_key(v) for v in c]):
            points = sorted(losses[panel][curve].items())
            means = [sum(v) / len(v) for _, v in points]
            label = ", ".join(f"{k}={v}" for k, v in zip(curve_keys, curve, strict=True))
            ax.plot([lr for lr, _ in points], means, marker="o", label=label or None)
            plotted += means
        if min(plotted) > 0 and max(plotted) > 10 * min(plotted):
            ax.set_yscale("log")
        ax.set_xscale("log")
        ax.set_xlabel("lr")
        ax.set_ylabel("final train loss")
        ax.set_title(panel or "all runs")
        if curve_keys:
            ax.legend(fontsize="small")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    write_bytes_atomic(path, buf.getvalue())
    return True


def _best_lr(rows: list[dict[str, str]], group_keys: list[str]) -> list[list[Any]]:
    """Per ``group_keys`` value: the lr with the lowest mean final train loss, that loss, #lrs, and a flag
    when that lr is the smallest or largest tried (the optimum may lie beyond the grid)."""
    means: dict[tuple[str, ...], dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        loss, lr = _number(row.get("train_loss")), _number(row["lr"])
        if loss is not None and lr is not None and math.isfinite(loss):
            means[tuple(row[k] for k in group_keys)][lr].append(loss)
    table = []
    for group in sorted(means, key=lambda g: [_sort_key(v) for v in g]):
        by_lr = {lr: sum(v) / len(v) for lr, v in means[group].items()}
        best = min(by_lr, key=by_lr.__getitem__)
        edge = "" if len(by_lr) < 2 else "lowest lr tried" if best == min(by_lr) else (
            "highest lr tried" if best == max(by_lr) else "")
        table.append([*group, best, by_lr[best], len(by_lr), f"on the grid's edge ({edge})" if edge else ""])
    return table


def sweep_blocks(sweep_dir: Path, figure_dir: Path) -> list[Block]:
    """A sweep directory's report: run counts, grid, results, best lr and loss-vs-lr plot (drawn
    into ``figure_dir`` when lr varies), failed runs' errors, and the top-level PNGs."""
    rows = read_results(sweep_dir / "results.csv")
    meta_path = sweep_dir / "sweep.json"
    meta = read_json_object(meta_path) if meta_path.is_file() else {}
    headers = list(rows[0]) if rows else ["run_id"]
    grid_keys = [h for h in headers if h not in ("run_id", *METRICS, "status")]
    varying = [k for k in grid_keys if len({r[k] for r in rows}) > 1]
    counts: dict[str, int] = defaultdict(int)
    for row in rows:
        counts[row["status"]] += 1
    blocks: list[Block] = [
        Heading(f"Sweep {meta.get('name', sweep_dir.resolve().name)}", 1),
        Paragraph(f"{len(rows)} runs: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
                  + (f". Config: {meta['source']}." if meta.get("source") else "."))]
    if meta.get("base") or meta.get("grid"):
        config = [[f"base.{k}", v] for k, v in meta.get("base", {}).items()]
        config += [[f"grid.{k}", v] for k, v in meta.get("grid", {}).items()]
        blocks += [Heading("Configuration"), Table(["key", "value"], config)]
    blocks += [Heading("Results"), Table(headers, [[row[h] for h in headers] for row in rows])]
    if "lr" in varying:
        group_keys = [k for k in varying if k not in ("lr", "seed")]
        best = _best_lr(rows, group_keys)
        if best:
            edges = sum(1 for row in best if row[-1])
            note = (f" {edges} of {len(best)} optima lie on the grid's edge: the true optimum may be beyond it; "
                    "extend the lr grid there." if edges else "")
            blocks += [Heading("Best learning rate"),
                       Paragraph("The lr with the lowest final train loss (mean over seeds) per group." + note),
                       Table([*group_keys, "best lr", "train loss", "lrs tried", "flag"], best)]
        curve_keys = [k for k in group_keys if k != "parameterization"]
        if _plot_loss_vs_lr(rows, curve_keys, figure_dir / LR_FIGURE):
            blocks += [Heading("Loss against learning rate"),
                       Figure(figure_dir / LR_FIGURE, "final train loss against lr")]
    failed = []
    for row in rows:
        error_path = inside(sweep_dir, "runs", row["run_id"], "error.json", what="run id")
        if row["status"] == "failed" and error_path.is_file():
            failed.append([row["run_id"], read_json_object(error_path).get("error")])
    if failed:
        blocks += [Heading("Failed runs"), Table(["run_id", "error"], failed)]
    return blocks + _figures(sweep_dir, exclude=[LR_FIGURE])


def _md_text(text: str) -> str:
    """Text for Markdown: raw HTML and link brackets escaped, so names render as they are written."""
    return html.escape(text, quote=False).replace("[", "\\[").replace("]", "\\]")


def _md_cell(value: Any) -> str:
    return _md_text(_fmt(value)).replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: Sequence[Block], base: Path) -> str:
    """Markdown; figure links are relative to ``base`` (the report's directory)."""
    parts = []
    for block in blocks:
        if isinstance(block, Heading):
            parts.append("#" * block.level + " " + _md_text(block.text))
        elif isinstance(block, Paragraph):
            parts.append(_md_text(block.text))
        elif isinstance(block, Table):
            lines = ["| " + " | ".join(_md_cell(h) for h in block.headers) + " |",
                     "|" + "---|" * len(block.headers)]
            lines += ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in block.rows]
            parts.append("\n".join(lines))
        else:
            link = quote(Path(os.path.relpath(block.path, base)).as_posix())
            parts.append(f"![{_md_text(block.caption)}]({link})")
    return "\n\n".join(parts) + "\n"


def render_html(blocks: Sequence[Block], title: str) -> str:
    """One HTML page with inline CSS and the figures embedded as base64 data URIs."""
    esc = html.escape
    parts = []
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"<h{block.level}>{esc(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            parts.append(f"<p>{esc(block.text)}</p>")
        elif isinstance(block, Table):
            head = "".join(f"<th>{esc(_fmt(h))}</th>" for h in block.headers)
            body = "".join("<tr>" + "".join(f"<td>{esc(_fmt(v))}</td>" for v in row) + "</tr>"
                           for row in block.rows)
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        else:
            data = base64.b64encode(read_bytes_no_follow(block.path)).decode("ascii")
            parts.append(f'<figure><img alt="{esc(block.caption)}" src="data:image/png;base64,{data}">'
                         f"<figcaption>{esc(block.caption)}</figcaption></figure>")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{STYLE}</style></head>\n<body>\n" + "\n".join(parts) + "\n</body></html>\n")


def write_report(directory: str | Path, out: str | Path | None = None) -> tuple[Path, Path]:
    """Write the report of a run or sweep ``directory``; returns (report.md, report.html).

    ``out`` is the Markdown path (default DIRECTORY/report.md); the HTML goes next to it with
    the suffix .html. Raises CLIError when ``directory`` holds neither summary.json nor
    results.csv.
    """
    directory = Path(directory)
    md_path = Path(out) if out is not None else directory / "report.md"
    html_path = md_path.with_suffix(".html")
    if md_path == html_path:
        raise CLIError(f"--out {md_path} names the Markdown file; the HTML is written next to it")
    is_run, is_sweep = (directory / "summary.json").is_file(), (directory / "results.csv").is_file()
    if not (is_run or is_sweep):
        raise CLIError(f"{directory} is neither a run directory (no summary.json) "
                       "nor a sweep directory (no results.csv)")
    md_path.parent.mkdir(parents=True, exist_ok=True)
    blocks = run_blocks(directory) if is_run else sweep_blocks(directory, md_path.parent)
    write_text_atomic(md_path, render_markdown(blocks, md_path.parent))
    write_text_atomic(html_path, render_html(blocks, blocks[0].text))
    return md_path, html_path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """DIR and --out."""
    parser.add_argument("dir", metavar="DIR",
                        help="a run directory (with summary.json) or a sweep directory (with results.csv)")
    parser.add_argument("--out", default=None, metavar="FILE",
                        help="the Markdown report (default: DIR/report.md); the HTML goes next to it")


def main(args: argparse.Namespace) -> int:
    """Write the report and print where."""
    md_path, html_path = write_report(args.dir, args.out)
    print(f"wrote {md_path} and {html_path}")
    return 0
