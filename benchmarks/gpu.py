"""GPU readiness in one run (benchmarks/gpu.sh, docs/performance.md): the sparse step checked
against the dense reference, the step against its floor, training throughput against
sparsify's TopK, and Feature Choice against TopK at large batches.

    python3 benchmarks/gpu.py                       # CUDA: d 768, F 32768, k 32, B 4096
    python3 benchmarks/gpu.py --device cpu --d-in 64 --num-latents 1024 --batch-size 512 \\
        --steps 3 --check-d-in 32 --check-latents 256 --check-batch 128 --step-latents 1024 \\
        --large-batches 1024 2048 --large-d-in 32 --large-latents 256 --large-tokens 40960

Sections, in this order (--sections picks some); each prints its rows as they finish. A row
whose package is missing, that would start past --budget seconds, or that runs out of GPU
memory is skipped with a line `skip ROW: WHY`; the last lines list the rows that ran.

check: for topk, mutual_choice, feature_choice and relu, with the aux_k and aux_zipf masks
non-empty, the objective over the sparse ops against the same over the dense ops (autograd
through the reference sparsifiers): the loss and every gradient, as |ours − ref| / |ref| over
the whole tensor. The dense reference is given the sparse step's selection (the `Pinned`
backend), so that a near-tie ordered differently by two summation orders (or by bf16 rounding)
cannot fail the numeric comparison; how many pairs the reference's own selection differs in
is checked and printed apart. relu is checked with b_enc lowered so that few affinities are
positive: the sparse path, not the dense fallback.

throughput: one training step (forward, backward, optimizer step) on the same random-normal
batches for everyone: choicesae's train.train_step + advance (the loop's step: the recipe's
schedule-free AdamW, or AdamW where schedulefree is missing; clipping, firing counts) per
sparsifier, in fp32 and under bf16 autocast, and sparsify's SparseCoder with its default
optimizer, ScheduleFreeWrapper(SignSGD), stepped as its Trainer steps it (its forward runs under
bf16 autocast on CUDA by its own decorator). Peak memory as torch.cuda.max_memory_allocated.

step: benchmarks/step.py's table at d, k and B of the throughput, for each --step-latents F and
in fp32 and bf16: forward + backward of every sparsifier's sparse step and of its dense
reference, against the floor (one dense encoder product), with peak memory.

large: choicesae bench's synthetic comparison (bench/paper.py: Zipf-distributed true features,
held-out FVU under batch inference and at per-feature thresholds) of the default Feature
Choice against TopK, at each --large-batches B with the same token budget, to carry the
capacity trend of docs/results.md (Feature Choice gains on TopK as k·B/F grows) to 16k-64k.

Exits 1 if a check fails or a row errs; skipped rows do not fail the run.
"""

import argparse
import contextlib
import dataclasses
import gc
import importlib
import importlib.util
import tempfile
import time
import traceback
from pathlib import Path

import torch

import choicesae
from choicesae.core.config import SAEConfig, TrainConfig
from choicesae.core.preprocess import normalize
from choicesae.core.sae import SAE
from choicesae.step.kernels import RELU_SPARSE_SHARE, Pairs, pre_acts
from choicesae.step.objective import Masks, objective
from choicesae.step.ops import Dense, Local, Sparse
from choicesae.training.loop import make_optimizer, train_step
from choicesae.training.run import resolve
from choicesae.training.state import TrainState, advance

