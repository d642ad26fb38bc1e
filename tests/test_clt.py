"""Cross-layer transcoders (SAEConfig.layers): one transcoder over L layers whose latent block l
reads layer l's MLP input and writes every MLP output j >= l. Its loss and gradients against a
loop written out per layer, its selections against brute force, its training on a
several-hookpoint store, and per-layer FVU and the splice of every MLP on a tiny Llama."""

import dataclasses

import pytest
import torch

from choicesae.core.config import SAEConfig, TrainConfig
from choicesae.core.losses import mse
from choicesae.core.sae import SAE, layer_mask
from choicesae.core.sparsifiers import SPARSIFIERS
from choicesae.errors import ConfigError
from choicesae.step import kernels
from choicesae.step.objective import Masks, objective
from choicesae.step.ops import Dense, Sparse
from choicesae.training.loop import train

L, D, F, K, B = 3, 4, 8, 6, 32  # layers, width per layer, latents per layer, k (all layers), batch
RULES = [  # (sparsifier, per_layer): per-layer and across-layer TopK and Mutual Choice, FC
    ("topk", True),
    ("topk", False),
    ("mutual_choice", True),
    ("mutual_choice", False),
    ("feature_choice", False),
    ("relu", False),
]


def clt(sparsifier="topk", per_layer=False, skip=False, seed=0) -> SAE:
    """A CLT with random biases (the initial ones are zero) and its zero blocks zero."""
    cfg = SAEConfig(
        sparsifier=sparsifier,
        k=K,
        num_latents=L * F,
        layers=L,
        per_layer=per_layer,
        skip=skip,
    ).resolve(L * D, L * D)
    sae = SAE(cfg, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(L * F, generator=g) * 0.3)
        sae.b_dec.copy_(torch.randn(L * D, generator=g))
        if skip:
            mask = layer_mask(cfg, "W_skip", sae.latents)
            sae.W_skip.copy_(torch.randn(L * D, L * D, generator=g) * mask)
    return sae


def data(seed=2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, L * D, generator=g), torch.randn(B, L * D, generator=g)


def blocks(t: torch.Tensor, rows: int, cols: int, i: int, j: int) -> torch.Tensor:
    return t[i * rows : (i + 1) * rows, j * cols : (j + 1) * cols]


