"""The Python API a researcher scripts with (`import choicesae as cs`): codes from raw
activations, evaluation, thresholds and export from arrays, no global side effects, refusals."""

import copy
import dataclasses
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import choicesae as cs
from choicesae.cli.main import main
from choicesae.core.allocation import feature_capacities
from choicesae.core.preprocess import normalize
from choicesae.data.store import StoreWriter

D = 32  # the synthetic fixture's width


def run_config(tmp_path, sparsifier="mutual_choice", steps=20, **kw) -> cs.TrainConfig:
    sae = cs.SAEConfig(sparsifier, k=4, expansion=4, **kw.pop("sae", {}))
    defaults = {"batch_size": 256, "progress": False, "log_every": 10, "overwrite": True}
    return cs.TrainConfig(out=str(tmp_path / "run"), sae=sae, steps=steps, **defaults | kw)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synthetic):
    """A Mutual Choice SAE trained from Python on an array, and its run folder."""
    cfg = run_config(tmp_path_factory.mktemp("api"))
    return cs.train(cfg, synthetic[0][:8192]), cfg


def test_version_is_the_package_metadata():
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert cs.__version__ == re.search(r'^version = "(.+)"', pyproject, re.M)[1]
    assert "__version__" in cs.__all__


@pytest.mark.parametrize("threshold", [None, "feature", "global"])
def test_codes_of_raw_activations_are_the_internal_path(trained, synthetic, threshold):
    sae, cfg = trained
    cs.calibrate_thresholds_(sae, synthetic[0][:4096], cfg.batch_size)
    x = 3 * synthetic[0][-256:] + 1  # raw: an offset and a scale the normalisation removes
    with torch.no_grad():
        dense = sae.codes(x, threshold=threshold)
        internal = sae.encode(normalize(x, sae.cfg.normalize, sae.scale)[0], threshold=threshold)
        indices, values = sae.codes(x, threshold=threshold, dense=False)
    assert torch.equal(dense, internal.acts) and dense.count_nonzero() > 0
    assert indices.shape == values.shape == (len(x), int(internal.l0.max()))
    assert torch.equal(torch.zeros_like(dense).scatter(1, indices, values), dense)
    assert (values.diff(dim=-1) <= 0).all()  # largest first, value-0 padding last
    assert torch.equal((values > 0).sum(-1), internal.l0)


def test_codes_of_a_topk_sae_have_k_entries_per_token(synthetic):
    torch.manual_seed(0)
    sae = cs.SAE(cs.SAEConfig("topk", k=4, expansion=4).resolve(D))
    with torch.no_grad():
        indices, values = sae.codes(synthetic[0][:64], dense=False)
    assert indices.shape == (64, 4)


def write_store(path: Path, x: torch.Tensor, shards: int = 3) -> cs.Store:
    meta = {"model": "m", "hookpoint": "h", "d_model": x.shape[1], "dtype": "float32"}
    writer = StoreWriter(path, meta | {"context": 8})
    for part in x.chunk(shards):
        writer.write_shard(part, np.zeros(len(part), dtype=np.int32))
    writer.finish()
    return cs.Store(path)


PROVENANCE = ("run", "store", "model", "hookpoint")  # where the rows came from


def test_evaluation_of_arrays_equals_the_store_path(trained, synthetic, tmp_path):
    sae, cfg = trained
    x_cal, x_test = synthetic[0][8192:12288], synthetic[0][12288:14336]
    cal, test = write_store(tmp_path / "cal", x_cal), write_store(tmp_path / "test", x_test)
    settings = {"calibration_tokens": 2048, "splice_contexts": 0, "report": False}
    by_store = cs.evaluate(
        cs.EvalConfig(run=cfg.out, store=str(test.path), calibrate=str(cal.path), **settings)
    )
    from_run = cs.evaluate(
        cs.EvalConfig(run=cfg.out, out=str(tmp_path / "eval"), **settings),
        x_test,
        calibrate=x_cal.numpy(),  # any array: a tensor, a numpy array or a Store
    )
    measured = {k: v for k, v in by_store.items() if k not in PROVENANCE}
    assert {k: from_run[k] for k in measured} == measured and by_store["model"] == "m"
    assert from_run.keys() == by_store.keys() and from_run["training"] == by_store["training"]
    assert (tmp_path / "eval" / "metrics.json").is_file()
    settings["batch_size"] = cfg.batch_size  # an SAE without its run
    in_memory = cs.evaluate(cs.EvalConfig(**settings), x_test, calibrate=x_cal, sae=sae)
    del measured["training"]  # an SAE without its run has no training log
    assert {k: in_memory[k] for k in measured} == measured and in_memory["run"] == ""
    assert torch.equal(cs.SAE.from_pretrained(Path(cfg.out) / "sae").threshold, sae.threshold)