SPARSIFIERS = ("topk", "mutual_choice", "feature_choice", "relu")
SECTIONS = ("check", "throughput", "step", "large")
# (loss, gradients, share of selected pairs the reference's own selection may differ in).
# bf16: the sparse step selects on bf16 z' and the dense one on float32 z', so near-ties go
# either way; the top-k_aux of aux_k among dead latents meets the most of them (~2% of pairs
# at d 768, F 8192 under CPU autocast: 4e-2 on W_enc's gradient, 4e-3 without aux losses).
TOLERANCE = {"fp32": (1e-5, 1e-4, 1e-3), "bf16": (5e-3, 0.1, 0.1)}
OOM = (torch.cuda.OutOfMemoryError,)  # "where memory allows": a skip, not an error


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--budget", type=float, help="seconds; no row starts past them (default: none)")
    p.add_argument("--d-in", type=int, default=768, help="throughput, step: input width d")
    p.add_argument("--num-latents", type=int, default=32768, help="throughput: latents F")
    p.add_argument("--k", type=int, default=32, help="active latents per token")
    p.add_argument("--batch-size", type=int, default=4096, help="throughput, step: tokens")
    p.add_argument("--steps", type=int, default=50, help="throughput: timed steps per method")
    p.add_argument("--warmup", type=int, default=5, help="throughput: untimed steps first")
    p.add_argument("--check-d-in", type=int, default=768, help="check: input width")
    p.add_argument("--check-latents", type=int, default=8192, help="check: latents")
    p.add_argument("--check-batch", type=int, default=1024, help="check: tokens")
    p.add_argument(  # the paper's 32·d, the throughput's, and one 4 times wider
        "--step-latents", type=int, nargs="+", default=[24576, 32768, 131072], help="step: F"
    )
    p.add_argument("--step-repeats", type=int, default=3, help="step: rounds, the best kept")
    p.add_argument("--large-batches", type=int, nargs="+", default=[16384, 32768, 65536])
    p.add_argument("--large-d-in", type=int, default=256, help="large: synthetic width")
    p.add_argument("--large-true", type=int, default=2048, help="large: true features")
    p.add_argument("--large-latents", type=int, default=4096, help="large: SAE latents F")
    p.add_argument("--large-k", type=int, default=16, help="large: k of both methods")
    p.add_argument(
        "--large-tokens", type=int, default=2**24, help="large: tokens each run trains on"
    )
    p.add_argument(
        "--large-rows", type=int, default=2**20, help="large: synthetic rows (reused per epoch)"
    )
    args = p.parse_args(argv)
    biggest = max(args.large_batches)
    for B in args.large_batches:  # refused here, not after the other sections have run
        if 2 * biggest % B or args.large_tokens // B < 10 or args.large_rows < biggest:
            p.error(
                f"--large-batches {B}: each batch must divide twice the largest, and "
                "--large-tokens hold 10 of its batches, --large-rows one of the largest"
            )
    return args


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def autocast(device: str, bf16: bool):
    return torch.autocast(torch.device(device).type, torch.bfloat16, enabled=bf16)


@contextlib.contextmanager
def full_fp32_matmul():
    """The fp32 check compares float32 against float32: no TF32 even if enabled elsewhere."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def free_memory(device: str) -> None:
    """Drop what the last row left, and its peak, before the next row is measured."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def missing(module: str) -> str:
    """Why `module` cannot be imported ("" if it can): absent, or broken by a version clash."""
    try:
        importlib.import_module(module)
    except Exception as e:  # ImportError, or whatever a clashing dependency raises inside it
        return f"{type(e).__name__}: {e}"
    return ""


class Ledger:
    """Which rows ran, were skipped or erred, and the time budget no row may start past."""

    def __init__(self, budget: float | None):
        self.end = float("inf") if budget is None else time.monotonic() + budget
        self.rows: dict[str, list[str]] = {"ran": [], "skipped": [], "erred": []}

    def left(self) -> float:
        return self.end - time.monotonic()

    def may_start(self, row: str, needs: float = 0.0) -> bool:
        """False, with the skip line, if `needs` seconds are no longer left."""
        if self.left() > needs:
            return True
        self.skip(row, f"out of time ({max(self.left(), 0):.0f} s of the budget left)")
        return False

    def ran(self, row: str) -> None:
        self.rows["ran"].append(row)

    def skip(self, row: str, why: str) -> None:
        print(f"skip {row}: {why}", flush=True)
        self.rows["skipped"].append(row)

    def erred(self, row: str) -> None:
        self.rows["erred"].append(row)

    def summary(self) -> str:
        return "\n".join(
            f"{what} ({len(rows)}): {', '.join(rows) or '-'}" for what, rows in self.rows.items()
        )


# ---- check: the sparse step against the dense reference ------------------------------------


