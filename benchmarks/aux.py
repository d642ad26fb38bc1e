"""What the aux losses (aux_k, aux_zipf) cost and what they buy, before and after bounding them
to a sample of tokens (losses.aux_rows), measured side by side in one run.

    .venv/bin/python benchmarks/aux.py [--train-steps 300] [--store data/minilm]

1. Cost: the sparse step (forward + backward) at d 384, F 3072, k 32, B 4096, k_aux 512 with
   10% of the latents dead and 25% dying (Definition 3.1's most), against the same step with
   the aux losses off: every token (before) and the bounded sample (after).
2. What they buy: Mutual Choice trained with the defaults on the MiniLM store, every token
   against the bounded sample: held-out dead %, dying latents at the end, FVU and time.
"""

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from choicesae import losses  # noqa: E402
from choicesae.core.config import SAEConfig, TrainConfig  # noqa: E402
from choicesae.core.sae import SAE  # noqa: E402
from choicesae.data.store import Store  # noqa: E402
from choicesae.step.objective import Masks, objective  # noqa: E402
from choicesae.step.ops import Sparse  # noqa: E402
from choicesae.training.loop import train  # noqa: E402

BOUNDED, EVERY_TOKEN = losses.AUX_SHARE, 1e9  # AUX_SHARE 1e9: aux_rows reads every token


def step_ms(args) -> dict[str, float]:
    """Best-of-repeats ms of one step for: no aux losses, aux on every token, aux bounded."""
    d, F = 384, 3072
    cfg = TrainConfig(sae=SAEConfig(k=32, num_latents=F).resolve(d), k_aux=512)
    torch.manual_seed(0)
    sae = SAE(cfg.sae)
    x = torch.randn(4096, d)
    x = x / x.norm(dim=-1, keepdim=True)
    rank = torch.randperm(F)
    dead, dying = rank < F // 10, (rank >= F // 10) & (rank < F // 10 + F // 4)
    variants = {
        "aux off": (dataclasses.replace(cfg, aux_k_coeff=0, aux_zipf_coeff=0), BOUNDED),
        "aux, every token": (cfg, EVERY_TOKEN),
        "aux, bounded sample": (cfg, BOUNDED),
    }
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(args.repeats + 1):  # the first round warms up
        for name, (c, share) in variants.items():
            losses.AUX_SHARE = share
            start = time.perf_counter()
            masks = Masks(dead, dying)
            objective(sae, x, c, "mutual_choice", masks, ops=Sparse()).loss.backward()
            best[name] = min(best[name], time.perf_counter() - start)
            sae.zero_grad(set_to_none=True)
    losses.AUX_SHARE = BOUNDED
    return {name: 1e3 * t for name, t in best.items()}


def trained(args, share: float, name: str) -> dict:
    store = Store(args.store)
    n = store.shape[0]
    x, heldout = store[: n - 100_000].half(), store[n - 100_000 :]
    losses.AUX_SHARE = share
    cfg = TrainConfig(
        out=f"{args.out}/{name}",
        overwrite=True,
        sae=SAEConfig(sparsifier="mutual_choice", k=32, num_latents=3072),
        batch_size=4096,
        steps=args.train_steps,
        progress=False,
        log_every=args.train_steps,
    )
    start = time.perf_counter()
    sae = train(cfg, x)
    seconds = time.perf_counter() - start
    losses.AUX_SHARE = BOUNDED
    with torch.no_grad():
        x_hat = torch.cat([sae.reconstruct(c, batch=True) for c in heldout.split(4096)])
    record = json.loads((Path(cfg.out) / "sae" / "training.json").read_text())
    fvu = (heldout - x_hat).pow(2).sum() / (heldout - heldout.mean(0)).pow(2).sum()
    return {
        "fvu": float(fvu),
        "dead_pct": record["dead_pct"],
        "dying": record.get("dying", 0),
        "seconds": seconds,
    }


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    args.add_argument("--repeats", type=int, default=5)
    args.add_argument("--train-steps", type=int, default=300)
    args.add_argument("--store", default="data/minilm")
    args.add_argument("--out", default="runs/aux")
    args = args.parse_args()
    torch.set_num_threads(1)
    ms = step_ms(args)
    base = ms["aux off"]
    print("| step (d 384, F 3072, B 4096, k_aux 512) | ms | aux cost / step without |")
    print("|---|---|---|")
    for name, t in ms.items():
        print(f"| {name} | {t:.0f} | {(t - base) / base:+.0%} |", flush=True)
    if args.train_steps:
        print(f"\n| Mutual Choice, {args.train_steps} steps x 4096 | FVU | dead % | dying | s |")
        print("|---|---|---|---|---|")
        for name, share in (("every token", EVERY_TOKEN), ("bounded sample", BOUNDED)):
            r = trained(args, share, name.replace(" ", "-"))
            print(
                f"| aux on {name} | {r['fvu']:.4f} | {r['dead_pct']:.1f} | {r['dying']} | "
                f"{r['seconds']:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
