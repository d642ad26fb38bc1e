"""Harvest and loader throughput on this machine, the loader as a ratio to the trainer's need.

    .venv/bin/python benchmarks/harvest.py [--tokens 50000] [--steps 20]

Harvests the embedded default (all-MiniLM-L6-v2, encoder.layer.3, default corpus) into a
temporary store, reads shuffled batches of 1536 rows from it, and trains the default SAE on it
for a few steps, printing tokens/s, rows/s and loader rows/s ÷ trainer rows/s.
"""

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path

from choicesae.config import SAEConfig, TrainConfig
from choicesae.harvest import HarvestConfig, harvest
from choicesae.train import train


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    args.add_argument("--tokens", type=int, default=50_000, help="rows to harvest")
    args.add_argument("--steps", type=int, default=20, help="training steps to time")
    args.add_argument("--batches", type=int, default=300, help="loader batches to time")
    args = args.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = HarvestConfig(tokens=args.tokens, out=f"{tmp}/store", progress=False)
        start = time.perf_counter()
        store = harvest(cfg)
        harvest_s = time.perf_counter() - start
        print(
            f"harvest: {args.tokens} tokens of {cfg.model} {cfg.hookpoint} in {harvest_s:.1f} s "
            f"= {args.tokens / harvest_s:,.0f} tokens/s (model load and tokenising included)"
        )

        batches = store.batches(batch_size=1536, seed=0)
        next(batches)  # fills the shuffle buffer and verifies the shards' checksums
        start = time.perf_counter()
        for _ in itertools.islice(batches, args.batches):
            pass
        loader = args.batches * 1536 / (time.perf_counter() - start)
        print(f"loader:  {loader:,.0f} rows/s (batches of 1536 from the shuffle buffer)")

        run = TrainConfig(
            store=f"{tmp}/store",
            out=f"{tmp}/run",
            steps=args.steps,
            log_every=args.steps,
            sae=SAEConfig(sparsifier="mutual_choice"),
            progress=False,
        )
        train(run)
        record = json.loads(Path(f"{tmp}/run/metrics.jsonl").read_text().splitlines()[-1])
        trainer = args.steps * 1536 / record["elapsed_s"]
        print(f"trainer: {trainer:,.0f} rows/s (mutual_choice, expansion 16, k 32, d_in 384)")
        print(f"loader / trainer: {loader / trainer:.0f}x")


if __name__ == "__main__":
    main()
