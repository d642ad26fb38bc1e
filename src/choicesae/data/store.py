"""The activation store: sharded, memory-mapped arrays on disk with a manifest.

    STORE/manifest.json            model, hookpoint, d_model, target, d_target, columns, dtype,
                                   context, tokens, shards
    STORE/shard-00000/acts.npy     [rows, d_model + d_target] activations: the hookpoint's, then
                                   (transcoder harvests) the target's; bfloat16 as uint16 bits

A harvest of several hookpoints from one model pass (`harvest --hookpoint a,b` or a pattern,
`layers.*.mlp`) is one store whose rows hold them side by side, the hookpoints' columns then the
targets' (the i-th target pairs with the i-th hookpoint), named in the manifest's `columns`
([[module path, width], ...]) and comma-joined in hookpoint and target. One store rather than one
per hookpoint: a token's activations at every layer stay on one row, so several models train from
one read of it (training/many.py) and a cross-layer model reads every layer of the same token.
`Store.select(hookpoint)` is one (hookpoint, target) pair of it, a store like a single harvest's.
    STORE/shard-00000/tokens.npy   [rows] int32 token id of each row, rows in context order

A shard is written under a temporary name, renamed when complete, and only then listed in the
manifest (itself replaced atomically), so a reader never sees a partial shard and an
interrupted harvest resumes after the last listed one. Each shard carries a SHA-256 checksum,
verified when a reader first opens it.
"""

import copy
import errno
import hashlib
import itertools
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from choicesae.errors import ConfigError, DataError

FORMAT = 1
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_NUMPY = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}  # bf16 as bits
LATER_FIELDS = {"target": "", "d_target": 0, "columns": None, "skip": 0, "model_dtype": "float32"}
"""Manifest fields added after the first stores, with what their absence means: no target, one
hookpoint (and target) as the columns, no text skipped, the model run in float32 (so that such
a store is still found complete, or resumed, by the same harvest)."""
BLOCK_ROWS = 4096  # contiguous rows read at once: long sequential reads, shuffled afterwards


def to_numpy(x: Tensor, dtype: str) -> np.ndarray:
    """x [N, d] cast to the storage dtype, as a numpy array (bfloat16 as its uint16 bits)."""
    x = x.detach().to("cpu", DTYPES[dtype]).contiguous()
    return x.view(torch.uint16).numpy() if dtype == "bfloat16" else x.numpy()


