"""sparsify's TopK against choicesae's sparsifiers, each library with its own defaults, trained
on the same batches of an activation store: tokens/s, held-out FVU at equal tokens, and the
training time each needs to reach sparsify's final FVU, in one run and one table.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/peers.py     # MiniLM: 1.2M tokens
    .venv/bin/python benchmarks/peers.py --steps 20 --eval-every 10 --num-latents 768 \\
        --batch-size 1024 --heldout 5000                                # a quick look
    ... benchmarks/peers.py --lr-sweep      # every method on a grid around its default lr
    ... benchmarks/peers.py --merge runs/peers/s0 runs/peers/s1 runs/peers/s2   # over seeds

The last --heldout rows of the store are held out; training takes the first steps x batch-size
rows of the others (all of them when fewer, reused pass after pass). Every library draws its
batches with choicesae.data.activations.batches(rows, batch_size, seed), and the run checks that
all of them trained on the same batches in the same order. One CPU thread each (--threads).
Every method trains at its library's default learning rate; with --lr-sweep at each factor of
--lr-grid (choicesae.bench.lr_sweep.LR_FACTORS by default) times it too, on the same batches, and
the table gives each row twice: at the default, and at the factor of the lowest final held-out
FVU ("best lr"). --merge reads the curves of runs that differ in --seed alone and gives their
final points as mean ± std over seeds, the best lr that of the lowest mean FVU.

  sparsify_topk   EleutherAI sparsify's default training (sparsify/trainer.py) replayed on the
                  stored activations: SparseCoder TopK, b_dec at the first batch's mean, the FVU
                  as the loss, schedule-free SignSGD at 5e-3 / sqrt(F / 2^14), momentum 0.95;
                  measured at the schedule-free average, the weights its checkpoints save
  topk, mutual_choice, feature_choice, relu
                  choicesae.training.loop with every setting at its default but sparsifier, k, F,
                  batch size, steps and seed, trained in segments of --eval-every steps, each
                  extending the last with resume=True (which continues a finished run exactly),
                  each segment's schedule the whole run's phases cut at its end
  mutual_choice +θ, feature_choice +θ
                  the same two SAEs with single-token JumpReLU inference (appendix B): one
                  threshold per feature, estimated on the last --calibration training rows

After every --eval-every steps each model is measured, untimed, on the held-out rows, encoded in
batches of about --batch-size rows (the batch rules see batches as in training): FVU in the
raw activation space, Σ|x − x̂|² / Σ|x − mean(x)|² over all held-out rows, L0 and the latents
that fire on none. Training time counts the steps alone, drawing the batches included:
choicesae's from its metrics.jsonl (elapsed_s), sparsify's timed around its steps. The time to
reach sparsify's final FVU interpolates linearly between the measured points. A best-lr row's
ratios are to sparsify at its best lr, a default row's to sparsify at its default; without
sparsify_topk in --methods (a sweep split over processes, each method's points the same as in a
joint run) they are left empty. OUT/table.md holds the table, OUT/curves.json the held-out
curves (row -> lr factor -> points).
"""

import os

os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # before torch loads OpenMP: idle threads sleep

import argparse
import contextlib
import importlib.metadata
import json
import math
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import torch
from schedulefree import ScheduleFreeWrapper
from sparsify import SparseCoder, SparseCoderConfig
from sparsify.sign_sgd import SignSGD
from torch import Tensor

from choicesae import SAE, SAEConfig, Store, TrainConfig, train
from choicesae.bench.lr_sweep import LR_FACTORS, default_and_best, lr_cell, lr_factors
from choicesae.core.preprocess import denormalize, normalize
from choicesae.core.sae import Threshold
from choicesae.core.schedule import RECIPES, recipe_lr
from choicesae.core.sparsifiers import TRAINABLE
from choicesae.core.thresholds import estimate_thresholds_
from choicesae.data.activations import batches, check_activations
from choicesae.evaluation.evaluate import first_tokens

REFERENCE = "sparsify_topk"
METHODS = (REFERENCE, *TRAINABLE)

Coder = Callable[[Tensor], tuple[Tensor, Tensor]]  # raw x [B, d] -> (raw x̂ [B, d], acts [B, F])
Point = tuple[int, float, dict[str, Coder]]  # (steps done, training seconds so far, the
# model then, under each inference that is a row of the table)
THRESHOLDED = ("mutual_choice", "feature_choice")  # batch rules, measured with θ too