def check_setup(sparsifier: str, args) -> tuple[SAE, TrainConfig, torch.Tensor, Masks]:
    """An SAE with non-zero biases, a token-normalized batch x [B, d] and masks with dead and
    dying latents (so both aux losses act), as tests/test_kernels.py builds them."""
    d, F, B, device = args.check_d_in, args.check_latents, args.check_batch, args.device
    sae_cfg = SAEConfig(sparsifier=sparsifier, k=args.k, num_latents=F).resolve(d)
    cfg = TrainConfig(sae=sae_cfg, batch_size=B, device=device, progress=False)
    torch.manual_seed(0)
    sae = SAE(sae_cfg).to(device)
    x, _ = normalize(torch.randn(B, d).to(device), "token")
    with torch.no_grad():
        sae.b_dec.copy_(0.1 * torch.randn(d) / d**0.5)  # |b_dec| 0.1 against |x| = 1
        std = pre_acts(sae, x).std()
        sae.b_enc.copy_(0.1 * std * torch.randn(F))
        if sparsifier == "relu":  # ~2% of z' positive: the sparse path, not the dense one
            sae.b_enc.sub_(2 * std)
    features = torch.arange(F, device=device)
    dead = features % 3 == 0
    return sae, cfg, x, Masks(dead, (features % 5 == 1) & ~dead)


def step_grads(fn, sae, x, cfg, sparsifier, masks, bf16: bool, **kw):
    """(StepOut, {name: gradient}) of one step of `fn` (forward under autocast if bf16)."""
    sae.zero_grad(set_to_none=True)
    with autocast(x.device.type, bf16):
        out = fn(sae, x, cfg, sparsifier, masks, **kw)
    out.loss.backward()
    return out, {name: p.grad.detach().clone() for name, p in sae.named_parameters()}


def active(acts: torch.Tensor) -> torch.Tensor:
    """[B, F] bool, the non-zero activations of dense or sparse COO acts (the sparse step's may
    hold zeros: selected, then cut by ReLU)."""
    return (acts.to_dense() if acts.is_sparse else acts) != 0


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


class Pinned(Local):
    """The backend that hands the reference ops the sparse step's code selection, so that the
    dense reference decodes exactly the pairs the sparse step chose."""

    def __init__(self, pairs: Pairs):
        self.pairs = pairs

    def select(self, name: str, z, k: int, m) -> Pairs:
        return self.pairs


def check_case(sparsifier: str, precision: str, args) -> bool:
    """One line: relative errors of the loss and of the worst gradient, differing pairs."""
    sae, cfg, x, masks = check_setup(sparsifier, args)
    bf16 = precision == "bf16"
    out, grads = step_grads(objective, sae, x, cfg, sparsifier, masks, bf16, ops=Sparse())
    ours = active(out.acts)
    pinned = Dense(Pinned(Pairs(*ours.nonzero().T, tuple(ours.shape))))
    ref, ref_grads = step_grads(objective, sae, x, cfg, sparsifier, masks, bf16, ops=pinned)
    with torch.no_grad(), autocast(x.device.type, bf16):  # the reference's own selection
        own = active(sae.sparsify(sparsifier, sae.pre_acts(x), cfg.sae.k).acts)
    differ, n = int((own != ours).sum()), max(int(own.sum()), 1)
    loss_err = rel(out.loss.detach(), ref.loss.detach())
    worst = max(ref_grads, key=lambda name: rel(grads[name], ref_grads[name]))
    grad_err = rel(grads[worst], ref_grads[worst])
    tol_loss, tol_grad, tol_pairs = TOLERANCE[precision]
    ok = out.terms.keys() == ref.terms.keys() and loss_err <= tol_loss and grad_err <= tol_grad
    # sparse acts: the sparse path ran (relu falls back to the dense step on too many pairs)
    ok = ok and differ <= max(4, tol_pairs * n) and out.acts.is_sparse
    print(
        f"check {precision} {sparsifier:<15} loss {loss_err:8.1e}  grads {grad_err:8.1e} "
        f"({worst:<5})  pairs differing {differ:>6}/{n:<7} {'PASS' if ok else 'FAIL'}",
        flush=True,
    )
    return ok


def check_all(args, ledger: "Ledger") -> bool:
    ok = True
    for precision in ("fp32", "bf16"):
        for sparsifier in SPARSIFIERS:
            row = f"check {precision} {sparsifier}"
            if not ledger.may_start(row):
                continue
            try:
                with full_fp32_matmul() if precision == "fp32" else contextlib.nullcontext():
                    ok &= check_case(sparsifier, precision, args)
                ledger.ran(row)
            except Exception:  # report and go on: one run should show every problem
                traceback.print_exc()
                print(f"check {precision} {sparsifier:<15} ERROR  FAIL", flush=True)
                ledger.erred(row)
                ok = False
    return ok


