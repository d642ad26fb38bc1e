"""Where Definition 3.1's expectation comes from: the Zipf law fitted to each window's middle
ranks (--dying-expectation fit, the default) against appendix G's, Algorithm 1's capacities at
the fitted (alpha, beta) for the budget k·B (--dying-expectation budget). Both train Mutual
Choice on the same batches of an activation store; the script prints, per density window, the
dying and dead counts each found, and the held-out FVU at the end.

    .venv/bin/python benchmarks/dying.py                  # MiniLM store, F 1536, 600 steps
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP

import argparse  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

import choicesae as cs  # noqa: E402
from choicesae.core.losses import fvu  # noqa: E402


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--store", default="data/minilm")
    p.add_argument("--num-latents", type=int, default=1536)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--density-tokens", type=int, default=262_144, help="tokens per window")
    p.add_argument("--heldout", type=int, default=65_536, help="the store's last rows")
    p.add_argument("--out", type=Path, default=Path("runs/dying"))
    return p.parse_args()


def main() -> None:
    args = parse()
    torch.set_num_threads(1)
    store = cs.Store(args.store)
    rest = len(store) - args.heldout
    x_train = store[: min(rest, args.steps * args.batch_size)]
    x_test = store[rest:]
    print(f"{args.store}: training on {len(x_train):,} rows, FVU on the last {len(x_test):,}")
    print("expectation  window-end step  dying  dead  (Mutual Choice, the same batches)")
    for expectation in ("fit", "budget"):
        cfg = cs.TrainConfig(
            out=str(args.out / expectation),
            overwrite=True,
            sae=cs.SAEConfig(sparsifier="mutual_choice", k=args.k, num_latents=args.num_latents),
            batch_size=args.batch_size,
            steps=args.steps,
            density_tokens=args.density_tokens,
            dying_expectation=expectation,
            log_every=args.density_tokens // args.batch_size,
            progress=False,
        )
        sae = cs.train(cfg, x_train)
        for line in (args.out / expectation / "metrics.jsonl").read_text().splitlines():
            r = json.loads(line)
            print(f"{expectation:<12} {r['step']:>15}  {r.get('dying', 0):>5}  {r['dead']:>4}")
        with torch.no_grad():
            heldout = float(fvu(sae.reconstruct(x_test, batch=True), x_test))  # as measured
        print(f"{expectation:<12} held-out FVU {heldout:.4f}")


if __name__ == "__main__":
    main()
