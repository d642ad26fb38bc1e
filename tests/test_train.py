import dataclasses
import json
import sys

import numpy as np
import pytest
import torch

from choicesae.core.config import SAEConfig, TrainConfig
from choicesae.core.preprocess import normalize
from choicesae.core.sae import SAE
from choicesae.core.schedule import RECIPES
from choicesae.core.sparsifiers import uniform_capacities
from choicesae.errors import ConfigError, DataError
from choicesae.step.objective import Masks, aux_coeffs, objective
from choicesae.training.checkpoint import checkpoint_paths, read_checkpoint
from choicesae.training.loop import make_optimizer, train
from choicesae.training.run import resolve


def config(tmp_path, sparsifier="topk", steps=300, **kw):
    sae_kw = {key: kw.pop(key) for key in ("k", "expansion", "normalize") if key in kw}
    train_kw = {"batch_size": 512, "lr": 3e-3, "log_every": 50, "progress": False, **kw}
    return TrainConfig(
        out=str(tmp_path / "run"),
        sae=SAEConfig(sparsifier=sparsifier, **{"k": 8, "expansion": 8, **sae_kw}),
        steps=steps,
        **train_kw,
    )


def records(tmp_path):
    return [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]


@pytest.mark.parametrize("sparsifier", ["topk", "mutual_choice", "feature_choice", "relu"])
def test_each_sparsifier_learns_the_synthetic_dictionary(tmp_path, synthetic, sparsifier):
    x, _ = synthetic
    sae = train(config(tmp_path, sparsifier), x)
    log = records(tmp_path)
    assert [r["step"] for r in log] == [50, 100, 150, 200, 250, 300]
    assert log[-1]["fvu"] < 0.35 and log[-1]["fvu"] < log[0]["fvu"] / 3
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(256), atol=1e-5)

    x_n, _ = normalize(x[:4096], "token")
    with torch.no_grad():
        codes = sae.encode(x_n[:512], batch=True)  # the training rule
    if sparsifier == "topk":
        assert codes.l0.max() <= 8
    elif sparsifier == "relu":
        assert log[-1]["l0"] < 256 / 4  # the L1 penalty made the code sparse
    else:  # budget k·B per batch: mean L0 at most k
        assert all(r["l0"] <= 8 + 1e-6 for r in log) and codes.l0.float().mean() <= 8
    loaded = SAE.from_pretrained(tmp_path / "run" / "sae")
    assert torch.equal(loaded(x_n), sae(x_n))
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["sae"]["num_latents"] == 256 and saved["sae"]["d_in"] == 32


def test_l1_coefficient_controls_relu_sparsity(tmp_path, synthetic):
    x, _ = synthetic
    l0 = []
    for coeff in (0.03, 0.3):
        train(config(tmp_path, "relu", steps=150, l1_coeff=coeff, overwrite=True), x)
        l0.append(records(tmp_path)[-1]["l0"])
    assert l0[1] < l0[0] / 2


def test_multi_topk_adds_the_4k_term(tmp_path, synthetic):
    x, _ = synthetic
    train(config(tmp_path, "topk", steps=100, multi_topk=True), x)
    last = records(tmp_path)[-1]
    assert last["mse_4k"] > 0
    assert last["loss"] == pytest.approx(last["mse"] + last["mse_4k"] + last["aux_k"], rel=1e-5)


def test_aux_terms_act_only_on_their_latents(synthetic):
    x, _ = synthetic
    cfg = dataclasses.replace(TrainConfig(), sae=SAEConfig(k=4).resolve(32), k_aux=16)
    torch.manual_seed(0)
    sae = SAE(cfg.sae)
    x_n, _ = normalize(x[:256], "token")
    none = torch.zeros(512, dtype=torch.bool)
    terms = objective(sae, x_n, cfg, "mutual_choice", Masks(none, none)).terms
    assert terms["aux_k"] == 0 and terms["aux_zipf"] == 0
    dead = torch.arange(512) % 4 == 0
    dying = torch.arange(512) % 4 == 1
    out = objective(sae, x_n, cfg, "mutual_choice", Masks(dead, dying))
    for name, mask in (("aux_k", dead), ("aux_zipf", dying)):
        assert out.terms[name] > 0
        sae.zero_grad()
        out.terms[name].backward(retain_graph=True)
        assert sae.W_enc.grad[:, mask].any() and not sae.W_enc.grad[:, ~mask].any()
        assert not sae.W_dec.grad[~mask].any()
    # section 4.4: Feature Choice trains without aux losses
    assert set(objective(sae, x_n, cfg, "feature_choice", Masks(dead, dying)).terms) == {"mse"}