def test_evaluation_of_arrays_names_what_is_missing(trained, synthetic):
    sae, cfg = trained
    x = synthetic[0][:1024]
    with pytest.raises(cs.ConfigError, match="batch_size"):
        cs.evaluate(cs.EvalConfig(report=False), x, calibrate=x, sae=sae)
    with pytest.raises(cs.ConfigError, match="not both"):
        cs.evaluate(cs.EvalConfig(run=cfg.out), x, calibrate=x, sae=sae)
    settings = {"splice_contexts": 0, "report": False}
    assert cs.evaluate(cs.EvalConfig(run=cfg.out, **settings), x)["l0"] > 0  # saved thresholds
    unfitted = copy.deepcopy(sae)  # as saved before training estimated them
    unfitted.threshold.fill_(float("nan"))
    with pytest.raises(cs.DataError, match=r"calibrate=rows"):
        cs.evaluate(cs.EvalConfig(batch_size=cfg.batch_size, **settings), x, sae=unfitted)
    with pytest.raises(cs.DataError, match=r"reads \[tokens, 32\]"):
        cs.calibrate_thresholds_(sae, x[:, :16], 256)
    with pytest.raises(cs.DataError, match="NaN"):
        cs.calibrate_thresholds_(sae, torch.full_like(x, float("nan")), 256)


@pytest.fixture(scope="module", params=["mutual_choice", "feature_choice"])
def batch_rule(request, tmp_path_factory, synthetic):
    """A Mutual or a Feature Choice SAE just as cs.train returns it, and its run config."""
    cfg = run_config(tmp_path_factory.mktemp(request.param), request.param, steps=40)
    return cs.train(cfg, synthetic[0][:8192]), cfg


def plain_codes(sae: cs.SAE, x: torch.Tensor) -> torch.Tensor:
    """Each token of raw x [B, d] encoded alone, written out in float64: centred and scaled
    to unit norm, z' = (x_n − b_dec) W_enc + b_enc, kept where z' > max(θ_i, 0)."""
    W_enc, b_enc, b_dec, theta = (
        t.detach().double() for t in (sae.W_enc, sae.b_enc, sae.b_dec, sae.threshold)
    )
    rows = []
    for token in x.double():
        x_n = (token - token.mean()) / (token - token.mean()).norm()
        z = (x_n - b_dec) @ W_enc + b_enc
        rows.append(torch.where(z > theta.clamp(min=0), z, torch.zeros_like(z)))
    return torch.stack(rows)


def test_a_tokens_default_code_is_the_same_alone_and_in_any_batch(batch_rule, synthetic):
    sae, cfg = batch_rule
    x = 3 * synthetic[0][-256:] + 1  # held out, raw
    reference = plain_codes(sae, x)
    alone = torch.cat([sae.codes(token[None]) for token in x])
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    shuffled = torch.empty_like(alone)
    shuffled[order] = sae.codes(x[order])
    for codes in (
        alone,
        sae.codes(x),
        shuffled,
        *[torch.cat(list(map(sae.codes, x.split(n)))) for n in (7, 64)],
    ):
        assert torch.equal(codes != 0, reference != 0)
        torch.testing.assert_close(codes, reference.float(), rtol=1e-5, atol=1e-6)
    assert 0.5 * cfg.sae.k < float((alone != 0).sum(-1).float().mean()) < 2 * cfg.sae.k
    # batch inference, asked for, is the training rule: a token's code then depends on its batch
    in_batch = sae.codes(x, batch=True)
    assert not torch.equal(torch.cat([sae.codes(t[None], batch=True) for t in x[:8]]), in_batch[:8])


