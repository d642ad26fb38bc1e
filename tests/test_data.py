import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from choicesae.data.activations import (
    _ROUNDS,
    _feistel,
    batch_indices,
    batches,
    check_activations,
    load_activations,
    shuffled_rows,
)
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


CASES = [(100, 30, 1), (97, 8, 0), (64, 64, 3), (1000, 1, 5), (4096, 100, 12345)]  # (N, B, seed)


@pytest.mark.parametrize("N,B,seed", CASES)
def test_every_pass_is_a_fresh_permutation(N, B, seed):
    """Each pass shows per_epoch·B distinct rows in sorted batches; passes and seeds differ."""
    per_epoch = N // B

    def one_pass(epoch: int, seed: int) -> list[np.ndarray]:
        return [batch_indices(epoch * per_epoch + i, N, B, seed) for i in range(per_epoch)]

    passes = [one_pass(epoch, seed) for epoch in range(3)]
    for epoch in passes:
        rows = np.concatenate(epoch)
        assert len(np.unique(rows)) == per_epoch * B and 0 <= rows.min() and rows.max() < N
        assert all(np.array_equal(b, np.sort(b)) and b.dtype == np.int64 for b in epoch)
    assert all(np.array_equal(a, b) for a, b in zip(one_pass(1, seed), passes[1], strict=True))
    if N == B:  # one batch of all the rows, sorted: the same every pass, whatever the seed
        assert all(np.array_equal(b, np.arange(N)) for epoch in passes for b in epoch)
        return
    for other in (passes[1], one_pass(0, seed + 1)):
        assert not all(np.array_equal(a, b) for a, b in zip(passes[0], other, strict=True))


@pytest.mark.parametrize("N", [1, 2, 3, 5, 16, 17, 100, 1023, 1025])
def test_shuffled_rows_matches_brute_force_cycle_walking(N):
    """The vectorised walk against a plain one over the whole table of the Feistel network."""
    half = max(1, ((N - 1).bit_length() + 1) // 2)
    keys = np.random.SeedSequence([7, 2]).generate_state(_ROUNDS, np.uint64)
    table = _feistel(np.arange(4**half, dtype=np.uint64), half, keys)
    assert np.array_equal(np.sort(table), np.arange(4**half))  # a bijection on 2·half bits

    def walk(p: int) -> int:
        p = int(table[p])
        while p >= N:
            p = int(table[p])
        return p

    rows = shuffled_rows(np.arange(N, dtype=np.uint64), N, seed=7, epoch=2)
    assert rows.tolist() == [walk(p) for p in range(N)]
    assert np.array_equal(np.sort(rows), np.arange(N))


def test_shuffle_looks_random():
    """No order of the rows survives the shuffle: positions and rows are uncorrelated, and
    about one row in N stays in place (deterministic seeds, so this cannot flake)."""
    N = 100_000
    for epoch in range(3):
        rows = shuffled_rows(np.arange(N, dtype=np.uint64), N, seed=0, epoch=epoch)
        assert abs(np.corrcoef(np.arange(N), rows)[0, 1]) < 0.01
        assert (rows == np.arange(N)).sum() < 10


def test_batch_indices_never_build_the_permutation():
    """10^12 rows: an O(N) permutation would need 8 TB; the batch needs only its own rows."""
    N, B = 10**12, 4096
    for step in [0, 1, N // B - 1, 3 * (N // B) + 5]:
        idx = batch_indices(step, N, B, seed=0)
        assert len(np.unique(idx)) == B and idx.min() >= 0 and idx.max() < N
        assert np.array_equal(idx, np.sort(idx))
    assert idx.max() > N // 2  # the rows spread over all of [0, N)


@pytest.mark.parametrize("N,B", [(25, 4), (24, 4), (8, 8)])
def test_batches_resume_at_any_step(N, B):
    x = torch.arange(2.0 * N).reshape(N, 2)  # row r is (2r, 2r + 1)
    stream = batches(x, B, seed=3)
    first = [next(stream) for _ in range(3 * (N // B) + 2)]
    for start in range(len(first)):
        resumed = batches(x, B, seed=3, start=start)
        assert all(torch.equal(next(resumed), want) for want in first[start:])
    assert first[0].dtype == torch.float32 and first[0].shape == (B, 2)
    assert torch.equal(first[1][:, 0] / 2, torch.from_numpy(batch_indices(1, N, B, 3)).float())


def test_batches_reject_large_batches():
    with pytest.raises(DataError, match="batch_size 26 exceeds"):
        batches(torch.zeros(25, 2), 26, seed=0)


def test_memory_mapped_batches_equal_in_memory_ones(tmp_path):
    x = np.random.default_rng(0).standard_normal((50, 3)).astype(np.float32)
    np.save(tmp_path / "a.npy", x)
    mapped, held = (
        batches(load_activations(tmp_path / "a.npy"), 7, 1),
        batches(torch.from_numpy(x), 7, 1),
    )
    assert all(torch.equal(next(mapped), next(held)) for _ in range(10))