class Heldout(NamedTuple):
    fvu: float
    l0: float  # mean active latents per token
    dead_pct: float  # % of latents active on no held-out row


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--store", default="data/minilm", help="activation store (choicesae harvest)")
    p.add_argument("--num-latents", type=int, default=3072, help="F")
    p.add_argument("--k", type=int, default=32, help="active latents per token")
    p.add_argument("--batch-size", type=int, default=4096, help="tokens per step")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=25, help="steps between held-out points")
    p.add_argument("--heldout", type=int, default=100_000, help="held-out rows (the last ones)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument(
        "--calibration", type=int, default=65_536, help="training rows the thresholds fit on"
    )
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated, of: %(default)s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--lr-sweep",
        action="store_true",
        help="also train every method at the --lr-grid factors x its default lr",
    )
    p.add_argument(
        "--lr-grid",
        default=",".join(map(str, LR_FACTORS)),
        help="comma-separated factors of each library's default lr, 1 included: %(default)s",
    )
    p.add_argument(
        "--merge", nargs="+", type=Path, help="--out folders of several seeds: their table"
    )
    p.add_argument("--out", type=Path, default=Path("runs/peers"), help="work folder")
    args = p.parse_args()
    if args.merge:
        return args
    args.methods = args.methods.split(",")
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        p.error(f"unknown --methods {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if min(args.steps, args.eval_every, args.batch_size, args.heldout, args.threads) < 1:
        p.error("--steps, --eval-every, --batch-size, --heldout and --threads must be positive")
    if args.calibration < args.batch_size:
        p.error("--calibration must hold at least one batch (--batch-size rows)")
    return args


class SameBatches:
    """Training rows x [N, d] as a choicesae RowSource that notes a fingerprint of every batch
    it serves, by batch size and step: choicesae.training.loop draws its batches itself, so this is
    how the run checks that every library trained on the same batches in the same order."""

    def __init__(self, x: Tensor):
        self.x, self.shape = x, tuple(x.shape)
        self.served: dict[tuple[int, int], float] = {}

    def batches(
        self, batch_size: int, seed: int, device: str = "cpu", start: int = 0
    ) -> Iterator[Tensor]:
        for step, x in enumerate(batches(self.x, batch_size, seed, device, start), start):
            self.served[batch_size, step] = float(x.sum())
            yield x


def load_rows(args: argparse.Namespace) -> tuple[Tensor, Tensor, int]:
    """(training rows [n, d], held-out rows [heldout, d], rows in the store), float32. A store
    that kept each context's first token (a causal LM's attention sink, norms far above the
    others) is read without those rows, as choicesae eval reads it."""
    store = Store(args.store)
    keep = ~first_tokens(store.manifest, len(store))
    n = int(keep.sum())
    rest = n - args.heldout
    if rest < args.batch_size:
        raise SystemExit(
            f"{args.store} has {n} rows: too few for {args.heldout} held out and a "
            f"batch of {args.batch_size}"
        )
    rows = store if keep.all() else torch.as_tensor(store[:])[keep]
    x_train = rows[: min(args.steps * args.batch_size, rest)]
    return check_activations(x_train, args.store), rows[rest:], n


def ends(args: argparse.Namespace) -> list[int]:
    """The steps after which the models are measured: every --eval-every, and the last."""
    return [*range(args.eval_every, args.steps, args.eval_every), args.steps]


def default_lr(method: str, num_latents: int) -> float:
    """The learning rate the method's library trains an SAE of F latents at by default."""
    if method == REFERENCE:
        return 5e-3 / (num_latents / 2**14) ** 0.5  # sparsify's default for signum
    return recipe_lr(RECIPES[TrainConfig.recipe], num_latents)


def sparsify_topk(rows: SameBatches, args: argparse.Namespace, lr: float) -> Iterator[Point]:
    """sparsify's Trainer.fit with its defaults (loss fvu, optimizer signum, no AuxK) but the
    learning rate, one step per batch of stored activations instead of a forward hook on the
    model."""
    torch.manual_seed(args.seed)
    cfg = SparseCoderConfig(num_latents=args.num_latents, k=args.k)
    coder = SparseCoder(rows.shape[1], cfg, dtype=torch.float32)
    opt = ScheduleFreeWrapper(SignSGD([{"params": coder.parameters(), "lr": lr}]), momentum=0.95)
    opt.train()
    data, done, seconds = rows.batches(args.batch_size, args.seed), 0, 0.0
    for end in ends(args):
        start = time.perf_counter()
        for step in range(done, end):
            x = next(data)  # [B, d]
            if step == 0:  # centre the pre-activations at initialisation, as its trainer does
                coder.b_dec.data = x.mean(0)
            coder.set_decoder_norm_to_unit_norm()
            coder(x).fvu.backward()
            coder.remove_gradient_parallel_to_decoder_directions()
            opt.step()
            opt.zero_grad()
        seconds += time.perf_counter() - start
        done = end
        with schedule_free_average(coder, opt):
            yield end, seconds, {REFERENCE: sparsify_coder(coder)}


@contextlib.contextmanager
def schedule_free_average(coder: SparseCoder, opt: ScheduleFreeWrapper) -> Iterator[None]:
    """The schedule-free average x in the coder's weights (opt.eval(), as sparsify's
    checkpoints save them); afterwards the training point y exactly as it was, which
    opt.train() alone restores only up to rounding."""
    y = [p.detach().clone() for p in coder.parameters()]
    opt.eval()
    try:
        yield
    finally:
        opt.train()
        with torch.no_grad():
            for p, saved in zip(coder.parameters(), y, strict=True):
                p.copy_(saved)


def sparsify_coder(coder: SparseCoder) -> Coder:
    def code(x: Tensor) -> tuple[Tensor, Tensor]:
        top_acts, top_indices, _ = coder.encode(x)  # [B, k] each
        acts = torch.zeros(len(x), coder.num_latents).scatter_(1, top_indices, top_acts)
        return coder.decode(top_acts, top_indices), acts

    return code


def choicesae_run(
    name: str, rows: SameBatches, args: argparse.Namespace, lr: float
) -> Iterator[Point]:
    """choicesae.training.loop at its defaults but the learning rate, one segment of
    --eval-every steps at a time."""
    out, seconds = args.out / "runs" / f"{name}-lr{lr:.2e}", 0.0
    shutil.rmtree(out, ignore_errors=True)  # overwrite=True would keep an old run's checkpoints
    sae_cfg = SAEConfig(sparsifier=name, k=args.k, num_latents=args.num_latents)
    for end in ends(args):
        cfg = TrainConfig(
            out=str(out),
            resume=end > args.eval_every,
            sae=sae_cfg,
            batch_size=args.batch_size,
            schedule=segment(TrainConfig(sae=sae_cfg, steps=args.steps).phases(), end),
            lr=lr,
            seed=args.seed,
            progress=False,
            log_every=args.eval_every,
            threshold_tokens=0,  # fitted below on the rows sparsify never trains on
        )
        sae = train(cfg, rows)
        last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
        seconds += last["elapsed_s"]  # this segment's loop: no setup, no checkpoint
        coders = {name: choicesae_coder(sae)}
        if name in THRESHOLDED:
            calibrate_(sae, rows.x[-args.calibration :], args.batch_size)
            coders[f"{name} +θ"] = choicesae_coder(sae, threshold="feature")
        yield end, seconds, coders


def segment(phases: list[tuple[str, int]], end: int) -> str:
    """The whole run's phases cut after `end` steps, as a --schedule: each segment keeps the
    run's phase switch (default Feature Choice trains Mutual Choice first)."""
    parts, done = [], 0
    for name, steps in phases:
        if done < end:
            parts.append(f"{name}:{min(steps, end - done)}")
        done += steps
    return ",".join(parts)


def calibrate_(sae: SAE, x: Tensor, batch_size: int) -> None:
    """The per-feature thresholds, fitted to batch inference on whole batches of the raw
    training rows x (untimed, as `choicesae eval` does after training)."""
    x_n, _ = normalize(x[: len(x) // batch_size * batch_size], sae.cfg.normalize, sae.scale)
    estimate_thresholds_(sae, list(x_n.split(batch_size)))


def choicesae_coder(sae: SAE, threshold: Threshold | None = None) -> Coder:
    """Batch inference over the rows given, or each token alone at `threshold`."""

    def code(x: Tensor) -> tuple[Tensor, Tensor]:  # SAE.reconstruct, keeping the activations
        x_n, stats = normalize(x, sae.cfg.normalize, sae.scale)
        acts = sae.encode(x_n, threshold=threshold, batch=threshold is None).acts  # [B, F]
        return denormalize(sae.decode(acts), stats), acts

    return code


@torch.no_grad()
def measure(code: Coder, x: Tensor, batch_size: int) -> Heldout:
    """Held-out metrics over raw rows x [N, d], encoded about batch_size rows at a time: the
    same FVU, Σ|x − x̂|² / Σ|x − mean(x)|² over all N rows, for every method."""
    sse, active, fired = 0.0, 0, torch.zeros((), dtype=torch.bool)
    for rows in x.tensor_split(math.ceil(len(x) / batch_size)):
        x_hat, acts = code(rows)
        sse += float((rows - x_hat).double().pow(2).sum())
        active += int((acts != 0).sum())
        fired = fired | (acts != 0).any(0)  # [F]
    variance = float((x.double() - x.double().mean(0)).pow(2).sum())
    return Heldout(sse / variance, active / len(x), 100 * float((~fired).double().mean()))


def trained(method: str, rows: SameBatches, args: argparse.Namespace, lr: float) -> Iterator[Point]:
    """The method's models after each segment of training at learning rate `lr`."""
    if method == REFERENCE:
        return sparsify_topk(rows, args, lr)
    return choicesae_run(method, rows, args, lr)


def measured(
    row: str, lr: float, step: int, seconds: float, code: Coder, x_test: Tensor, B: int
) -> dict:
    heldout = measure(code, x_test, B)
    print(
        f"{row:>18} lr {lr:.1e} step {step:>5}  {seconds:8.1f} s  FVU {heldout.fvu:.4f}  "
        f"L0 {heldout.l0:.1f}  dead {heldout.dead_pct:.1f}%",
        file=sys.stderr,
        flush=True,
    )
    return {"step": step, "seconds": seconds, "lr": lr, **heldout._asdict()}


def seconds_to_reach(curve: list[dict], fvu: float) -> float | None:
    """Training seconds at which the held-out FVU first reaches `fvu`, interpolated linearly
    between the measured points; None if it never does."""
    before = None
    for point in curve:
        if point["fvu"] <= fvu:
            if before is None:
                return point["seconds"]
            share = (before["fvu"] - fvu) / (before["fvu"] - point["fvu"])
            return before["seconds"] + share * (point["seconds"] - before["seconds"])
        before = point
    return None


def table(curves: dict[str, dict[float, list[dict]]], tokens: int) -> str:
    """One row per inference of each method at its default learning rate, and after a sweep one
    more at its best; ratios to sparsify's last point at its default, or at its best."""
    chosen = {
        row: default_and_best({factor: curve[-1]["fvu"] for factor, curve in by_lr.items()})
        for row, by_lr in curves.items()
    }
    refs = {label: curves[REFERENCE][factor] for label, factor in chosen.get(REFERENCE, [])}
    lines = [
        "| method | lr | tokens/s | L0 | FVU | dead % | s to sparsify's FVU | tokens/s ÷ sparsify "
        "| FVU ÷ sparsify |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row, rows in chosen.items():
        for label, factor in rows:
            curve = curves[row][factor]
            end, speed = curve[-1], tokens / curve[-1]["seconds"]
            ratios = "— | — | —"  # without sparsify in the run
            if refs:
                ref = refs[label][-1]
                reach = seconds_to_reach(curve, ref["fvu"])
                ratios = (
                    f"{'—' if reach is None else f'{reach:.1f}'} | "
                    f"{speed / (tokens / ref['seconds']):.2f} | {end['fvu'] / ref['fvu']:.3f}"
                )
            name = row if label == "default" else f"{row}, best lr"
            lines.append(
                f"| {name} | {lr_cell(end['lr'], factor)} | {speed:,.0f} | {end['l0']:.1f} | "
                f"{end['fvu']:.4f} | {end['dead_pct']:.1f} | {ratios} |"
            )
    return "\n".join(lines)


def commit() -> str:
    """The checkout's commit, marked when src/ differs from it."""
    root = Path(__file__).resolve().parent.parent
    git = ["git", "-C", str(root)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run([*git, "diff", "--quiet", "HEAD", "--", "src"]).returncode
    return head.stdout.strip() + (" (src/ modified)" if dirty else "")


def header(args: argparse.Namespace, x_train: Tensor, store_rows: int) -> str:
    versions = {name: importlib.metadata.version(name) for name in ("torch", "eai-sparsify")}
    tokens = args.steps * args.batch_size
    factors = lr_factors(args.lr_sweep, args.lr_grid)
    return (
        f"choicesae {commit()}, torch {versions['torch']}, sparsify "
        f"{versions['eai-sparsify']}; {args.threads} thread(s)\n"
        f"store {args.store}: {store_rows:,} rows of d = {x_train.shape[1]}; training on the "
        f"first {len(x_train):,}, FVU on the last {args.heldout:,} (raw activations)\n"
        f"F = {args.num_latents}, k = {args.k}, batch {args.batch_size}, {args.steps} steps = "
        f"{tokens:,} tokens, seed {args.seed}, measured every {args.eval_every} steps; "
        f"learning rates: each library's default x {', '.join(map(str, factors))}"
    )


def merged(folders: list[Path]) -> str:
    """The final held-out points of runs of several seeds (their curves.json), as mean ± std
    over seeds of each row and lr factor they all hold: the row at its default lr and at the
    factor of the lowest mean FVU, and each seed's FVU ÷ sparsify's at the same label."""
    seeds = [json.loads((f / "curves.json").read_text()) for f in folders]
    last = {  # row -> factor -> [the seeds' final points]
        row: {
            float(f): [s[row][f][-1] for s in seeds]
            for f in by_lr
            if all(row in s and f in s[row] for s in seeds)
        }
        for row, by_lr in seeds[0].items()
    }

    def cell(values: list[float], digits: int) -> str:
        v = torch.tensor(values, dtype=torch.float64)
        return f"{v.mean():.{digits}f} ± {v.std(correction=0):.{digits}f}"

    chosen = {
        row: default_and_best({f: sum(p["fvu"] for p in ps) / len(ps) for f, ps in by.items()})
        for row, by in last.items()
    }
    refs = {label: last[REFERENCE][f] for label, f in chosen.get(REFERENCE, [])}
    lines = [
        f"{len(folders)} seeds ({', '.join(map(str, folders))}): final held-out points, mean ± std",
        "",
        "| method | lr | L0 | FVU | dead % | FVU ÷ sparsify |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row, rows in chosen.items():
        for label, f in rows:
            points = last[row][f]
            of = {key: [float(p[key]) for p in points] for key in ("l0", "fvu", "dead_pct")}
            ratio = "—"  # without sparsify in the runs
            if refs:
                ratios = [p["fvu"] / r["fvu"] for p, r in zip(points, refs[label], strict=True)]
                ratio = cell(ratios, 3)
            name = row if label == "default" else f"{row}, best lr"
            lines.append(
                f"| {name} | {lr_cell(points[0]['lr'], f)} | {cell(of['l0'], 1)} | "
                f"{cell(of['fvu'], 4)} | {cell(of['dead_pct'], 1)} | {ratio} |"
            )
    return "\n".join(lines)


def main() -> None:
    args = parse()
    if args.merge:
        print(merged(args.merge))
        return
    torch.set_num_threads(args.threads)
    x_train, x_test, store_rows = load_rows(args)
    lrs = {  # (method, factor) -> its learning rate
        (method, factor): factor * default_lr(method, args.num_latents)
        for method in args.methods
        for factor in lr_factors(args.lr_sweep, args.lr_grid)
    }
    rows = {run: SameBatches(x_train) for run in lrs}
    runs = {run: trained(run[0], rows[run], args, lr) for run, lr in lrs.items()}
    curves: dict[str, dict[float, list[dict]]] = {}  # by row of the table, then lr factor
    for _ in ends(args):  # round robin: a slow spell of the shared machine hits them all alike
        for (_, factor), points in runs.items():
            step, seconds, coders = next(points)
            for row, code in coders.items():
                lr = lrs[row.removesuffix(" +θ"), factor]
                point = measured(row, lr, step, seconds, code, x_test, args.batch_size)
                curves.setdefault(row, {}).setdefault(factor, []).append(point)
    steps = {  # choicesae also draws one larger batch to initialise b_dec and W
        run: {step: fp for (size, step), fp in r.served.items() if size == args.batch_size}
        for run, r in rows.items()
    }
    first = (REFERENCE if REFERENCE in args.methods else args.methods[0]), 1.0
    for run in lrs:
        if steps[run] != steps[first]:
            raise SystemExit(
                f"{run[0]} at lr {lrs[run]:.1e} trained on other batches than {first[0]}"
            )
    if sorted(steps[first]) != list(range(args.steps)):
        raise SystemExit(f"{first[0]} did not train on steps 0 to {args.steps - 1} once each")
    text = header(args, x_train, store_rows) + "\n\n" + table(curves, args.steps * args.batch_size)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(text + "\n")
    (args.out / "curves.json").write_text(json.dumps(curves, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
