import dataclasses
import itertools
import json
import os
import pydoc_data.topics
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from tiny_models import save_tiny_model
from torch import Tensor

import choicesae.data.store as store_module
from choicesae.cli.main import main, parser
from choicesae.core.config import SAEConfig, TrainConfig, _field_docs
from choicesae.data.harvest import HarvestConfig, Harvester, OnlineActivations, harvest
from choicesae.data.hooks import load_model
from choicesae.data.store import Store
from choicesae.data.text import PARAGRAPHS_PER_CALL, contexts, documents, token_stream
from choicesae.errors import ConfigError, DataError
from choicesae.training.loop import train

TOPICS = pydoc_data.topics.topics


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two short English documents as a text file, the same as JSONL."""
    folder = tmp_path_factory.mktemp("text")
    docs = [TOPICS["naming"], TOPICS["try"]]
    (folder / "a.txt").write_text(docs[0])
    (folder / "b.txt").write_text(docs[1])
    (folder / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return folder


@pytest.fixture(scope="module", params=["gpt2", "bert"])
def tiny(request, tmp_path_factory):
    return save_tiny_model(request.param, tmp_path_factory.mktemp(request.param))


TRANSCODERS = {  # arch: (hookpoint, target), an MLP's input and its output
    "gpt2": ("h.1.ln_2", "h.1.mlp"),
    "bert": ("encoder.layer.1.attention.output", "encoder.layer.1.intermediate"),  # 32 -> 64
}


@pytest.fixture(scope="module", params=list(TRANSCODERS))
def transcoder(request, tmp_path_factory):
    """(model folder, hookpoint, target, target's width)."""
    folder, _ = save_tiny_model(request.param, tmp_path_factory.mktemp(request.param))
    hookpoint, target = TRANSCODERS[request.param]
    return folder, hookpoint, target, 64 if target.endswith("intermediate") else 32


def config(model, hookpoint, text, out, **kw) -> HarvestConfig:
    kw = {"tokens": 1000, "batch_size": 4, "shard_tokens": 200, "progress": False} | kw
    return HarvestConfig(model=str(model), hookpoint=hookpoint, text=str(text), out=str(out), **kw)


def files(path) -> dict[str, bytes]:
    return {
        p.name + "/" + f.name: f.read_bytes() for p in path.glob("shard-*") for f in p.iterdir()
    }


def test_harvest_matches_the_model_and_repeats_byte_for_byte(tiny, corpus, tmp_path):
    folder, hookpoint = tiny
    text = f"{corpus / 'a.txt'},{corpus / 'b.txt'}"
    store = harvest(config(folder, hookpoint, text, tmp_path / "s1", dtype="float32"))
    again = harvest(config(folder, hookpoint, text, tmp_path / "s2", dtype="float32"))
    assert files(tmp_path / "s1") == files(tmp_path / "s2") and store.num_shards > 2
    assert store.shape == (1000, 32) and store.manifest["complete"]

    model, tokenizer = load_model(str(folder))
    ctxs = list(itertools.islice(contexts(documents(text), tokenizer, 64), 16))  # 16*63 >= 1000
    assert np.array_equal(store.tokens(), np.concatenate([c[1:] for c in ctxs])[:1000])
    for c in (0, 5, 15):  # the rows of context c are its positions 1..63, BOS/CLS dropped
        ids = torch.tensor([ctxs[c]])
        with torch.no_grad():
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[2][0]
        rows = store[np.arange(63 * c, min(63 * (c + 1), 1000))]
        torch.testing.assert_close(rows, hidden[1 : 1 + len(rows)], atol=1e-5, rtol=1e-4)
    assert torch.equal(again[:], store[:])


def test_skip_harvests_the_text_that_follows(tiny, corpus, tmp_path):
    folder, hookpoint = tiny
    text = f"{corpus / 'a.txt'},{corpus / 'b.txt'}"
    whole = harvest(config(folder, hookpoint, text, tmp_path / "whole", dtype="float32"))
    later = harvest(
        config(folder, hookpoint, text, tmp_path / "later", dtype="float32", tokens=300, skip=600)
    )
    assert np.array_equal(later.tokens(), whole.tokens()[630:930])  # 600 rows: 10 contexts of 63
    torch.testing.assert_close(later[:], whole[np.arange(630, 930)])
    assert later.manifest["skip"] == 600
    with pytest.raises(DataError, match="after the 1000 contexts skipped"):
        harvest(config(folder, hookpoint, text, tmp_path / "none", skip=63_000))
    with pytest.raises(ConfigError, match="skip must not be negative"):
        config(folder, hookpoint, text, tmp_path / "bad", skip=-1)


def outputs_by_hand(folder, text, modules, tokens, drop_first) -> tuple[Tensor, np.ndarray]:
    """(rows [tokens, sum of widths]: the outputs of `modules` side by side, token ids) of
    the contexts of `text`, each run alone through the whole model with forward hooks."""
    model, tokenizer = load_model(str(folder))
    seen = {}
    for name in modules:
        model.get_submodule(name).register_forward_hook(
            lambda _m, _i, out, name=name: seen.__setitem__(name, out.clone())
        )
    rows, ids = [], []
    for ctx in contexts(documents(text), tokenizer, 64):
        with torch.no_grad():
            model(input_ids=torch.tensor([ctx]))
        rows.append(torch.cat([seen[name][0] for name in modules], -1)[int(drop_first) :])
        ids += ctx[int(drop_first) :]
        if len(ids) >= tokens:
            break
    return torch.cat(rows)[:tokens], np.array(ids[:tokens])


@pytest.mark.parametrize("drop_first", [True, False])
def test_a_target_harvest_stores_hookpoint_and_target_side_by_side(
    transcoder, corpus, tmp_path, drop_first
):
    folder, hookpoint, target, d_target = transcoder
    text = f"{corpus / 'a.txt'},{corpus / 'b.txt'}"
    cfg = config(folder, hookpoint, text, tmp_path / "s", dtype="float32", target=target)
    store = harvest(dataclasses.replace(cfg, drop_first=drop_first))
    assert store.shape == (1000, 32 + d_target) and store.num_shards > 2
    assert (store.d_model, store.d_target) == (32, d_target)
    assert {k: store.manifest[k] for k in ("hookpoint", "target", "d_model", "d_target")} == {
        "hookpoint": hookpoint,
        "target": target,
        "d_model": 32,
        "d_target": d_target,
    }
    rows, ids = outputs_by_hand(folder, text, [hookpoint, target], 1000, drop_first)
    assert np.array_equal(store.tokens(), ids)
    torch.testing.assert_close(store[:], rows, atol=1e-5, rtol=1e-4)


def test_online_target_activations_are_the_stored_pairs(transcoder, corpus, tmp_path):
    folder, hookpoint, target, d_target = transcoder
    cfg = config(folder, hookpoint, corpus / "a.txt", tmp_path / "s", dtype="float32")
    cfg = dataclasses.replace(cfg, target=target)
    stored = harvest(cfg)[:]
    online = OnlineActivations(cfg)
    assert online.shape == (1000, 32 + d_target) and online.d_target == d_target
    batch = next(online.batches(batch_size=100, seed=0))  # [100, 32 + d_target]
    distance = (batch[:, None] - stored[None]).abs().amax(-1).min(dim=1).values  # [100]
    assert distance.max() < 1e-5


def test_bad_targets_are_clear_errors(transcoder, corpus, tmp_path):
    folder, hookpoint, target, _ = transcoder
    text, out = corpus / "a.txt", tmp_path / "s"
    pattern = re.escape(f"unknown hookpoint '{target}x'") + ".*closest: .*" + re.escape(target)
    with pytest.raises(ConfigError, match=pattern):
        harvest(config(folder, hookpoint, text, out, target=target + "x"))
    with pytest.raises(ConfigError, match="target .* is the hookpoint"):
        config(folder, hookpoint, text, out, target=hookpoint)
    blocks = target.split(".1.")[0]  # h or encoder.layer: a list of blocks, never called
    with pytest.raises(ConfigError, match=r"not \[batch, tokens, width\]"):
        harvest(config(folder, hookpoint, text, out, target=blocks))
    assert not out.exists()


def test_the_last_context_is_short_and_padding_never_stored(tiny, corpus, tmp_path):
    folder, hookpoint = tiny
    _, tokenizer = load_model(str(folder))
    text = corpus / "a.txt"
    ctxs = list(contexts(documents(str(text)), tokenizer, 16))
    assert len(ctxs[-1]) < 16 and all(len(c) == 16 for c in ctxs[:-1])
    cfg = config(folder, hookpoint, text, tmp_path / "s", tokens=10**6, context=16)
    cfg = dataclasses.replace(cfg, batch_size=16, shard_tokens=2000)
    store = harvest(cfg)
    expected = np.concatenate([c[1:] for c in ctxs])  # every real token, no pad, no BOS/CLS
    assert np.array_equal(store.tokens(), expected)
    keep_first = harvest(dataclasses.replace(cfg, out=str(tmp_path / "k"), drop_first=False))
    assert np.array_equal(keep_first.tokens(), np.concatenate(ctxs))


def test_text_files_jsonl_and_datasets_give_the_same_store(tiny, corpus, tmp_path):
    folder, hookpoint = tiny
    text = f"{corpus / 'a.txt'},{corpus / 'b.txt'}"
    reference = harvest(config(folder, hookpoint, text, tmp_path / "t")).tokens()
    from_jsonl = harvest(config(folder, hookpoint, corpus / "docs.jsonl", tmp_path / "j"))
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    (dataset / "train.jsonl").write_text((corpus / "docs.jsonl").read_text())
    from_dataset = harvest(config(folder, hookpoint, f"hf:{dataset}", tmp_path / "d"))
    assert np.array_equal(from_jsonl.tokens(), reference)
    assert np.array_equal(from_dataset.tokens(), reference)


class CountingTokenizer:
    """A tokenizer that counts the texts it is asked to tokenise."""

    def __init__(self, tokenizer):
        self.tokenizer, self.texts = tokenizer, 0

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def __call__(self, text, **kw):
        self.texts += len(text) if isinstance(text, list) else 1
        return self.tokenizer(text, **kw)


def test_the_token_stream_is_lazy_and_tokenises_paragraph_by_paragraph(tiny):
    _, tokenizer = load_model(str(tiny[0]))
    book = "\n\n".join(f"paragraph {i} of a long book." for i in range(1000))
    docs = ["", " \n\n ", TOPICS["try"], "a\n\n\n\nb  c", book]
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    expected: list[int] = []  # one tokenizer call per paragraph, documents joined by sep
    for doc in docs:
        paragraphs = [p for p in doc.split("\n\n") if p.strip()]
        ids = [t for p in paragraphs for t in tokenizer(p, add_special_tokens=False)["input_ids"]]
        expected += ([sep] if expected and ids else []) + ids
    assert list(token_stream(iter(docs), tokenizer)) == expected
    counting = CountingTokenizer(tokenizer)
    next(contexts(iter([book]), counting, 16))  # tokenises a few paragraphs, not the book
    assert counting.texts <= PARAGRAPHS_PER_CALL + 2  # + 2: special_tokens' probes


def test_a_loaded_harvester_is_reused_for_its_own_config_only(tiny, corpus, tmp_path):
    folder, hookpoint = tiny
    cfg = config(folder, hookpoint, corpus / "a.txt", tmp_path / "reused")
    harvester = Harvester(cfg)
    harvest(cfg, harvester)
    harvest(config(folder, hookpoint, corpus / "a.txt", tmp_path / "fresh"))
    assert files(tmp_path / "reused") == files(tmp_path / "fresh")
    with pytest.raises(ConfigError, match="another config"):
        harvest(dataclasses.replace(cfg, context=32), harvester)


class Killed(BaseException):
    """Stands for SIGKILL: nothing of the harvest's own error handling runs."""


def interrupt(cfg: HarvestConfig, monkeypatch) -> None:
    """Harvest cfg until it dies half-way through writing its third shard."""
    save, calls = store_module._save, []

    def dies_in_the_third_shard(path, array):
        calls.append(path)
        if len(calls) == 5:  # acts.npy of shard 2, half written
            path.write_bytes(b"\x93NUMPY half")
            raise Killed
        save(path, array)

    monkeypatch.setattr(store_module, "_save", dies_in_the_third_shard)
    with pytest.raises(Killed):
        harvest(cfg)
    monkeypatch.setattr(store_module, "_save", save)


def check_resumes_to_the_same_store(cfg: HarvestConfig, tmp_path, monkeypatch) -> None:
    full = harvest(dataclasses.replace(cfg, out=str(tmp_path / "full")))
    cfg = dataclasses.replace(cfg, out=str(tmp_path / "cut"))
    interrupt(cfg, monkeypatch)
    assert (tmp_path / "cut" / "shard-00002.tmp" / "acts.npy").exists()
    partial = Store(tmp_path / "cut")  # a reader sees the two complete shards only
    assert partial.num_shards == 2 and torch.equal(partial[:], full[: len(partial)])
    resumed = harvest(cfg)
    assert files(tmp_path / "cut") == files(tmp_path / "full")
    assert resumed.manifest == full.manifest


def test_an_interrupted_harvest_resumes_to_the_same_store(tiny, corpus, tmp_path, monkeypatch):
    folder, hookpoint = tiny
    cfg = config(folder, hookpoint, corpus / "a.txt", tmp_path / "unused")
    check_resumes_to_the_same_store(cfg, tmp_path, monkeypatch)


def test_an_interrupted_target_harvest_resumes_to_the_same_store(
    transcoder, corpus, tmp_path, monkeypatch
):
    folder, hookpoint, target, _ = transcoder
    cfg = config(folder, hookpoint, corpus / "a.txt", tmp_path / "unused", target=target)
    check_resumes_to_the_same_store(cfg, tmp_path, monkeypatch)


def test_resuming_with_another_target_or_none_is_refused(
    transcoder, corpus, tmp_path, monkeypatch, capsys
):
    folder, hookpoint, target, _ = transcoder
    other = target.rsplit(".", 1)[0]  # the block: h.1 or encoder.layer.1
    cfg = config(folder, hookpoint, corpus / "a.txt", tmp_path / "s", target=target)
    interrupt(cfg, monkeypatch)
    argv = ["harvest", "--model", str(folder), "--hookpoint", hookpoint, "--text", cfg.text]
    argv += ["--tokens", "1000", "--shard-tokens", "200", "--batch-size", "4", "--no-progress"]
    argv += ["--out", cfg.out]
    for wrong in (other, ""):
        assert main([*argv, "--target", wrong]) == 2
        assert f"holds a harvest with target={target!r}, not {wrong!r}" in capsys.readouterr().err
    assert main(argv) == 2  # no --target at all
    assert f"target={target!r}, not ''" in capsys.readouterr().err
    assert main([*argv, "--target", target]) == 0  # the same target resumes
    interrupt(dataclasses.replace(cfg, target="", out=str(tmp_path / "sae")), monkeypatch)
    with pytest.raises(ConfigError, match=re.escape(f"target='', not '{target}'")):
        harvest(dataclasses.replace(cfg, out=str(tmp_path / "sae")))


def test_a_harvest_killed_by_a_signal_resumes_to_the_same_store(tmp_path):
    folder, hookpoint = save_tiny_model("gpt2", tmp_path / "gpt2")
    text = tmp_path / "pydoc.txt"
    text.write_text("\n\n".join(TOPICS[k] for k in sorted(TOPICS)))
    argv = ["harvest", "--model", str(folder), "--hookpoint", hookpoint, "--text", str(text)]
    argv += ["--tokens", "20000", "--shard-tokens", "1000", "--batch-size", "4", "--no-progress"]
    command = [sys.executable, "-m", "choicesae", *argv]
    cut = subprocess.Popen([*command, "--out", str(tmp_path / "cut")])
    manifest = tmp_path / "cut" / "manifest.json"
    while not (manifest.exists() and len(json.loads(manifest.read_text())["shards"]) >= 3):
        assert cut.poll() is None, "the harvest ended before it could be killed"
        time.sleep(0.01)
    os.kill(cut.pid, signal.SIGKILL)
    cut.wait()
    assert not json.loads(manifest.read_text())["complete"]
    assert main([*argv, "--out", str(tmp_path / "cut")]) == 0
    assert main([*argv, "--out", str(tmp_path / "full")]) == 0
    assert files(tmp_path / "cut") == files(tmp_path / "full")


def test_bad_inputs_are_clear_errors(tiny, corpus, tmp_path):
    folder, hookpoint = tiny
    (tmp_path / "empty.txt").write_text("  \n\n ")
    with pytest.raises(DataError, match="holds no tokens"):
        harvest(config(folder, hookpoint, tmp_path / "empty.txt", tmp_path / "s"))
    assert not (tmp_path / "s").exists()
    with pytest.raises(DataError, match="does not exist"):
        harvest(config(folder, hookpoint, tmp_path / "absent.txt", tmp_path / "s"))
    with pytest.raises(DataError, match="model folder .* does not exist"):
        harvest(config(tmp_path / "no-model", hookpoint, corpus / "a.txt", tmp_path / "s"))
    with pytest.raises(ConfigError, match=f"closest: {hookpoint}"):
        harvest(config(folder, hookpoint + "0", corpus / "a.txt", tmp_path / "s"))
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match="line 2"):
        harvest(config(folder, hookpoint, tmp_path / "bad.jsonl", tmp_path / "s"))


