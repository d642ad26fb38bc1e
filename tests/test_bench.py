"""The bench (bench/paper.py): settings, the per-method runs, the L1 calibration, the table, and a
tiny end-to-end run that is reused when run again."""

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from choicesae.bench.paper import (
    METHODS,
    BenchConfig,
    _next_coeff,
    aggregate,
    bench,
    controlled,
    markdown_table,
    run_config,
    synthetic_data,
)
from choicesae.errors import ConfigError
from choicesae.training.checkpoint import load_checkpoint
from choicesae.training.loop import base_iterate, train

TINY = dict(
    steps=40,
    batch_size=512,
    num_latents=96,
    train_tokens=4096,
    eval_tokens=1024,
    d_in=32,
    true_features=64,
    mean_active=4.0,
)


@pytest.mark.parametrize(
    "bad",
    [
        {"methods": "topk,bogus"},
        {"ks": "8,2000"},
        {"ks": "eight"},
        {"switch": 1.0},
        {"seeds": 0},
        {"data": "imagenet"},
    ],
)
def test_impossible_settings_are_refused(bad):
    with pytest.raises(ConfigError):
        BenchConfig(**bad)


def test_defaults_depend_on_the_data():
    assert (BenchConfig("synthetic").batch_size, BenchConfig("minilm").batch_size) == (4096, 1536)
    assert BenchConfig("minilm", steps=7).steps == 7


def test_every_method_gets_the_same_budget_and_its_own_sparsifier():
    cfg = BenchConfig(steps=100, ks="8")
    configs = {m: run_config(cfg, m, 8, 1, 0.2, 128) for m in METHODS}
    assert {c.total_steps * c.batch_size for c in configs.values()} == {100 * cfg.batch_size}
    assert {c.sae.k for c in configs.values()} == {8} and {c.seed for c in configs.values()} == {1}
    zipf = configs["feature_choice_zipf"]
    assert zipf.phases() == [("mutual_choice", 90), ("feature_choice", 10)]
    assert zipf.sae.capacities == "zipf"
    default, uniform = configs["feature_choice"], configs["feature_choice_uniform"]
    assert default.sae.capacities == "density" and default.phases() == zipf.phases()
    assert uniform.sae.capacities == "uniform" and uniform.phases() == [("feature_choice", 100)]
    assert configs["mutual_choice_no_aux_zipf"].sae.sparsifier == "mutual_choice"
    assert configs["mutual_choice_no_aux_zipf"].aux_zipf_coeff == 0
    assert configs["mutual_choice"].aux_zipf_coeff == -1 and configs["relu"].l1_coeff == 0.2
    assert {c.k_aux for c in configs.values()} == {64}
    alpha = run_config(cfg, "feature_choice_zipf_alpha", 8, 1, 0.2, 128)
    assert alpha.fit_alpha and not zipf.fit_alpha and alpha.sae.capacities == "zipf"


@pytest.mark.parametrize(
    "l0_of",
    [
        lambda c: 300.0 * c**-0.4,
        lambda c: 300.0 * c**-2.5,
        lambda c: 90.0 / (1 + (c / 0.3) ** 8),  # steep, like a real ReLU SAE's L0
    ],
)
def test_l1_steps_reach_the_target_l0(l0_of):
    tried = [(0.1, l0_of(0.1))]
    for _ in range(8):
        c = _next_coeff(tried, 16)
        tried.append((c, l0_of(c)))
    assert abs(math.log(tried[-1][1] / 16)) < 0.05


def _record(method, k, seed, fvu):
    inference = {
        m: {"l0": k, "fvu": fvu} for m in ("batch", "feature_threshold", "global_threshold")
    }
    fpt = {"first_token_l0": None}
    return dict(method=method, k=k, seed=seed, steps=10, step_ms=5.0, dead_pct=0.0,
                dying_pct=1.0, inference=inference, features_per_token=fpt)  # fmt: skip


def test_aggregate_takes_mean_and_spread_over_seeds():
    records = [_record("topk", 8, s, f) for s, f in enumerate((0.1, 0.3))]
    records.append(_record("mutual_choice", 8, 0, 0.2))
    rows = aggregate(records)
    assert [r["method"] for r in rows] == ["topk", "mutual_choice"]
    assert rows[0]["FVU"] == pytest.approx((0.2, 0.1)) and rows[0]["seeds"] == 2
    assert "FVU θ_i" not in rows[0] and rows[1]["FVU θ_i"] == pytest.approx((0.2, 0.0))
    table = markdown_table(rows)
    assert "| topk | 8 | 2 | 8.0 ± 0.0 | 0.2000 ± 0.1000 |" in table