# ---- throughput: one training step, choicesae against sparsify ------------------------------


def choicesae_step(sparsifier: str, bf16: bool, data: list[torch.Tensor], args, optimizer: str):
    """choicesae's training step (train.train_step + advance, as run_loop calls them)."""
    d, F, B = args.d_in, args.num_latents, args.batch_size
    sae_cfg = SAEConfig(sparsifier=sparsifier, k=args.k, num_latents=F, d_in=d)
    steps = args.warmup + args.steps  # the lr schedule's length
    cfg = TrainConfig(
        sae=sae_cfg,
        batch_size=B,
        steps=steps,
        device=args.device,
        progress=False,
        optimizer=optimizer,
    )
    cfg = resolve(cfg, d)
    torch.manual_seed(0)
    sae = SAE(cfg.sae).to(args.device)
    sae.init_from_data_(data[0])
    optimizer = make_optimizer(sae, cfg)
    state = TrainState.fresh(F, args.device)

    def step(x: torch.Tensor) -> None:
        nonlocal state
        with autocast(args.device, bf16):
            _, _, fired = train_step(sae, optimizer, x, cfg, state)
        state = advance(state, fired, cfg, sae)

    return step


def sparsify_step(data: list[torch.Tensor], args):
    """sparsify's TopK SparseCoder stepped as its Trainer.fit steps it with the defaults
    (loss_fn fvu, optimizer signum, auxk_alpha 0, normalize_decoder, no multi-TopK)."""
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.sign_sgd import SignSGD

    d, F = args.d_in, args.num_latents
    torch.manual_seed(0)
    sae = SparseCoder(d, SparseCoderConfig(num_latents=F, k=args.k), args.device, torch.float32)
    sae.b_dec.data = data[0].mean(0)  # the trainer's first step centres the pre-activations
    lr = 5e-3 / (F / 2**14) ** 0.5  # its default for signum
    optimizer = ScheduleFreeWrapper(SignSGD([dict(params=sae.parameters(), lr=lr)]), momentum=0.95)
    optimizer.train()
    since_fired = torch.zeros(F, dtype=torch.long, device=args.device)

    def step(x: torch.Tensor) -> None:
        sae.set_decoder_norm_to_unit_norm()
        total_variance = (x - x.mean(0)).pow(2).sum()
        out = sae(x=x, y=x, dead_mask=None, total_variance=total_variance)
        did_fire = torch.zeros(F, dtype=torch.bool, device=x.device)
        did_fire[out.latent_indices.flatten()] = True
        float(out.fvu.detach())  # its running average of the FVU: a sync point per step
        (out.fvu + 0.0 * out.auxk_loss + out.multi_topk_fvu / 8).backward()  # auxk_alpha 0
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad()
        since_fired.add_(x.shape[0]).masked_fill_(did_fire, 0)

    return step


def timed(step, data: list[torch.Tensor], args) -> tuple[float, float]:
    """(seconds per step, peak GiB on CUDA, else NaN) over args.steps steps after warm-up."""
    for i in range(args.warmup):
        step(data[i % len(data)])
    sync(args.device)
    start = time.perf_counter()
    for i in range(args.steps):
        step(data[i % len(data)])
    sync(args.device)
    seconds = (time.perf_counter() - start) / args.steps
    cuda = args.device.startswith("cuda")
    return seconds, torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")


def methods(data: list[torch.Tensor], args, optimizer: str) -> dict:
    """{row name: factory of a step function}; sparsify's TopK first, the baseline."""
    rows = {"sparsify topk": lambda: sparsify_step(data, args)}
    for bf16 in (False, True):
        for name in SPARSIFIERS:
            label = f"choicesae {name}" + (" bf16" if bf16 else "")
            rows[label] = lambda n=name, b=bf16: choicesae_step(n, b, data, args, optimizer)
    return rows


