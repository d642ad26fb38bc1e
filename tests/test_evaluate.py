import json
import pydoc_data.topics
import shutil

import numpy as np
import pytest
import torch
from tiny_models import save_tiny_model
from transformers import AutoModelForCausalLM

from choicesae.core.config import SAEConfig, TrainConfig
from choicesae.core.sae import SAE
from choicesae.core.sparsifiers import topk
from choicesae.core.thresholds import estimate_thresholds_, feature_thresholds
from choicesae.data.harvest import HarvestConfig, harvest
from choicesae.data.hooks import find_module
from choicesae.data.store import Store
from choicesae.errors import ConfigError, DataError
from choicesae.evaluation import metrics, splice
from choicesae.evaluation.evaluate import EvalConfig, evaluate, first_tokens, summary_line
from choicesae.evaluation.report import CompareConfig, compare
from choicesae.training.loop import train

TOPICS = pydoc_data.topics.topics


def small_sae(normalize="none", sparsifier="topk", seed=0) -> SAE:
    torch.manual_seed(seed)
    cfg = SAEConfig(d_in=8, num_latents=16, k=2, sparsifier=sparsifier, normalize=normalize)
    sae = SAE(cfg)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    return sae


def test_sae_pass_matches_a_plain_loop():
    sae, x = small_sae(), torch.randn(40, 8)
    got = metrics.sae_pass(sae, x, 10, lambda z: topk(z, 2).acts)
    W_enc, b_enc, W_dec, b_dec = (
        t.detach().double() for t in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)
    )
    mean = [sum(float(x[i, j]) for i in range(40)) / 40 for j in range(8)]
    sse = var = 0.0
    counts, l0 = [0] * 16, []
    for i in range(40):
        z = [float((x[i].double() - b_dec) @ W_enc[:, f] + b_enc[f]) for f in range(16)]
        chosen = sorted(range(16), key=lambda f: -z[f])[:2]
        chosen = [f for f in chosen if z[f] > 0]
        l0.append(len(chosen))
        for f in chosen:
            counts[f] += 1
        x_hat = b_dec + sum((z[f] * W_dec[f] for f in chosen), torch.zeros(8, dtype=torch.float64))
        sse += sum((float(x_hat[j]) - float(x[i, j])) ** 2 for j in range(8))
        var += sum((float(x[i, j]) - mean[j]) ** 2 for j in range(8))
    assert got.l0.tolist() == l0 and got.counts.tolist() == counts
    assert got.mse == pytest.approx(sse / 40, rel=1e-5)
    assert got.fvu == pytest.approx(sse / var, rel=1e-5) and got.fvu_raw == pytest.approx(got.fvu)


def test_fvu_is_measured_in_both_spaces_with_token_normalisation():
    sae, x = small_sae("token"), 3 * torch.randn(30, 8) + 1
    got = metrics.sae_pass(sae, x, 30, lambda z: topk(z, 2).acts)
    x_n = (x - x.mean(-1, keepdim=True)) / (x - x.mean(-1, keepdim=True)).norm(dim=-1, keepdim=True)
    with torch.no_grad():
        sse = float(((sae(x_n) - x_n) ** 2).sum())
        raw = float(((sae.reconstruct(x) - x) ** 2).sum()) / metrics.variance(x)
    assert got.fvu == pytest.approx(sse / metrics.variance(x_n))
    assert got.fvu_raw == pytest.approx(raw, rel=1e-4)


def test_per_feature_thresholds_reproduce_batch_densities_exactly():
    sae = small_sae("none", "mutual_choice")
    batches = list(torch.randn(96, 8).split(32))
    fitted = estimate_thresholds_(sae, batches)
    x = torch.cat(batches)
    batch_counts = sum((sae.encode(b, batch=True).acts > 0).sum(0) for b in batches)
    single = sae.encode(x, threshold="feature").acts > 0
    assert single.sum(0).tolist() == batch_counts.tolist()  # every density, hence the L0
    assert fitted["calibration_l0"] == pytest.approx(float(single.sum(-1).float().mean()))
    smallest = [
        min(float(v) for v in sae.encode(b, batch=True).acts.detach().flatten() if v > 0)
        for b in batches
    ]
    assert float(sae.threshold_global) == pytest.approx(sum(smallest) / 3)
    z = sae.pre_acts(x)
    assert torch.equal(sae.encode(x, threshold="global").acts, z * (z > sae.threshold_global))


