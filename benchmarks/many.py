"""N per-layer transcoders from one model pass and one read, against N separate harvests and
N separate runs, in one run on the same text: wall time, and bytes written and drawn.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/many.py [--layers 12,13,14,15]

Harvest: one harvest of every layer's MLP input and output (layers.L.post_attention_layernorm
and layers.L.mlp of SmolLM2-135M; data/store.py's several-hookpoint store) against one harvest
per layer of its pair alone, the model loaded once for each (not timed). Each harvest runs the
model only as far as the last module it captures, so a layer's own harvest is cheaper than a
pass to the slice's last layer. Training: the layers' transcoders trained from one read of the
shared store (training/many.py, a thread per model) against one run per layer on its own
store, every run with the same settings; the models are the same bit for bit (tests/
test_many.py), so only the time differs. Bytes drawn: the rows of the batches drawn (the init
sample, the steps, the threshold batches) times the bytes of a row, the shared read's whole
rows once against each run's own rows.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP

import argparse  # noqa: E402
import tempfile
import time
from pathlib import Path

from choicesae.core.config import SAEConfig, TrainConfig
from choicesae.data import shared
from choicesae.data.harvest import HarvestConfig, Harvester, harvest
from choicesae.data.hooks import SMOLLM2
from choicesae.training import many
from choicesae.training.loop import train


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*.npy"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", default="12,13,14,15")
    p.add_argument("--tokens", type=int, default=32_768)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--expansion", type=int, default=4)
    args = p.parse_args()
    layers = [int(i) for i in args.layers.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="many-"))
    pairs = [(f"layers.{i}.post_attention_layernorm", f"layers.{i}.mlp") for i in layers]

    def harvest_cfg(hookpoint: str, target: str, out: str) -> HarvestConfig:
        return HarvestConfig(
            model=SMOLLM2, hookpoint=hookpoint, target=target, tokens=args.tokens,
            out=str(tmp / out), progress=False,
        )  # fmt: skip

    one = harvest_cfg(",".join(h for h, _ in pairs), ",".join(t for _, t in pairs), "all")
    loaded = Harvester(one)  # the model loads untimed
    store, t_one = timed(lambda: harvest(one, loaded))
    alone, t_alone = [], 0.0
    for i, (h, t) in zip(layers, pairs, strict=True):
        cfg = harvest_cfg(h, t, f"layer{i}")
        loaded = Harvester(cfg)
        s, seconds = timed(lambda cfg=cfg, loaded=loaded: harvest(cfg, loaded))
        alone.append(s)
        t_alone += seconds
    written = sum(size(s.path) for s in alone)
    print(f"harvest, {len(layers)} layers x {args.tokens} tokens:")
    print(f"  one pass  {t_one:8.1f} s  {size(store.path) / 2**20:8.1f} MiB written")
    print(f"  {len(layers)} passes  {t_alone:8.1f} s  {written / 2**20:8.1f} MiB written")
    print(f"  one pass / {len(layers)} passes: time {t_one / t_alone:.2f}")

    def train_cfg(store_path: Path, out: str) -> TrainConfig:
        return TrainConfig(
            sae=SAEConfig(sparsifier="mutual_choice", k=32, expansion=args.expansion),
            transcoder=True, store=str(store_path), steps=args.steps, batch_size=args.batch_size,
            out=str(tmp / out), progress=False,
        )  # fmt: skip

    reads = []
    real = shared.SharedRead
    many.SharedRead = lambda *a: reads.append(real(*a)) or reads[-1]
    _, t_many = timed(lambda: many.train_many(train_cfg(store.path, "runs-one-read")))
    t_runs = sum(
        timed(lambda s=s: train(train_cfg(s.path, f"run-{s.path.name}")))[1] for s in alone
    )
    steps = args.steps + max(1, args.steps // 100)  # the steps and the threshold batches
    drawn = min(args.tokens, 16_384) + steps * args.batch_size  # rows drawn by one run
    row = 2 * (576 + 576)  # a pair's row in float16
    print(f"training, {len(layers)} transcoders x {args.steps} steps of {args.batch_size}:")
    print(f"  one read  {t_many:8.1f} s  {reads[0].bytes_read / 2**20:8.1f} MiB drawn")
    separate = len(layers) * drawn * row
    print(f"  {len(layers)} runs    {t_runs:8.1f} s  {separate / 2**20:8.1f} MiB drawn")
    print(f"  one read / {len(layers)} runs: time {t_many / t_runs:.2f}")


if __name__ == "__main__":
    main()