def throughput(args, ledger: Ledger, absent: dict[str, str]) -> bool:
    """Time every method, printing its row as soon as it is timed; False if one erred."""
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(args.batch_size, args.d_in, generator=g).to(args.device) for _ in "ab"]
    d, F, k, B = args.d_in, args.num_latents, args.k, args.batch_size
    optimizer = "adamw" if absent["schedulefree"] else "recipe"
    print(f"\nthroughput: d={d} F={F} k={k} B={B}, {args.steps} steps after {args.warmup}")
    if absent["schedulefree"]:
        print("choicesae rows step plain AdamW: schedulefree (the recipe's optimizer) is missing")
    print(f"{'method':<30}{'ms/step':>10}{'tokens/s':>12}{'peak GiB':>10}{'/sparsify':>11}")
    base, ok = None, True
    for label, make in methods(data, args, optimizer).items():
        why = (absent["sparsify"] or absent["schedulefree"]) if label.startswith("sparsify") else ""
        if why:
            ledger.skip(label, f"{why} (carry its wheels: docs/performance.md)")
            continue
        if not ledger.may_start(label):
            continue
        free_memory(args.device)
        try:
            seconds, peak = timed(make(), data, args)
        except OOM:
            ledger.skip(label, "out of GPU memory")
            continue
        except Exception:  # report and go on: one run should show every problem
            traceback.print_exc()
            print(f"{label:<30}{'ERROR':>10}", flush=True)
            ledger.erred(label)
            ok = False
            continue
        ledger.ran(label)
        base = base or (seconds if label == "sparsify topk" else None)
        ratio = f"{base / seconds:>11.2f}" if base else f"{'-':>11}"
        row = f"{label:<30}{seconds * 1e3:>10.2f}{B / seconds:>12.0f}{peak:>10.2f}{ratio}"
        print(row, flush=True)
    print(
        "/sparsify: tokens/s over sparsify topk's; peak GiB counts the two batches. choicesae "
        f"relu\ntakes the dense path while more than 1/{round(1 / RELU_SPARSE_SHARE)} of z' is "
        "positive (early training, as here)."
    )
    return ok


# ---- step: the sparse step against its floor and the dense reference ------------------------