def plain_loop(sae: SAE, x, y, sparsifier: str, per_layer: bool):
    """The CLT written out per layer: z_i = x_i W_enc_i + b_enc_i; the codes a (per layer, or
    over every layer at once); ŷ_j = Σ_{i<=j} a_i W_dec_{i→j} (+ x_j W_skip_j) + b_dec_j.
    Returns (loss, {name: gradient of each block})."""
    W_enc = [blocks(sae.W_enc, D, F, i, i).detach().clone().requires_grad_() for i in range(L)]
    b_enc = [sae.b_enc[i * F : (i + 1) * F].detach().clone().requires_grad_() for i in range(L)]
    W_dec = {
        (i, j): blocks(sae.W_dec, F, D, i, j).detach().clone().requires_grad_()
        for i in range(L)
        for j in range(i, L)
    }
    b_dec = [sae.b_dec[j * D : (j + 1) * D].detach().clone().requires_grad_() for j in range(L)]
    xs = x.split(D, 1)
    z = [xs[i] @ W_enc[i] + b_enc[i] for i in range(L)]
    rule = SPARSIFIERS[sparsifier].reference
    m = sae.capacities(B, K) if SPARSIFIERS[sparsifier].capacities else None
    if per_layer:
        a = [rule(z[i], K // L, None).acts for i in range(L)]
    else:
        a = rule(torch.cat(z, 1), K, m).acts.split(F, 1)
    y_hat = []
    for j in range(L):
        y_j = sum(a[i] @ W_dec[i, j] for i in range(j + 1)) + b_dec[j]
        if sae.W_skip is not None:
            y_j = y_j + xs[j] @ blocks(sae.W_skip, D, D, j, j)
        y_hat.append(y_j)
    loss = mse(torch.cat(y_hat, 1), y)
    if sparsifier == "relu":  # L1 of the codes weighted by each latent's decoder norm
        norm = [torch.cat([W_dec[i, j] for j in range(i, L)], 1).norm(dim=1) for i in range(L)]
        loss = loss + 0.1 * sum((a[i] * norm[i]).sum() for i in range(L)) / B
    loss.backward()
    grads = {("W_enc", i, i): W_enc[i].grad for i in range(L)}
    grads |= {("b_enc", i): b_enc[i].grad for i in range(L)}
    grads |= {("W_dec", i, j): w.grad for (i, j), w in W_dec.items()}
    grads |= {("b_dec", j): b_dec[j].grad for j in range(L)}
    return loss.detach(), grads


def train_config(sparsifier: str, **kw) -> TrainConfig:
    return TrainConfig(
        sae=SAEConfig(sparsifier=sparsifier, k=K, num_latents=L * F),
        aux_k_coeff=0.0,
        aux_zipf_coeff=0.0,
        l1_coeff=0.1,
        **kw,
    )


@pytest.mark.parametrize("ops", [Dense, Sparse])
@pytest.mark.parametrize(("sparsifier", "per_layer"), RULES)
def test_loss_and_gradients_equal_a_plain_loop(sparsifier, per_layer, ops):
    sae, (x, y) = clt(sparsifier, per_layer), data()
    if sparsifier == "relu":  # few enough positive affinities for the sparse relu kernel
        with torch.no_grad():
            sae.b_enc.sub_(1.5)
    none = torch.zeros(L * F, dtype=torch.bool)
    cfg = train_config(sparsifier)
    out = objective(sae, x, cfg, sparsifier, Masks(none, none), 0, ops(), y)
    out.loss.backward()
    sae.mask_grad_()
    loss, grads = plain_loop(sae, x, y, sparsifier, per_layer)
    torch.testing.assert_close(out.loss.detach(), loss)
    expected = {
        "W_enc": torch.zeros(L * D, L * F),
        "W_dec": torch.zeros(L * F, L * D),
        "b_enc": torch.zeros(L * F),
        "b_dec": torch.zeros(L * D),
    }
    for (name, *at), g in grads.items():
        part = expected[name]
        if name == "W_enc":
            blocks(part, D, F, *at).copy_(g)
        elif name == "W_dec":
            blocks(part, F, D, *at).copy_(g)
        else:
            n = len(g)
            part[at[0] * n : (at[0] + 1) * n] = g
    for name, g in expected.items():
        torch.testing.assert_close(getattr(sae, name).grad, g, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("feature_major", [False, True])
def test_block_product_equals_the_dense_product(feature_major):
    """The encoder's product over W_enc's diagonal blocks equals the whole dense product, for
    the CLT and for a shard of its latents (which takes the dense product itself)."""
    sae, (x, _) = clt("mutual_choice"), data()
    dense = x @ sae.W_enc
    z = sae.product(x, feature_major)
    torch.testing.assert_close(z.t() if feature_major else z, dense)
    assert not feature_major or z.is_contiguous()
    shard = SAE(sae.cfg, latents=slice(3, 17), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(shard.product(x), x @ shard.W_enc)


def test_skip_path_is_one_per_layer():
    sae, (x, y) = clt("topk", per_layer=True, skip=True), data()
    none = torch.zeros(L * F, dtype=torch.bool)
    out = objective(sae, x, train_config("topk"), "topk", Masks(none, none), 0, Sparse(), y)
    torch.testing.assert_close(out.loss.detach(), plain_loop(sae, x, y, "topk", True)[0])
    out.loss.backward()
    sae.mask_grad_()
    assert not (sae.W_skip.grad * ~layer_mask(sae.cfg, "W_skip", sae.latents)).any()


def brute_force(z: torch.Tensor, n: int) -> torch.Tensor:
    """[B, F'] bool: the n largest positive entries of z, by sorting every one of them."""
    order = torch.sort(-z.flatten(), stable=True).indices[:n]
    chosen = torch.zeros(z.numel(), dtype=torch.bool)
    chosen[order] = True
    return chosen.view_as(z) & (z > 0)


@pytest.mark.parametrize("per_layer", [False, True])
def test_mutual_choice_over_layers_is_brute_force(per_layer):
    """Global Mutual Choice: the k·B largest affinities of every layer's latents at once;
    per-layer: the (k / L)·B largest of each layer's block."""
    sae = clt("mutual_choice", per_layer)
    z = torch.randn(B, L * F, generator=torch.Generator().manual_seed(3)) + 0.5
    if per_layer:
        expected = torch.cat([brute_force(b, K // L * B) for b in z.split(F, 1)], 1)
    else:
        expected = brute_force(z, K * B)
    assert torch.equal(sae.select(z, batch=True).acts != 0, expected)
    pairs = kernels.index_form(sae, "mutual_choice")(z, K, None)
    found = torch.zeros_like(expected)
    found[pairs.token, pairs.feature] = True
    assert torch.equal(found & (z > 0), expected)
    if not per_layer:  # the budget goes where the affinities are: layers get unequal shares
        share = expected.view(B, L, F).sum((0, 2))
        assert share.sum() == K * B and len(set(share.tolist())) > 1


def test_per_layer_topk_keeps_k_over_l_in_every_layer():
    sae = clt("topk", per_layer=True)
    z = torch.randn(B, L * F, generator=torch.Generator().manual_seed(4)) + 3
    acts = sae.select(z).acts.view(B, L, F)
    assert ((acts != 0).sum(-1) == K // L).all()
    assert sae.default_threshold is None  # encoded by its own rule, layer by layer
    assert clt("topk", per_layer=False).default_threshold == "feature"  # reads later layers


def test_config_refuses_what_does_not_split_into_layers():
    with pytest.raises(ConfigError, match="per_layer"):
        SAEConfig(k=7, layers=3, per_layer=True)
    with pytest.raises(ConfigError, match="per_layer"):
        SAEConfig(per_layer=True)
    with pytest.raises(ConfigError, match="token"):
        SAEConfig(layers=2, normalize="token")
    with pytest.raises(ConfigError, match="split"):
        SAEConfig(layers=3, num_latents=100)
    with pytest.raises(ConfigError, match="transcoder"):
        TrainConfig(cross_layer=True)


# ---- a CLT of every layer of a tiny Llama, from one several-hookpoint store ------------------

HOOKS, TARGETS = "layers.*.post_attention_layernorm", "layers.*.mlp"


@pytest.fixture(scope="module")
def llama_store(tmp_path_factory):
    import pydoc_data.topics

    from tiny_models import save_tiny_model

    from choicesae.data.harvest import HarvestConfig, harvest

    tmp = tmp_path_factory.mktemp("clt")
    model = save_tiny_model("llama", tmp / "llama")[0]
    (tmp / "a.txt").write_text(pydoc_data.topics.topics["naming"] * 2)
    cfg = HarvestConfig(
        model=str(model),
        text=str(tmp / "a.txt"),
        out=str(tmp / "store"),
        hookpoint=HOOKS,
        target=TARGETS,
        tokens=1024,
        batch_size=4,
        dtype="float32",
        progress=False,
    )
    return harvest(cfg)


def store_config(store, out, sparsifier="mutual_choice", **kw) -> TrainConfig:
    return TrainConfig(
        store=str(store.path),
        out=str(out),
        transcoder=True,
        cross_layer=True,
        sae=SAEConfig(sparsifier=sparsifier, k=K, num_latents=L * 64, **kw),
        batch_size=128,
        steps=12,
        progress=False,
        threshold_tokens=256,
    )


@pytest.fixture(scope="module")
def trained(llama_store, tmp_path_factory):
    from choicesae.training.many import train_many

    out = tmp_path_factory.mktemp("runs") / "clt"
    return train_many(store_config(llama_store, out))[0], out


def test_trains_one_clt_over_every_layer_of_the_store(trained, llama_store):
    sae, out = trained
    c = sae.cfg
    assert (c.layers, c.d_in, c.d_out, c.num_latents) == (L, L * 32, L * 32, L * 64)
    assert c.hookpoint == llama_store.manifest["hookpoint"] and c.target.endswith("layers.2.mlp")
    for name in ("W_enc", "W_dec"):  # the absent blocks stayed zero through training
        assert not (getattr(sae, name) * ~layer_mask(c, name, sae.latents)).any(), name
    loaded = SAE.from_pretrained(out / "sae")
    assert loaded.cfg == c
    for name, t in sae.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], t, rtol=0, atol=0, equal_nan=True)
    x = llama_store[:64][:, : c.d_in]
    assert torch.equal(loaded.reconstruct(x), sae.reconstruct(x))


def test_per_layer_metrics_add_up_to_the_whole(trained, llama_store):
    from choicesae.evaluation.cross_layer import layer_metrics

    sae = trained[0]
    rows = llama_store[:512]
    got = layer_metrics(sae, rows, 128)
    assert len(got["fvu"]) == L and all(0 < f < 2 for f in got["fvu"])
    l0 = float((sae.codes(rows[:, : sae.cfg.d_in]) != 0).sum(1).double().mean())
    assert sum(got["l0"]) == pytest.approx(l0)


def test_splice_replaces_every_mlp_from_inputs_of_the_same_pass(trained, llama_store):
    """Target j's replacement reads x_0 … x_j of the spliced pass: a loop that hooks every
    layer by hand and sums the CLT's blocks written out gives the same losses."""
    from choicesae.evaluation import cross_layer, splice
    from choicesae.evaluation.cross_layer import layer_replacements

    sae = trained[0]
    got = cross_layer.splice_metrics(sae, llama_store, contexts=4, batch_size=128)
    assert got["kl"]["transcoders"] > 0 and "kl_recovered" in got
    model, base, tokenizer, kind = splice.load_spliceable(llama_store.manifest["model"])
    ids, where = splice.store_contexts(llama_store, tokenizer, 4)
    layers = base.layers

    def by_hand(replace_j):  # the spliced pass, one hook pair per layer, written out
        seen: list = []
        handles = []
        for j, layer in enumerate(layers):
            handles.append(
                layer.post_attention_layernorm.register_forward_hook(
                    lambda m, i, o: seen.append(o[where])
                )
            )

            def hook(m, i, o, j=j):
                new = o.clone()
                new[where] = replace_j(j, seen)
                return new

            handles.append(layer.mlp.register_forward_hook(hook))
        try:
            return splice.model_output(model, kind, ids)
        finally:
            for h in handles:
                h.remove()

    def clt_output(j, seen):  # ŷ_j of the CLT from x_0 … x_j, its sum written out
        x = torch.cat(seen[-(j + 1) :], 1)
        x_n = x * sae.scale
        y = sae.b_dec[j * 32 : (j + 1) * 32].clone()
        for i in range(j + 1):
            w_enc = blocks(sae.W_enc, 32, 64, i, i)
            z = x_n[:, i * 32 : (i + 1) * 32] @ w_enc + sae.b_enc[i * 64 : (i + 1) * 64]
            theta = sae.threshold[i * 64 : (i + 1) * 64]
            a = z * (z > theta.clamp(min=0))
            y = y + a @ blocks(sae.W_dec, 64, 32, i, j)
        return y / sae.scale_out

    with torch.no_grad():
        out = by_hand(clt_output)
        clean = splice.model_output(model, kind, ids)
    ce = splice.context_losses(kind, out, clean, ids)["loss"].double().mean()
    assert float(ce) == pytest.approx(got["losses"]["transcoders"], rel=1e-5)
    assert len(layer_replacements(sae)) == L


def test_eval_reports_every_layer(trained, llama_store, tmp_path):
    from choicesae.evaluation.evaluate import EvalConfig, evaluate

    cfg = EvalConfig(run=str(trained[1]), store=str(llama_store.path), out=str(tmp_path))
    got = evaluate(dataclasses.replace(cfg, splice_contexts=4, max_tokens=512, report=False))
    assert len(got["layers"]["fvu"]) == L and "transcoders" in got["splice"]["losses"]
    # thresholds estimated again, on the whole rows of the run's own store
    again = evaluate(dataclasses.replace(cfg, calibrate=str(llama_store.path), report=False))
    assert again["thresholds"]["estimated_by"] == "eval" and len(again["layers"]["fvu"]) == L


# ---- feature sharding: 2 processes, each a slice of every layer's latents --------------------


def sharded_rows() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1024, L * D, generator=g)
    return x, (x * 2).tanh().cumsum(1)  # each output reads its own and earlier inputs


PER_LAYER = ("mutual_choice", "topk")  # what --per-layer selects within each block


def sharded_config(out, sparsifier: str, per_layer=False, **kw) -> TrainConfig:
    sae = SAEConfig(sparsifier, k=K, num_latents=L * F, layers=L, skip=True, per_layer=per_layer)
    return TrainConfig(
        out=str(out),
        transcoder=True,
        sae=sae,
        batch_size=64,
        steps=10,
        lr=1e-2,
        dead_tokens=128,
        density_tokens=256,
        k_aux=8,
        progress=False,
        **kw,
    )


def test_two_processes_equal_one(tmp_path):
    """--parallel features: rank r holds latents [r·L·F/2, (r+1)·L·F/2), a shard cutting across
    layer blocks, and the selections over all latents, the masks and the clipping stay the
    one-process ones. --parallel data with --per-layer: each layer's block selects over the
    global batch, as one process does."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    worker = Path(__file__).with_name("clt_sharded.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(worker.parent)}
    done = subprocess.run(
        [*cmd, "2", str(worker), str(tmp_path)], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr[-4000:]
    runs = [(s, s, False) for s in ("mutual_choice", "feature_choice", "topk")]
    runs += [(f"data-{s}", s, True) for s in PER_LAYER]
    for run, sparsifier, per_layer in runs:
        cfg = sharded_config(tmp_path / "one" / run, sparsifier, per_layer)
        single = train(cfg, sharded_rows())
        both = SAE.from_pretrained(tmp_path / run / "sae")
        for name, t in single.state_dict().items():
            torch.testing.assert_close(
                both.state_dict()[name], t, rtol=1e-4, atol=1e-5, equal_nan=True, msg=name
            )
