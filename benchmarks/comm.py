"""Bytes each rank hands to collectives per training step, by sparsifier, mode (data parallel
with --distributed-selection global or local; feature sharding, --parallel features) and
purpose, measured in a real multi-process run
(gloo on CPU) from the sizes of the tensors passed to comm.all_gather / all_reduce.

    .venv/bin/python benchmarks/comm.py                       # 2 processes, d 384, F 6144
    .venv/bin/python benchmarks/comm.py --nproc 2 --d 64 --expansion 8 --batch 512

selection: candidate values all_gathered (each rank sends this; it receives W−1 times it).
gradients: data: one flat all_reduce of every gradient (2·F·d + F + d floats); features
  (the sparse step): b_dec's encoder-side gradient [d], once per step.
activations: features: the decoder's partial sums [B, d], all_reduced per decode.
stats: data: all_reduce of loss terms, firing counts [F], FVU sums (and |e|² for the aux
  losses); features: firing counts [F/W] all_gathered and the gradient norm (clipping).
control: the stop flag. The expected sizes, as formulas: docs/distributed.md.
"""

import argparse
import os
import subprocess
import sys

import torch

from choicesae.core.config import SAEConfig, TrainConfig
from choicesae.core.sae import SAE
from choicesae.data.activations import batches
from choicesae.parallel import comm, features
from choicesae.training.loop import make_optimizer, step_ops, train_step
from choicesae.training.run import resolve
from choicesae.training.state import TrainState, advance

PURPOSES = ("selection", "activations", "gradients", "stats", "control")
MODES = ("global", "local", "features")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--nproc", type=int, default=2, help="processes (torchrun --nproc-per-node)")
    p.add_argument("--d", type=int, default=384)
    p.add_argument("--expansion", type=int, default=16)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=1536, help="global batch")
    p.add_argument("--steps", type=int, default=3)
    return p.parse_args()


def per_step(sparsifier: str, mode: str, args, world) -> dict[str, float]:
    """Mean bytes per step and purpose over args.steps steps of `sparsifier` in `mode`."""
    sae_cfg = SAEConfig(sparsifier=sparsifier, k=args.k, expansion=args.expansion)
    cfg = TrainConfig(sae=sae_cfg, batch_size=args.batch, steps=args.steps, progress=False)
    sharded = {"parallel": "features"} if mode == "features" else {}
    setting = sharded or {"distributed_selection": mode}
    cfg = resolve(TrainConfig(**{**cfg.__dict__, **setting}), args.d)
    torch.manual_seed(0)
    rows = torch.randn(4 * args.batch, args.d)
    latents = features.span(cfg.sae.num_latents, world) if sharded else None
    sae = SAE(cfg.sae, latents)  # features: each rank its latents (and the whole batch)
    optimizer, state = make_optimizer(sae, cfg), TrainState.fresh(cfg.sae.num_latents, "cpu")
    ops = step_ops(cfg, world)
    comm.COMM.clear()
    for x in batches(rows, args.batch, 0):
        if state.step == args.steps:
            break
        comm.any_rank(False, world)  # the loop's stop check, as in run_loop
        x = x if features else comm.shard(x, world)
        _, _, fired = train_step(sae, optimizer, x, cfg, state, ops, world)
        state = advance(state, fired, cfg, sae)
    return {p: comm.COMM[p] / args.steps for p in PURPOSES}


def main() -> None:
    args = parse()
    if "WORLD_SIZE" not in os.environ:  # relaunch this script under torchrun
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += ["--nproc-per-node", str(args.nproc), "--", __file__, *sys.argv[1:]]
        sys.exit(subprocess.call(cmd))
    world = comm.init_from_env("cpu")
    F = args.d * args.expansion
    if world.main:
        print(
            f"W={world.size} d={args.d} F={F} k={args.k} B={args.batch} (global); bytes/step/rank"
        )
        print(f"{'sparsifier':<15}{'mode':<10}" + "".join(f"{p:>12}" for p in PURPOSES))
    for sparsifier in ("topk", "mutual_choice", "feature_choice", "relu"):
        for mode in MODES:
            sent = per_step(sparsifier, mode, args, world)
            if world.main:
                row = "".join(f"{sent[p]:>12,.0f}" for p in PURPOSES)
                print(f"{sparsifier:<15}{mode:<10}{row}")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