def to_tensor(a: np.ndarray, dtype: str) -> Tensor:
    """Rows read from a shard [N, d] as float32."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    return (t.view(torch.bfloat16) if dtype == "bfloat16" else t).float()


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    file = path / "manifest.json"
    if not file.is_file():
        what = "does not exist" if not path.exists() else "holds no manifest.json"
        raise DataError(f"activation store {path} {what}; make one with `choicesae harvest`")
    try:
        manifest = json.loads(file.read_text())
    except (OSError, ValueError) as e:  # ValueError: bad JSON or bad UTF-8
        raise DataError(f"the manifest of the store {path} is unreadable: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else manifest
        raise DataError(f"store {path} has format {found!r}, expected {FORMAT}")
    manifest = LATER_FIELDS | manifest
    if not _well_formed(manifest):
        raise DataError(f"the manifest of the store {path} is damaged (fields missing or wrong)")
    return manifest


def _well_formed(manifest: dict) -> bool:
    """The fields a reader relies on have the right types."""
    shards = manifest.get("shards")
    d_model, d_target = manifest.get("d_model"), manifest.get("d_target")
    groups = manifest.get("columns")
    return (
        manifest.get("dtype") in DTYPES
        and isinstance(d_model, int)
        and d_model > 0
        and isinstance(d_target, int)
        and d_target >= 0
        and isinstance(shards, list)
        and all(
            isinstance(s, dict)
            and isinstance(s.get("name"), str)
            and s["name"].startswith("shard-")
            and isinstance(s.get("rows"), int)
            and s["rows"] >= 0
            and isinstance(s.get("sha256"), str)
            for s in shards
        )
        and (
            groups is None  # each group [path, width], the widths adding up to a row's
            or isinstance(groups, list)
            and all(isinstance(g, list) and len(g) == 2 and isinstance(g[1], int) for g in groups)
            and sum(g[1] for g in groups) == d_model + d_target
        )
    )


def write_manifest(path: Path, manifest: dict) -> None:
    """Replace STORE/manifest.json atomically (write a temporary file, fsync, rename)."""
    tmp = path / "manifest.json.tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(manifest, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path / "manifest.json")


def shard_checksum(folder: Path) -> str:
    digest = hashlib.sha256()
    for name in ("acts.npy", "tokens.npy"):
        with open(folder / name, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


class StoreWriter:
    """Appends complete shards to a store; reopening a store resumes after its last shard."""

    def __init__(self, path: str | Path, meta: dict, overwrite: bool = False):
        self.path = Path(path)
        is_store = (self.path / "manifest.json").is_file()
        if self.path.exists() and not is_store and any(self.path.iterdir()):
            raise ConfigError(f"{self.path} is a folder but not an activation store; pick another")
        if overwrite and is_store:
            shutil.rmtree(self.path)
        if (self.path / "manifest.json").exists():
            self.manifest = read_manifest(self.path)
            _check_same_harvest(self.path, self.manifest, meta)
        else:
            self.manifest = {"format": FORMAT, **meta, "tokens": 0, "complete": False}
            self.manifest["shards"] = []
            self._try(lambda: self.path.mkdir(parents=True, exist_ok=True), "create the store")
            self._try(lambda: write_manifest(self.path, self.manifest), "write the manifest")
        self._remove_unlisted()

    @property
    def done(self) -> int:
        """Number of complete shards."""
        return len(self.manifest["shards"])

    def _remove_unlisted(self) -> None:
        """Leftovers of an interrupted harvest: temporary shards, or a shard renamed before the
        manifest listed it. They are rewritten, byte for byte, by the resumed harvest."""
        listed = {s["name"] for s in self.manifest["shards"]}
        for folder in self.path.glob("shard-*"):
            if folder.name not in listed:
                shutil.rmtree(folder)

    def write_shard(self, acts: Tensor, tokens: np.ndarray) -> None:
        """Add one shard: acts [rows, d_model + d_target], tokens [rows]. Visible once complete."""
        name = f"shard-{self.done:05d}"
        tmp = self.path / f"{name}.tmp"
        rows = to_numpy(acts, self.manifest["dtype"])

        def write() -> None:
            tmp.mkdir()
            _save(tmp / "acts.npy", rows)
            _save(tmp / "tokens.npy", tokens.astype(np.int32))
            os.replace(tmp, self.path / name)

        try:
            self._try(write, f"write {name}")
        except DataError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        entry = {"name": name, "rows": len(rows), "sha256": shard_checksum(self.path / name)}
        self.manifest["shards"].append(entry)
        self.manifest["tokens"] += len(rows)
        self._try(lambda: write_manifest(self.path, self.manifest), f"list {name}")

    def finish(self) -> None:
        self.manifest["complete"] = True
        self._try(lambda: write_manifest(self.path, self.manifest), "finish the manifest")

    def _try(self, action, what: str) -> None:
        """Run `action`, turning a full disk or another OS error into a DataError that says the
        shards already listed are kept."""
        try:
            action()
        except OSError as e:
            reason = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else str(e)
            raise DataError(
                f"cannot {what} in the store {self.path}: {reason}. The {self.done} complete "
                "shards are kept; free space and run the same harvest again to resume"
            ) from e


def _save(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())


def _check_same_harvest(path: Path, manifest: dict, meta: dict) -> None:
    for key, value in meta.items():
        if manifest.get(key) != value:
            raise ConfigError(
                f"{path} holds a harvest with {key}={manifest.get(key)!r}, not {value!r}; "
                "pick another --out, or pass --overwrite to replace it"
            )


def names(field: str) -> list[str]:
    """The module paths of a manifest's comma-joined hookpoint or target field."""
    return field.split(",") if field else []


def columns(manifest: dict) -> list[tuple[str, int]]:
    """[(module path, width)] of a row's column groups, in row order: the hookpoints', then the
    targets'."""
    if manifest["columns"] is not None:
        return [(name, width) for name, width in manifest["columns"]]
    pairs = [(manifest["hookpoint"], manifest["d_model"])]
    return pairs + ([(manifest["target"], manifest["d_target"])] if manifest["d_target"] else [])


