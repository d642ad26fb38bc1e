import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from choicesae.data import batch_indices, batches, check_activations, load_activations
from choicesae.errors import DataError


def test_load_npy_memory_mapped(tmp_path):
    x = np.random.default_rng(0).standard_normal((100, 8)).astype(np.float32)
    np.save(tmp_path / "a.npy", x)
    rows = load_activations(tmp_path / "a.npy")
    assert isinstance(rows, np.memmap) and np.array_equal(rows, x)


def test_load_safetensors_single_and_keyed(tmp_path):
    x, y = torch.randn(20, 4), torch.randn(30, 4)
    save_file({"acts": x}, tmp_path / "one.safetensors")
    assert torch.equal(load_activations(tmp_path / "one.safetensors"), x)
    save_file({"a": x, "b": y}, tmp_path / "two.safetensors")
    assert torch.equal(load_activations(tmp_path / "two.safetensors", "b"), y)
    with pytest.raises(DataError, match="activations-key"):
        load_activations(tmp_path / "two.safetensors")
    with pytest.raises(DataError, match="'c' is not"):
        load_activations(tmp_path / "two.safetensors", "c")


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda p: p.write_bytes(b""), "is empty"),
        (lambda p: p.write_bytes(b"not an array at all"), "not a readable array"),
        (lambda p: np.save(p, np.zeros(5, np.float32)), "must be 2-D"),
        (lambda p: np.save(p, np.zeros((2, 3, 4), np.float32)), "must be 2-D"),
        (lambda p: np.save(p, np.zeros((0, 4), np.float32)), "holds no data"),
        (lambda p: np.save(p, np.zeros((3, 4), np.int64)), "floating-point"),
    ],
)
def test_bad_files_get_clear_errors(tmp_path, make, message):
    path = tmp_path / "bad.npy"
    make(path)
    with pytest.raises(DataError, match=message):
        load_activations(path)


def test_missing_and_wrong_suffix(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_activations(tmp_path / "nope.npy")
    (tmp_path / "x.csv").write_text("1,2\n")
    with pytest.raises(DataError, match=r"\.npy or \.safetensors"):
        load_activations(tmp_path / "x.csv")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_name_the_row(bad):
    x = torch.randn(200_000, 2)
    x[123_456, 1] = bad
    with pytest.raises(DataError, match="NaN or Inf \\(first at row 123456\\)"):
        check_activations(x)


def test_batch_indices_are_per_epoch_permutations():
    N, B = 100, 30  # 3 batches per epoch, 10 rows left out each epoch
    epoch0 = np.concatenate([batch_indices(s, N, B, seed=1) for s in range(3)])
    assert len(set(epoch0.tolist())) == 90
    assert not np.array_equal(batch_indices(0, N, B, 1), batch_indices(3, N, B, 1))
    assert np.array_equal(batch_indices(4, N, B, 1), batch_indices(4, N, B, 1))


def test_batches_resume_at_any_step_and_reject_large_batches():
    x = torch.arange(50.0).reshape(25, 2)
    stream = batches(x, 4, seed=0)
    first = [next(stream) for _ in range(8)]
    resumed = batches(x, 4, seed=0, start=5)
    assert torch.equal(next(resumed), first[5])
    assert first[0].dtype == torch.float32 and first[0].shape == (4, 2)
    with pytest.raises(DataError, match="batch_size 26 exceeds"):
        batches(x, 26, seed=0)
