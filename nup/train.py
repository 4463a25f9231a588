"""Train a νP MLP and write metrics.jsonl, summary.json and PNG plots to an output directory.

The default run trains a depth-4 MLP with offset quadratic widths 16·(k + 2)² (SPEC §2: 144,
256, 400) on the UCI handwritten digits bundled with scikit-learn, 500 steps of batch 256, with
the geometry-aware learning-rate schedule (the random-walk test,
:class:`nup.schedule.RandomWalkLR`) at base lr 0.2, in seconds on one CPU core.
metrics.jsonl holds one JSON object per step: the minibatch loss and accuracy, the lr multiplier λ
applied at that step (mean over layers) and, per layer in the order of summary.json's "names", the
effective lr, cos(new update, cumulative update), the update norm and ‖C‖ = ‖P − P₀‖; eval steps add
the test loss and accuracy. summary.json is written last: its presence marks a finished run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from nup import distributed
from nup.checkpoint import CHECKPOINT, load_checkpoint, restore, save_checkpoint
from nup.data import batches, load_digits_split, teacher_student
from nup.io import append_jsonl, open_append_text, open_new_text, write_json_atomic
from nup.plots import plot_run
from nup.schedule import SCHEDULES

DATA_SETS = ("digits", "teacher")
LOSSES = ("ce", "mse")
BASES = ("none", "sgd", "momentum", "adam")
EFFECTIVE_PROBE = 256
"""Train inputs whose cosines set ``--depth-normalizer effective``'s divisor."""
BIAS_SIGMA_B2 = 0.05  # σ_b² of the EOC point used with --bias (a·s + b·|s| has an EOC only at σ_b = 0)


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """One training run; every field is also a ``nup train`` flag (underscores -> dashes)."""

    data: str = _opt("digits", f"data set: {' | '.join(DATA_SETS)} (teacher: N(0,1) inputs in 32 dims, "
                               "10 classes labelled by a fixed random tanh MLP)")
    depth: int = _opt(4, "number of weight layers L (>= 2)")
    m: int = _opt(16, "width multiplier: hidden widths m·k² (quadratic), m·k (linear) or m (constant)")
    width_schedule: str | None = _opt(None, "quadratic | linear | constant; unset: the parameterization's own")
    width_offset: int = _opt(2, "k0 >= 0: hidden widths follow the schedule at k + k0 (m·(k + k0)² under quadratic)")
    depth_normalizer: str = _opt("none", "none | harmonic (hidden update scales divided by T_hidden(L) = "
                                         "Σ_{k=2}^{L-1} ρ_k: the hidden block moves like one layer at any depth) | "
                                         "effective (divided by Σ_{k≥2} e_k·ρ_k, each layer's minibatch efficiency "
                                         f"at init from the first {EFFECTIVE_PROBE} train inputs)")
    activation: str = _opt("relu", "relu | abs | identity | tanh | gelu | silu | leaky_relu[:SLOPE] | "
                                   "linear_abs:A,B")
    parameterization: str = _opt("nup", "nup | sp | sp_inv_depth")
    lr: float = _opt(0.2, "base learning rate η (> 0); the schedule multiplies it")
    schedule: str = _opt("geometry", f"lr multiplier schedule: {' | '.join(SCHEDULES)} "
                                     "(warmup*: 10%% of the steps of linear warm-up)")
    steps: int = _opt(500, "number of optimizer steps")
    batch_size: int = _opt(256, "minibatch size (sampled without replacement within each epoch)")
    seed: int = _opt(0, "seed of the initialization and the batch order (the data and split are fixed)")
    device: str = _opt("cpu", "torch device: cpu, cuda, cuda:1, ...")
    max_width: int | None = _opt(None, "cap on every hidden width (a capped run says so in summary.json)")
    bias: bool = _opt(False, f"hidden-layer biases, at the EOC point σ_b² = {BIAS_SIGMA_B2} (needs a smooth "
                             "activation: tanh, gelu, silu)")
    loss: str = _opt("ce", "ce (cross-entropy) | mse (0.5·‖f − onehot(y)‖², mean over the batch)")
    base: str = _opt("none", "direction before normalization: none (the gradient) | sgd | momentum "
                             "(SGD, momentum 0.9) | adam")
    eval_every: int = _opt(25, "evaluate the test set every this many steps (and after the last one)")
    fused: bool = _opt(False, "apply each layer's update inside the backward pass (base none only)")
    nproc: int = _opt(1, "data-parallel processes, through torchrun (gloo on CPU, NCCL on CUDA); each takes an "
                         "equal slice of every batch")

    @classmethod
    def fields(cls) -> list[str]:
        """The field names, in declaration order."""
        return [f.name for f in dataclasses.fields(cls)]

    def validate(self) -> None:
        """Raise ValueError naming the first bad value."""
        from nup.parameterization import (
            DEFAULT_WIDTH_LIMIT,
            DEPTH_NORMALIZERS,
            PARAMETERIZATIONS,
            WIDTH_SCHEDULES,
            resolve_parameterization,
        )
        from nup.theory import EFFECTIVE
        from nup_kernels.activations import get_activation

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        for f in dataclasses.fields(self):  # TOML and the Python API can pass any type
            need(_has_type(getattr(self, f.name), f.type), _TYPE_ERRORS[f.type.removesuffix(" | None")].format(
                 name=f.name, value=getattr(self, f.name)))
        need(self.data in DATA_SETS, f"unknown data {self.data!r}; choose one of {', '.join(DATA_SETS)}")
        need(self.depth >= 2, f"depth must be >= 2, got {self.depth}")
        need(self.m >= 1, f"m must be >= 1, got {self.m}")
        need(self.width_schedule is None or self.width_schedule in WIDTH_SCHEDULES,
             f"unknown width schedule {self.width_schedule!r}; choose one of {', '.join(WIDTH_SCHEDULES)}")
        need(isinstance(self.width_offset, int) and not isinstance(self.width_offset, bool) and self.width_offset >= 0,
             f"width_offset must be an integer >= 0, got {self.width_offset!r}")
        need(self.depth_normalizer in (*DEPTH_NORMALIZERS, EFFECTIVE),
             f"unknown depth_normalizer {self.depth_normalizer!r}; choose one of "
             f"{', '.join((*DEPTH_NORMALIZERS, EFFECTIVE))}")
        act = get_activation(self.activation)
        need(not (self.bias and act.is_linear_abs),
             f"bias needs a smooth activation (tanh, gelu, silu): {act} has an EOC only at σ_b = 0")
        choices = ", ".join(PARAMETERIZATIONS)
        need(self.parameterization in PARAMETERIZATIONS,
             f"unknown parameterization {self.parameterization!r}; choose one of {choices}")
        need(math.isfinite(self.lr) and self.lr > 0,
             f"lr must be a positive finite number, got {self.lr!r}")
        need(self.schedule in SCHEDULES,
             f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        need(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(self.seed >= 0, f"seed must be >= 0, got {self.seed}")
        try:
            device = torch.device(self.device)
        except RuntimeError:
            raise ValueError(f"unknown device {self.device!r}; write cpu, cuda or cuda:N") from None
        need(device.type in ("cpu", "cuda"), f"device {self.device!r}: write cpu, cuda or cuda:N")
        need(device.type != "cuda" or torch.cuda.is_available(), f"device {self.device!r}: no CUDA available")
        need(self.max_width is None or self.max_width >= 1,
             f"max_width must be a positive integer, got {self.max_width!r}")
        widest = max(resolve_parameterization(self.parameterization, self.m, self.width_schedule)
                     .hidden_widths(self.depth, self.width_offset))
        need(self.max_width is not None or widest <= DEFAULT_WIDTH_LIMIT,
             f"hidden width {widest} exceeds {DEFAULT_WIDTH_LIMIT}; set max_width to cap the widths, "
             "or lower m or depth")
        need(self.loss in LOSSES, f"unknown loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        need(self.base in BASES, f"unknown base {self.base!r}; choose one of {', '.join(BASES)}")
        need(self.eval_every >= 1, f"eval_every must be >= 1, got {self.eval_every}")
        need(not (self.fused and self.base != "none"), f"fused updates need base none, got {self.base!r}")
        need(isinstance(self.nproc, int) and self.nproc >= 1 and self.batch_size % self.nproc == 0,
             f"nproc must be >= 1 and divide batch_size {self.batch_size}, got {self.nproc!r}")
        need(not (self.fused and self.nproc > 1), "fused updates run inside backward, before DDP averages the "
                                                  "gradients: use --no-fused with --nproc > 1")


_TYPE_ERRORS = {"int": "{name} must be an integer, got {value!r}",
                "bool": "{name} must be true or false, got {value!r}",
                "str": "{name} must be a string, got {value!r}",
                "float": "{name} must be a number, got {value!r}"}


def _has_type(value: Any, hint: str) -> bool:
    """Whether ``value`` fits a TrainConfig annotation (``"int"``, ``"str | None"``, …); a bool is no number."""
    if hint.endswith(" | None") and value is None:
        return True
    kind = hint.removesuffix(" | None")
    if kind == "bool":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    return isinstance(value, {"int": int, "float": (int, float), "str": str}[kind])


def _loss_fn(kind: str, n_classes: int):
    if kind == "ce":
        return F.cross_entropy

    def mse(f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 0.5 * (f - F.one_hot(y, n_classes).to(f.dtype)).pow(2).sum(dim=1).mean()

    return mse


def _load_data(config: TrainConfig, device: torch.device):
    if config.data == "digits":
        return load_digits_split(seed=0, device=device)
    return teacher_student(seed=0, device=device)


def _prepare_out_dir(out_dir: str | Path) -> Path:
    """Create ``out_dir``, check that it is writable and drop a stale summary.json (its finished mark).

    Raises OSError with a one-line message when the directory cannot be written.
    """
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
        (out / "summary.json").unlink(missing_ok=True)
    except OSError as err:
        raise OSError(f"output directory {str(out)!r} is not writable: {err.strerror or err}") from None
    return out


def _build_optimizer(model: torch.nn.Module, config: TrainConfig):
    from nup import NuP, make_schedule

    base = None
    params = list(model.parameters())
    if config.base == "sgd":
        base = torch.optim.SGD(params, lr=1.0)
    elif config.base == "momentum":
        base = torch.optim.SGD(params, lr=1.0, momentum=0.9)
    elif config.base == "adam":
        base = torch.optim.Adam(params, lr=1.0)
    warmup = config.steps // 10 if config.schedule.startswith("warmup") else 0
    schedule = make_schedule(config.schedule, total_steps=config.steps, warmup=warmup)
    kwargs = {"fused": True} if config.fused else {}
    return NuP(model.named_parameters(), lr=config.lr, base=base, schedule=schedule, **kwargs)


def _tensorboard(out: Path, start: int):
    """A SummaryWriter on OUT/tensorboard that drops events from ``start`` on (a resumed run rewrites them)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ImportError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(str(out / "tensorboard"), purge_step=start or None)


def _log_row(board, row: dict[str, Any], names: list[str]) -> None:
    """One metrics.jsonl row as scalars: ``train/loss``, ``test/acc``, ``nup/cos/<name>``, ..."""
    step = row["step"]
    for key in ("loss", "acc", "lr_mult", "test_loss", "test_acc"):
        if key in row:
            board.add_scalar(key.replace("_", "/", 1) if key.startswith("test") else f"train/{key}", row[key], step)
    for key in ("lr", "cos", "update_norm", "c_norm"):
        for name, value in zip(names, row[key], strict=True):
            board.add_scalar(f"nup/{key}/{name}", value, step)


@torch.no_grad()
def _evaluate(model, loss_fn, x: torch.Tensor, y: torch.Tensor, chunk: int = 4096) -> tuple[float, float]:
    """(mean loss, accuracy) over the whole set, in chunks, with one host sync."""
    total_loss = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device)
    for i in range(0, x.shape[0], chunk):
        f = model(x[i:i + chunk])
        total_loss += loss_fn(f, y[i:i + chunk]) * f.shape[0]
        correct += (f.argmax(dim=1) == y[i:i + chunk]).sum()
    loss, acc = (torch.stack([total_loss, correct]) / x.shape[0]).tolist()
    return loss, acc


def _versions() -> dict[str, str | None]:
    import nup

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    nup_version = getattr(nup, "__version__", None)
    if nup_version is None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            nup_version = version("nup")
        except PackageNotFoundError:
            nup_version = None
    return {"python": platform.python_version(), "torch": torch.__version__, "triton": triton_version,
            "nup": nup_version}


def run_training(config: TrainConfig, out_dir: str | Path, progress: bool = True, checkpoint_every: int = 0,
                 resume: bool = False, tensorboard: bool = False) -> dict:
    """Train one model, write metrics.jsonl, the plots and (last, atomically) summary.json.

    ``checkpoint_every`` > 0 writes OUT/checkpoint.pt (see :mod:`nup.checkpoint`) after every that
    many steps; ``resume`` continues from it when it exists (bit for bit: metrics.jsonl and the
    final model equal the uninterrupted run's), returns the summary of a run of the same config
    that already finished, and else starts at step 0. The checkpoint is removed
    when the run finishes. ``tensorboard`` also logs every metrics.jsonl value to OUT/tensorboard.

    Returns the summary dict. Raises ValueError for a bad config or a checkpoint of another
    config, OSError for an unwritable ``out_dir``, ImportError when the digits need
    scikit-learn (or ``tensorboard`` needs the tensorboard package) and it is missing.
    """
    from tqdm.auto import tqdm

    from nup import NuMLP
    from nup.diagnostics import pairwise_cosines
    from nup.theory import EFFECTIVE, resolve_effective

    t_start = time.perf_counter()
    config.validate()
    if not (isinstance(checkpoint_every, int) and checkpoint_every >= 0):
        raise ValueError(f"checkpoint_every must be an integer >= 0 (0: no checkpoints), got {checkpoint_every!r}")
    finished = Path(out_dir) / "summary.json"
    if resume and finished.is_file() and not (Path(out_dir) / CHECKPOINT).is_file():
        summary = json.loads(finished.read_text(encoding="utf-8"))
        if summary.get("config") == dataclasses.asdict(config):
            return summary  # finished already: nothing to resume
    out = _prepare_out_dir(out_dir)
    device = distributed.init_from_env(config.device)
    x_train, y_train, x_test, y_test = _load_data(config, device)
    n_classes = int(torch.cat([y_train, y_test]).max()) + 1

    torch.manual_seed(config.seed)
    shape = dict(width_schedule=config.width_schedule, width_offset=config.width_offset, activation=config.activation,
                 parameterization=config.parameterization, max_width=config.max_width,
                 sigma_b2=BIAS_SIGMA_B2 if config.bias else 0.0, depth_normalizer=config.depth_normalizer)
    if config.depth_normalizer == EFFECTIVE:  # its divisor from the first EFFECTIVE_PROBE train inputs
        cosines = pairwise_cosines(x_train[:EFFECTIVE_PROBE]).cpu().numpy()
        shape = resolve_effective(shape, config.depth, config.m, cosines, config.batch_size)
    model = NuMLP(x_train.shape[1], n_classes, config.depth, config.m, bias=config.bias, **shape).to(device)
    opt = _build_optimizer(model, config)
    names: list[str] | None = None
    last = {"loss": math.nan, "acc": math.nan}
    start, ckpt_path, ckpt_config = 0, out / CHECKPOINT, dataclasses.asdict(config)
    if resume and ckpt_path.is_file():
        state = load_checkpoint(ckpt_path, ckpt_config, device)
        start = restore(state, model, opt)
        names, last = state["extra"]["names"], state["extra"]["last"]
        if distributed.is_main_process():
            with open(out / "metrics.jsonl", "r+b") as fh:  # drop rows written after the checkpoint
                fh.truncate(state["metrics_bytes"])
    net, main = distributed.wrap_ddp(model), distributed.is_main_process()
    loss_fn = _loss_fn(config.loss, n_classes)
    stream = batches(x_train, y_train, config.batch_size, torch.Generator().manual_seed(config.seed), skip=start)
    board = _tensorboard(out, start) if tensorboard and main else None

    diverged_at: int | None = None
    t_train = time.perf_counter()
    bar = tqdm(total=config.steps, initial=start, desc="nup train", unit="step",
               disable=None if progress and main else True, leave=False)
    log = (open_append_text if start else open_new_text)(out / "metrics.jsonl") if main else open(os.devnull, "w")
    with log as fh, bar:
        for step in range(start, config.steps):
            xb, yb = distributed.local_batch(*next(stream))
            f = net(xb)
            loss = loss_fn(f, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            v = opt.stat_vectors()
            n = len(v["names"])
            names = names or list(v["names"])
            acc = (f.detach().argmax(dim=1) == yb).float().mean()
            head = torch.stack([loss.detach(), acc, v["lr"].float().mean() / config.lr])
            head = distributed.mean_over_ranks(head)  # the same on every rank: all stop together on divergence
            flat = torch.cat([head, *(v[k].float() for k in ("lr", "cos", "update_norm", "c_norm"))])
            vals = flat.tolist()  # the one host sync of this step
            row = {"step": step, "loss": vals[0], "acc": vals[1], "lr_mult": vals[2]}
            for i, key in enumerate(("lr", "cos", "update_norm", "c_norm")):
                row[key] = vals[3 + i * n: 3 + (i + 1) * n]
            last = {"loss": vals[0], "acc": vals[1]}
            if not math.isfinite(vals[0]):
                diverged_at = step
            if (step + 1) % config.eval_every == 0 or step == config.steps - 1 or diverged_at is not None:
                row["test_loss"], row["test_acc"] = _evaluate(model, loss_fn, x_test, y_test)
                bar.set_postfix(loss=f"{vals[0]:.3g}", test_acc=f"{row['test_acc']:.3f}", refresh=False)
            append_jsonl(fh, row)
            if board is not None:
                _log_row(board, row, names)
            bar.update()
            if diverged_at is not None:
                break
            if checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < config.steps and main:
                save_checkpoint(ckpt_path, step=step + 1, model=model, optimizer=opt, config=ckpt_config,
                                metrics_bytes=os.fstat(fh.fileno()).st_size, extra={"names": names, "last": last})
    train_time = time.perf_counter() - t_train
    if board is not None:
        board.close()

    if not main:
        return {}
    train_loss, train_acc = _evaluate(model, loss_fn, x_train, y_train)
    test_loss, test_acc = _evaluate(model, loss_fn, x_test, y_test)
    plots = plot_run(out, names=names, title=f"{config.parameterization}, depth {config.depth}, m {config.m}")
    summary = {
        "status": "diverged" if diverged_at is not None else "ok",
        "diverged_at_step": diverged_at,
        "steps_done": step + 1,
        "train_loss": train_loss,
        "train_acc": train_acc,
        "test_loss": test_loss,
        "test_acc": test_acc,
        "last_batch_loss": last["loss"],
        "last_batch_acc": last["acc"],
        "train_time_s": train_time,
        "wall_time_s": time.perf_counter() - t_start,
        "config": dataclasses.asdict(config),
        "versions": _versions(),
        "widths": list(model.widths),
        "widths_capped": bool(model.capped),
        "hidden_scale_divisor": model.layout.hidden_divisor,
        "names": names,
        "n_params": sum(p.numel() for p in model.parameters()),
        "data": {"name": config.data, "n_train": x_train.shape[0], "n_test": x_test.shape[0],
                 "n_features": x_train.shape[1], "n_classes": n_classes},
        "files": ["metrics.jsonl", *sorted(p.name for p in plots.values()), "summary.json",
                  *(["tensorboard"] if tensorboard else [])],
    }
    write_json_atomic(out / "summary.json", summary)
    ckpt_path.unlink(missing_ok=True)  # the run is finished: summary.json is its mark
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`TrainConfig` field, plus --out and --quiet."""
    types = {"int": int, "float": float, "str": str}
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        text = f.metadata["help"] + " (default: %(default)s)"
        if f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=text)
        else:
            kind = str(f.type).replace(" | None", "")
            parser.add_argument(flag, type=types[kind], default=f.default, metavar=kind.upper(), help=text)
    parser.add_argument("--out", default="runs/train", help="output directory (default: %(default)s)")
    parser.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                        help="write OUT/checkpoint.pt (model, optimizer, schedule, RNG; atomically) every N steps; "
                             "0: never (default: %(default)s)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUT/checkpoint.pt, bit for bit as if never interrupted (starts at "
                             "step 0 when there is none); give the same flags as the interrupted run")
    parser.add_argument("--tensorboard", action="store_true",
                        help="also log every metric to OUT/tensorboard (needs the tensorboard package)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no final line")
    parser.add_argument("--threads", type=int, default=1, metavar="INT",
                        help="torch CPU threads; 1 is fastest for these model sizes, and torch's multi-thread "
                             "pool slows down many-fold when other work shares the cores; 0: torch's default "
                             "(default: %(default)s)")


def main(args: argparse.Namespace) -> int:
    from nup.cli import CLIError

    config = TrainConfig(**{name: getattr(args, name) for name in TrainConfig.fields()})
    if args.threads < 0:
        raise CLIError(f"--threads must be >= 0, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if config.nproc > 1 and not distributed.launched():
        config.validate()
        flags = distributed.to_flags(dataclasses.asdict(config) | {
            "out": args.out, "quiet": args.quiet or None, "checkpoint_every": args.checkpoint_every or None,
            "resume": args.resume or None, "tensorboard": args.tensorboard or None})
        return distributed.launch(["train", *flags], config.nproc)
    try:
        summary = run_training(config, args.out, progress=not args.quiet, checkpoint_every=args.checkpoint_every,
                               resume=args.resume, tensorboard=args.tensorboard)
    except ImportError as err:
        raise CLIError(str(err)) from None
    finally:
        distributed.close()
    if not args.quiet and summary:
        state = "" if summary["status"] == "ok" else f" (diverged at step {summary['diverged_at_step']})"
        print(f"test acc {summary['test_acc']:.4f}, test loss {summary['test_loss']:.4g}, "
              f"train loss {summary['train_loss']:.4g}, {summary['wall_time_s']:.1f} s{state} -> {args.out}")
    return 0
