"""Several hookpoints from one model pass into one store (data/harvest.py, data/store.py), and
one model per hookpoint trained from one read of it (data/shared.py, training/many.py): each
the model that a harvest and a training run of that hookpoint alone give."""

import copy
import json

import numpy as np
import pytest
import torch
from tiny_models import save_tiny_model

from choicesae.core.config import SAEConfig, TrainConfig
from choicesae.core.sae import SAE
from choicesae.data import shared as shared_module
from choicesae.data.harvest import HarvestConfig, OnlineActivations, harvest
from choicesae.data.store import open_store
from choicesae.errors import ConfigError
from choicesae.training import many
from choicesae.training.loop import train
from choicesae.training.many import train_many

LAYERS = ["h.0.ln_2", "h.1.ln_2", "h.2.ln_2"]  # tiny GPT-2's MLP inputs; their outputs h.*.mlp


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return save_tiny_model("gpt2", tmp_path_factory.mktemp("gpt2"))[0]


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    import pydoc_data.topics

    path = tmp_path_factory.mktemp("text") / "a.txt"
    path.write_text(pydoc_data.topics.topics["naming"] + pydoc_data.topics.topics["try"])
    return path


def config(model, text, out, **kw) -> HarvestConfig:
    kw = {"tokens": 1200, "batch_size": 4, "shard_tokens": 300, "progress": False} | kw
    return HarvestConfig(model=str(model), text=str(text), out=str(out), dtype="float32", **kw)


@pytest.fixture(scope="module")
def layers(gpt2, text, tmp_path_factory):
    """A store of every layer's MLP input and output, from one pass."""
    out = tmp_path_factory.mktemp("store") / "s"
    return harvest(config(gpt2, text, out, hookpoint="h.*.ln_2", target="h.*.mlp"))


def test_one_pass_stores_every_pair_as_separate_harvests_would(layers, gpt2, text, tmp_path):
    m = layers.manifest
    assert layers.hookpoints == LAYERS and m["target"] == "h.0.mlp,h.1.mlp,h.2.mlp"
    assert m["columns"] == [[p, 32] for p in LAYERS] + [[f"h.{i}.mlp", 32] for i in range(3)]
    assert layers.shape == (1200, 6 * 32)
    alone = harvest(config(gpt2, text, tmp_path / "one", hookpoint="h.1.ln_2", target="h.1.mlp"))
    one = layers.select("h.1.ln_2")
    assert {k: one.manifest[k] for k in ("hookpoint", "target", "d_model", "d_target")} == {
        k: alone.manifest[k] for k in ("hookpoint", "target", "d_model", "d_target")
    }
    assert torch.equal(one[:], alone[:])  # the same forward pass: the same floats
    rows = np.arange(0, 1200, 7)
    assert torch.equal(one[rows], layers[rows][:, [*range(32, 64), *range(128, 160)]])
    batch = next(one.batches(64, seed=3))
    assert torch.equal(batch, next(alone.batches(64, seed=3)))


def test_bad_lists_of_hookpoints_are_clear_errors(layers, gpt2, text, tmp_path):
    with pytest.raises(ConfigError, match="3 hookpoints and 2 targets"):
        harvest(config(gpt2, text, tmp_path / "a", hookpoint="h.*.ln_2", target="h.0.mlp,h.1.mlp"))
    with pytest.raises(ConfigError, match=r"no hookpoint matches 'h\.\*\.nope'"):
        harvest(config(gpt2, text, tmp_path / "b", hookpoint="h.*.nope"))
    with pytest.raises(ConfigError, match="h.1.ln_2 named twice"):
        harvest(config(gpt2, text, tmp_path / "c", hookpoint="h.1.ln_2,h.*.ln_2"))
    with pytest.raises(ConfigError, match="online training reads one hookpoint"):
        OnlineActivations(config(gpt2, text, tmp_path / "d", hookpoint="h.*.ln_2"))
    with pytest.raises(ConfigError, match="holds 3 hookpoints .*name one with --hookpoint"):
        open_store(layers.path)
    with pytest.raises(ConfigError, match="holds no hookpoint 'h.9.ln_2'"):
        layers.select("h.9.ln_2")
    assert not any((tmp_path / n).exists() for n in "abcd")


def run(layers, out, **kw) -> TrainConfig:
    sae = SAEConfig(sparsifier="mutual_choice", k=4, num_latents=64, **kw.pop("sae", {}))
    kw = dict(steps=30, batch_size=128, threshold_tokens=256, progress=False) | kw
    return TrainConfig(sae=sae, transcoder=True, store=str(layers.path), out=str(out), **kw)


def test_models_from_one_read_equal_models_trained_alone(layers, tmp_path, monkeypatch):
    reads = []
    real = shared_module.SharedRead
    monkeypatch.setattr(many, "SharedRead", lambda *a: reads.append(real(*a)) or reads[-1])
    saes = train_many(run(layers, tmp_path / "many", sae={"hookpoint": "h.*.ln_2"}))
    assert [s.cfg.hookpoint for s in saes] == LAYERS
    assert [s.cfg.target for s in saes] == ["h.0.mlp", "h.1.mlp", "h.2.mlp"]
    for hookpoint, sae in zip(LAYERS, saes, strict=True):
        cfg = run(layers, tmp_path / "alone" / hookpoint, sae={"hookpoint": hookpoint})
        alone = train(cfg)
        for name, value in alone.state_dict().items():  # bit for bit, NaN (no density yet) too
            theirs = sae.state_dict()[name]
            torch.testing.assert_close(value, theirs, rtol=0, atol=0, equal_nan=True, msg=name)
        saved = SAE.from_pretrained(tmp_path / "many" / hookpoint / "sae")
        assert torch.equal(saved.W_dec, sae.W_dec)
        assert json.loads((tmp_path / "many" / hookpoint / "config.json").read_text())
    # each batch drawn once for the three: the init sample, 30 steps, 1 threshold batch
    [shared] = reads
    assert shared.rows_read == 1200 + (30 + 1) * 128
    assert shared.bytes_read == shared.rows_read * 6 * 32 * 4


