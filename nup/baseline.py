"""Plain baselines on ``nup train``'s digits split: scikit-learn's LogisticRegression or MLPClassifier (Adam).

The split, the standardization and the test set are exactly ``nup train --data digits``'s
(:func:`nup.data.load_digits_split` with seed 0), so the accuracies compare one to one. Prints
the test accuracy; ``--out DIR`` also writes ``DIR/summary.json``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

MODELS = ("logreg", "mlp")


def run_baseline(model: str = "mlp", seed: int = 0, hidden: tuple[int, ...] = (256, 256)) -> dict[str, Any]:
    """Fit ``model`` on the digits train split; returns test accuracy, train accuracy and the settings.

    ``mlp``: ``MLPClassifier(hidden, solver="adam", max_iter=500, random_state=seed)``;
    ``logreg``: ``LogisticRegression(max_iter=5000)`` (deterministic, ``seed`` unused).
    Raises ValueError for an unknown model, ImportError without scikit-learn.
    """
    if model not in MODELS:
        raise ValueError(f"unknown baseline {model!r}; choose one of {', '.join(MODELS)}")
    from nup.data import load_digits_split

    x_train, y_train, x_test, y_test = (t.numpy() for t in load_digits_split(seed=0))
    if model == "mlp":
        from sklearn.neural_network import MLPClassifier

        clf = MLPClassifier(hidden_layer_sizes=hidden, solver="adam", max_iter=500, random_state=seed)
    else:
        from sklearn.linear_model import LogisticRegression

        clf = LogisticRegression(max_iter=5000)
    start = time.perf_counter()
    clf.fit(x_train, y_train)
    return {"model": model, "seed": seed, "hidden": list(hidden) if model == "mlp" else None,
            "test_acc": float(clf.score(x_test, y_test)), "train_acc": float(clf.score(x_train, y_train)),
            "fit_time_s": time.perf_counter() - start, "n_train": int(len(y_train)), "n_test": int(len(y_test))}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="mlp", help=f"{' | '.join(MODELS)} (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="MLPClassifier's random_state (default: %(default)s)")
    parser.add_argument("--out", default=None, help="write DIR/summary.json too (default: print only)")


def main(args: argparse.Namespace) -> int:
    from nup.cli import CLIError
    from nup.io import write_json_atomic

    try:
        summary = run_baseline(args.model, args.seed)
    except ImportError:
        raise CLIError("the baselines need scikit-learn: run `pip install -e .[data]`") from None
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "summary.json", summary)
    print(f"{args.model}: test acc {summary['test_acc']:.4f}, train acc {summary['train_acc']:.4f}, "
          f"{summary['fit_time_s']:.1f} s")
    return 0