def test_topk_trains_with_aux_k_only_unless_aux_zipf_is_asked_for(synthetic):
    """The paper's TopK baseline has aux_k only (Gao et al.); aux_zipf comes with Mutual Choice
    (section 4.2); Feature Choice and relu train with neither (section 4.4)."""
    cfg = dataclasses.replace(TrainConfig(), sae=SAEConfig(k=4).resolve(32), k_aux=16)
    asked = dataclasses.replace(cfg, aux_zipf_coeff=0.1)
    assert aux_coeffs(cfg, "topk") == {"aux_k": 1 / 32}
    assert aux_coeffs(asked, "topk") == {"aux_k": 1 / 32, "aux_zipf": 0.1}
    assert aux_coeffs(cfg, "mutual_choice") == {"aux_k": 1 / 32, "aux_zipf": 1 / 32}
    off = dataclasses.replace(cfg, aux_zipf_coeff=0.0)
    assert aux_coeffs(off, "mutual_choice") == {"aux_k": 1 / 32}
    assert aux_coeffs(asked, "feature_choice") == {} == aux_coeffs(asked, "relu")
    torch.manual_seed(0)
    sae = SAE(cfg.sae)
    x_n, _ = normalize(synthetic[0][:256], "token")
    dead, dying = torch.arange(512) % 4 == 0, torch.arange(512) % 4 == 1
    assert set(objective(sae, x_n, cfg, "topk", Masks(dead, dying)).terms) == {"mse", "aux_k"}
    terms = objective(sae, x_n, asked, "topk", Masks(dead, dying)).terms
    assert terms["aux_zipf"] > 0
    with pytest.raises(ConfigError, match="aux_zipf_coeff must not be negative"):
        TrainConfig(aux_zipf_coeff=-0.5)


def test_feature_choice_trains_after_mutual_choice_by_default(tmp_path, synthetic):
    """--sparsifier feature_choice is phased by default (section 4.4): Mutual Choice for
    --mutual-choice-share of the steps, then Feature Choice at density capacities; share 0 is
    section 4.3's Feature Choice from the first step; a --schedule is read as given."""
    fc = SAEConfig(sparsifier="feature_choice")
    assert fc.capacities == "density"
    assert TrainConfig(sae=fc, steps=1000).phases() == [
        ("mutual_choice", 900),
        ("feature_choice", 100),
    ]
    assert TrainConfig(sae=fc, steps=3, mutual_choice_share=0.1).phases() == [
        ("feature_choice", 3)  # no step left to Mutual Choice
    ]
    assert TrainConfig(sae=fc, steps=10, mutual_choice_share=0).phases() == [("feature_choice", 10)]
    assert TrainConfig(steps=10).phases() == [("topk", 10)]  # other sparsifiers: one phase
    given = TrainConfig(sae=fc, schedule="topk:5,feature_choice:5")
    assert given.phases() == [("topk", 5), ("feature_choice", 5)]
    for bad in (1.0, -0.1):
        with pytest.raises(ConfigError, match="mutual_choice_share must lie in"):
            TrainConfig(mutual_choice_share=bad)
    train(config(tmp_path, "feature_choice", steps=200, log_every=10), synthetic[0])
    phases = [r["phase"] for r in records(tmp_path)]
    assert phases == ["mutual_choice"] * 18 + ["feature_choice"] * 2


def test_dead_latents_are_counted_in_tokens(tmp_path, synthetic):
    x, _ = synthetic
    # 4x more latents than true features, k = 2: many latents never win a slot
    train(config(tmp_path, "topk", steps=100, k=2, expansion=16, dead_tokens=2048), x)
    assert records(tmp_path)[-1]["dead_pct"] > 0
    train(
        config(
            tmp_path,
            "feature_choice",
            steps=100,
            k=2,
            expansion=16,
            overwrite=True,
            dead_tokens=2048,
        ),
        x,
    )
    assert records(tmp_path)[-1]["dead_pct"] == 0  # every feature picks tokens in every batch


