"""Training time beside a busy neighbour process, the way users start choicesae.

    .venv/bin/python benchmarks/threads.py [--steps 60]

Times one short training run (synthetic data, d 128, F 2048, batch 2048) in a fresh process,
with and without a neighbour that keeps one core busy, for each way of starting it:
  cli           `choicesae train` from the shell
  cli, before   the same with CHOICESAE_OMP_DEFAULTS=0: OpenMP's own wait policy, what every
                run got before choicesae set OMP_WAIT_POLICY=PASSIVE
  import        `import choicesae` first in a Python program
  torch first   `import torch` before choicesae: OpenMP was loaded with its own policy, too
                early for choicesae to set it (training warns)
and prints the seconds and the slowdown the neighbour causes. The OMP_WAIT_POLICY of this
shell is removed from the runs.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SNIPPET = """
import sys
{first}
import choicesae as cs
x, _ = cs.sparse_dictionary(cs.SyntheticConfig(tokens=65536, d_in=128, num_features=1024))
cfg = cs.TrainConfig(out=sys.argv[1], overwrite=True, steps={steps}, batch_size=2048,
                     sae=cs.SAEConfig(num_latents=2048), progress=False)
cs.train(cfg, x)
"""


def timed(way: str, steps: int, out: str, data: str) -> float:
    """Seconds in the training loop of one run started `way` (metrics.jsonl's elapsed_s at
    the end: the start-up of the process is left out)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if way.startswith("cli"):
        if way == "cli, before":
            env["CHOICESAE_OMP_DEFAULTS"] = "0"
        cli = Path(sys.executable).with_name("choicesae")
        cmd = [str(cli), "train", "--activations", data, "--out", out, "--overwrite"]
        cmd += ["--steps", str(steps), "--batch-size", "2048", "--num-latents", "2048"]
        cmd += ["--no-progress"]
    else:
        first = "" if way == "import" else "import torch"
        cmd = [sys.executable, "-c", SNIPPET.format(first=first, steps=steps), out]
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return json.loads((Path(out) / "metrics.jsonl").read_text().splitlines()[-1])["elapsed_s"]


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    args.add_argument("--steps", type=int, default=60)
    args = args.parse_args()
    import numpy as np

    from choicesae.data.synthetic import SyntheticConfig, sparse_dictionary

    with tempfile.TemporaryDirectory() as tmp:
        x, _ = sparse_dictionary(SyntheticConfig(tokens=65536, d_in=128, num_features=1024))
        np.save(f"{tmp}/x.npy", x.numpy())
        print(f"{'start':<12} {'alone s':>8} {'neighbour s':>12} {'slowdown':>9}")
        for way in ("cli", "cli, before", "import", "torch first"):
            alone = timed(way, args.steps, f"{tmp}/run", f"{tmp}/x.npy")
            busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            try:
                shared = timed(way, args.steps, f"{tmp}/run", f"{tmp}/x.npy")
            finally:
                busy.kill()
            print(f"{way:<12} {alone:8.1f} {shared:12.1f} {shared / alone:8.1f}x", flush=True)


if __name__ == "__main__":
    main()
