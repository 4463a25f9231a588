"""Data for ``nup train``: the UCI digits (bundled with scikit-learn) and a teacher–student task.

Every loader returns ``(x_train, y_train, x_test, y_test)``: inputs float32 of shape
``(n, d)``, labels int64 class indices of shape ``(n,)``.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

Split = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, test)``: each class contributes ``round(n_c · test_fraction)`` test samples.

    Both index arrays are sorted, so the split depends only on ``labels`` and ``seed``.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        test.append(rng.permutation(idx)[: int(round(len(idx) * test_fraction))])
    test_idx = np.sort(np.concatenate(test))
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    return train_idx, test_idx


def _standardize(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Zero mean, unit variance per feature, with the train statistics (constant features -> 0)."""
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return (x_train - mean) / std, (x_test - mean) / std


def _to_torch(x: np.ndarray, y: np.ndarray, device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.as_tensor(x, dtype=torch.float32, device=device),
            torch.as_tensor(y, dtype=torch.int64, device=device))


def load_digits_split(seed: int = 0, test_fraction: float = 0.2, device: str | torch.device = "cpu") -> Split:
    """The 1,797 UCI 8×8 digits, stratified into train/test: x of shape (n, 64), 10 classes.

    Inputs are standardized with the train set's per-pixel mean and std. Needs scikit-learn
    (it ships the data; nothing is downloaded).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError(
            "the digits data set needs scikit-learn: run `pip install -e .[data]` or use --data teacher"
        ) from None
    x, y = load_digits(return_X_y=True)
    train_idx, test_idx = stratified_split(y, test_fraction, seed)
    x_train, x_test = _standardize(x[train_idx].astype(np.float64), x[test_idx].astype(np.float64))
    return (*_to_torch(x_train, y[train_idx], device), *_to_torch(x_test, y[test_idx], device))


def teacher_student(
    n_train: int = 4096,
    n_test: int = 1024,
    dim: int = 32,
    seed: int = 0,
    device: str | torch.device = "cpu",
    n_classes: int = 10,
    hidden: int = 64,
) -> Split:
    """A classification task labelled by a fixed random teacher MLP.

    Inputs are ``N(0, I_dim)``. The teacher is ``dim -> hidden -> n_classes`` with tanh and
    ``N(0, 1/fan_in)`` weights; the label is the argmax of its logits after each logit is
    centred by its mean over all ``n_train + n_test`` samples, which keeps the classes roughly
    balanced. Everything is drawn from one ``torch.Generator`` seeded with ``seed`` on CPU, so
    the task is identical on every device. (With ``--loss mse`` the trainer regresses one-hot
    targets of these labels.)
    """
    if min(n_train, n_test, dim, n_classes, hidden) < 1:
        raise ValueError("teacher_student: n_train, n_test, dim, n_classes and hidden must be positive")
    gen = torch.Generator().manual_seed(seed)
    w1 = torch.randn(hidden, dim, generator=gen) / dim**0.5
    w2 = torch.randn(n_classes, hidden, generator=gen) / hidden**0.5
    x = torch.randn(n_train + n_test, dim, generator=gen)
    logits = torch.tanh(x @ w1.T) @ w2.T
    y = (logits - logits.mean(dim=0)).argmax(dim=1)
    x, y = x.to(device), y.to(device)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator, skip: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless minibatches ``(x[idx], y[idx])``, each epoch a fresh permutation without replacement.

    ``generator`` is a CPU generator; the sequence depends only on its seed. Every batch has
    ``min(batch_size, n)`` rows: an epoch's last incomplete batch is dropped. ``skip`` starts at
    batch ``skip`` of that sequence (a resumed run's data order), drawing only the permutations.
    """
    n = x.shape[0]
    if batch_size < 1 or n < 1:
        raise ValueError(f"batches: need batch_size >= 1 and a non-empty data set, got {batch_size}, n={n}")
    size = min(batch_size, n)
    per_epoch = n // size
    for _ in range(skip // per_epoch):
        torch.randperm(n, generator=generator)
    first = skip % per_epoch
    while True:
        perm = torch.randperm(n, generator=generator).to(x.device)
        for start in range(first * size, n - size + 1, size):
            idx = perm[start:start + size]
            yield x[idx], y[idx]
        first = 0
