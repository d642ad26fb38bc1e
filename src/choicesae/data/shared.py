"""One read of a store for several readers: each batch of whole rows is drawn once and every
reader takes its own columns of it (training/many.py trains one model per hookpoint of a
several-hookpoint harvest this way, each in a thread of its own).

A reader's `batches(batch_size, seed, device, start)` is the stream its selected store would
give (`Store.select(...).batches`): the same rows in the same order, so a model trained from
the shared read equals one trained alone on its columns. Readers that ask for the same stream
share one draw of it; a reader may run at most LEAD batches ahead of the slowest one, which
bounds the memory to LEAD + 1 batches of whole rows.
"""

import threading
from collections import deque
from collections.abc import Iterator

import torch
from torch import Tensor

from choicesae.data.store import DTYPES, Store

LEAD = 2  # batches a reader may draw ahead of the slowest


class Aborted(RuntimeError):
    """Another reader of the shared read failed: the others stop instead of waiting for it."""


class SharedRead:
    """The whole-row batches of `store` drawn once for `n` readers (`readers`)."""

    def __init__(self, store: Store, hookpoints: list[str]):
        self.store = store
        self.views = [store.select(h) for h in hookpoints]
        self.cond = threading.Condition()
        self.streams: dict[tuple, _Stream] = {}
        self.failed: BaseException | None = None
        self.rows_read = 0  # whole rows drawn from the store, for the bytes read

    @property
    def bytes_read(self) -> int:
        """Bytes of activations drawn from the store (whole rows, storage dtype)."""
        return self.rows_read * self.store.width * DTYPES[self.store.dtype].itemsize

    def readers(self) -> list["Reader"]:
        """One row source per hookpoint, in order: what `train` reads for its model."""
        return [Reader(self, i, view) for i, view in enumerate(self.views)]

    def abort(self, error: BaseException) -> None:
        """Wake and stop every reader: one of them failed and will draw no more."""
        with self.cond:
            self.failed = error
            self.cond.notify_all()

    def take(self, key: tuple, i: int) -> Tensor:
        """Reader i's next batch of whole rows [B, width] (storage dtype) of stream `key`."""
        with self.cond:
            stream = self.streams.get(key)
            if stream is None:
                stream = self.streams[key] = _Stream(self.store.raw_batches(*key), len(self.views))
            while not stream.queues[i]:
                if self.failed is not None:
                    raise Aborted(f"another model reading the store failed: {self.failed}")
                if stream.longest() >= LEAD:  # the slowest reader has LEAD batches waiting
                    self.cond.wait()
                    continue
                batch = next(stream.source)
                self.rows_read += len(batch)
                stream.push(batch)
                self.cond.notify_all()
            batch = stream.queues[i].popleft()
            self.cond.notify_all()
            return batch

    def leave(self, key: tuple, i: int) -> None:
        """Reader i draws no more of stream `key`: stop keeping batches for it."""
        with self.cond:
            stream = self.streams.get(key)
            if stream is not None:
                stream.leave(i)
                if not stream.active:
                    del self.streams[key]
            self.cond.notify_all()


class _Stream:
    """One stream of whole-row batches and what each reader has yet to take of it."""

    def __init__(self, source: Iterator[Tensor], n: int):
        self.source = source
        self.queues = [deque() for _ in range(n)]
        self.active = set(range(n))

    def longest(self) -> int:
        return max((len(self.queues[i]) for i in self.active), default=0)

    def push(self, batch: Tensor) -> None:
        for i in self.active:
            self.queues[i].append(batch)

    def leave(self, i: int) -> None:
        self.active.discard(i)
        self.queues[i].clear()


class Reader:
    """The row source of one hookpoint in a shared read: a selected store's shape, widths and
    manifest, and its batches cut from the shared whole rows."""

    def __init__(self, shared: SharedRead, i: int, view: Store):
        self.shared, self.i, self.view = shared, i, view
        self.shape, self.manifest = view.shape, view.manifest
        self.d_model, self.d_target = view.d_model, view.d_target
        self.columns = torch.from_numpy(view.index)

    def __len__(self) -> int:
        return self.shape[0]

    def batches(
        self, batch_size: int, seed: int, device: str = "cpu", start: int = 0
    ) -> Iterator[Tensor]:
        """Endless float32 batches [batch_size, d_model + d_target], as view.batches gives."""
        self.view.check_batch_size(batch_size)
        return self._cut((batch_size, seed, start), device)

    def _cut(self, key: tuple, device: str) -> Iterator[Tensor]:
        try:
            while True:
                rows = self.shared.take(key, self.i)  # [B, width] whole rows, storage dtype
                yield rows[:, self.columns].to(device, torch.float32)
        finally:  # closed, or dropped: the other readers stop keeping batches for this one
            self.shared.leave(key, self.i)
