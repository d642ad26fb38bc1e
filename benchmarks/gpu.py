"""GPU readiness in one run: the sparse step checked against the dense reference, in fp32 and
under bf16 autocast, then the training throughput of every sparsifier against sparsify's TopK.

    .venv/bin/python benchmarks/gpu.py              # CUDA: d 768, F 32768, k 32, B 4096
    .venv/bin/python benchmarks/gpu.py --device cpu --d-in 64 --num-latents 1024 \\
        --batch-size 512 --steps 3 --check-d-in 32 --check-latents 256 --check-batch 128

check: for topk, mutual_choice, feature_choice and relu, with the aux_k and aux_zipf masks
non-empty, the objective over the sparse ops against the same over the dense ops (autograd
through the reference sparsifiers): the loss and every gradient, as |ours − ref| / |ref| over
the whole tensor. The dense reference is given the sparse step's selection (the `Pinned`
backend), so that a near-tie ordered differently by two summation orders (or by bf16 rounding)
cannot fail the numeric comparison; how many pairs the reference's own selection differs in
is checked and printed apart. relu is checked with b_enc lowered so that few affinities are
positive: the sparse path, not the dense fallback.

throughput: one training step (forward, backward, optimizer step) on the same random-normal
batches for everyone: choicesae's train.train_step + advance (the loop's step: AdamW, clipping,
firing counts) per sparsifier, in fp32 and under bf16 autocast, and sparsify's SparseCoder with
its default optimizer, ScheduleFreeWrapper(SignSGD), stepped as its Trainer steps it (its forward
runs under bf16 autocast on CUDA by its own decorator). Exits 1 if a check fails or a row errs.
"""

import argparse
import contextlib
import gc
import time
import traceback

import torch

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
# (loss, gradients, share of selected pairs the reference's own selection may differ in).
# bf16: the sparse step selects on bf16 z' and the dense one on float32 z', so near-ties go
# either way; the top-k_aux of aux_k among dead latents meets the most of them (~2% of pairs
# at d 768, F 8192 under CPU autocast: 4e-2 on W_enc's gradient, 4e-3 without aux losses).
TOLERANCE = {"fp32": (1e-5, 1e-4, 1e-3), "bf16": (5e-3, 0.1, 0.1)}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--d-in", type=int, default=768, help="throughput: input width d")
    p.add_argument("--num-latents", type=int, default=32768, help="throughput: latents F")
    p.add_argument("--k", type=int, default=32, help="active latents per token (both parts)")
    p.add_argument("--batch-size", type=int, default=4096, help="throughput: tokens per step")
    p.add_argument("--steps", type=int, default=50, help="timed steps per method")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per method first")
    p.add_argument("--check-d-in", type=int, default=768, help="check: input width")
    p.add_argument("--check-latents", type=int, default=8192, help="check: latents")
    p.add_argument("--check-batch", type=int, default=1024, help="check: tokens")
    p.add_argument("--skip-check", action="store_true", help="throughput only")
    return p.parse_args(argv)


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


def check_all(args) -> bool:
    ok = True
    for precision in ("fp32", "bf16"):
        for sparsifier in SPARSIFIERS:
            try:
                with full_fp32_matmul() if precision == "fp32" else contextlib.nullcontext():
                    ok &= check_case(sparsifier, precision, args)
            except Exception:  # report and go on: one run should show every problem
                traceback.print_exc()
                print(f"check {precision} {sparsifier:<15} ERROR  FAIL", flush=True)
                ok = False
    return ok


# ---- throughput: one training step, choicesae against sparsify ------------------------------


def choicesae_step(sparsifier: str, bf16: bool, data: list[torch.Tensor], args):
    """choicesae's training step (train.train_step + advance, as run_loop calls them)."""
    d, F, B = args.d_in, args.num_latents, args.batch_size
    sae_cfg = SAEConfig(sparsifier=sparsifier, k=args.k, num_latents=F, d_in=d)
    steps = args.warmup + args.steps  # the lr schedule's length
    cfg = TrainConfig(sae=sae_cfg, batch_size=B, steps=steps, device=args.device, progress=False)
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


def methods(data: list[torch.Tensor], args) -> dict:
    """{row name: factory of a step function}; sparsify's TopK first, the baseline."""
    rows = {"sparsify topk": lambda: sparsify_step(data, args)}
    for bf16 in (False, True):
        for name in SPARSIFIERS:
            label = f"choicesae {name}" + (" bf16" if bf16 else "")
            rows[label] = lambda name=name, bf16=bf16: choicesae_step(name, bf16, data, args)
    return rows


def throughput(args) -> bool:
    """Time every method, printing its row as soon as it is timed; False if one failed."""
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(args.batch_size, args.d_in, generator=g).to(args.device) for _ in "ab"]
    d, F, k, B = args.d_in, args.num_latents, args.k, args.batch_size
    print(f"\nthroughput: d={d} F={F} k={k} B={B}, {args.steps} steps after {args.warmup}")
    print(f"{'method':<30}{'ms/step':>10}{'tokens/s':>12}{'peak GiB':>10}{'/sparsify':>11}")
    base, ok = None, True
    for label, make in methods(data, args).items():
        gc.collect()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            seconds, peak = timed(make(), data, args)
        except Exception:  # a missing package or too little memory: report, go on
            traceback.print_exc()
            print(f"{label:<30}{'ERROR':>10}", flush=True)
            ok = False
            continue
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


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(
            f"--device {args.device}: CUDA is not available to torch {torch.__version__} "
            f"(CUDA build: {torch.version.cuda}); install a CUDA build or pass --device cpu"
        )
    name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    tf32 = torch.backends.cuda.matmul.allow_tf32
    print(f"torch {torch.__version__} on {name}; TF32 matmul {tf32}", flush=True)
    checked = True if args.skip_check else check_all(args)
    timed_ok = throughput(args)
    print(f"\ncheck {'PASS' if checked else 'FAIL'}; throughput {'OK' if timed_ok else 'ERROR'}")
    return 0 if checked and timed_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