def test_tiny_synthetic_bench_end_to_end_and_reused(tmp_path):
    cfg = BenchConfig(
        out=str(tmp_path), methods="topk,mutual_choice,feature_choice_zipf", ks="4",
        seeds=2, **TINY,
    )  # fmt: skip
    table = bench(cfg)
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(records) == 6
    for r in records:
        assert 0 < r["mmcs"] <= 1 and 0 <= r["recovered"] <= 1
        assert r["inference"]["batch"]["l0"] == pytest.approx(4, rel=0.1)
    phases = [
        json.loads(line)["phase"]
        for line in (tmp_path / "runs/feature_choice_zipf-k4-s0/metrics.jsonl")
        .read_text()
        .splitlines()
        if line
    ]
    assert phases[0] == "mutual_choice" and phases[-1] == "feature_choice"
    assert table.read_text().count("| 4 | 2 |") == 3
    for name in ("pareto.png", "phase_switch.png", "features_per_token.png"):
        assert (tmp_path / name).stat().st_size > 1000
    before = (tmp_path / "results.jsonl").read_text()
    bench(cfg)  # every run is in results.jsonl: nothing is trained again
    assert (tmp_path / "results.jsonl").read_text() == before


def test_the_dead_latent_controls_run_other_weights_or_another_rule(tmp_path):
    """mutual_choice_fc_inference: Mutual Choice's weights as a density Feature Choice SAE, no
    Feature Choice training; *_unaveraged: schedule-free's base iterate z of the last
    checkpoint, of which the weights the step read were y = (1 − β) z + β x, x the saved
    average (β = 0.9)."""
    methods = "mutual_choice,mutual_choice_fc_inference,mutual_choice_unaveraged"
    cfg = BenchConfig(out=str(tmp_path), methods=methods, ks="4", seeds=1, **TINY)
    configs = {m: run_config(cfg, m, 4, 0, 0.0, 32) for m in cfg.method_list}
    plain = dataclasses.replace(configs["mutual_choice"], out="")
    for m in cfg.method_list:  # each control trains as Mutual Choice, in a folder of its own
        assert dataclasses.replace(configs[m], out="") == plain
    train_cfg = configs["mutual_choice_unaveraged"]
    sae = train(train_cfg, synthetic_data(cfg).train)
    fc = controlled("mutual_choice_fc_inference", sae, train_cfg)
    assert (fc.cfg.sparsifier, fc.cfg.capacities) == ("feature_choice", "density")
    assert torch.equal(fc.W_enc, sae.W_enc) and torch.equal(fc.density, sae.density)
    saved = load_checkpoint(Path(train_cfg.out))
    z, y = base_iterate(saved), saved["sae"]
    unaveraged = controlled("mutual_choice_unaveraged", sae, train_cfg)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(unaveraged, name), z[name])
    for name in ("W_enc", "b_enc"):  # not projected after the step: the interpolation exactly
        torch.testing.assert_close(y[name], 0.1 * z[name] + 0.9 * getattr(sae, name).detach())
    assert not torch.equal(unaveraged.W_enc, sae.W_enc)
    table = bench(cfg).read_text()  # the controls' rows, with dead latents per inference
    assert "| mutual_choice_fc_inference | 4 | 1 |" in table and "dead % θ_i" in table


def test_matryoshka_methods_nest_the_same_sae():
    cfg = BenchConfig(steps=100, ks="8", num_latents=512)
    for base in ("topk", "mutual_choice", "feature_choice"):
        plain, nested = (run_config(cfg, m, 8, 0, 0.0, 128) for m in (base, f"{base}_matryoshka"))
        assert nested.prefixes == [(32, 1.0), (128, 1.0)] and plain.prefixes == []
        assert dataclasses.replace(nested, matryoshka="", out=plain.out) == plain


def test_a_causal_lm_bench_reports_ce_and_kl_on_both_held_out_texts(tmp_path, monkeypatch):
    """The smollm2 bench end to end on a tiny GGUF Llama: every record carries ΔCE, KL and the
    loss recovered on the same-kind held-out rows and on text of another kind, and the table
    shows both."""
    import pydoc_data.topics

    from tiny_models import save_tiny_gguf

    from choicesae.bench import paper

    gguf, _ = save_tiny_gguf(tmp_path / "tiny.gguf")
    monkeypatch.setattr(paper, "MODELS", {"smollm2": (str(gguf), "layers.1")})
    monkeypatch.chdir(tmp_path)  # the bench caches its harvests in data/
    topics = pydoc_data.topics.topics
    (tmp_path / "other.txt").write_text("\n\n".join(topics[k] for k in sorted(topics)[-40:]))
    cfg = BenchConfig(
        "smollm2",
        methods="topk,mutual_choice",
        ks="4",
        seeds=1,
        steps=20,
        batch_size=252,
        num_latents=64,
        train_tokens=2016,
        eval_tokens=504,
        splice_contexts=8,
        other_text=str(tmp_path / "other.txt"),
        out=str(tmp_path / "bench"),
    )
    table = bench(cfg).read_text()
    records = [json.loads(line) for line in (tmp_path / "bench" / "results.jsonl").open()]
    assert [r["method"] for r in records] == ["topk", "mutual_choice"]
    for r in records:
        for part in (r, r["other"]):
            assert part["splice"]["kl"]["sae"] > 0 and part["splice"]["delta_loss"]["sae"] != 0
            assert part["loss_recovered"]["sae"] < 1
    assert "other.txt" in table and table.count("| ΔCE |") == table.count("ΔCE θ_i") == 2
