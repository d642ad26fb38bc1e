"""The sweep behind the default training recipe (schedule.RECIPES): held-out FVU of SAEs trained
with candidate recipes across widths, budgets and data, on the same batches.

    .venv/bin/python benchmarks/recipe.py --grid lr,width,long,synthetic [--jobs 2]

Grids (F = latents, B = batch, TopK at k = 32 on the harvested MiniLM store unless said):
  lr         F = 8d, B = 4096, 300 steps: schedule-free and AdamW with a decay over their
             learning rates, and the paper's recipe
  width      F = 4d and 32d, B = 1536 (the default batch), 300 steps
  long       F = 8d, B = 1536, 5000 steps (7.7M tokens)
  synthetic  choicesae synthetic data (d = 128, 1024 true features), F = 8d, B = 1536, 1000 steps
Learning rates are given at F = 2^14 and scaled by 1/sqrt(F / 2^14), as every recipe does.
Every run is one thread; finished runs are kept in OUT/results.jsonl and not run again, so an
interrupted sweep continues. FVU, L0 and dead % are measured on held-out rows in the raw space.
"""

import argparse
import json
import multiprocessing
import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from choicesae.core.config import SAEConfig, TrainConfig  # noqa: E402
from choicesae.core.preprocess import normalize  # noqa: E402
from choicesae.data.store import Store  # noqa: E402
from choicesae.data.synthetic import SyntheticConfig, sparse_dictionary  # noqa: E402
from choicesae.training.loop import train  # noqa: E402

HELDOUT = 100_000
# (optimizer, lr at F = 2^14, warm-up steps, decay fraction): the fast recipe's candidates
SCHEDULE_FREE = [("schedule_free", lr, 50, 0.0) for lr in (1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2)]
ADAMW = [("adamw", lr, 50, 0.2) for lr in (1e-3, 2e-3, 4e-3)]
PAPER = ("adamw", 2e-4, 100, 0.2)
GRIDS = {
    "lr": [("minilm", 8, 4096, 300, r) for r in [*SCHEDULE_FREE, *ADAMW, PAPER]],
    "width": [("minilm", e, 1536, 300, r) for e in (4, 32) for r in [*SCHEDULE_FREE[1:4], PAPER]],
    "long": [("minilm", 8, 1536, 5000, r) for r in (SCHEDULE_FREE[1], SCHEDULE_FREE[2], PAPER)],
    "synthetic": [("synthetic", 8, 1536, 1000, r) for r in [*SCHEDULE_FREE[1:4], PAPER]],
}


def data(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(train rows, held-out rows): the store's last HELDOUT rows are held out."""
    if name == "synthetic":
        x, _ = sparse_dictionary(
            SyntheticConfig(tokens=600_000, d_in=128, num_features=1024, seed=0)
        )
        return x[:-HELDOUT], x[-HELDOUT:]
    store = Store(os.environ.get("RECIPE_STORE", "data/minilm"))
    n = store.shape[0]
    return store[: n - HELDOUT].half(), store[n - HELDOUT :]


def run(job: tuple, out: Path) -> dict:
    name, expansion, batch, steps, (optimizer, lr, warmup, decay) = job
    torch.set_num_threads(1)
    x, heldout = data(name)
    F = expansion * x.shape[1]
    cfg = TrainConfig(
        out=str(out / "runs" / key(job)),
        overwrite=True,
        sae=SAEConfig(sparsifier="topk", k=32, num_latents=F),
        batch_size=batch,
        steps=steps,
        optimizer=optimizer,
        lr=lr / (F / 2**14) ** 0.5,
        warmup_steps=warmup,
        decay_fraction=decay,
        progress=False,
        log_every=min(steps, 500),
        checkpoint_every=steps,
    )
    sae = train(cfg, x)
    with torch.no_grad():
        x_hat, acts = [], []
        for chunk in heldout.split(8192):
            x_hat.append(sae.reconstruct(chunk))
            acts.append(sae.encode(normalize(chunk, sae.cfg.normalize, sae.scale)[0]).acts != 0)
        x_hat, fired = torch.cat(x_hat), torch.cat(acts)
    fvu = float((heldout - x_hat).pow(2).sum() / (heldout - heldout.mean(0)).pow(2).sum())
    last = json.loads((Path(cfg.out) / "metrics.jsonl").read_text().splitlines()[-1])
    return {
        "key": key(job),
        "data": name,
        "F": F,
        "batch": batch,
        "steps": steps,
        "recipe": f"{optimizer} lr {lr:g}@2^14 warm-up {warmup} decay {decay}",
        "fvu": round(fvu, 4),
        "l0": round(float(fired.sum(-1).float().mean()), 2),
        "dead_pct": round(100 * float((~fired.any(0)).float().mean()), 2),
        "train_s": last["elapsed_s"],
    }


def key(job: tuple) -> str:
    name, expansion, batch, steps, (optimizer, lr, warmup, decay) = job
    return f"{name}-x{expansion}-b{batch}-s{steps}-{optimizer}-{lr:g}-w{warmup}-d{decay}"


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    args.add_argument("--grid", default="lr,width,long,synthetic", help="grids to run")
    args.add_argument("--jobs", type=int, default=2, help="runs at once, one thread each")
    args.add_argument("--out", default="runs/recipe")
    args = args.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    done = (
        {json.loads(ln)["key"] for ln in results.read_text().splitlines()}
        if (results.exists())
        else set()
    )
    jobs = [j for g in args.grid.split(",") for j in GRIDS[g] if key(j) not in done]
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        for record in pool.imap_unordered(_run, [(j, out) for j in jobs]):
            print(json.dumps(record), flush=True)
            with results.open("a") as f:
                f.write(json.dumps(record) + "\n")
    rows = [json.loads(ln) for ln in results.read_text().splitlines()]
    print("\n| data | F | batch | steps | recipe | FVU | L0 | dead % | train s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["data"], r["F"], r["batch"], r["steps"], r["fvu"])):
        print(
            f"| {r['data']} | {r['F']} | {r['batch']} | {r['steps']} | {r['recipe']} | "
            f"{r['fvu']:.4f} | {r['l0']:.1f} | {r['dead_pct']:.1f} | {r['train_s']:.0f} |"
        )


def _run(args: tuple) -> dict:
    return run(*args)


if __name__ == "__main__":
    main()