def test_a_feature_never_selected_never_fires_and_one_always_selected_always_does():
    sae, x = small_sae(), torch.randn(20, 8)
    counts = torch.zeros(16, dtype=torch.long)
    counts[3], counts[5] = 20, 7
    theta = feature_thresholds(sae, x, counts)
    fires = (sae.pre_acts(x) > theta).sum(0)
    assert fires[0] == 0 and fires[5] == 7 and theta[3] == 0


def test_feature_thresholds_are_each_columns_quantile_in_any_chunking():
    """θ_i, found by one top-k per chunk of features taken in order of their counts, is each
    column's (counts_i + 1)-th largest z' sorted on its own (a plain loop), floored at 0."""
    sae, x = small_sae(), torch.randn(50, 8)
    counts = torch.tensor([0, 1, 2, 3, 5, 8, 13, 21, 34, 49, 50, 50, 4, 0, 7, 11])
    z = sae.pre_acts(x).detach()
    plain = torch.tensor(
        [
            0.0 if n >= 50 else max(float(z[:, i].sort(descending=True).values[n]), 0.0)
            for i, n in enumerate(counts.tolist())
        ]
    )
    for chunk in (1, 3, 512):  # z' of a chunk's columns: equal to float rounding
        torch.testing.assert_close(feature_thresholds(sae, x, counts, chunk), plain)


def test_a_jumprelu_sae_runs_its_own_thresholds_and_is_never_trained():
    sae = SAE(SAEConfig(d_in=8, num_latents=16, sparsifier="jumprelu", normalize="none"))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.threshold.copy_(torch.rand(16) * 0.3)  # no global one, as in most SAELens files
    x = torch.randn(64, 8)
    z = sae.pre_acts(x)
    expected = z * (z > sae.threshold)
    assert torch.equal(sae.encode(x).acts, expected)  # the default, and the batch "rule"
    assert torch.equal(sae.encode(x, batch=True).acts, expected)
    cfg = EvalConfig(batch_size=16, splice_contexts=0, report=False)
    result = evaluate(cfg, x, sae=sae)  # nothing to estimate: its thresholds are the model
    assert result["inference_mode"] == "feature_threshold"
    assert sorted(result["inference"]) == ["batch", "feature_threshold"]
    assert result["l0"] == pytest.approx(float((expected != 0).sum(-1).float().mean()))
    assert result["thresholds"]["estimated_by"] == "saved"
    with pytest.raises(ConfigError, match="not trainable"):
        TrainConfig(sae=SAEConfig(sparsifier="jumprelu"))
    with pytest.raises(ConfigError, match="its own"):
        estimate_thresholds_(sae, [x])


def test_thresholds_are_saved_and_required(tmp_path):
    sae = small_sae()
    with pytest.raises(ConfigError, match="no feature thresholds"):
        sae.encode(torch.randn(2, 8), threshold="feature")
    with pytest.raises(ConfigError, match="'feature' or 'global'"):
        sae.encode(torch.randn(2, 8), threshold="both")
    estimate_thresholds_(sae, [torch.randn(16, 8)])
    sae.save_pretrained(tmp_path / "sae")
    loaded = SAE.from_pretrained(tmp_path / "sae")
    assert torch.equal(loaded.threshold, sae.threshold)
    assert torch.equal(loaded.threshold_global, sae.threshold_global)
    from safetensors.torch import load_file, save_file  # an SAE saved before threshold_global

    state = load_file(tmp_path / "sae" / "model.safetensors")
    del state["threshold_global"]
    save_file(state, tmp_path / "sae" / "model.safetensors")
    assert SAE.from_pretrained(tmp_path / "sae").threshold_global.isnan()


