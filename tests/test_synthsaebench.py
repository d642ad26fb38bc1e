"""The SynthSAEBench target (bench/synthsaebench.py): a tiny end-to-end run through SAELens's
generator, trainer and evaluator, its resume, its settings, and a score checked against our own
reconstruction of the same held-out samples."""

import math
import sys

import pytest
import torch

from choicesae.bench import synthsaebench as ssb
from choicesae.bench.paper import read_results
from choicesae.bench.synthsaebench import (
    HELD_OUT_SEED,
    SynthSAEBenchConfig,
    sample_rows,
    synthetic_model,
    synthsaebench,
)
from choicesae.cli.main import main
from choicesae.errors import ConfigError
from choicesae.interop.saelens import from_saelens

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
    assert all(f"| {method} | 1 |" in text for method in cfg.method_list)
    assert "nan" not in text


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
