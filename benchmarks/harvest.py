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
    if isinstance(getattr(cut, "norm", None), nn.Module):  # Llama's final norm: not the block's
        cut.norm = nn.Identity()
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
    torch.testing.assert_close(bare.float(), harvested)
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


def dtype_comparison(cfg: HarvestConfig, repeats: int) -> None:
    """The bare forward, cut at the hookpoint, in float32 and in bfloat16 over the same
    contexts: tokens/s of each (interleaved, best of `repeats`) and the relative error of the
    bfloat16 activations, over the real tokens."""
    models = {
        dtype: cut_at(Harvester(dataclasses.replace(cfg, model_dtype=dtype)).model, cfg.hookpoint)
        for dtype in ("float32", "bfloat16")
    }
    harvester = Harvester(cfg)
    pad_id = harvester.tokenizer.pad_token_id or 0
    batches = [pad(b, cfg.context, pad_id) for b in batched(harvester.contexts(), cfg.batch_size)]
    seconds = {dtype: [] for dtype in models}
    for _ in range(repeats):
        for dtype, model in models.items():
            seconds[dtype].append(bare_forward(model, batches))
    with torch.inference_mode():
        acts = {
            dtype: torch.cat(
                [
                    model(input_ids=i, attention_mask=m).last_hidden_state[m.bool()]
                    for i, m in batches
                ]
            ).float()
            for dtype, model in models.items()
        }
    error = (acts["bfloat16"] - acts["float32"]).norm() / acts["float32"].norm()
    per_row = (acts["bfloat16"] - acts["float32"]).norm(dim=-1) / acts["float32"].norm(dim=-1)
    fp32, bf16 = (cfg.tokens / min(seconds[d]) for d in ("float32", "bfloat16"))
    print(f"forward to {cfg.hookpoint} of {cfg.model}, best of {repeats}:")
    print(f"  float32 {fp32:,.0f} tokens/s, bfloat16 {bf16:,.0f} tokens/s: ratio {bf16 / fp32:.2f}")
    print(
        f"  bfloat16 activations' relative error: {float(error):.4f} overall, per token median "
        f"{float(per_row.median()):.4f}, 99th percentile {float(per_row.quantile(0.99)):.4f}"
    )


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    args.add_argument("--tokens", type=int, default=50_000, help="rows to harvest")
    args.add_argument("--repeats", type=int, default=3, help="timings of harvest and forward")
    args.add_argument("--steps", type=int, default=20, help="training steps to time")
    args.add_argument("--batches", type=int, default=300, help="loader batches to time")
    args.add_argument("--model", default=HarvestConfig.model, help="model name, folder or GGUF")
    args.add_argument("--hookpoint", default=HarvestConfig.hookpoint)
    args.add_argument("--model-dtype", default=HarvestConfig.model_dtype, help="of the harvest")
    args.add_argument("--dtypes", action="store_true", help="also float32 against bfloat16")
    args = args.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = HarvestConfig(
            model=args.model,
            hookpoint=args.hookpoint,
            model_dtype=args.model_dtype,
            tokens=args.tokens,
            out=f"{tmp}/store",
            progress=False,
        )
        if args.dtypes:
            dtype_comparison(cfg, args.repeats)
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