def test_allocation_and_features_per_token_against_plain_counts():
    counts = torch.tensor([50, 0, 20, 10, 5, 3, 0, 1] * 4)
    got = metrics.allocation_metrics(counts, 100)
    assert got["dead"] == 8 and got["dead_pct"] == 25.0
    assert got["density_sorted"] == sorted((counts.double() / 100).tolist(), reverse=True)
    l0 = torch.tensor([3, 1, 4, 1, 5, 0])
    first = torch.tensor([True, False, False, True, False, False])
    fpt = metrics.features_per_token(l0, first)
    assert fpt["histogram"] == [1, 1, 0, 0, 1, 1] and fpt["histogram_first"] == [0, 1, 0, 1, 0, 0]
    assert fpt["first_token_l0"] == 2.0 and fpt["other_l0"] == 2.5
    assert first_tokens({"context": 3, "drop_first": False}, 7).tolist() == [
        True,
        False,
        False,
        True,
        False,
        False,
        True,
    ]
    assert not first_tokens({"context": 3, "drop_first": True}, 7).any()


# ---- splice: tiny models and MiniLM, stores harvested as in test_harvest -------------------


def harvest_pair(model, hookpoint, root, tokens=(4800, 1600), **kw):
    root.mkdir(parents=True, exist_ok=True)
    (root / "train.txt").write_text("\n\n".join(TOPICS[k] for k in sorted(TOPICS)[:30]))
    (root / "test.txt").write_text("\n\n".join(TOPICS[k] for k in sorted(TOPICS)[30:40]))
    common = (
        dict(
            model=str(model),
            hookpoint=hookpoint,
            context=16,
            batch_size=8,
            progress=False,
            dtype="float32",
        )
        | kw
    )
    for name, n in zip(("train", "test"), tokens, strict=True):
        harvest(
            HarvestConfig(text=str(root / f"{name}.txt"), tokens=n, out=str(root / name), **common)
        )
    return root / "train", root / "test"


def train_run(store, out, batch_size=240, sparsifier="mutual_choice", **kw):
    cfg = TrainConfig(
        store=str(store),
        out=str(out),
        batch_size=batch_size,
        steps=40,
        progress=False,
        log_every=10,
        density_tokens=2400,
        overwrite=True,
        sae=SAEConfig(sparsifier=sparsifier, k=4, expansion=4),
        **kw,
    )
    train(cfg)
    return out


