"""Activation files and the shuffled batches drawn from them.

Activations are rows [N, d_in]: a .npy file (memory-mapped, so it may exceed memory), a
.safetensors file, or an in-memory tensor. Everything is checked before training starts.
"""

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor

from choicesae.errors import DataError


@runtime_checkable
class RowSource(Protocol):
    """Rows that make their own shuffled batches and check themselves: an activation store
    (store.Store) or model activations harvested on the fly (harvest.OnlineActivations)."""

    shape: tuple[int, int]  # (rows, d_in)

    def batches(
        self, batch_size: int, seed: int, device: str = "cpu", start: int = 0
    ) -> Iterator[Tensor]: ...


Rows = np.ndarray | Tensor | RowSource  # [N, d_in]
_CHECK_CHUNK = 65_536


def load_activations(path: str | Path, key: str = "") -> Rows:
    """Open an activation file [N, d_in] and check it (see `check_activations`)."""
    path = Path(path)
    if not str(path):
        raise DataError("no activations given (--activations FILE or --store STORE)")
    if not path.is_file():
        raise DataError(f"activation file {path} does not exist")
    if path.stat().st_size == 0:
        raise DataError(f"activation file {path} is empty")
    try:
        if path.suffix == ".npy":
            rows = np.load(path, mmap_mode="r")
        elif path.suffix == ".safetensors":
            rows = _load_safetensors(path, key)
        else:
            raise DataError(f"activation file {path} must end in .npy or .safetensors")
    except DataError:
        raise
    except Exception as e:  # numpy's header parser alone raises half a dozen kinds on junk
        raise DataError(f"activation file {path} is not a readable array: {e!r}") from e
    return check_activations(rows, name=str(path))


def _load_safetensors(path: Path, key: str) -> Tensor:
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        if not key and len(keys) == 1:
            key = keys[0]
        if key not in keys:
            wanted = f"tensor {key!r} is not" if key else "several tensors are"
            raise DataError(
                f"{path}: {wanted} in the file; pick one with --activations-key from {keys}"
            )
        return f.get_tensor(key)


def check_activations(rows: Rows, name: str = "activations") -> Rows:
    """Refuse what cannot be trained on: wrong dimensionality, no rows, a non-float dtype,
    NaN or Inf (scanned in chunks, naming the first bad row). A RowSource checks itself."""
    if isinstance(rows, RowSource):
        return rows
    if rows.ndim != 2:
        raise DataError(f"{name} must be 2-D [tokens, d_in], got shape {tuple(rows.shape)}")
    if rows.shape[0] == 0 or rows.shape[1] == 0:
        raise DataError(f"{name} holds no data (shape {tuple(rows.shape)})")
    if not _tensor(rows[:1]).is_floating_point():
        raise DataError(f"{name} must hold floating-point numbers, got {rows.dtype}")
    for start in range(0, rows.shape[0], _CHECK_CHUNK):
        chunk = _tensor(rows[start : start + _CHECK_CHUNK])
        bad = ~torch.isfinite(chunk).all(-1)
        if bad.any():
            row = start + int(bad.nonzero()[0])
            raise DataError(f"{name} contains NaN or Inf (first at row {row})")
    return rows


def check_targets(
    transcoder: bool, targets: bool, source: str, instead: str, hookpoint="A", target="B"
) -> None:
    """A transcoder reads rows with targets (`harvest --target`) and an SAE rows without: the
    widths alone could match by chance. `instead`: what to do with pairs and an SAE."""
    if transcoder and not targets:
        raise DataError(
            f"{source} holds no targets and the SAE is a transcoder: harvest (input, target) "
            f"pairs with `choicesae harvest --hookpoint {hookpoint} --target {target}`"
        )
    if targets and not transcoder:
        raise DataError(
            f"{source} holds (hookpoint, target) pairs for a transcoder and the SAE is an "
            f"autoencoder: {instead}"
        )


