"""The JumpReLU thresholds every Mutual and Feature Choice run now ends with (appendix B):
what they cost and what they give, estimated at the end of training (what `train` does)
against tracked during it (as SAELens tracks its BatchTopK threshold), in the same run.

    nice -n 19 .venv/bin/python benchmarks/thresholds.py [--store data/bench-smollm2]

- end: train's own estimate, on the batches the stream gives after the last step, with the
  saved (schedule-free averaged) weights; its time is training.json's thresholds.seconds.
- tracked: at every step, with the weights that step reads (schedule-free's y, not the average
  that is saved), an EMA at rate 0.01 (SAELens's topk_threshold_lr) of the smallest selected
  activation (global θ) and of each feature's largest unselected affinity, its threshold in
  that batch (θ_i). Its cost is the time of those updates alone, given the z' and the
  selection that the step computes anyway (recomputed here, and that time left out).

- sizes: the end estimate again on --sizes batches after the last step (what train's
  threshold_tokens and its one-batch-per-100-steps cap choose between), each timed.

Held out: the store's first --eval-tokens rows (as `choicesae bench` holds them out, but in
store order: batch inference meets batches of one text, which the per-token thresholds do not
see), the rest trains. Prints the run's time, each estimate's cost as % of it, and held-out
L0, FVU and dead latents of batch inference and of each set of thresholds on the saved SAE.
"""

import argparse
import copy
import functools
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from choicesae.core.config import SAEConfig, TrainConfig  # noqa: E402
from choicesae.core.schedule import phase_at  # noqa: E402
from choicesae.core.thresholds import estimate_thresholds_  # noqa: E402
from choicesae.data.activations import batches  # noqa: E402
from choicesae.data.store import Store  # noqa: E402
from choicesae.evaluation.evaluate import compare_inference  # noqa: E402
from choicesae.step.ops import batch_codes  # noqa: E402
from choicesae.training import loop  # noqa: E402

RATE = 0.01  # SAELens's topk_threshold_lr


class Tracker:
    """Thresholds tracked over training: θ_i [F] and θ [] as EMAs of each batch's own."""

    def __init__(self, num_latents: int):
        self.theta = torch.zeros(num_latents)
        self.theta_global = torch.zeros(())
        self.update_s = self.recompute_s = 0.0

    @torch.no_grad()
    def __call__(self, sae, rows, cfg, state) -> None:
        start = time.perf_counter()
        z = sae.pre_acts(sae.prepare(rows)[0])  # [B, F], what the step computes anyway
        acts = sae.sparsify(phase_at(state.step, cfg.phases())[1], z, cfg.sae.k).acts
        middle = time.perf_counter()
        selected = acts > 0
        # a feature's threshold in this batch: its (c_i + 1)-th largest z', the largest of
        # those it was not selected for (the selected ones are its c_i largest)
        per_batch = z.masked_fill(selected, float("-inf")).amax(0).clamp(min=0)
        self.theta.lerp_(per_batch, RATE)
        if selected.any():
            self.theta_global.lerp_(acts[selected].min(), RATE)
        self.update_s += time.perf_counter() - middle
        self.recompute_s += middle - start


def tracked_training(cfg: TrainConfig, x: torch.Tensor):
    """Train with the tracker called before every step; (SAE, tracker, wall seconds)."""
    tracker, step = Tracker(cfg.sae.num_latents), loop.train_step

    def train_step(sae, optimizer, rows, cfg, state, ops=None, world=loop.SINGLE):
        tracker(sae, rows, cfg, state)
        return step(sae, optimizer, rows, cfg, state, ops, world)

    loop.train_step = train_step
    try:
        start = time.perf_counter()
        sae = loop.train(cfg, x)
        return sae, tracker, time.perf_counter() - start
    finally:
        loop.train_step = step


def heldout_rows(sae, test: torch.Tensor, batch_size: int) -> dict:
    """Held-out L0, FVU, dead of batch inference and of both thresholds."""
    measured, _ = compare_inference(sae, test, batch_size)
    keep = ("l0", "fvu", "dead")
    return {mode: {k: round(v[k], 4) for k in keep} for mode, v in measured.items()}


def calibration_sizes(sae, cfg: TrainConfig, x, test, sizes: list[int], run_s: float) -> list:
    """The end estimate on n batches after the last step, for each n: time and held-out rows."""
    rows = []
    for n in sizes:
        stream = batches(x, cfg.batch_size, cfg.seed, start=cfg.steps)
        other = copy.deepcopy(sae)
        start = time.perf_counter()
        x_n = [other.prepare(next(stream))[0] for _ in range(n)]
        estimate_thresholds_(other, x_n, functools.partial(batch_codes, other))
        seconds = time.perf_counter() - start
        measured = heldout_rows(other, test, cfg.batch_size)
        rows.append({"batches": n, "s": round(seconds, 2), "pct": round(100 * seconds / run_s, 2)})
        rows[-1] |= {mode: measured[mode] for mode in ("feature_threshold", "global_threshold")}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", default="data/bench-smollm2")
    parser.add_argument("--eval-tokens", type=int, default=65_536)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=1536)
    parser.add_argument("--num-latents", type=int, default=2304)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--methods", default="mutual_choice,feature_choice")
    parser.add_argument("--sizes", default="3,6,12,24")
    parser.add_argument("--out", default="runs/bench-thresholds")
    args = parser.parse_args()
    store = Store(args.store)
    rows = store[np.arange(len(store))].float()
    test, train = rows[: args.eval_tokens], rows[args.eval_tokens :]
    print(f"{args.store}: {len(train)} training rows, {len(test)} held out", flush=True)
    for method in args.methods.split(","):
        cfg = TrainConfig(
            out=str(Path(args.out) / method),
            overwrite=True,
            sae=SAEConfig(sparsifier=method, k=args.k, num_latents=args.num_latents),
            batch_size=args.batch_size,
            steps=args.steps,
            progress=False,
        )
        sae, tracker, wall = tracked_training(cfg, train)
        end = json.loads((Path(cfg.out) / "sae" / "training.json").read_text())["thresholds"]
        run_s = wall - tracker.recompute_s - tracker.update_s  # as train runs it
        result = {
            "method": method,
            "run_s": round(run_s, 2),
            "end_s": end["seconds"],
            "end_pct": round(100 * end["seconds"] / run_s, 3),
            "end_tokens": end["calibration_tokens"],
            "tracked_s": round(tracker.update_s, 3),
            "tracked_pct": round(100 * tracker.update_s / (run_s - end["seconds"]), 3),
            "end": heldout_rows(sae, test, args.batch_size),
        }
        tracked = copy.deepcopy(sae)
        tracked.threshold.copy_(tracker.theta)
        tracked.threshold_global.copy_(tracker.theta_global)
        result["tracked"] = heldout_rows(tracked, test, args.batch_size)
        sizes = [int(n) for n in args.sizes.split(",")]
        result["sizes"] = calibration_sizes(sae, cfg, train, test, sizes, run_s)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
