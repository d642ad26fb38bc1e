"""Golden weights: what 30 CPU training steps produce, pinned so that a change meant to move
code, not behaviour (a refactor), shows it kept every bit.

tests/golden.json holds, for each run below, a SHA-256 of the trained SAE's tensors and their
sums. On the platform it was written on (the same torch and CPU capability) the hashes must
match bit for bit; elsewhere float rounding may differ, so the sums must match to 1e-4.
Rewrite it, after a change that is meant to alter training, with

    CHOICESAE_WRITE_GOLDEN=1 .venv/bin/python -m pytest -q tests/test_golden.py

The two-process runs (data parallel and feature sharding) run under torchrun; the `__main__`
part is what each rank does."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from choicesae.core.config import SAEConfig, TrainConfig
from choicesae.core.sae import SAE
from choicesae.training.loop import train

GOLDEN = Path(__file__).with_name("golden.json")
B, F, K, STEPS = 64, 32, 4, 30
SPARSIFIERS = ("topk", "mutual_choice", "feature_choice", "relu")
ONE_PROCESS = {  # run name -> what it sets besides the shared settings of `config`
    **{
        f"{s}-{kern}": {"sparsifier": s, "kernels": kern}
        for s in SPARSIFIERS
        for kern in ("sparse", "dense")
    },
    "multi_topk": {"sparsifier": "topk", "multi_topk": True},
    "phased": {"schedule": f"mutual_choice:{STEPS // 2},feature_choice:{STEPS // 2}"},
    "no_aux": {"sparsifier": "mutual_choice", "aux_k_coeff": 0.0, "aux_zipf_coeff": 0.0},
    "nfm": {"sparsifier": "topk", "nfm_coeff": 0.1},
}
TWO_PROCESSES = {
    **{
        f"{layout}-{s}-{kernels}": {"sparsifier": s, "parallel": layout, "kernels": kernels}
        for layout in ("data", "features")
        for s in SPARSIFIERS
        for kernels in ("sparse", "dense")
    },
    "data-local": {"sparsifier": "mutual_choice", "distributed_selection": "local"},
    "data-multi_topk": {"sparsifier": "mutual_choice", "multi_topk": True},
    "features-multi_topk": {
        "sparsifier": "feature_choice",
        "multi_topk": True,
        "parallel": "features",
    },
}


def config(out: Path, name: str, sparsifier: str = "topk", **kw) -> TrainConfig:
    """30 steps with dead and dying latents early, so that both aux losses act (aux_zipf set
    for TopK too, and Feature Choice uniform from the first step: the weights were written
    when those were the defaults)."""
    kw = {"aux_zipf_coeff": 1 / 32, "mutual_choice_share": 0.0} | kw
    return TrainConfig(
        activations=str(out / "x.npy"),
        out=str(out / name),
        sae=SAEConfig(sparsifier=sparsifier, k=K, num_latents=F, capacities="uniform"),
        batch_size=B,
        steps=STEPS,
        lr=1e-2,
        warmup_steps=2,
        dead_tokens=2 * B,
        density_tokens=4 * B,
        k_aux=4 * K,
        progress=False,
        **kw,
    )


def platform() -> str:
    return f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}"


def fingerprint(sae: SAE) -> dict:
    """SHA-256 over the state dict's names and bytes, and each tensor's sum; a transcoder's
    target scale, added after the golden weights were written, is left out (an autoencoder's
    is always 1), and the JumpReLU thresholds, estimated after the last step since the golden
    weights were written, are counted as NaN, as they were then: training itself is pinned."""
    digest, sums = hashlib.sha256(), {}
    state = sae.state_dict()
    assert float(state.pop("scale_out")) == 1.0
    for name in ("threshold", "threshold_global"):
        state[name] = torch.full_like(state[name], float("nan"))
    for name, tensor in sorted(state.items()):
        digest.update(name.encode() + tensor.contiguous().numpy().tobytes())
        sums[name] = float(tensor.double().nansum())
    return {"sha256": digest.hexdigest(), "sums": sums}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synthetic) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("golden")
    np.save(out / "x.npy", synthetic[0][:4096].numpy())
    found = {name: fingerprint(train(config(out, name, **kw))) for name, kw in ONE_PROCESS.items()}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    done = subprocess.run(
        [*cmd, __file__, str(out)],
        capture_output=True,
        text=True,
        env={"OMP_NUM_THREADS": "1", **os.environ},
    )
    assert done.returncode == 0, done.stderr[-4000:]
    for name in TWO_PROCESSES:
        found[name] = fingerprint(SAE.from_pretrained(out / name / "sae"))
    return found


def test_thirty_steps_match_the_golden_weights(trained):
    if os.environ.get("CHOICESAE_WRITE_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps({"platform": platform(), "runs": trained}, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert sorted(trained) == sorted(golden["runs"])
    for name, found in trained.items():
        expected = golden["runs"][name]
        if golden["platform"] == platform():
            assert found["sha256"] == expected["sha256"], f"{name}: the weights changed"
        else:
            assert found["sums"] == pytest.approx(expected["sums"], rel=1e-4, abs=1e-4), name


if __name__ == "__main__":  # one torchrun rank
    work = Path(sys.argv[1])
    for run, settings in TWO_PROCESSES.items():
        train(config(work, run, **settings))
