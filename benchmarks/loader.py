"""Loader time per batch as a share of one TopK training step, at 10^6, 10^7 and 10^8 rows.

    .venv/bin/python benchmarks/loader.py                      # ~4 minutes, files up to 16 GB
    .venv/bin/python benchmarks/loader.py --max-file-gb 2      # ~1 minute: files of 10^6 rows

step: one choicesae train_step of the default TopK (d 384, F 3072, k 32, B 4096) on one thread,
  measured first in this run; every loader time is printed as a share of it (target: 5%).
index old / new: data.batch_indices alone; old is the full permutation per step it replaced.
memory: data.batches from a tensor in RAM (rows that fit in --max-ram-gb).
npy warm: data.batches from a .npy memory map whose pages are in the page cache.
npy cold: the same, the file's cached pages dropped before each batch (posix_fadvise DONTNEED),
  as every read of a file much larger than RAM misses; the virtual disk's host may still
  cache, so cold times are a lower bound. Page cache cannot be dropped machine-wide here.
store warm / cold: Store.batches (blocks of 4096 contiguous rows through a 256k-row shuffle
  buffer), float16, after the buffer's first fill.
A second table reads one batch cold from the 10^6-row .npy as B/C runs of C contiguous rows,
with the kernel's read-around and with madvise(MADV_RANDOM). Times are the best of --repeats
batches. Files go under runs/loader/ and are removed, also on error or Ctrl-C.
"""

import argparse
import mmap
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from choicesae.core.config import SAEConfig, TrainConfig
from choicesae.core.sae import SAE
from choicesae.data.activations import batch_indices, batches
from choicesae.data.store import Store, StoreWriter
from choicesae.training.loop import make_optimizer, train_step
from choicesae.training.run import resolve
from choicesae.training.state import TrainState

D, F, K, B = 384, 3072, 32, 4096
SHARD_ROWS = 1 << 18


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", type=float, nargs="+", default=[1e6, 1e7, 1e8])
    p.add_argument("--repeats", type=int, default=5, help="batches timed (the best is reported)")
    p.add_argument("--max-ram-gb", type=float, default=4, help="largest tensor held in RAM")
    p.add_argument("--max-file-gb", type=float, default=16, help="largest file written")
    return p.parse_args()


def old_batch_indices(step: int, num_rows: int, batch_size: int, seed: int) -> np.ndarray:
    """What batch_indices did before: a permutation of all the rows on every step."""
    epoch, i = divmod(step, num_rows // batch_size)
    perm = np.random.default_rng([seed, epoch]).permutation(num_rows)
    return np.sort(perm[i * batch_size : (i + 1) * batch_size])


def best(fn, repeats: int, before=lambda: None) -> float:
    """Least seconds of `repeats` calls of fn (step i of them), each after before()."""
    times = []
    for i in range(repeats):
        before()
        start = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - start)
    return min(times)


def step_seconds(repeats: int) -> float:
    cfg = resolve(TrainConfig(sae=SAEConfig(k=K, num_latents=F), batch_size=B), D)
    sae = SAE(cfg.sae)
    optimizer, state = make_optimizer(sae, cfg), TrainState.fresh(F, "cpu")
    x = torch.randn(B, D)
    sae.init_from_data_(x)
    train_step(sae, optimizer, x, cfg, state)  # warm-up
    return best(lambda _: train_step(sae, optimizer, x, cfg, state), repeats)


def fill_(rows: np.ndarray) -> None:
    """Random rows [n, D] (one block repeated: the values do not matter, but untouched zero
    pages would all map one physical page and read unrealistically fast)."""
    block = np.random.default_rng(0).standard_normal((1 << 16, D), dtype=np.float32)
    for start in range(0, len(rows), len(block)):
        rows[start : start + len(block)] = block[: len(rows) - start]


def evict(*paths: Path) -> None:
    """Drop the files' clean pages from the page cache (mapped pages stay)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def write_npy(path: Path, n: int) -> Path:
    rows = np.lib.format.open_memmap(path, "w+", np.float32, (n, D))
    fill_(rows)
    rows.flush()
    del rows
    return path


def write_store(path: Path, n: int) -> list[Path]:
    writer = StoreWriter(path, {"d_model": D, "dtype": "float16"})
    block = torch.randn(SHARD_ROWS, D)
    for start in range(0, n, SHARD_ROWS):
        rows = min(SHARD_ROWS, n - start)
        writer.write_shard(block[:rows], np.zeros(rows, np.int32))
    writer.finish()
    return sorted(path.glob("shard-*/acts.npy"))


def loader_seconds(rows, repeats: int, before=lambda: None) -> float:
    """Best seconds of data.batches' next batch; a fresh stream at step i for each."""
    return best(lambda i: next(batches(rows(), B, seed=0, start=i)), repeats, before)


