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


def peers(tmp_path, *flags: str, first: dict | None = None) -> tuple[str, dict]:
    """benchmarks/peers.py on a toy store: (table.md, curves.json). `first`: manifest fields
    of a store that kept each context's first token, those rows made 1000 times larger."""
    manifest = {"model": "toy", "d_model": 32, "dtype": "float32", **(first or {})}
    writer = StoreWriter(tmp_path / "store", manifest)
    x = torch.randn(4096, 32, generator=torch.Generator().manual_seed(0))
    if first:
        x[:: first["context"]] *= 1000
    writer.write_shard(x, np.zeros(len(x), dtype=np.int32))
    writer.finish()
    out = tmp_path / "peers"
    toy = "--num-latents 64 --k 4 --batch-size 256 --steps 4 --eval-every 2 --heldout 512"
    toy += " --calibration 1024"
    done = subprocess.run(
        [sys.executable, "benchmarks/peers.py", "--store", str(tmp_path / "store")]
        + [*toy.split(), "--out", str(out), *flags],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    table = (out / "table.md").read_text()
    assert table.strip() in done.stdout
    return table, json.loads((out / "curves.json").read_text())


def test_peers_table(tmp_path):
    table, curves = peers(tmp_path)
    rows = [
        *("sparsify_topk", "topk", "mutual_choice", "mutual_choice +θ"),
        *("feature_choice", "feature_choice +θ", "relu"),
    ]
    assert [line.split("|")[1].strip() for line in table.splitlines()[-7:]] == rows
    assert all(list(curves[row]) == ["1.0"] for row in rows)  # the default lr alone
    curves = {row: curves[row]["1.0"] for row in rows}
    assert [[point["step"] for point in curves[row]] for row in rows] == [[2, 4]] * 7
    assert curves["topk"][-1]["l0"] == pytest.approx(4)
    thresholded = curves["feature_choice +θ"][-1]  # a real JumpReLU row, not batch inference
    assert thresholded["seconds"] == curves["feature_choice"][-1]["seconds"]
    assert thresholded["fvu"] != curves["feature_choice"][-1]["fvu"]
    sparsify_lr = 5e-3 / (64 / 2**14) ** 0.5  # sparsify's default for signum at F = 64
    assert curves["sparsify_topk"][-1]["lr"] == pytest.approx(sparsify_lr)
    assert curves["topk"][-1]["lr"] == pytest.approx(2e-3 / (64 / 2**14) ** 0.5)


def test_the_lr_sweep_gives_each_row_at_its_default_and_at_its_best(tmp_path):
    """Every method, sparsify included, at each factor of its own default lr (the script exits
    non-zero if any run trained on other batches); the best row is the lowest final FVU, and its
    ratios are to sparsify at its own best."""
    methods = "sparsify_topk,mutual_choice"
    grid = (0.5, 1.0, 2.0)
    table, curves = peers(tmp_path, "--lr-sweep", "--lr-grid", "2,1,0.5", "--methods", methods)
    rows = ["sparsify_topk", "mutual_choice", "mutual_choice +θ"]
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in table.splitlines()[-6:]]
    assert [c[0] for c in cells] == [name for row in rows for name in (row, f"{row}, best lr")]
    final = {row: {float(f): c[-1] for f, c in curves[row].items()} for row in rows}
    for row, (default, best) in zip(rows, zip(cells[::2], cells[1::2], strict=True), strict=True):
        assert sorted(final[row]) == list(grid)
        lrs = {f: point["lr"] for f, point in final[row].items()}
        assert all(lrs[f] == pytest.approx(f * lrs[1.0]) for f in grid)
        factor = min(final[row], key=lambda f: final[row][f]["fvu"])
        assert default[1].endswith("(×1)") and best[1].endswith(f"(×{factor:g})")
        assert float(default[4]) == pytest.approx(final[row][1.0]["fvu"], abs=1e-4)
        assert float(best[4]) == pytest.approx(final[row][factor]["fvu"], abs=1e-4)
    ref = min(final["sparsify_topk"].values(), key=lambda point: point["fvu"])["fvu"]
    assert float(cells[3][-1]) == pytest.approx(float(cells[3][4]) / ref, abs=2e-3)
    assert float(cells[1][-1]) == 1.0


def test_merge_gives_mean_and_std_over_seeds(tmp_path):
    """--merge over two folders whose final FVUs differ by 0.02: the mean is halfway and the
    std 0.01, each method at its default and at its lowest mean FVU."""
    first, second = tmp_path / "s0", tmp_path / "s1"
    curves = {
        "sparsify_topk": {"0.5": [0.3, 0.2], "1.0": [0.3, 0.25]},
        "mutual_choice": {"0.5": [0.3, 0.22], "1.0": [0.3, 0.2]},
    }
    for folder, shift in ((first, 0.0), (second, 0.02)):
        folder.mkdir()
        by_row = {
            row: {
                f: [{"lr": float(f), "fvu": v + shift, "l0": 4.0, "dead_pct": 0.0} for v in fvus]
                for f, fvus in by_lr.items()
            }
            for row, by_lr in curves.items()
        }
        (folder / "curves.json").write_text(json.dumps(by_row))
    done = subprocess.run(
        [sys.executable, "benchmarks/peers.py", "--merge", str(first), str(second)],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in done.stdout.splitlines()[-4:]]
    assert [c[0] for c in cells] == [
        "sparsify_topk", "sparsify_topk, best lr", "mutual_choice", "mutual_choice, best lr"
    ]  # fmt: skip
    assert [c[3] for c in cells] == ["0.2600 ± 0.0100"] + ["0.2100 ± 0.0100"] * 3
    assert cells[1][1].endswith("(×0.5)") and cells[3][1].endswith("(×1)")
    assert cells[2][-1] == "0.807 ± 0.007" and cells[3][-1] == "1.000 ± 0.000"


def test_a_contexts_first_tokens_are_left_out(tmp_path):
    """A store that kept each context's first token (drop_first false): those rows, here 1000
    times the others (as a causal LM's attention sink), are read by no library."""
    table, curves = peers(
        tmp_path, "--methods", "sparsify_topk", first={"drop_first": False, "context": 8}
    )
    assert "3,584 rows" in table  # 4,096 less every 8th
    assert all(point["fvu"] < 2 for point in curves["sparsify_topk"]["1.0"])


def test_a_sweep_split_over_processes_gives_the_same_points(tmp_path):
    """Without sparsify in --methods (a sweep split over processes, one per library) a method's
    held-out points are those of the joint run, and the ratio columns are left empty."""
    _, joint = peers(tmp_path / "joint", "--methods", "sparsify_topk,mutual_choice")
    table, alone = peers(tmp_path / "alone", "--methods", "mutual_choice")

    def untimed(points):  # timings differ run to run
        return [{k: v for k, v in p.items() if k != "seconds"} for p in points]

    for row in ("mutual_choice", "mutual_choice +θ"):
        assert untimed(alone[row]["1.0"]) == untimed(joint[row]["1.0"])
    assert "sparsify_topk" not in alone
    last = [c.strip() for c in table.splitlines()[-1].split("|")[1:-1]]
    assert last[0] == "mutual_choice +θ" and last[-3:] == ["—", "—", "—"]