@pytest.mark.parametrize(
    "change,data,error,message",
    [
        ({}, lambda x: x[:, 0], DataError, "must be 2-D"),
        ({}, lambda x: x[:, :, None], DataError, "must be 2-D"),
        (
            {},
            lambda x: torch.where(torch.arange(len(x))[:, None] == 77, np.nan, x),
            DataError,
            "NaN or Inf \\(first at row 77\\)",
        ),
        ({}, lambda x: x[:0], DataError, "holds no data"),
        ({"k": 256}, lambda x: x, ConfigError, "k=256 must be smaller than the number of latents"),
        ({"d_in": 16}, lambda x: x, ConfigError, "d_in=16 does not match"),
        (
            {"sparsifier": "feature_choice", "k": 1, "expansion": 32},
            lambda x: x,
            ConfigError,
            "feature_choice needs k \\* batch_size >= num_latents",
        ),
        ({"batch_size": 40_000}, lambda x: x, DataError, "batch_size 40000 exceeds"),
        ({"multi_topk": True, "k": 80}, lambda x: x, ConfigError, "multi_topk needs 4k"),
    ],
)
def test_bad_input_is_refused_before_training(tmp_path, synthetic, change, data, error, message):
    x, _ = synthetic
    sae_keys = {"k", "d_in", "sparsifier", "expansion"}
    cfg = config(tmp_path, **{k: v for k, v in change.items() if k not in sae_keys})
    cfg = dataclasses.replace(
        cfg, sae=dataclasses.replace(cfg.sae, **{k: v for k, v in change.items() if k in sae_keys})
    )
    with pytest.raises(error, match=message):
        train(cfg, data(x))
    assert not (tmp_path / "run").exists()  # nothing was written


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: SAEConfig(sparsifier="batchtopk"), "unknown sparsifier 'batchtopk'"),
        (lambda: SAEConfig(k=0), "k must be at least 1"),
        (lambda: SAEConfig(k=64, num_latents=64), "k=64 must be smaller"),
        (lambda: SAEConfig(normalize="layer"), "normalize must be"),
        (lambda: TrainConfig(batch_size=0), "batch_size must be at least 1"),
        (lambda: TrainConfig(lr=-1.0), "lr must not be negative"),
        (lambda: TrainConfig(decay_fraction=2.0), "decay_fraction"),
        (lambda: TrainConfig(sae=SAEConfig(sparsifier="relu"), multi_topk=True), "multi_topk"),
    ],
)
def test_impossible_settings(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_existing_run_is_not_clobbered(tmp_path, synthetic):
    x, _ = synthetic
    train(config(tmp_path, steps=5), x)
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match="already holds a run"):
        train(config(tmp_path, steps=5), x)
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before
    train(config(tmp_path, steps=5, overwrite=True), x)


def test_unwritable_output_folder(tmp_path, synthetic):
    x, _ = synthetic
    (tmp_path / "file").write_text("")
    cfg = dataclasses.replace(config(tmp_path), out=str(tmp_path / "file" / "run"))
    with pytest.raises(ConfigError, match="cannot write to the output folder"):
        train(cfg, x)


def phased_config(tmp_path, **kw):
    cfg = config(tmp_path, steps=0, k=4, expansion=8, density_tokens=512 * 20, **kw)
    sae = dataclasses.replace(cfg.sae, capacities="zipf")
    return dataclasses.replace(cfg, sae=sae, schedule="mutual_choice:120,feature_choice:80")


def test_phased_training_mutual_then_zipf_feature_choice(tmp_path, synthetic):
    x, _ = synthetic
    sae = train(phased_config(tmp_path), x)
    log = records(tmp_path)
    assert log[-1]["step"] == 200
    assert [r["phase"] for r in log] == ["mutual_choice"] * 2 + ["feature_choice"] * 2
    assert all({"zipf_beta", "zipf_r2", "dying", "aux_zipf_features"} <= set(r) for r in log)
    assert all("aux_zipf" in r for r in log[:3]) and "aux_zipf" not in log[3]  # 101-120: MC
    assert log[-1]["dead"] == 0 and log[-1]["fvu"] < 0.5
    assert sae.cfg.sparsifier == "feature_choice"
    # the Zipf beta was fitted to the Mutual Choice phase's densities (alpha fixed at 1)
    alpha, beta = sae.zipf.tolist()
    assert alpha == 1.0 and beta != 6.8
    # inference uses Zipf capacities by density rank, and each feature respects its own
    x_n, _ = normalize(x[:512], "token")
    m = sae.capacities(512, 4)
    assert m.unique().numel() > 3
    assert m[sae.feature_rank.argmin()] == m.max()
    with torch.no_grad():
        assert ((sae.encode(x_n, batch=True).acts != 0).sum(0) <= m).all()
    loaded = SAE.from_pretrained(tmp_path / "run" / "sae")
    assert torch.equal(loaded.zipf, sae.zipf) and torch.equal(loaded.feature_rank, sae.feature_rank)


