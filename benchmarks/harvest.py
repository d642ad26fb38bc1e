"""Harvest throughput as a ratio to a bare forward pass; loader and trainer throughput.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/harvest.py [--tokens 50000] [--steps 20]

Harvests the embedded default (all-MiniLM-L6-v2, encoder.layer.3, default corpus) into a
temporary store and, in the same run, times a bare forward pass of the same model cut after the
hookpoint over the same contexts (pre-tokenised, same batches, no hook, no store): harvest
tokens/s ÷ bare tokens/s is what tokenising, capturing and writing cost (target >= 0.8). The
model is loaded once, before either is timed; each is timed --repeats times, interleaved, and
the fastest kept (the machine is shared). Then it reads shuffled batches of 1536 rows from the
store and trains the default SAE on it for a few steps, printing loader rows/s ÷ trainer rows/s.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP

import argparse  # noqa: E402
import copy  # noqa: E402
import dataclasses
import itertools
import json
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from choicesae.core.config import SAEConfig, TrainConfig
from choicesae.data.harvest import HarvestConfig, Harvester, batched, harvest, pad
from choicesae.data.hooks import capture
from choicesae.training.loop import train


def cut_at(model: nn.Module, hookpoint: str) -> nn.Module:
    """A copy of `model` that ends with the block `hookpoint` (PARENT.INDEX of a ModuleList):
    the later blocks and the pooler are removed, so its last hidden state is the hookpoint's."""
    parent, _, index = hookpoint.rpartition(".")
    blocks = model.get_submodule(parent)
    if not (isinstance(blocks, nn.ModuleList) and index.isdigit()):
        raise SystemExit(f"cannot cut the model at {hookpoint}: not a block of a ModuleList")
    cut = copy.deepcopy(model)
    owner, _, name = parent.rpartition(".")
    setattr(cut.get_submodule(owner), name, nn.ModuleList(blocks[: int(index) + 1]))
    if getattr(cut, "pooler", None) is not None:
        cut.pooler = None
    return cut


def bare_forward(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Seconds for the forward passes of the cut model over pre-padded batches [B, T]."""
    start = time.perf_counter()
    with torch.inference_mode():
        for input_ids, mask in batches:
            model(input_ids=input_ids, attention_mask=mask)
    return time.perf_counter() - start


def time_harvest(cfg: HarvestConfig, harvester: Harvester) -> float:
    """Seconds for the harvest (tokenising, forward, store), the model already loaded."""
    start = time.perf_counter()
    harvest(cfg, harvester)
    return time.perf_counter() - start


def harvest_ratio(cfg: HarvestConfig, repeats: int) -> None:
    harvester = Harvester(cfg)  # the one-off model load, timed in neither
    cut = cut_at(harvester.model, cfg.hookpoint)
    pad_id = harvester.tokenizer.pad_token_id or 0
    batches = [pad(b, cfg.context, pad_id) for b in batched(harvester.contexts(), cfg.batch_size)]
    with torch.inference_mode():  # the cut model is the harvest's model: check it, and warm up
        bare = cut(input_ids=batches[0][0], attention_mask=batches[0][1]).last_hidden_state
    harvested = capture(harvester.model, harvester.module, *batches[0])
    torch.testing.assert_close(bare, harvested)
    bare_s, harvest_s = [], []
    for _ in range(repeats):
        bare_s.append(bare_forward(cut, batches))
        harvest_s.append(time_harvest(cfg, harvester))
    bare_tps, harvest_tps = cfg.tokens / min(bare_s), cfg.tokens / min(harvest_s)
    print(
        f"harvest: {cfg.tokens} tokens of {cfg.model} {cfg.hookpoint}, {len(batches)} batches "
        f"of {cfg.batch_size}x{cfg.context}, best of {repeats}"
    )
    print(f"  harvest (tokenise + forward + store): {harvest_tps:,.0f} tokens/s")
    print(f"  bare forward, cut at the hookpoint:   {bare_tps:,.0f} tokens/s")
    print(f"  harvest / bare forward: {harvest_tps / bare_tps:.2f} (target >= 0.8)")


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    args.add_argument("--tokens", type=int, default=50_000, help="rows to harvest")
    args.add_argument("--repeats", type=int, default=3, help="timings of harvest and forward")
    args.add_argument("--steps", type=int, default=20, help="training steps to time")
    args.add_argument("--batches", type=int, default=300, help="loader batches to time")
    args = args.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = HarvestConfig(tokens=args.tokens, out=f"{tmp}/store", progress=False)
        harvest_ratio(dataclasses.replace(cfg, overwrite=True), args.repeats)
        store = harvest(cfg)  # the store harvested last, complete: reopened, not harvested again

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
