"""A cross-layer transcoder (SAEConfig.layers = L > 1) measured layer by layer: the FVU of each
layer's MLP output, and how its default codes spread the budget over depth (L0 and dead
latents per layer); and the downstream losses with every MLP of its layers replaced by its
output in one forward pass, target j's replacement read from the inputs of layers <= j of that
same, already spliced, pass (the replacement model of attribution graphs)."""

import functools

import torch
from torch import Tensor

from choicesae.core.preprocess import denormalize, normalize
from choicesae.core.sae import SAE
from choicesae.data.store import Store, names
from choicesae.errors import ConfigError
from choicesae.evaluation import splice


@torch.no_grad()
def layer_metrics(sae: SAE, rows: Tensor, batch_size: int) -> dict:
    """Per layer, of the default codes of held-out raw rows [N, L·d_in + L·d_out] encoded
    `batch_size` at a time: the FVU of its MLP output (raw space), the mean active latents of
    its block (the share of the budget it gets) and its latents that never fired."""
    L = sae.cfg.layers
    x, y = sae.split(rows)
    sse = torch.zeros(L, dtype=torch.float64, device=x.device)
    counts = torch.zeros(sae.cfg.num_latents, dtype=torch.long, device=x.device)
    for start in range(0, len(x), batch_size):
        b = slice(start, start + batch_size)
        x_n, _ = normalize(x[b], sae.cfg.normalize, sae.scale)
        acts = sae.encode(x_n).acts  # [B, L·F]
        y_hat = denormalize(sae.decode(acts, x_n), sae.output_stats(x[b]))  # [B, L·d_out]
        sse += (y_hat - y[b]).double().pow(2).view(len(y_hat), L, -1).sum((0, 2))
        counts += (acts != 0).sum(0)
    y = y.double().view(len(y), L, -1)
    variance = (y - y.mean(0)).pow(2).sum((0, 2))
    per_layer = counts.view(L, -1)
    return {
        "fvu": (sse / variance.clamp_min(1e-12)).tolist(),
        "l0": (per_layer.sum(1).double() / len(x)).tolist(),
        "dead": (per_layer == 0).sum(1).tolist(),
    }


def layer_replacements(sae: SAE) -> list[splice.Replace]:
    """One replacement per layer j, called in layer order within a forward pass with the
    rows x_j of layer j's input: ŷ_j = Σ_{i<=j} a_i W_dec_{i→j} + b_dec_j (+ x_j W_skip_j),
    the default codes a_i of the inputs x_0 … x_j recorded so far in the pass. The later
    layers' inputs are left zero, which changes nothing in ŷ_j: latent block i reads x_i
    alone and writes no output below layer i, and a latent's default code reads no other
    layer (SAE.default_threshold), with one dataset scale for every layer."""
    L = sae.cfg.layers
    d_in, d_out = sae.cfg.d_in // L, sae.cfg.d_out // L
    seen: list[Tensor] = []  # x_0 … x_{j-1} of this pass

    def replace(j: int, x_j: Tensor) -> Tensor:  # [n, d_in] -> [n, d_out]
        if j == 0:
            seen.clear()
        if len(seen) != j:
            raise ConfigError(f"layer {j} of the cross-layer transcoder ran out of order")
        seen.append(x_j)
        x = torch.cat([*seen, x_j.new_zeros(len(x_j), d_in * (L - 1 - j))], 1)
        return sae.reconstruct(x)[:, j * d_out : (j + 1) * d_out]

    return [functools.partial(replace, j) for j in range(L)]


def splice_metrics(sae: SAE, store: Store, contexts: int, batch_size: int) -> dict:
    """Downstream losses (splice.replaced_set) on the store's first `contexts` contexts with
    every MLP output of the CLT's layers replaced by its prediction (`layer_replacements`),
    against zero and mean ablation of every one of them. `store`: a held-out harvest of the
    CLT's hookpoints and targets, whole rows."""
    device = sae.W_enc.device
    y_mean = sae.split(store[: min(len(store), 65_536)].to(device))[1].mean(0)  # [L·d_out]
    sites = zip(
        names(sae.cfg.target),
        names(sae.cfg.hookpoint),
        layer_replacements(sae),
        y_mean.chunk(sae.cfg.layers),
        strict=True,
    )
    return splice.replaced_set(store, list(sites), contexts, batch_size, device)
