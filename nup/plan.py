"""``nup plan``: the memory a NuMLP + NuP configuration needs, before allocating it.

For a configuration (depth, m, width offset k0, parameterization, dtype, batch) it prints the
parameter count and, on each path (drop-in ``opt.step()`` and the fused in-backward update), the
bytes of the weights W, the cumulative update C (or P₀ with ``--cumulative init``), the gradients G
and the activations saved for the backward, whether the total fits one GPU of ``--gpu-gb``
(less ``--reserve`` for the CUDA context and allocator), and the FSDP2 shard count that would.

What each path holds (measured on CPU by ``tests/test_plan.py``):

- W and C (or P₀): ``P`` elements each, in the parameter dtype (P₀ only in fp32).
- G: drop-in keeps every ``.grad`` (``P`` elements); fused never writes ``.grad``: the small-batch
  (Gram) update holds no G, the materialized one one layer's at a time.
- activations: every layer saves its input, ``B·Σ_{k<L} n_k`` elements, plus ``B·Σ_{0<k<L} n_k`` for
  the pre-activations when φ' cannot be read from φ's output (tanh, GELU, ...); fused also keeps the
  output ``B·n_L``.
- On CPU at small batch the fused path runs autograd's own ops with W detached
  (:func:`nup.fused.autograd_route`): it writes no ``.grad``, saves no output, holds each layer's ``δ``
  (``B·n_k``) until the backward pass ends and forms one layer's G at a time in one shared buffer.
- a base optimizer (wrapper mode) adds its state: momentum ``P``, Adam ``2P``, in fp32.
- FSDP2 over N ranks shards W, C, G and the optimizer state (÷N) and splits the global batch (÷N);
  each rank also holds the gathered full weight of the largest layer twice (current and prefetched)
  and, on the drop-in path, its full gradient before the reduce-scatter.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
PATHS = ("dropin", "fused")
BASE_STATE = {"none": 0, "sgd": 0, "momentum": 1, "adam": 2}
MAX_SHARDS = 4096


@dataclass(frozen=True)
class PathPlan:
    """Bytes on one path; ``shards`` is the least FSDP2 rank count that fits (None: none up to MAX_SHARDS)."""

    path: str
    weights: int
    cumulative: int
    grads: int
    activations: int
    optimizer_state: int
    total: int
    fits: bool
    shards: int | None


def plan(depth: int, m: int, *, width_offset: int = 0, parameterization: str = "nup", batch: int = 64,
         dtype: str = "fp32", in_features: int = 64, out_features: int = 10, activation: str = "relu",
         cumulative: str = "delta", base: str = "none", bias: bool = False, gpu_gb: float = 141.0,
         reserve: float = 0.1, gram: bool = True, width_schedule: str | None = None) -> dict[str, Any]:
    """The memory plan of one configuration: ``{"widths", "params", "paths": {path: PathPlan}, ...}``."""
    from nup.theory import layout_of
    from nup_kernels.activations import get_activation

    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPE_BYTES)}")
    if cumulative not in ("delta", "init"):
        raise ValueError(f"cumulative must be delta or init, got {cumulative!r}")
    if cumulative == "init" and dtype != "fp32":
        raise ValueError("cumulative init stores P_0 and needs fp32 parameters (W − P_0 cancels in 16-bit)")
    if base not in BASE_STATE:
        raise ValueError(f"unknown base {base!r}; choose one of {', '.join(BASE_STATE)}")
    if batch < 1 or gpu_gb <= 0 or not 0 <= reserve < 1:
        raise ValueError("batch must be >= 1, gpu_gb > 0 and reserve in [0, 1)")
    widths = layout_of(depth, m, in_features=in_features, out_features=out_features, width_offset=width_offset,
                       parameterization=parameterization, activation=activation,
                       width_schedule=width_schedule).widths
    layer_sizes = [a * b for a, b in zip(widths[:-1], widths[1:])]
    n_params = sum(layer_sizes) + (sum(widths[1:-1]) if bias else 0)
    b = DTYPE_BYTES[dtype]
    saved = sum(widths[:-1])
    if not get_activation(activation).grad_from_output:
        saved += sum(widths[1:-1])
    usable = gpu_gb * 1e9 * (1 - reserve)
    paths = {}
    for path in PATHS if base == "none" else ("dropin",):  # fused is νP-SGD mode only
        if path == "dropin":
            grads, grad_layer = n_params * b, max(layer_sizes) * b
        else:
            grads = grad_layer = 0 if gram else max(layer_sizes) * b
        acts = batch * (saved + (widths[-1] if path == "fused" else 0)) * b
        state = 4 * BASE_STATE[base] * n_params
        sharded = n_params * b + n_params * (4 if cumulative == "init" else b) + grads + state
        total = sharded + acts
        gathered = 2 * max(layer_sizes) * b + (grad_layer if path == "dropin" else 0)
        shards = next((n for n in range(1, MAX_SHARDS + 1)
                       if sharded / n + acts / min(n, batch) + (gathered if n > 1 else 0) <= usable), None)
        paths[path] = PathPlan(path, n_params * b, n_params * (4 if cumulative == "init" else b), grads, acts,
                               state, total, total <= usable, shards)
    return {"depth": depth, "m": m, "width_offset": width_offset, "parameterization": parameterization,
            "dtype": dtype, "batch": batch, "widths": widths, "params": n_params, "largest_layer": max(layer_sizes),
            "gpu_gb": gpu_gb, "reserve": reserve, "cumulative": cumulative, "paths": paths}


def human(n_bytes: float) -> str:
    """Bytes in GB/MB/kB (powers of 1000), 3 significant digits."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= size:
            return f"{n_bytes / size:.3g} {unit}"
    return f"{int(n_bytes)} B"