def test_density_capacities_follow_the_mutual_choice_phase(tmp_path, synthetic):
    x, _ = synthetic
    cfg = phased_config(tmp_path)
    cfg = dataclasses.replace(cfg, sae=dataclasses.replace(cfg.sae, capacities="density"))
    sae = train(cfg, x)
    assert records(tmp_path)[-1]["dead"] == 0
    m = sae.capacities(512, 4)  # from the last window's densities, in proportion
    expected = (sae.density / sae.density.sum() * 4 * 512).floor().clamp(min=1)
    assert torch.equal(m, expected.long()) and m.unique().numel() > 3
    fresh = SAE(sae.cfg)  # before any window has closed: uniform
    uniform = uniform_capacities(4, 512, sae.cfg.num_latents)
    assert torch.equal(fresh.capacities(512, 4), uniform)


@pytest.mark.parametrize("stop_at", [50, 130])  # before and after the phase switch at 120
def test_resume_is_bit_exact_across_the_phase_switch(tmp_path, synthetic, monkeypatch, stop_at):
    x, _ = synthetic
    straight = train(phased_config(tmp_path / "a", checkpoint_every=20), x)

    from choicesae.training import loop as train_module

    real_advance = train_module.advance

    def crash_at(state, *args):
        if state.step == stop_at:
            raise KeyboardInterrupt  # killed between checkpoints
        return real_advance(state, *args)

    monkeypatch.setattr(train_module, "advance", crash_at)
    with pytest.raises(KeyboardInterrupt):
        train(phased_config(tmp_path / "b", checkpoint_every=20), x)
    monkeypatch.setattr(train_module, "advance", real_advance)
    resumed = train(phased_config(tmp_path / "b", checkpoint_every=20, resume=True), x)
    for name, tensor in straight.state_dict().items():
        torch.testing.assert_close(
            resumed.state_dict()[name], tensor, rtol=0, atol=0, equal_nan=True
        )
    steps = [r["step"] for r in records(tmp_path / "b")]
    assert steps == sorted(set(steps)) and steps[-1] == 200


def test_resume_refuses_other_settings_or_no_checkpoint(tmp_path, synthetic):
    x, _ = synthetic
    with pytest.raises(DataError, match="cannot resume"):
        train(config(tmp_path, steps=5, resume=True), x)
    train(config(tmp_path, steps=5), x)
    with pytest.raises(ConfigError, match=r"settings differ.*'lr'"):
        train(config(tmp_path, steps=5, resume=True, lr=1e-3), x)
    with pytest.raises(ConfigError, match=r"change the 5 steps already trained \(topk:5\)"):
        train(config(tmp_path, "mutual_choice", steps=5, resume=True), x)


def test_bad_schedule_is_refused():
    with pytest.raises(ConfigError, match="SPARSIFIER:STEPS"):
        TrainConfig(schedule="mutual_choice:100,batchtopk:5")
    with pytest.raises(ConfigError, match="SPARSIFIER:STEPS"):
        TrainConfig(schedule="mutual_choice")
    assert TrainConfig(schedule="topk:3, feature_choice:4").total_steps == 7


