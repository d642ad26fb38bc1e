"""The SynthSAEBench target (bench/synthsaebench.py): a tiny end-to-end run through SAELens's
generator, trainer and evaluator, its resume, its settings, and a score checked against our own
reconstruction of the same held-out samples."""

import math
import sys

import pytest
import torch

from choicesae.bench import synthsaebench as ssb
from choicesae.bench.lr_sweep import LR_FACTORS
from choicesae.bench.paper import read_results
from choicesae.bench.synthsaebench import (
    HELD_OUT_SEED,
    SynthSAEBenchConfig,
    sample_rows,
    synthetic_model,
    synthsaebench,
    train_peer,
)
from choicesae.cli.main import main
from choicesae.errors import ConfigError
from choicesae.interop.saelens import from_saelens
from choicesae.training.loop import train

pytest.importorskip("sae_lens", reason="the interop extra installs sae-lens")

# 256 true features in 32 dimensions, width 64: seconds on a CPU
TINY = dict(scale=64, hidden_dim=32, k=4, seeds=1, steps=30, batch_size=256, eval_samples=2048)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthsaebench")
    methods = "mutual_choice,saelens_topk,saelens_matryoshka_batchtopk"
    cfg = SynthSAEBenchConfig(out=str(out), methods=methods, **TINY)
    return cfg, synthsaebench(cfg)


def test_every_method_is_scored_in_the_table(tiny):
    cfg, table = tiny
    records = read_results(cfg.folder / "results.jsonl")
    assert sorted(r["method"] for r in records) == sorted(cfg.method_list)
    for r in records:
        scores = (r["eval"]["mcc"], r["eval"]["classification"]["f1_score"], r["fvu"])
        assert all(math.isfinite(v) for v in scores), r
        assert 0 < r["eval"]["sae_l0"] and 0 < r["eval"]["mcc"] <= 1
    text = table.read_text()
    assert all(f"| {method} | " in text and "(×1) | 1 |" in text for method in cfg.method_list)
    assert "best lr" not in text and "nan" not in text  # without --lr-sweep: the default alone


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """A sweep of one of ours and one of SAELens's, noting the rows and lr each run trains on."""
    out = tmp_path_factory.mktemp("synthsaebench-sweep")
    methods = "mutual_choice,saelens_topk"
    cfg = SynthSAEBenchConfig(out=str(out), methods=methods, lr_sweep=True, **TINY | {"steps": 10})
    seen = []

    def ours(train_cfg, rows):
        seen.append(("mutual_choice", train_cfg.lr, float(rows.sum())))
        return train(train_cfg, rows)

    def peer(cfg, model, method, seed, rows, lr):
        seen.append((method, lr, float(rows.sum())))
        return train_peer(cfg, model, method, seed, rows, lr)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ssb, "train", ours)
        mp.setattr(ssb, "train_peer", peer)
        return cfg, synthsaebench(cfg), seen


def test_the_lr_sweep_trains_every_method_at_each_factor_of_its_default_on_the_same_rows(swept):
    cfg, _, seen = swept
    defaults = {"mutual_choice": 2e-3 / (64 / 2**14) ** 0.5, "saelens_topk": 3e-4}
    wanted = sorted((m, f * lr) for m, lr in defaults.items() for f in LR_FACTORS)
    trained = sorted((m, lr) for m, lr, _ in seen)
    assert [m for m, _ in trained] == [m for m, _ in wanted]
    assert [lr for _, lr in trained] == pytest.approx([lr for _, lr in wanted])
    assert len({rows for _, _, rows in seen}) == 1  # one seed: every run on its rows
    records = read_results(cfg.folder / "results.jsonl")
    assert len({r["eval"]["mcc"] for r in records}) == len(wanted)  # each trainer took its lr


def test_the_swept_table_gives_each_method_at_its_default_and_at_its_best_mcc(swept):
    cfg, table, _ = swept
    records = read_results(cfg.folder / "results.jsonl")
    lines = [line.split(" | ") for line in table.read_text().splitlines() if "(×" in line]
    assert [cells[0] for cells in lines] == [
        *("| mutual_choice", "| mutual_choice, best lr"),
        *("| saelens_topk", "| saelens_topk, best lr"),
    ]
    for default, best in zip(lines[::2], lines[1::2], strict=True):
        method = default[0].removeprefix("| ")
        mcc = {r["lr_factor"]: r["eval"]["mcc"] for r in records if r["method"] == method}
        top = max(mcc, key=mcc.__getitem__)
        assert default[1].endswith("(×1)") and best[1].endswith(f"(×{top:g})")
        assert float(default[3].split(" ± ")[0]) == pytest.approx(mcc[1.0], abs=1e-4)
        assert float(best[3].split(" ± ")[0]) == pytest.approx(mcc[top], abs=1e-4)


def test_finished_runs_are_not_trained_again(tiny, monkeypatch):
    cfg, _ = tiny
    results = cfg.folder / "results.jsonl"
    before = results.read_text()

    def never(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    for name in ("train", "train_peer", "sample_rows", "synthetic_model"):
        monkeypatch.setattr(ssb, name, never)
    synthsaebench(cfg)
    assert results.read_text() == before


def test_the_score_is_our_own_reconstruction(tiny):
    """SAELens's explained variance of the exported Mutual Choice SAE is 1 - the FVU of our SAE
    on the same held-out samples, one sample at a time at its per-feature thresholds: the export,
    the thresholds, the normalisation and the held-out stream are wired as they should be."""
    cfg, _ = tiny
    records = read_results(cfg.folder / "results.jsonl")
    record = next(r for r in records if r["method"] == "mutual_choice")
    ours = from_saelens(cfg.folder / "runs" / f"mutual_choice-k{cfg.k}-s0" / "saelens")
    x = sample_rows(synthetic_model(cfg), cfg.eval_samples, cfg.batch_size, HELD_OUT_SEED)
    with torch.no_grad():
        x_hat = ours.reconstruct(x, threshold="feature")
        l0 = float((ours.codes(x, threshold="feature") != 0).sum(-1).float().mean())
    fvu = float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
    assert record["fvu"] == pytest.approx(fvu, abs=1e-4)
    assert record["eval"]["sae_l0"] == pytest.approx(l0, abs=1e-3)


@pytest.mark.parametrize(
    "bad",
    [
        {"scale": 3},
        {"scale": 256},
        {"methods": "topk,bogus"},
        {"k": 512},
        {"hidden_dim": 1},
        {"seeds": 0},
        {"switch": 1.0},
    ],
)
def test_impossible_settings_are_refused(bad):
    with pytest.raises(ConfigError):
        SynthSAEBenchConfig(**bad)


def test_the_bench_command_reads_the_targets_settings(monkeypatch, capsys):
    seen = {}
    target = (SynthSAEBenchConfig, lambda cfg: seen.setdefault("cfg", cfg), "")
    monkeypatch.setitem(sys.modules["choicesae.cli.main"].BENCH_TARGETS, "synthsaebench", target)
    assert main(["bench", "synthsaebench", "--scale", "16", "--seeds", "2"]) == 0
    assert (seen["cfg"].scale, seen["cfg"].seeds, seen["cfg"].num_latents) == (16, 2, 256)
    assert main(["bench", "synthsaebench", "--scale", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "scale must be a power of two" in err