def test_an_sae_exported_right_after_train_loads_in_saelens_and_agrees(
    batch_rule, tmp_path, synthetic
):
    sae, cfg = batch_rule
    path = cs.to_saelens(sae, tmp_path / "lens")  # no eval, no calibration: training's thresholds
    sae_lens = pytest.importorskip("sae_lens", reason="the interop extra installs sae-lens")
    x = 100 * synthetic[0][-128:] + 1  # a model's scale: SAELens's layer norm adds eps 1e-5
    with torch.no_grad():
        ours, theirs = sae.codes(x), sae_lens.SAE.load_from_disk(path).encode(x)
    assert ours.count_nonzero() > 0 and torch.equal(ours != 0, theirs != 0)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    assert torch.equal(cs.from_saelens(path).threshold, sae.threshold)


def test_training_ends_with_thresholds_estimated_on_the_batches_after_its_last(synthetic, tmp_path):
    """Every run but relu's saves both thresholds, fitted (core/thresholds.py) to the
    stream's next batches with the saved weights: max(1, min(32768 / B, steps / 100)) of them,
    selected as the sparse step selects (the reference rule here)."""
    from choicesae.core.thresholds import estimate_thresholds_
    from choicesae.data.activations import batches

    x = synthetic[0][:8192]
    for sparsifier in ("mutual_choice", "feature_choice", "topk", "relu"):
        cfg = run_config(tmp_path / sparsifier, sparsifier, steps=64)
        sae = cs.train(cfg, x)
        record = json.loads((tmp_path / sparsifier / "run" / "sae" / "training.json").read_text())
        saved = cs.SAE.from_pretrained(tmp_path / sparsifier / "run" / "sae")
        if sparsifier == "relu":
            assert record["thresholds"] == {} and not saved.has_thresholds("feature")
            continue
        assert saved.has_thresholds("feature") and saved.has_thresholds("global")
        after = batches(x, cfg.batch_size, cfg.seed, start=64)
        plain = copy.deepcopy(sae)
        fitted = estimate_thresholds_(plain, [sae.prepare(next(after))[0]])  # the reference
        assert record["thresholds"]["calibration_tokens"] == cfg.batch_size
        assert torch.equal(plain.threshold, saved.threshold)
        assert float(plain.threshold_global) == float(saved.threshold_global)
        assert fitted["calibration_l0"] == record["thresholds"]["calibration_l0"]


def test_numpy_and_float64_inputs_work_and_carry_no_history(trained, synthetic):
    sae, _ = trained
    x = 3 * synthetic[0][-64:] + 1
    x64 = x.double().numpy()
    for given in (x64, x.double(), x.numpy(), x.half()):
        codes = sae.codes(given)
        assert codes.dtype == torch.float32 and not codes.requires_grad
        if given.dtype != torch.float16:  # half: rounded inputs, some other codes
            torch.testing.assert_close(codes, sae.codes(x), rtol=1e-5, atol=1e-6)
        assert not sae.reconstruct(given).requires_grad
        indices, values = sae.codes(given, dense=False)
        assert not values.requires_grad
    torch.testing.assert_close(sae.reconstruct(x64), sae.reconstruct(x))
    x_n = normalize(x, sae.cfg.normalize, sae.scale)[0]
    assert torch.equal(sae.encode(x_n.double().numpy()).acts, sae.encode(x_n).acts)
    torch.testing.assert_close(sae(x_n.double()), sae(x_n))
    z = np.random.default_rng(0).normal(size=(16, 8))  # float64
    m = np.full(8, 2)
    for codes in (
        cs.topk(z, 2),
        cs.mutual_choice(z, 2),
        cs.feature_choice(z, m),
        cs.relu(z),
        cs.jumprelu(z, 0.5),
        cs.sparsify("mutual_choice", z, k=2),
    ):
        assert codes.acts.dtype == torch.float64 and codes.acts.shape == (16, 8)
    with pytest.raises(cs.DataError, match="floats, got torch.int64"):
        sae.codes(np.ones((2, D), dtype=np.int64))
    with pytest.raises(cs.DataError, match=r"reads \[tokens, 32\]"):
        sae.codes(x[:, :16])