def test_online_activations_feed_the_trainer_the_stored_rows(tiny, corpus, tmp_path):
    folder, hookpoint = tiny
    cfg = config(folder, hookpoint, corpus / "a.txt", tmp_path / "s", dtype="float32")
    stored = harvest(cfg)[:]
    online = OnlineActivations(cfg)
    batch = next(online.batches(batch_size=100, seed=0))  # [100, 32], without a store
    distance = (batch[:, None] - stored[None]).abs().amax(-1).min(dim=1).values  # [100]
    assert online.shape == (1000, 32) and distance.max() < 1e-5
    run = TrainConfig(out=str(tmp_path / "run"), steps=20, batch_size=64, progress=False)
    sae = train(dataclasses.replace(run, sae=SAEConfig(k=4, expansion=2)), online)
    assert sae.cfg.d_in == 32 and (tmp_path / "run" / "sae").is_dir()


def test_the_bundled_minilm_layer_3(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(TOPICS["try"])
    cfg = HarvestConfig(text=str(text), tokens=300, out=str(tmp_path / "s"), progress=False)
    store = harvest(cfg)
    model, tokenizer = load_model("all-MiniLM-L6-v2")
    first = next(contexts(documents(str(text)), tokenizer, 64))
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor([first]), output_hidden_states=True).hidden_states
    # float16 storage: compare at its precision
    torch.testing.assert_close(store[:63], hidden[4][0, 1:], atol=2e-2, rtol=1e-2)
    assert store.manifest["model"] == "all-MiniLM-L6-v2" and store.shape == (300, 384)


def test_cli_lists_hookpoints_and_documents_every_option(tiny, capsys):
    folder, hookpoint = tiny
    assert main(["hookpoints", str(folder)]) == 0
    assert hookpoint in capsys.readouterr().out.split()
    assert main(["hookpoints", str(folder) + "-absent"]) == 2
    assert "does not exist" in capsys.readouterr().err
    docs = _field_docs(HarvestConfig)
    with pytest.raises(SystemExit):
        parser().parse_args(["harvest", "--help"])
    text = capsys.readouterr().out
    for f in dataclasses.fields(HarvestConfig):
        assert docs.get(f.name) and "--" + f.name.replace("_", "-") in text


def test_the_default_corpus_falls_back_to_pydoc_without_the_debian_packages(tmp_path, monkeypatch):
    import choicesae.data.text as text_module

    for name in ("JARGON", "FORTUNES", "PYTHON_DOCS"):
        monkeypatch.setattr(text_module, name, tmp_path / "absent")
    with pytest.warns(UserWarning, match="apt|not installed"):
        docs = list(documents("default"))
    assert docs == [TOPICS[k] for k in sorted(TOPICS)]
