"""benchmarks/peers.py at toy size: sparsify and every choicesae sparsifier on one tiny store."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from choicesae.data.store import StoreWriter

pytest.importorskip("sparsify", reason="the interop extra installs eai-sparsify")
ROOT = Path(__file__).resolve().parent.parent


def test_peers_table(tmp_path):
    writer = StoreWriter(tmp_path / "store", {"model": "toy", "d_model": 32, "dtype": "float32"})
    x = torch.randn(4096, 32, generator=torch.Generator().manual_seed(0))
    writer.write_shard(x, np.zeros(len(x), dtype=np.int32))
    writer.finish()
    out = tmp_path / "peers"
    toy = "--num-latents 64 --k 4 --batch-size 256 --steps 4 --eval-every 2 --heldout 512"
    toy += " --calibration 1024"
    done = subprocess.run(
        [sys.executable, "benchmarks/peers.py", "--store", str(tmp_path / "store")]
        + [*toy.split(), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    table = (out / "table.md").read_text()
    assert table.strip() in done.stdout
    rows = [
        *("sparsify_topk", "topk", "mutual_choice", "mutual_choice +θ"),
        *("feature_choice", "feature_choice +θ", "relu"),
    ]
    assert [line.split("|")[1].strip() for line in table.splitlines()[-7:]] == rows
    curves = json.loads((out / "curves.json").read_text())
    assert [[point["step"] for point in curves[row]] for row in rows] == [[2, 4]] * 7
    assert curves["topk"][-1]["l0"] == pytest.approx(4)
    thresholded = curves["feature_choice +θ"][-1]  # a real JumpReLU row, not batch inference
    assert thresholded["seconds"] == curves["feature_choice"][-1]["seconds"]
    assert thresholded["fvu"] != curves["feature_choice"][-1]["fvu"]