def test_a_failing_model_stops_the_others_and_its_error_is_raised(layers, tmp_path, monkeypatch):
    real = many.train

    def failing(cfg, reader):
        if cfg.sae.hookpoint == "h.1.ln_2":
            next(reader.batches(128, cfg.seed))  # draws, then fails: the others must not wait
            raise RuntimeError("disk on fire")
        return real(cfg, reader)

    monkeypatch.setattr(many, "train", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        train_many(run(layers, tmp_path, steps=200))


def test_one_named_hookpoint_trains_alone_in_out(layers, tmp_path):
    [sae] = train_many(run(layers, tmp_path, sae={"hookpoint": "h.2.ln_2"}))
    assert (sae.cfg.hookpoint, sae.cfg.target) == ("h.2.ln_2", "h.2.mlp")
    assert (tmp_path / "sae" / "config.json").is_file()


def test_a_skip_transcoder_per_layer_from_one_read(layers, tmp_path):
    saes = train_many(run(layers, tmp_path, steps=5, sae={"skip": True}))
    assert len(saes) == 3 and all(s.W_skip is not None for s in saes)
    assert sorted(p.name for p in tmp_path.iterdir()) == LAYERS


class Exact(SAE):
    """A stand-in transcoder that predicts its target exactly: the MLP itself, run on the
    hookpoint's rows (an MLP reads each token alone)."""

    def __init__(self, cfg: SAEConfig, mlp: torch.nn.Module):
        super().__init__(cfg)
        self.mlp = mlp

    def reconstruct(self, x, threshold=None, batch=False):
        return self.mlp(x)


def test_a_whole_set_is_spliced_in_one_pass(layers, gpt2, tmp_path):
    from choicesae.evaluation.evaluate import set_splice_metrics
    from choicesae.evaluation.splice import load_spliceable

    base = load_spliceable(str(gpt2))[1]
    exact = [  # a copy of the MLP: the model's own carries the splice's hook
        Exact(
            SAEConfig(
                k=4, num_latents=64, d_in=32, d_out=32, normalize="dataset",
                hookpoint=f"h.{i}.ln_2", target=f"h.{i}.mlp",
            ),
            copy.deepcopy(base.get_submodule(f"h.{i}.mlp")),
        )
        for i in range(3)
    ]  # fmt: skip
    result = set_splice_metrics(exact, layers, contexts=8, batch_size=256)
    assert result["loss_recovered"]["transcoders"] == pytest.approx(1.0, abs=1e-5)
    assert result["kl"]["transcoders"] == pytest.approx(0.0, abs=1e-6)
    # trained transcoders for every layer: worse than exact, better than ablating the MLPs
    saes = train_many(run(layers, tmp_path, steps=40))
    trained = set_splice_metrics(saes, layers, contexts=8, batch_size=256)
    one = set_splice_metrics(saes[:1], layers, contexts=8, batch_size=256)
    kl = trained["kl"]  # a random model's CE hardly moves; its distributions do
    assert 0 < kl["transcoders"] < kl["mean_ablation"] < kl["zero_ablation"]
    assert one["losses"]["clean"] == trained["losses"]["clean"]
    assert 0 < one["kl"]["transcoders"] < kl["transcoders"]


def test_a_wide_harvest_builds_smaller_shards_of_the_same_rows(
    layers, gpt2, text, tmp_path, monkeypatch
):
    """A shard is built in memory as float32: past SHARD_BYTES it holds fewer contexts (whole
    batches), and the store holds the same rows."""
    from choicesae.data import harvest as harvest_module

    monkeypatch.setattr(harvest_module, "SHARD_BYTES", 4 * 6 * 32 * 100)  # 100 rows of 192
    cfg = config(gpt2, text, tmp_path / "s", hookpoint="h.*.ln_2", target="h.*.mlp")
    narrow = harvest(cfg)
    assert narrow.manifest["contexts_per_shard"] == 4  # one batch of 4 contexts, 252 rows
    assert max(s["rows"] for s in narrow.manifest["shards"]) == 4 * 63 < 300
    assert torch.equal(narrow[:], layers[:])


def test_a_store_from_before_skip_and_model_dtype_is_the_same_harvest(gpt2, text, tmp_path):
    """Stores harvested before --skip and --model-dtype existed lack them in their manifest:
    the same harvest finds them complete rather than refusing them as another one."""
    cfg = config(gpt2, text, tmp_path / "s", hookpoint="h.1")
    first = harvest(cfg)
    manifest = json.loads((first.path / "manifest.json").read_text())
    del manifest["skip"], manifest["model_dtype"]
    (first.path / "manifest.json").write_text(json.dumps(manifest))
    again = harvest(cfg)  # complete: read back, nothing harvested or refused
    assert torch.equal(again[:], first[:])