def step_table_module():
    """benchmarks/step.py, loaded from its file (benchmarks/ is no package)."""
    spec = importlib.util.spec_from_file_location("bench_step", Path(__file__).with_name("step.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def step_table(args, ledger: Ledger) -> bool:
    """benchmarks/step.py's table (floor, sparse, dense; peak memory) per precision and F."""
    table, ok = step_table_module(), True
    for precision in ("fp32", "bf16"):
        for F in args.step_latents:
            row = f"step {precision} F={F}"
            if not ledger.may_start(row):
                continue
            step_args = argparse.Namespace(
                k=args.k,
                batch=args.batch_size,
                device=args.device,
                bf16=precision == "bf16",
                dead=0.0,
                multi_topk=False,
                repeats=args.step_repeats,
                sparsifiers=list(SPARSIFIERS),
            )
            free_memory(args.device)
            try:
                results = table.bench(args.d_in, F, step_args)
            except OOM:
                ledger.skip(row, "out of GPU memory")
                continue
            except Exception:
                traceback.print_exc()
                print(f"{row} ERROR", flush=True)
                ledger.erred(row)
                ok = False
                continue
            print(f"\nstep {precision}:", end="")
            table.report(args.d_in, F, results, step_args)
            ledger.ran(row)
    return ok


# ---- large: Feature Choice against TopK at large batches, synthetic Zipf data ---------------


def large_config(args, out: str):
    """The bench config of the smallest batch; each batch replaces batch_size and steps."""
    from choicesae.bench.paper import BenchConfig

    B = min(args.large_batches)
    return BenchConfig(
        data="synthetic",
        out=out,
        methods="topk,feature_choice",
        ks=str(args.large_k),
        seeds=1,
        steps=args.large_tokens // B,
        batch_size=B,
        num_latents=args.large_latents,
        train_tokens=args.large_rows,
        eval_tokens=2 * max(args.large_batches),  # whole batches of every B (powers of 2)
        d_in=args.large_d_in,
        true_features=args.large_true,
        device=args.device,
    )


def large_batches(args, ledger: Ledger, absent: dict[str, str]) -> bool:
    """Train TopK and the default Feature Choice at each batch on the same synthetic rows
    (reused across epochs) with the same token budget; their held-out FVUs."""
    from choicesae.bench.paper import run_one, synthetic_data

    why = f"{absent['schedulefree']} (the recipe's optimizer)" if absent["schedulefree"] else ""
    if why or ledger.left() <= 0:  # the bench trains with the recipe's schedule-free AdamW
        for B in sorted(args.large_batches):
            ledger.skip(f"large B={B}", why or "out of time")
        return True
    F, k, ok = args.large_latents, args.large_k, True
    print(
        f"\nlarge: synthetic d={args.large_d_in}, {args.large_true} true features (Zipf), "
        f"F={F}, k={k}, {args.large_tokens} tokens per run over {args.large_rows} rows"
    )
    with tempfile.TemporaryDirectory() as out:
        base = large_config(args, out)
        start = time.perf_counter()
        data = synthetic_data(base)  # on the CPU, as `choicesae bench --device cuda` has it
        print(f"data generated in {time.perf_counter() - start:.1f} s", flush=True)
        head = f"{'B':>7}{'k·B/F':>7}{'steps':>7}  {'method':<16}{'FVU batch':>10}"
        print(head + f"{'FVU θ_i':>9}{'L0 θ_i':>8}{'MMCS':>7}{'train s':>9}")
        needs = 0.0  # seconds of the last run: the same token budget costs about as much
        for B in sorted(args.large_batches):
            cfg = dataclasses.replace(base, batch_size=B, steps=args.large_tokens // B)
            fvu = {}
            for method in ("topk", "feature_choice"):
                row = f"large B={B} {method}"
                if not ledger.may_start(row, needs):
                    continue
                free_memory(args.device)
                try:
                    record = run_one(cfg, data, method, k, seed=0, l1=0.0)
                except OOM:
                    ledger.skip(row, "out of GPU memory")
                    continue
                except Exception:
                    traceback.print_exc()
                    print(f"{row} ERROR", flush=True)
                    ledger.erred(row)
                    ok = False
                    continue
                ledger.ran(row)
                needs = 1.2 * record["train_s"]
                batch, theta = (
                    record["inference"]["batch"],
                    record["inference"]["feature_threshold"],
                )
                fvu[method] = (batch["fvu"], theta["fvu"])
                line = f"{B:>7}{k * B / F:>7.0f}{cfg.steps:>7}  {method:<16}{batch['fvu']:>10.4f}"
                line += f"{theta['fvu']:>9.4f}{theta['l0']:>8.1f}{record['mmcs']:>7.3f}"
                print(line + f"{record['train_s']:>9.1f}", flush=True)
            if len(fvu) == 2:
                (fc, fc_theta), (tk, tk_theta) = fvu["feature_choice"], fvu["topk"]
                print(f"{'':>23}FC ÷ TopK{fc / tk:>17.3f}{fc_theta / tk_theta:>9.3f}", flush=True)
    return ok


def run_section(name: str, section, ledger: Ledger) -> bool:
    """The section's verdict; one that raises outside its rows (making its data, say) is
    reported and the next one runs."""
    try:
        return section()
    except Exception:
        traceback.print_exc()
        print(f"{name} ERROR", flush=True)
        ledger.erred(name)
        return False


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(
            f"--device {args.device}: CUDA is not available to torch {torch.__version__} "
            f"(CUDA build: {torch.version.cuda}); install a CUDA build or pass --device cpu"
        )
    ledger = Ledger(args.budget)
    name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    tf32 = torch.backends.cuda.matmul.allow_tf32
    print(f"torch {torch.__version__} on {name}; TF32 matmul {tf32}", flush=True)
    print(f"choicesae: from {Path(choicesae.__file__).parent}")
    absent = {package: missing(package) for package in ("schedulefree", "sparsify")}
    for package, why in absent.items():
        where = "" if why else Path(importlib.import_module(package).__file__).parent
        print(f"{package}: " + (f"missing ({why})" if why else f"from {where}"), flush=True)
    sections = {
        "check": lambda: check_all(args, ledger),
        "throughput": lambda: throughput(args, ledger, absent),
        "step": lambda: step_table(args, ledger),
        "large": lambda: large_batches(args, ledger, absent),
    }
    ok = {
        name: run_section(name, sections[name], ledger)
        for name in SECTIONS
        if name in args.sections
    }
    print("\n" + ledger.summary())
    print("result: " + "; ".join(f"{name} {'OK' if good else 'FAIL'}" for name, good in ok.items()))
    return 0 if all(ok.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