def test_batch_inference_is_asked_for_and_warned_about_when_degenerate(batch_rule, synthetic):
    sae, cfg = batch_rule
    x = synthetic[0][-512:]
    with pytest.raises(cs.ConfigError, match="ask for one of them"):
        sae.codes(x, threshold="global", batch=True)
    with pytest.raises(cs.ConfigError, match="pass batch=True"):
        sae.encode(normalize(x, sae.cfg.normalize, sae.scale)[0], k=8)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        sae.codes(x[: cfg.batch_size], batch=True)  # the training batch size: as trained
        assert not record
        if sae.cfg.sparsifier == "feature_choice":  # k·B = 16 < F = 128: capacities of 1
            sae.codes(x[:4], batch=True)
            [warning] = [str(w.message) for w in record]
            assert (
                "a batch of 4 tokens: k*B = 16 for 128 features, capacities summing to" in warning
            )


def test_train_leaves_the_global_rng_alone(synthetic, tmp_path):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    sae = cs.train(run_config(tmp_path, steps=3, seed=7), synthetic[0][:2048])
    assert torch.equal(torch.get_rng_state(), before)
    cs.SAE.from_pretrained(tmp_path / "run" / "sae")
    assert torch.equal(torch.get_rng_state(), before)
    # its own generator draws what torch.manual_seed(seed) used to: the same initial weights
    torch.manual_seed(7)
    assert torch.equal(cs.SAE(sae.cfg).W_dec, cs.SAE(sae.cfg, generator=seeded(7)).W_dec)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_steps_that_disagree_with_the_schedule_are_refused(capsys):
    schedule = "mutual_choice:80,feature_choice:20"
    with pytest.raises(cs.ConfigError, match=r"steps=500 disagrees .* runs 100 steps"):
        cs.TrainConfig(steps=500, schedule=schedule)
    assert cs.TrainConfig(steps=100, schedule=schedule).total_steps == 100
    assert cs.TrainConfig(schedule=schedule).total_steps == 100
    assert cs.TrainConfig().total_steps == 10_000 and cs.TrainConfig(steps=7).total_steps == 7
    assert main(["train", "--steps", "500", "--schedule", schedule]) == 2
    assert "disagrees" in capsys.readouterr().err
    with pytest.raises(cs.ConfigError, match="steps must not be negative"):
        cs.TrainConfig(steps=-1)


def test_the_run_config_records_the_schedules_steps(synthetic, tmp_path):
    cfg = run_config(tmp_path, steps=0, schedule="mutual_choice:3,topk:2")
    assert cs.train(cfg, synthetic[0][:2048]).cfg.sparsifier == "topk"
    saved = (tmp_path / "run" / "config.json").read_text()
    assert '"steps": 5' in saved


def short_capacity_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "capacities sum to" in str(w.message)]


def test_capacities_short_of_the_budget_are_stated(synthetic, tmp_path):
    """Zipf capacities floor Algorithm 1's shares: they sum to less than k·B, so the mean L0
    falls below k; the run says so once, when Feature Choice starts (here at step 0, at the
    ranks of feature index and the default beta)."""
    sae = {"capacities": "zipf"}
    cfg = run_config(tmp_path, "feature_choice", steps=4, sae=sae, mutual_choice_share=0)
    F, k, B = 4 * D, 4, cfg.batch_size
    m = feature_capacities(torch.arange(1, F + 1), k, B, 1.0, 6.8, 1, 0)
    assert int(m.sum()) < k * B
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        cs.train(cfg, synthetic[0][:4096])
    assert short_capacity_warnings(record) == [
        f"zipf Feature Choice capacities sum to {int(m.sum())} < k*batch_size = {k * B}: the "
        f"mean L0 will be at most {int(m.sum()) / B:.3g}, not k = {k}"
    ]
    full = dataclasses.replace(cfg, sae=dataclasses.replace(cfg.sae, capacities="uniform"))
    with warnings.catch_warnings(record=True) as record:  # 4 * 256 / 128 = 8 each: all of k·B
        warnings.simplefilter("always")
        cs.train(full, synthetic[0][:4096])
    assert short_capacity_warnings(record) == []