@pytest.fixture(scope="module", params=["gpt2", "bert"])
def tiny_run(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    folder, hookpoint = save_tiny_model(request.param, root / "model")
    train_store, test_store = harvest_pair(folder, hookpoint, root)
    return request.param, train_run(train_store, root / "run"), test_store


def setup_splice(test_store, contexts=12):
    store = Store(test_store)
    model, base, tokenizer, kind = splice.load_spliceable(store.manifest["model"])
    module = find_module(base, store.manifest["hookpoint"])
    ids, where = splice.store_contexts(store, tokenizer, contexts)
    return store, model, module, kind, ids, where


def test_identity_recovers_all_and_zero_none(tiny_run):
    arch, _, test_store = tiny_run
    _, model, module, kind, ids, where = setup_splice(test_store)
    assert kind == ("encoder" if arch == "bert" else "causal")
    replace = {"identity": lambda h: h, "zero": torch.zeros_like, "half": lambda h: h / 2}
    measured = splice.downstream_losses(
        model, kind, ids, where, splice.at(module, None, replace), 5
    )
    losses = measured["loss"]
    assert splice.loss_recovered(losses["identity"], losses["clean"], losses["zero"]) == 1.0
    assert splice.loss_recovered(losses["zero"], losses["clean"], losses["zero"]) == 0.0
    assert losses["half"] != losses["clean"]
    if kind == "causal":
        kl = measured["kl"]
        assert kl["clean"] == 0.0 and kl["identity"] == 0.0 and kl["zero"] > kl["half"] > 0
        assert splice.loss_recovered(kl["identity"], 0.0, kl["zero"]) == 1.0
        for name in ("clean", "half", "zero"):  # against HF's own loss and a plain KL
            ce, divergence = hand_ce_and_kl(test_store, ids, where, replace.get(name))
            assert losses[name] == pytest.approx(ce, rel=1e-5)
            assert kl[name] == pytest.approx(divergence, rel=1e-4, abs=1e-9)
    else:
        assert losses["clean"] == 0.0 and losses["zero"] > 0 and "kl" not in measured


def hand_ce_and_kl(test_store, ids, where, replace):
    """Mean over contexts of the HF causal LM's own next-token loss (labels=ids) and of the
    mean per-token KL(P_clean || P) with the hookpoint's output at `where` replaced by
    `replace` in a hook written out here (None: untouched), each context run alone."""
    store = Store(test_store)
    lm = AutoModelForCausalLM.from_pretrained(store.manifest["model"]).eval()
    block = find_module(lm.base_model, store.manifest["hookpoint"])
    ces, kls = [], []
    with torch.no_grad():
        for c in range(len(ids)):
            x = ids[c : c + 1]
            clean = torch.log_softmax(lm(input_ids=x).logits[0, :-1].double(), -1)

            def hook(_module, _inputs, output, c=c):
                h = output[0] if isinstance(output, tuple) else output
                h = h.clone()
                h[0, where[c]] = replace(h[0, where[c]])
                return (h, *output[1:]) if isinstance(output, tuple) else h

            handle = block.register_forward_hook(hook) if replace else None
            out = lm(input_ids=x, labels=x)
            if handle:
                handle.remove()
            ces.append(float(out.loss))
            logp = torch.log_softmax(out.logits[0, :-1].double(), -1)
            kl = sum(clean[t].exp() @ (clean[t] - logp[t]) for t in range(len(logp)))
            kls.append(float(kl) / len(logp))
    return np.mean(ces), np.mean(kls)


def test_contexts_rebuilt_from_the_store_give_its_rows(tiny_run):
    _, _, test_store = tiny_run
    store, model, module, kind, ids, where = setup_splice(test_store, contexts=4)
    assert where[:, 0].logical_not().all() and where[:, 1:].all()  # drop_first: BOS/CLS kept
    from choicesae.evaluation.evaluate import check_rows_match

    check_rows_match(model, module, ids, where, store)  # passes: the rows are the model's
    with pytest.raises(DataError, match="not harvested from this model"):
        check_rows_match(model, module, ids.roll(1, dims=1), where, store)


def test_eval_end_to_end_is_deterministic_and_saves_thresholds(tiny_run, tmp_path):
    arch, run, test_store = tiny_run
    cfg = EvalConfig(run=str(run), store=str(test_store), splice_contexts=32, report=False)
    first = evaluate(cfg)
    saved = SAE.from_pretrained(run / "sae")
    text = (run / "eval" / "metrics.json").read_text()
    second = evaluate(cfg)
    assert (run / "eval" / "metrics.json").read_text() == text and first == second
    assert not saved.threshold.isnan().any() and float(saved.threshold_global) > 0
    assert first["thresholds"]["estimated_by"] == "saved"  # training's, left as they were
    assert torch.equal(saved.threshold, SAE.from_pretrained(run / "sae").threshold)
    single, batch = first["inference"]["feature_threshold"], first["inference"]["batch"]
    assert first["inference_mode"] == "feature_threshold"  # the headline: the default codes
    assert (first["l0"], first["fvu"]) == (single["l0"], single["fvu"])
    assert first["allocation"]["dead"] == single["dead"]
    # fitted by training on one batch of 240 tokens (a 40-step run): close, not exact
    assert abs(single["l0"] - batch["l0"]) < 1.0 and single["density_corr"] > 0.9
    assert first["l0"] == pytest.approx(
        np.dot(np.arange(len(h := first["features_per_token"]["histogram"])), h) / first["tokens"]
    )
    s = first["splice"]
    assert s["kind"] == ("encoder" if arch == "bert" else "causal")
    for name in ("sae", "sae_feature_threshold"):  # ΔL = L − L_clean; KL score as SAEBench's
        assert s["delta_loss"][name] == s["losses"][name] - s["losses"]["clean"]
        if arch == "gpt2":
            assert s["kl_recovered"][name] == 1 - s["kl"][name] / s["kl"]["zero_ablation"]
    line = summary_line(first)
    assert ("ΔCE" in line and "KL" in line) == (arch == "gpt2") == ("kl" in s)
    recovered = 100 * s["loss_recovered"]["sae_feature_threshold"]
    assert f"(feature thresholds)  loss recovered {recovered:.2f}%" in line
    topks = [p["l0"] for p in first["progressive"]["topk"]]
    assert topks == sorted(topks) and len(first["progressive"]["jumprelu"]) == 6
    if arch == "gpt2":  # compare: the L0–ΔCE Pareto front of a causal LM's runs
        compare(CompareConfig(runs=f"{run},{run}", out=str(tmp_path / "cmp")))
        rows = json.loads((tmp_path / "cmp" / "compare.json").read_text())
        v = "sae_feature_threshold"  # a Mutual Choice SAE's default codes: one token at a time
        assert first["inference_mode"] == "feature_threshold"
        assert rows[0]["ΔCE / Δloss"] == s["delta_loss"][v] and rows[0]["KL"] == s["kl"][v]
        assert rows[0]["L0"] == first["inference"]["feature_threshold"]["l0"]
        assert [r["Pareto (L0, downstream)"] for r in rows] == ["yes", "yes"]  # ties: both


def test_eval_errors_name_the_problem(tiny_run, tmp_path):
    _, run, test_store = tiny_run
    with pytest.raises(DataError, match="not a run folder"):
        evaluate(EvalConfig(run=str(tmp_path), store=str(test_store)))
    moved = tmp_path / "run"
    shutil.copytree(run, moved)
    config = json.loads((moved / "config.json").read_text())
    (moved / "config.json").write_text(json.dumps(config | {"store": str(tmp_path / "gone")}))
    cfg = EvalConfig(run=str(moved), store=str(test_store), splice_contexts=0, report=False)
    assert evaluate(cfg)["thresholds"]["estimated_by"] == "saved"  # no data needed
    old = SAE.from_pretrained(moved / "sae")  # as saved before training estimated them
    old.threshold.fill_(float("nan"))
    old.save_pretrained(moved / "sae")
    with pytest.raises(DataError, match="--calibrate"):
        evaluate(cfg)
    with pytest.raises(ConfigError, match="splice_contexts"):
        EvalConfig(run=str(run), splice_contexts=-1)


def test_first_token_share_on_a_store_that_keeps_it(tmp_path):
    folder, hookpoint = save_tiny_model("gpt2", tmp_path / "model")
    train_store, test_store = harvest_pair(folder, hookpoint, tmp_path, drop_first=False)
    run = train_run(train_store, tmp_path / "run")
    result = evaluate(
        EvalConfig(run=str(run), store=str(test_store), splice_contexts=16, report=False)
    )
    fpt = result["features_per_token"]
    assert fpt["first_tokens"] == -(-result["tokens"] // 16) and sum(fpt["histogram_first"]) > 0
    assert result["splice"]["loss_recovered"]["sae"] == pytest.approx(
        1
        - (result["splice"]["losses"]["sae"] - result["splice"]["losses"]["clean"])
        / (result["splice"]["losses"]["zero_ablation"] - result["splice"]["losses"]["clean"])
    )


def test_minilm_few_hundred_tokens(tmp_path):
    train_store, test_store = harvest_pair(
        "all-MiniLM-L6-v2", "encoder.layer.3", tmp_path, tokens=(1200, 480), context=32
    )
    run = train_run(train_store, tmp_path / "run", batch_size=120, sparsifier="topk")
    result = evaluate(
        EvalConfig(run=str(run), store=str(test_store), splice_contexts=9, report=False)
    )
    s = result["splice"]
    assert s["kind"] == "encoder" and s["contexts"] == 9 and s["losses"]["clean"] == 0.0
    assert 0 < s["losses"]["sae"] < s["losses"]["zero_ablation"]  # better than ablation
    assert 0 < s["loss_recovered"]["sae"] <= 1