def store_seconds(path: Path, files: list[Path], repeats: int, cold: bool) -> float:
    stream = Store(path).batches(B, seed=0)
    next(stream)  # fills the shuffle buffer, once per run
    return best(lambda _: next(stream), repeats, (lambda: evict(*files)) if cold else lambda: None)


def measure(n: int, folder: Path, args) -> dict[str, float | None]:
    """Seconds per batch of each loader at n rows (None: too large for the limits)."""
    out = dict.fromkeys(["index old", "index new", "memory", "npy warm", "npy cold"])
    out |= dict.fromkeys(["store warm", "store cold"])
    out["index old"] = best(lambda i: old_batch_indices(i, n, B, 0), 1 if n > 3e7 else args.repeats)
    out["index new"] = best(lambda i: batch_indices(i, n, B, 0), args.repeats)
    if n * D * 4 <= args.max_ram_gb * 2**30:
        x = torch.empty(n, D)
        fill_(x.numpy())
        out["memory"] = loader_seconds(lambda: x, args.repeats)
        del x
    if n * D * 4 <= args.max_file_gb * 2**30:
        path = write_npy(folder / f"x{n}.npy", n)
        mapped = np.load(path, mmap_mode="r")
        out["npy warm"] = loader_seconds(lambda: mapped, args.repeats)
        del mapped  # a page still mapped stays cached: each cold batch gets a fresh map
        cold = lambda: np.load(path, mmap_mode="r")  # noqa: E731
        out["npy cold"] = loader_seconds(cold, args.repeats, lambda: evict(path))
        path.unlink()
    if n * D * 2 <= args.max_file_gb * 2**30:
        files = write_store(folder / f"store{n}", n)
        for cold in (False, True):
            out[f"store {'cold' if cold else 'warm'}"] = store_seconds(
                folder / f"store{n}", files, args.repeats, cold
            )
        shutil.rmtree(folder / f"store{n}")
    return out


def layout_seconds(path: Path, run: int, advice: int | None, repeats: int) -> float:
    """Best seconds to read one batch cold from the .npy as B/run random runs of `run` rows."""
    n = np.load(path, mmap_mode="r").shape[0]

    def read(i: int) -> None:
        rows = np.load(path, mmap_mode="r")
        if advice is not None:
            rows._mmap.madvise(advice)
        starts = batch_indices(i, n // run, B // run, seed=1) * run
        np.asarray(rows[(starts[:, None] + np.arange(run)).ravel()])

    return best(read, repeats, lambda: evict(path))


def main() -> None:
    args = parse()
    torch.set_num_threads(1)
    step = step_seconds(args.repeats)
    print(
        f"TopK step (d {D}, F {F}, k {K}, B {B}, 1 thread): {step * 1e3:.0f} ms; 5% of it is "
        f"{step * 50:.1f} ms. Each cell: loader ms per batch, share of the step."
    )
    Path("runs/loader").mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(dir="runs/loader"))
    try:
        header = None
        for n in map(int, args.rows):
            times = measure(n, folder, args)
            if header is None:
                header = f"{'rows':>6}" + "".join(f"{name:>16}" for name in times)
                print(header)
            cells = [
                f"{t * 1e3:8.2f}ms{100 * t / step:5.0f}%" if t else f"{'-':>15}"
                for t in times.values()
            ]
            print(f"{n:>6.0e}" + "".join(f"{c:>16}" for c in cells), flush=True)
        print_layouts(folder, step, args)
    finally:
        shutil.rmtree(folder)


def print_layouts(folder: Path, step: float, args) -> None:
    path = write_npy(folder / "layout.npy", 10**6)
    print(
        f"\nOne batch read cold from a {path.stat().st_size / 2**30:.1f} GB .npy as B/C runs "
        "of C contiguous rows: ms, share of the step"
    )
    print(f"{'C':>6}{'read-around':>20}{'MADV_RANDOM':>20}")
    for run in (1, 16, 256, 4096):
        cells = [layout_seconds(path, run, a, args.repeats) for a in (None, mmap.MADV_RANDOM)]
        print(f"{run:>6}" + "".join(f"{t * 1e3:12.1f}ms{100 * t / step:5.0f}%" for t in cells))
    path.unlink()


if __name__ == "__main__":
    main()
