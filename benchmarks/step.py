"""Time one training step (forward + backward) of the sparse step against its floor and the
plain dense-autograd step, all measured side by side in one run.

    .venv/bin/python benchmarks/step.py                      # d 384 768, F = 8d 32d, k 32, B 4096
    .venv/bin/python benchmarks/step.py --d 128 --batch 1024 --repeats 2    # a quick look

floor: one dense encoder product (x − b_dec) W_enc (under bf16 autocast with --bf16), the least
a step can cost. fast: the objective over ops.Sparse + backward. dense: over ops.Dense +
backward (autograd through the reference sparsifiers). Times are the best of --repeats rounds
in which every variant runs once: on a shared machine interference only ever adds time, and the
rounds interleave the variants so that slow spells hit all of them alike. Peak memory is
measured in a separate untimed pass: on CPU the growth of the process's peak RSS during the
step (VmHWM, reset through /proc/self/clear_refs), on CUDA torch.cuda.max_memory_allocated above
the memory in use before.
"""

import argparse
import dataclasses
import functools
import time

import torch

from choicesae.core.config import SAEConfig, TrainConfig
from choicesae.core.sae import SAE
from choicesae.step.objective import Masks, objective
from choicesae.step.ops import Dense, Sparse

STEPS = {
    "fast": functools.partial(objective, ops=Sparse()),
    "dense": functools.partial(objective, ops=Dense()),
}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--d", type=int, nargs="+", default=[384, 768], help="input widths")
    p.add_argument("--expansion", type=int, nargs="+", default=[8, 32], help="F / d")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (the best is reported)")
    p.add_argument("--sparsifiers", nargs="+", default=["topk", "mutual_choice", "feature_choice"])
    p.add_argument("--dead", type=float, default=0.0, help="fraction of latents marked dead")
    p.add_argument("--multi-topk", action="store_true", help="add the L(4k)/8 term")
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true", help="run the step under bf16 autocast")
    return p.parse_args()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_step(fn, sae, x, cfg, name, masks, args) -> None:
    with torch.autocast(x.device.type, torch.bfloat16, enabled=args.bf16):
        out = fn(sae, x, cfg, name, masks)
    out.loss.backward()
    sae.zero_grad(set_to_none=True)


def floor(xc, W_enc, args) -> None:
    """The one dense encoder product, at the precision of the step it is the floor of."""
    with torch.autocast(xc.device.type, torch.bfloat16, enabled=args.bf16):
        torch.mm(xc, W_enc)


def timed(fn, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def peak_mib(fn, device: str) -> float:
    """Memory the call needs beyond what was in use before it, in MiB."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS to the current RSS
    before = _rss_kib("VmRSS:")
    fn()
    return (_rss_kib("VmHWM:") - before) / 1024


def setup(d: int, F: int, args):
    sae_cfg = SAEConfig(k=args.k, num_latents=F).resolve(d)
    cfg = dataclasses.replace(TrainConfig(sae=sae_cfg), multi_topk=args.multi_topk)
    torch.manual_seed(0)
    sae = SAE(sae_cfg).to(args.device)
    x = torch.randn(args.batch, d, device=args.device)
    x = x / x.norm(dim=-1, keepdim=True)  # unit-norm tokens, as normalize="token" gives
    dead = torch.rand(F, device=args.device) < args.dead
    return sae, x, cfg, Masks(dead, torch.zeros_like(dead))


def bench(d: int, F: int, args) -> dict:
    """{variant: (best seconds, peak MiB)}; variants 'floor' and (sparsifier, impl)."""
    sae, x, cfg, masks = setup(d, F, args)
    xc = (x - sae.b_dec).detach()
    W_enc = sae.W_enc.detach()
    runs = {"floor": lambda: floor(xc, W_enc, args)}
    for name in args.sparsifiers:
        for impl, fn in STEPS.items():
            runs[name, impl] = lambda fn=fn, name=name: run_step(fn, sae, x, cfg, name, masks, args)
    memory = {key: peak_mib(run, args.device) for key, run in runs.items()}  # also warms up
    times = {key: [] for key in runs}
    for _ in range(args.repeats):
        for key, run in runs.items():
            times[key].append(timed(run, args.device))
    return {key: (min(t), memory[key]) for key, t in times.items()}


def report(d: int, F: int, results: dict, args) -> None:
    floor = results["floor"][0]
    print(f"\nd={d} F={F} ({F // d}·d) k={args.k} B={args.batch}  floor {floor * 1e3:.1f} ms")
    head = f"{'sparsifier':<15}{'impl':<6}{'step ms':>9}{'tok/s':>10}{'peak MiB':>10}"
    print(head + f"{'/floor':>8}{'dense/fast':>11}{'/topk':>7}")
    topk = results.get(("topk", "fast"), (None,))[0]
    for name in args.sparsifiers:
        for impl in STEPS:
            t, mem = results[name, impl]
            row = f"{name:<15}{impl:<6}{t * 1e3:>9.1f}{args.batch / t:>10.0f}{mem:>10.0f}"
            row += f"{t / floor:>8.2f}"
            if impl == "fast":
                speedup = results[name, "dense"][0] / t
                row += f"{speedup:>11.2f}" + (f"{t / topk:>7.2f}" if topk else "")
            print(row, flush=True)


def main() -> None:
    args = parse()
    torch.set_grad_enabled(True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    for d in args.d:
        for e in args.expansion:
            report(d, e * d, bench(d, e * d, args), args)


if __name__ == "__main__":
    main()