def test_phased_run_on_minilm_ends_with_zero_dead_features(tmp_path):
    """Section 4.4 on the embedded default's activations (MiniLM layer 3 over the default
    offline corpus): Mutual Choice with aux_k and aux_zipf, then Zipf Feature Choice."""
    from choicesae.data.harvest import HarvestConfig, harvest

    store = tmp_path / "store"
    harvest(HarvestConfig(tokens=16_384, out=str(store), progress=False))
    cfg = TrainConfig(
        store=str(store),
        out=str(tmp_path / "run"),
        batch_size=512,
        lr=1e-3,
        log_every=10,
        sae=SAEConfig(k=8, expansion=2, capacities="zipf"),
        progress=False,
        schedule="mutual_choice:100,feature_choice:40",
        dead_tokens=5120,
        density_tokens=5120,
    )
    train(cfg)
    log = records(tmp_path)
    mc = [r for r in log if r["phase"] == "mutual_choice"]
    assert any(r["dying"] > 0 for r in mc)  # Definition 3.1 found dying features ...
    assert any(r["aux_zipf_features"] > 0 and r["aux_zipf"] > 0 for r in mc)  # ... and acted
    assert log[-1]["phase"] == "feature_choice" and log[-1]["dead"] == 0
    assert log[-1]["fvu"] < mc[0]["fvu"]


def test_recipes_fill_what_is_left_to_them():
    fast = resolve(TrainConfig(sae=SAEConfig(num_latents=4096)), 64)
    assert (fast.optimizer, fast.warmup_steps, fast.decay_fraction) == ("schedule_free", 50, 0.0)
    assert fast.lr == pytest.approx(RECIPES["fast"].lr_2_14 * 2)  # sqrt(2^14 / 4096) = 2
    paper = resolve(TrainConfig(recipe="paper", sae=SAEConfig(num_latents=4096)), 64)
    assert (paper.optimizer, paper.warmup_steps, paper.decay_fraction) == ("adamw", 100, 0.2)
    assert paper.lr == pytest.approx(4e-4)
    mine = TrainConfig(recipe="paper", optimizer="schedule_free", lr=1e-3, warmup_steps=0)
    mine = resolve(dataclasses.replace(mine, decay_fraction=0.5), 64)
    assert (mine.optimizer, mine.lr, mine.warmup_steps, mine.decay_fraction) == (
        "schedule_free",
        1e-3,
        0,
        0.5,
    )
    with pytest.raises(ConfigError, match="recipe must be one of fast, paper"):
        TrainConfig(recipe="slow")


def test_schedule_free_saves_the_averaged_weights_with_unit_decoder_rows(tmp_path, synthetic):
    """The SAE written at the end is the schedule-free average x (eval mode), not the point y
    where gradients were taken, and its decoder rows have unit norm."""
    x, _ = synthetic
    sae = train(config(tmp_path, steps=30), x)
    saved = read_checkpoint(checkpoint_paths(tmp_path / "run")[-1])
    y = saved["sae"]["W_enc"]  # the checkpoint holds the training point, to resume from
    assert not torch.equal(sae.W_enc, y)
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(sae.cfg.num_latents))


def test_schedule_free_without_its_package_names_the_way_out(monkeypatch):
    """schedulefree is imported only to build its optimizer (the rest runs without it, as on
    the GPU machine of benchmarks/gpu.sh); missing, it is named with the setting that avoids it."""
    monkeypatch.setitem(sys.modules, "schedulefree", None)  # `import schedulefree` fails
    cfg = resolve(TrainConfig(sae=SAEConfig(k=4, num_latents=64)), 16)
    assert cfg.optimizer == "schedule_free"
    with pytest.raises(ConfigError, match="needs the schedulefree package.*--optimizer adamw"):
        make_optimizer(SAE(cfg.sae), cfg)
    adamw = make_optimizer(SAE(cfg.sae), dataclasses.replace(cfg, optimizer="adamw"))
    assert isinstance(adamw, torch.optim.AdamW)


def test_algorithm_1_unchanged_takes_the_papers_32x_setting_at_batch_1536():
    """d 768, F = 32·d, k 32, B 1536 (the paper's GPT-2 run): with m_min = 0 Algorithm 1's
    capacities (18,531 of them zero) fit the budget; raising them to 1 would not, and is refused
    in one line naming the budget."""
    sae = SAEConfig(sparsifier="feature_choice", k=32, expansion=32, capacities="zipf", m_min=0)
    cfg = TrainConfig(sae=sae, batch_size=1536, schedule="mutual_choice:8,feature_choice:2")
    assert resolve(cfg, 768).sae.num_latents == 32 * 768
    raised = dataclasses.replace(cfg, sae=dataclasses.replace(sae, m_min=1))
    with pytest.raises(ConfigError, match="past the budget k\\*batch_size = 49152"):
        resolve(raised, 768)
