"""`choicesae eval` of transcoders: a tiny BERT's MLP, read at its hidden layer (A, after GELU)
and predicted at its output projection (B, a Linear of A's output), harvested as pairs."""

import json
import re

import pytest
import torch
import torch.nn.functional as F_
from test_evaluate import harvest_pair, train_run
from tiny_models import save_tiny_model

from choicesae.cli.main import main
from choicesae.core.config import SAEConfig
from choicesae.core.sae import SAE
from choicesae.data.harvest import HarvestConfig, harvest
from choicesae.data.hooks import find_module
from choicesae.data.store import Store
from choicesae.errors import ConfigError, DataError
from choicesae.evaluation import splice
from choicesae.evaluation.evaluate import EvalConfig, check_rows_match, evaluate

A, B = "encoder.layer.0.intermediate", "encoder.layer.0.output.dense"  # widths 64 and 32
BATCH = 240  # train_run's batch size: 16 contexts of 15 stored tokens


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(root, model folder, train and test stores of (A, B) pairs, a trained transcoder run)."""
    root = tmp_path_factory.mktemp("transcoder")
    folder, _ = save_tiny_model("bert", root / "model")
    train_store, test_store = harvest_pair(folder, A, root, target=B)
    run = train_run(train_store, root / "run", sparsifier="topk", transcoder=True)
    return root, folder, train_store, test_store, run


def other_harvest(pair, name: str, **kw) -> str:
    """The test text harvested again with other settings (another target, or none)."""
    root, folder = pair[:2]
    cfg = HarvestConfig(
        model=str(folder),
        hookpoint=A,
        text=str(root / "test.txt"),
        tokens=1600,
        context=16,
        batch_size=8,
        dtype="float32",
        progress=False,
        out=str(root / name),
        **kw,
    )
    harvest(cfg)
    return cfg.out


def spliceable(test_store, contexts=12):
    store = Store(test_store)
    model, base, tokenizer, kind = splice.load_spliceable(store.manifest["model"])
    ids, where = splice.store_contexts(store, tokenizer, contexts)
    return store, model, base, kind, ids, where


def test_an_exact_transcoder_spliced_in_the_same_pass_recovers_all(pair):
    store, model, base, kind, ids, where = spliceable(pair[3])
    source, target = find_module(base, A), find_module(base, B)
    replace = {  # B's own Linear of A's rows is exactly B's output: a perfect transcoder
        "exact": lambda h: F_.linear(h, target.weight, target.bias),
        "zero": lambda h: h.new_zeros(len(h), target.out_features),
    }
    variants = splice.at(target, source, replace)
    losses = splice.downstream_losses(model, kind, ids, where, variants, 5)["loss"]
    assert kind == "encoder" and losses["clean"] == 0.0
    assert losses["exact"] == pytest.approx(0.0, abs=1e-10) and losses["zero"] > 1e-6
    recovered = splice.loss_recovered(losses["exact"], losses["clean"], losses["zero"])
    assert recovered == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ConfigError, match="did not run before its target"), torch.no_grad():
        with splice.spliced_into(source, where, replace["exact"], source=target):
            model(input_ids=ids, attention_mask=torch.ones_like(ids))


def test_rows_are_checked_against_both_modules(pair):
    store, model, base, _, ids, where = spliceable(pair[3], contexts=4)
    source, target = find_module(base, A), find_module(base, B)
    check_rows_match(model, source, ids, where, store, target)  # both halves are the model's
    wrong = find_module(base, "encoder.layer.1.output.dense")  # the same width, another layer
    with pytest.raises(DataError, match=f"activations at {B} differ"):
        check_rows_match(model, source, ids, where, store, wrong)


def test_a_transcoder_evaluates_end_to_end_against_its_targets(pair, capsys):
    _, _, _, test_store, run = pair
    assert main(["eval", str(run), "--store", str(test_store), "--splice-contexts", "32"]) == 0
    assert f"transcoder {A} -> {B} (d_out 32)" in capsys.readouterr().out
    result = json.loads((run / "eval" / "metrics.json").read_text())
    assert result["transcoder"] == {"hookpoint": A, "target": B, "d_out": 32}
    assert result["d_in"] == 64 and "transcoder" in (run / "eval" / "report.html").read_text()
    sae = SAE.from_pretrained(run / "sae")
    assert not sae.threshold.isnan().any()  # fitted on the inputs, saved with the model
    rows = Store(test_store)[: result["tokens"]]  # the rows eval measured
    x, y = rows[:, :64], rows[:, 64:]
    with torch.no_grad():
        y_hat = torch.cat([sae.reconstruct(xb) for xb in x.split(BATCH)])  # the default codes
        l0 = torch.cat([(sae.codes(xb) != 0).sum(-1) for xb in x.split(BATCH)])
    fvu = float(((y_hat - y) ** 2).sum() / ((y - y.mean(0)) ** 2).sum())
    assert result["fvu_raw"] == pytest.approx(fvu, rel=1e-4) and 0 < fvu < 1
    assert result["fvu"] == pytest.approx(fvu, rel=1e-4)  # one scale factor: the same ratio
    assert result["l0"] == pytest.approx(float(l0.float().mean()))
    s = result["splice"]
    assert s["losses"]["clean"] == 0.0 < s["losses"]["sae"] < s["losses"]["zero_ablation"]
    assert 0 < s["loss_recovered"]["sae"] <= 1
    in_memory = evaluate(
        EvalConfig(batch_size=BATCH, splice_contexts=0, report=False),
        (x, y),
        calibrate=(x, y),
        sae=sae,
    )
    assert in_memory["fvu"] == result["fvu"] and in_memory["l0"] == result["l0"]
    assert main(["browse", str(run), "--store", str(test_store), "--top", "2"]) == 0


def test_stores_that_do_not_fit_are_refused_in_one_line(pair):
    root, _, train_store, test_store, run = pair
    alone = other_harvest(pair, "alone")  # A without targets
    elsewhere = other_harvest(pair, "elsewhere", target="encoder.layer.0.attention.output.dense")
    cases = [
        (EvalConfig(run=str(run), store=alone), None, f"store {alone} holds no targets"),
        (EvalConfig(run=str(run), store=elsewhere), None, f"the transcoder predicts {B}"),
        (
            EvalConfig(run=str(run), store=str(test_store), calibrate=alone),
            None,
            f"calibration store {alone} holds no targets",
        ),
        (
            EvalConfig(store=str(test_store), batch_size=BATCH),
            SAE(SAEConfig(num_latents=128, k=4).resolve(64)),
            "pairs for a transcoder and the SAE is an autoencoder",
        ),
    ]
    for cfg, sae, message in cases:
        with pytest.raises(DataError, match=re.escape(message)) as error:
            evaluate(cfg, sae=sae)
        assert "\n" not in str(error.value)
    x = Store(test_store)[:BATCH][:, :64]
    with pytest.raises(DataError, match=r"reads \[tokens, 64 \+ 32\]"):
        evaluate(EvalConfig(run=str(run), report=False), x)


def test_train_refuses_a_store_that_does_not_fit(pair, tmp_path, capsys):
    """`train --store` of pairs without --transcoder, and --transcoder on a store without
    targets: one line each, before anything is written."""
    _, _, train_store, _, _ = pair
    alone = other_harvest(pair, "alone-train")
    cases = [
        (["--store", str(train_store)], "holds (hookpoint, target) pairs for a transcoder"),
        (["--store", alone, "--transcoder"], "holds no targets and the SAE is a transcoder"),
    ]
    for i, (flags, message) in enumerate(cases):
        out = tmp_path / f"run{i}"
        code = main(["train", *flags, "--steps", "2", "--batch-size", "64", "--out", str(out)])
        error = capsys.readouterr().err
        assert code == 2 and message in error and error.count("\n") == 1 and not out.exists()
