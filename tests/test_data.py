"""Data loaders of ``nup train``: the stratified digits split, the teacher task, the batch stream."""

import numpy as np
import pytest
import torch

from nup.data import batches, load_digits_split, stratified_split, teacher_student


@pytest.fixture(scope="module")
def digits():
    pytest.importorskip("sklearn")
    return load_digits_split(seed=0)


def test_digits_shapes_and_dtypes(digits):
    x_train, y_train, x_test, y_test = digits
    assert x_train.shape[0] + x_test.shape[0] == 1797
    assert x_train.shape[1] == x_test.shape[1] == 64
    assert x_train.dtype == x_test.dtype == torch.float32
    assert y_train.dtype == y_test.dtype == torch.int64
    assert set(y_train.tolist()) == set(y_test.tolist()) == set(range(10))
    assert x_test.shape[0] == pytest.approx(0.2 * 1797, abs=10)


def test_digits_split_is_stratified(digits):
    from sklearn.datasets import load_digits

    _, y = load_digits(return_X_y=True)
    _, y_train, _, y_test = digits
    full = np.bincount(y, minlength=10)
    test = np.bincount(y_test.numpy(), minlength=10)
    train = np.bincount(y_train.numpy(), minlength=10)
    np.testing.assert_array_equal(train + test, full)
    assert np.all(np.abs(test - 0.2 * full) <= 0.5 + 1e-9)  # round(n_c · 0.2) per class


def test_digits_split_is_deterministic_and_seeded(digits):
    again = load_digits_split(seed=0)
    for a, b in zip(digits, again, strict=True):
        assert torch.equal(a, b)
    other = load_digits_split(seed=1)
    assert not torch.equal(digits[3], other[3]) or not torch.equal(digits[2], other[2])


def test_digits_standardized_with_train_statistics(digits):
    x_train, _, x_test, _ = digits
    mean, std = x_train.mean(0), x_train.std(0, unbiased=False)
    varying = std > 0
    assert int(varying.sum()) >= 60  # a few corner pixels are constant in the digits
    torch.testing.assert_close(mean, torch.zeros(64), atol=1e-5, rtol=0)
    torch.testing.assert_close(std[varying], torch.ones(int(varying.sum())), atol=1e-5, rtol=0)
    assert torch.all(x_train[:, ~varying] == 0)
    # the test set is transformed with the train statistics, so it is close to but not exactly standard
    assert 0 < x_test.mean(0)[varying].abs().max() < 0.5


def test_stratified_split_partitions_indices():
    labels = np.repeat(np.arange(3), [10, 7, 1])
    train, test = stratified_split(labels, 0.3, seed=5)
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(18))
    assert np.bincount(labels[test], minlength=3).tolist() == [3, 2, 0]
    with pytest.raises(ValueError, match="test_fraction"):
        stratified_split(labels, 1.0, seed=0)


def test_teacher_student_is_deterministic():
    a = teacher_student(n_train=256, n_test=64, dim=8, seed=3)
    b = teacher_student(n_train=256, n_test=64, dim=8, seed=3)
    c = teacher_student(n_train=256, n_test=64, dim=8, seed=4)
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v)
    assert not torch.equal(a[0], c[0])
    x_train, y_train, x_test, y_test = a
    assert x_train.shape == (256, 8) and x_test.shape == (64, 8)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert 0 <= int(y_train.min()) and int(y_train.max()) < 10
    assert abs(float(x_train.mean())) < 0.1 and abs(float(x_train.std()) - 1) < 0.1


def test_teacher_labels_use_every_class():
    _, y_train, _, _ = teacher_student(n_train=4096, n_test=1024, dim=32, seed=0)
    counts = torch.bincount(y_train, minlength=10)
    assert int(counts.min()) > 4096 / 10 / 4  # centred logits keep the classes roughly balanced


def test_batches_cover_each_epoch_without_replacement():
    x = torch.arange(10, dtype=torch.float32)[:, None]
    y = torch.arange(10)
    stream = batches(x, y, 3, torch.Generator().manual_seed(0))
    epoch = [next(stream) for _ in range(3)]  # 10 // 3 full batches, the last incomplete one dropped
    seen = torch.cat([yb for _, yb in epoch])
    assert all(xb.shape == (3, 1) for xb, _ in epoch)
    assert len(set(seen.tolist())) == 9
    assert all(torch.equal(xb[:, 0].long(), yb) for xb, yb in epoch)


def test_batches_are_deterministic_given_the_seed():
    x, y = torch.randn(50, 4), torch.arange(50)

    def take(seed: int) -> list[torch.Tensor]:
        stream = batches(x, y, 8, torch.Generator().manual_seed(seed))
        return [next(stream)[1] for _ in range(12)]

    first, again, other = take(1), take(1), take(2)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_batch_larger_than_data_gives_full_permutations():
    x, y = torch.randn(5, 2), torch.arange(5)
    stream = batches(x, y, 128, torch.Generator().manual_seed(0))
    for _ in range(2):
        _, yb = next(stream)
        assert sorted(yb.tolist()) == list(range(5))
    with pytest.raises(ValueError):
        next(batches(x, y, 0, torch.Generator()))