def paired(x: Rows, y: Rows) -> Tensor:
    """A transcoder's in-memory training rows [N, d_in + d_out]: inputs x [N, d_in] and
    targets y [N, d_out] side by side, as a store harvested with --target holds them."""
    x = _tensor(check_activations(x, "inputs"))
    y = _tensor(check_activations(y, "targets"))
    if len(x) != len(y):
        raise DataError(f"inputs hold {len(x)} rows but targets {len(y)}; give one target per row")
    return torch.cat([x.float(), y.float()], 1)


def _tensor(rows: Rows) -> Tensor:
    """Rows as a tensor; a read-only slice of a memory map is copied into memory first."""
    if isinstance(rows, Tensor):
        return rows
    rows = np.asarray(rows)
    return torch.from_numpy(rows if rows.flags.writeable else rows.copy())


def batch_indices(step: int, num_rows: int, batch_size: int, seed: int) -> np.ndarray:
    """Row indices [batch_size] of batch `step`: positions i·B .. (i+1)·B of a fresh permutation
    per pass over the data, a pure function of (step, seed) so that a run can be resumed at any
    step. Only the batch's own positions are permuted (see `shuffled_rows`), so a batch costs
    O(batch_size) whatever the number of rows. Sorted, because the order inside a batch does
    not matter and sorted reads are faster on a memory map."""
    per_epoch = num_rows // batch_size  # the rows left over after whole batches skip a pass
    epoch, i = divmod(step, per_epoch)
    positions = np.arange(i * batch_size, (i + 1) * batch_size, dtype=np.uint64)
    return np.sort(shuffled_rows(positions, num_rows, seed, epoch)).astype(np.int64)


_ROUNDS = 6  # 4 Feistel rounds with random round functions already give a random permutation
# (Luby and Rackoff); two more are cheap insurance for a hash standing in for a random function


def shuffled_rows(positions: np.ndarray, num_rows: int, seed: int, epoch: int) -> np.ndarray:
    """The row [n] at each position [n] (uint64, each < num_rows) of pass `epoch`'s permutation
    of [0, num_rows), without building that permutation: a Feistel network keyed by (seed,
    epoch) permutes all numbers of 2h bits (the fewest with 2^(2h) >= num_rows), and a position
    sent past num_rows is sent through again until it lands below ("cycle walking"), which
    leaves a permutation of [0, num_rows). As 2^(2h) < 4·num_rows, a position takes fewer than
    four trips through the network on average."""
    half = max(1, ((num_rows - 1).bit_length() + 1) // 2)
    keys = np.random.SeedSequence([seed, epoch]).generate_state(_ROUNDS, np.uint64)
    rows = _feistel(positions.astype(np.uint64), half, keys)
    todo = np.flatnonzero(rows >= num_rows)
    while todo.size:
        rows[todo] = _feistel(rows[todo], half, keys)
        todo = todo[rows[todo] >= num_rows]
    return rows


def _feistel(x: np.ndarray, half: int, keys: np.ndarray) -> np.ndarray:
    """A bijection on numbers [n] of 2·half bits: each round swaps the halves and XORs one
    with a keyed hash of the other, which can be undone whatever the hash."""
    mask = np.uint64((1 << half) - 1)
    left, right = x >> np.uint64(half), x & mask
    for key in keys:
        left, right = right, left ^ (_mix(right ^ key) & mask)
    return (left << np.uint64(half)) | right


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: every input bit flips about half the output bits (uint64
    arithmetic wraps, as the hash wants)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def batches(
    rows: Rows, batch_size: int, seed: int, device: str = "cpu", start: int = 0
) -> Iterator[Tensor]:
    """Endless float32 batches [batch_size, d_in] from step `start` on."""
    if isinstance(rows, RowSource):
        return rows.batches(batch_size, seed, device, start)
    if batch_size > rows.shape[0]:
        raise DataError(f"batch_size {batch_size} exceeds the {rows.shape[0]} rows of activations")

    def generate() -> Iterator[Tensor]:
        for step in itertools.count(start):
            idx = batch_indices(step, rows.shape[0], batch_size, seed)
            x = rows[torch.from_numpy(idx)] if isinstance(rows, Tensor) else _tensor(rows[idx])
            yield x.to(device=device, dtype=torch.float32)

    return generate()