def open_store(path: str | Path, hookpoint: str = "", cross_layer: bool = False) -> "Store":
    """The store at `path`; of a several-hookpoint harvest, the one `hookpoint` names, or with
    `cross_layer` every one of them: whole rows [x_0 … x_{L-1} | y_0 … y_{L-1}]."""
    store = Store(path)
    if len(store.hookpoints) == 1 or cross_layer:
        return store
    if not hookpoint:
        raise ConfigError(
            f"the store {path} holds {len(store.hookpoints)} hookpoints "
            f"({', '.join(store.hookpoints)}): name one with --hookpoint"
        )
    return store.select(hookpoint)


class Store:
    """A store opened for reading: complete shards only, memory-mapped, each checked against
    its checksum when first opened. Rows are numbered across shards in harvest order. A store
    of several hookpoints reads whole rows; `select` gives one hookpoint's (and target's)."""

    ndim = 2

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        if not self.manifest["shards"]:
            raise DataError(f"store {self.path} holds no complete shard yet")
        self.dtype = self.manifest["dtype"]
        self.offsets = np.cumsum([0] + [s["rows"] for s in self.manifest["shards"]])
        self._open: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.width = self.d_model + self.d_target  # of a row on disk
        self.index: np.ndarray | None = None  # the columns read (select), None: all

    @property
    def hookpoints(self) -> list[str]:
        """The module paths harvested as inputs, in column order."""
        return names(self.manifest["hookpoint"])

    def select(self, hookpoint: str) -> "Store":
        """The store of one hookpoint of a several-hookpoint harvest, and of its target (the one
        harvested beside it, if any): rows [hookpoint | target], its manifest naming them."""
        hooks, targets = self.hookpoints, names(self.manifest["target"])
        if hookpoint not in hooks:
            raise ConfigError(
                f"the store {self.path} holds no hookpoint {hookpoint!r}; it holds "
                f"{', '.join(hooks)}"
            )
        i = hooks.index(hookpoint)
        wanted = [hookpoint] + ([targets[i]] if targets else [])
        spans, start = {}, 0
        for name, width in columns(self.manifest):
            spans[name] = (start, width)
            start += width
        view = copy.copy(self)  # the shards' memory maps are shared
        view.index = np.concatenate([np.arange(a, a + w) for a, w in map(spans.get, wanted)])
        widths = [spans[name][1] for name in wanted]
        view.manifest = self.manifest | {
            "hookpoint": hookpoint,
            "target": wanted[1] if targets else "",
            "d_model": widths[0],
            "d_target": sum(widths[1:]),
            "columns": [[name, w] for name, w in zip(wanted, widths, strict=True)],
        }
        return view

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, d_model + d_target): a row is [hookpoint | target]."""
        return int(self.offsets[-1]), self.d_model + self.d_target

    @property
    def d_model(self) -> int:
        """Width of the hookpoint's activations: the first d_model columns of a row."""
        return self.manifest["d_model"]

    @property
    def d_target(self) -> int:
        """Width of the target's activations, the last columns of a row; 0: an SAE store."""
        return self.manifest["d_target"]

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def num_shards(self) -> int:
        return len(self.manifest["shards"])

    def shard(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(acts [rows, d_model + d_target] raw storage dtype, tokens [rows]) of shard i,
        memory-mapped."""
        if i not in self._open:
            self._open[i] = self._load(self.manifest["shards"][i])
        return self._open[i]

    def _load(self, entry: dict) -> tuple[np.ndarray, np.ndarray]:
        folder = self.path / entry["name"]
        try:
            corrupt = shard_checksum(folder) != entry["sha256"]
        except OSError as e:
            raise DataError(f"{entry['name']} of the store {self.path} is unreadable: {e}") from e
        if corrupt:  # checked first: a damaged .npy header can fail in many ways inside numpy
            raise DataError(
                f"{entry['name']} of the store {self.path} is corrupt: its SHA-256 differs from "
                "the manifest's; harvest the store again"
            )
        try:
            acts = np.load(folder / "acts.npy", mmap_mode="r")
            tokens = np.load(folder / "tokens.npy", mmap_mode="r")
        except Exception as e:  # numpy raises ValueError, SyntaxError, TokenError, ...
            raise DataError(f"{entry['name']} of the store {self.path} is unreadable: {e}") from e
        expected = (entry["rows"], self.width)
        if acts.shape != expected or tokens.shape != expected[:1]:
            raise DataError(
                f"{entry['name']} of {self.path} has shape {acts.shape}, not {expected}"
            )
        return acts, tokens

    def _locate(self, row: int) -> tuple[int, int]:
        i = int(np.searchsorted(self.offsets, row, side="right")) - 1
        return i, row - int(self.offsets[i])

    def __getitem__(self, index) -> Tensor:
        """Rows as float32 [n, d_model + d_target], for a slice or an array of row numbers."""
        rows = np.arange(self.shape[0])[index]
        out = torch.empty(len(rows), self.shape[1])
        shard_of = np.searchsorted(self.offsets, rows, side="right") - 1
        for i in np.unique(shard_of):
            where = np.nonzero(shard_of == i)[0]
            acts = self.shard(int(i))[0]
            out[where] = to_tensor(self._columns(acts[rows[where] - self.offsets[i]]), self.dtype)
        return out

    def _columns(self, acts: np.ndarray) -> np.ndarray:
        """The selected columns of rows [n, width] read from a shard."""
        return acts if self.index is None else acts[:, self.index]

    def tokens(self) -> np.ndarray:
        """[rows] token id of every row, in row order."""
        return np.concatenate([self.shard(i)[1] for i in range(self.num_shards)])

    def blocks(self, seed: int) -> Iterator[Tensor]:
        """Endless blocks of up to BLOCK_ROWS contiguous rows [n, d] in the storage dtype,
        visiting every block of every shard once per epoch in a fresh random order."""
        spans = [
            (i, start)
            for i, entry in enumerate(self.manifest["shards"])
            for start in range(0, entry["rows"], BLOCK_ROWS)
        ]
        for epoch in itertools.count():
            for j in np.random.default_rng([seed, epoch]).permutation(len(spans)):
                i, start = spans[j]
                block = self.shard(i)[0][start : start + BLOCK_ROWS]
                block = torch.from_numpy(np.array(self._columns(block)))
                yield block.view(torch.bfloat16) if self.dtype == "bfloat16" else block

    def batches(
        self, batch_size: int, seed: int, device: str = "cpu", start: int = 0
    ) -> Iterator[Tensor]:
        """Endless shuffled float32 batches [batch_size, d_model + d_target] (see `shuffled`)."""
        self.check_batch_size(batch_size)
        return (x.to(device, torch.float32) for x in self.raw_batches(batch_size, seed, start))

    def raw_batches(self, batch_size: int, seed: int, start: int = 0) -> Iterator[Tensor]:
        """The batches of `batches` in the storage dtype, on the CPU."""
        data = shuffled(self.blocks(seed), batch_size, seed, min(SHUFFLE_ROWS, self.shape[0]))
        return itertools.islice(data, start, None)

    def check_batch_size(self, batch_size: int) -> None:
        if batch_size > self.shape[0]:
            raise DataError(
                f"batch_size {batch_size} exceeds the {self.shape[0]} rows of {self.path}"
            )


SHUFFLE_ROWS = 1 << 18  # rows in the shuffle buffer: 256k rows (192 MiB of 384-wide fp16)


def shuffled(
    blocks: Iterator[Tensor], batch_size: int, seed: int, buffer_rows: int = SHUFFLE_ROWS
) -> Iterator[Tensor]:
    """Endless batches [batch_size, d] drawn at random from a buffer of `buffer_rows` rows that
    the blocks [n, d] flow through: each batch takes random rows out and the next incoming rows
    take their places, so rows of many shards (and contexts) mix, as the paper shuffles."""
    rng = np.random.default_rng(seed)
    buffer, pending = _take(blocks, torch.empty(0), buffer_rows)  # [buffer_rows, d]
    while True:
        incoming, pending = _take(blocks, pending, batch_size)  # [batch_size, d]
        idx = torch.from_numpy(rng.choice(len(buffer), batch_size, replace=False))
        batch = buffer[idx]
        buffer[idx] = incoming
        yield batch


def _take(blocks: Iterator[Tensor], pending: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """(the next n rows, what is left over) from `pending` followed by `blocks`."""
    parts, have = [pending] if len(pending) else [], len(pending)
    while have < n:
        block = next(blocks)
        parts.append(block)
        have += len(block)
    rows = torch.cat(parts)
    return rows[:n].clone(), rows[n:]