def count(n: int) -> str:
    """A parameter count in k/M/G (powers of 1000), 3 significant digits."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return str(n)


def table(plans: list[dict[str, Any]]) -> str:
    """A Markdown table: one row per configuration and path."""
    head = ("| depth | m | k0 | dtype | batch | params | widest | path | W | C/P₀ | G | activations | total | "
            "fits 1 GPU | FSDP2 shards |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for p in plans:
        for path in p["paths"].values():
            shards = "none fits" if path.shards is None else str(path.shards)
            lines.append(f"| {p['depth']} | {p['m']} | {p['width_offset']} | {p['dtype']} | {p['batch']} | "
                         f"{count(p['params'])} | {max(p['widths'][1:-1]):,} | {path.path} | {human(path.weights)} | "
                         f"{human(path.cumulative)} | {human(path.grads)} | {human(path.activations)} | "
                         f"{human(path.total)} | {'yes' if path.fits else 'no'} | {shards} |")
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The configuration flags (comma-separated depths give one row each) and --out."""
    def ints(text: str) -> list[int]:
        try:
            return [int(t) for t in text.split(",") if t.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None

    parser.add_argument("--depth", type=ints, default=[64], help="depth L, or several: 64,128,256 (default: 64)")
    parser.add_argument("--m", type=int, default=1, help="base width m (default: %(default)s)")
    parser.add_argument("--width-offset", type=int, default=3, help="width offset k0 (default: %(default)s)")
    parser.add_argument("--parameterization", default="nup", help="nup | sp | sp_inv_depth (default: %(default)s)")
    parser.add_argument("--width-schedule", default=None, help="quadratic | linear | constant (default: the "
                                                               "parameterization's own)")
    parser.add_argument("--dtype", default="fp32", help=f"{' | '.join(DTYPE_BYTES)} (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=64, help="global batch size (default: %(default)s)")
    parser.add_argument("--in-features", type=int, default=64, help="input width n_0 (default: %(default)s)")
    parser.add_argument("--out-features", type=int, default=10, help="output width n_L (default: %(default)s)")
    parser.add_argument("--activation", default="relu", help="activation (default: %(default)s)")
    parser.add_argument("--cumulative", default="delta", help="delta (store C) | init (store P₀, fp32 only) "
                                                              "(default: %(default)s)")
    parser.add_argument("--base", default="none", help="none | sgd | momentum | adam: wrapper mode's base "
                                                       "optimizer state, drop-in path only (default: %(default)s)")
    parser.add_argument("--bias", action="store_true", help="hidden-layer biases")
    parser.add_argument("--materialize-g", action="store_true", help="fused path materializes each layer's G "
                                                                     "(large batch) instead of the Gram update")
    parser.add_argument("--gpu-gb", type=float, default=141.0, help="memory of one GPU in GB (default: "
                                                                    "%(default)s, an H200)")
    parser.add_argument("--reserve", type=float, default=0.1, help="fraction of the GPU kept for the CUDA "
                                                                   "context, workspaces and fragmentation "
                                                                   "(default: %(default)s)")
    parser.add_argument("--out", default=None, metavar="FILE", help="also write the table as Markdown to FILE")


def main(args: argparse.Namespace) -> int:
    """Print the table (and write it to --out)."""
    from nup.io import write_text_atomic

    plans = [plan(d, args.m, width_offset=args.width_offset, parameterization=args.parameterization,
                  batch=args.batch, dtype=args.dtype, in_features=args.in_features, out_features=args.out_features,
                  activation=args.activation, cumulative=args.cumulative, base=args.base, bias=args.bias,
                  gpu_gb=args.gpu_gb, reserve=args.reserve, gram=not args.materialize_g,
                  width_schedule=args.width_schedule) for d in args.depth]
    text = table(plans)
    sys.stdout.write(text)
    if args.out:
        write_text_atomic(Path(args.out), text)
    return 0

