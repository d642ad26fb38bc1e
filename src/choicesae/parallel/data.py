"""Data-parallel training on several processes (torchrun, torch.distributed).

Every rank holds the same SAE and a contiguous slice of the global batch of B tokens (B/W
rows each, W ranks). The step is the one-process step on the concatenated batch:

- selection is global. Token Choice is per token: nothing to exchange. Mutual Choice (the
  k·B largest affinities of the batch) and Feature Choice (feature i's m_i largest tokens)
  exchange *candidate values*, never activations: each rank sends the values that could be
  global winners (its own top k·B, or its top m_max per feature), every rank finds the same
  global threshold from them and keeps its entries above it;
- ties at a threshold go to the earliest (rank, token, feature), the row-major order of the
  concatenated batch, so the selection is deterministic and independent of the world size;
- the loss of the global batch is a sum over ranks of local contributions (`contributions`),
  so summing the gradients (one all_reduce) gives the one-process gradient;
- firing counts are summed the same way, so densities, dead and dying features are global.

`--distributed-selection local` selects on each rank's own slice instead (the budget k·B/W
per rank), with the gradients and counts still summed.
"""

from functools import partial

import torch
from torch import Tensor

from choicesae.core.losses import aux_rows
from choicesae.errors import ConfigError
from choicesae.parallel.comm import (
    World,
    all_gather,
    all_reduce,
    first_true,
    global_threshold,
    pairs_of,
    ties_taken,
)
from choicesae.step import kernels
from choicesae.step.kernels import Pairs
from choicesae.step.ops import Local


def select_mutual_choice(z_pre: Tensor, k: int, world: World) -> Pairs:
    """This rank's share of the M = k·B largest affinities of the global batch; z_pre
    [B/W, F]. Each rank's top M holds all its global winners, so the M-th largest of the
    gathered candidates [W, M] is the global threshold t. Non-positive winners are zeros
    after ReLU (appendix H) and are left out, as kernels.select_mutual_choice does."""
    b, F = z_pre.shape
    M = min(k * b * world.size, b * world.size * F)
    z = z_pre.detach().float()
    t, every = global_threshold(z, M)
    if t <= 0:  # fewer than M positive affinities: every positive one is selected
        return pairs_of(z > 0)
    need = M - (every > t).sum()
    take = ties_taken((every == t).sum(1), need, world.rank)
    return pairs_of((z > t) | first_true(z == t, take, None))


def select_feature_choice(z_pre: Tensor, m: Tensor, world: World) -> Pairs:
    """This rank's share of each feature's m[i] largest affinities over the global batch;
    z_pre [B/W, F], m [F] the capacities of the global batch. Each rank's top m_max per
    feature holds all its winners, so the gathered candidates [W, m_max, F] give every
    feature's global threshold t [F]. Non-positive winners stay (zero activations), as in
    kernels.select_feature_choice."""
    b, F = z_pre.shape
    m = m.to(z_pre.device)
    m_max = int(m.max())
    if m_max > b * world.size:
        raise ConfigError(
            f"feature_choice capacity {m_max} exceeds the batch size {b * world.size}"
        )
    z = z_pre.detach().float()
    if m_max == 0:  # every capacity 0 (the same m on every rank): nothing is selected
        return pairs_of(torch.zeros_like(z, dtype=torch.bool))
    candidates = z.new_full((m_max, F), float("-inf"))
    n = min(m_max, b)
    candidates[:n] = z.topk(n, dim=0, sorted=False).values
    every = all_gather(candidates, "selection")  # [W, m_max, F]
    ranked = every.flatten(0, 1).topk(m_max, dim=0).values  # [m_max, F], sorted
    t = ranked.gather(0, (m - 1).clamp(min=0)[None]).squeeze(0)  # [F] m_i-th largest
    t = torch.where(m > 0, t, float("inf"))  # capacity 0: nothing is selected
    need = m - (every > t).sum((0, 1))  # [F]
    take = ties_taken((every == t).sum(1), need, world.rank)  # [F]
    return pairs_of((z > t) | first_true(z == t, take, 0))


GLOBAL = {  # each sparsifier's selection over the global batch; None: the local one is it
    "topk": None,  # per token
    "mutual_choice": lambda z_pre, k, m, world: select_mutual_choice(z_pre, k, world),
    "feature_choice": lambda z_pre, k, m, world: select_feature_choice(z_pre, m, world),
    "relu": None,  # per entry
}


class DataParallel(Local):
    """The ops' backend for data parallel: this rank's slice of every batch, selections over
    the global batch (the local ones under --distributed-selection local), and the loss,
    gradients and counts summed over ranks by `reduce`."""

    def __init__(self, world: World, global_selection: bool = True, layers: int = 1):
        """`layers` > 1: select within each of a per-layer CLT's layer blocks (per_layer)."""
        self.world, self.global_selection, self.layers = world, global_selection, layers

    def capacities(self, sae, batch_size: int, k: int) -> Tensor:
        """Feature Choice's capacities for the batch the selection spans."""
        size = self.world.size if self.global_selection else 1
        return sae.capacities(batch_size * size, k)

    def select(self, name: str, z_pre: Tensor, k: int, m: Tensor | None) -> Pairs | None:
        if not self.global_selection:
            return None
        if name not in GLOBAL:
            raise ConfigError(f"sparsifier {name!r} has no selection over the global batch")
        form = GLOBAL[name]
        if form is None:
            return None
        index = partial(form, world=self.world)
        return (kernels.per_layer(index, self.layers) if self.layers > 1 else index)(z_pre, k, m)

    def reduce(self, sae, result, y: Tensor, fired: Tensor, cfg):
        return reduce_step(sae, result, y, self.world, fired, aux_rows(sae.cfg.k, cfg.k_aux))


# ---- the global loss, gradients and statistics -----------------------------------------------

RATIOS = ("aux_k", "aux_zipf")  # |e − ê|² / |e|²: ratios of sums over the batch


def contributions(
    terms: dict[str, Tensor], x: Tensor, x_hat: Tensor, world: World, rows: slice
) -> dict:
    """Each loss term's share held by this rank, so that the global batch's term is the sum of
    the shares over ranks. Token means (mse, mse_4k, l1) weigh 1/W (the slices are equal); the
    aux losses divide the local |e − ê|² by the global |e|² (e = x − x̂ at the aux losses'
    `rows`, detached as in the step); terms of the weights alone (nfm) are counted once, 1/W
    on each rank."""
    shares = {name: term / world.size for name, term in terms.items() if name not in RATIOS}
    if any(name in RATIOS for name in terms):
        local = (x - x_hat).detach()[rows].pow(2).sum()
        total = all_reduce(local.clone(), "stats")
        scale = local.clamp_min(1e-12) / total.clamp_min(1e-12)  # undo the local denominator
        shares |= {name: terms[name] * scale for name in RATIOS if name in terms}
    return shares


def reduce_step(sae, result, x: Tensor, world: World, fired: Tensor, rows: slice):
    """Backward through this rank's shares, then sum over ranks the gradients (one flat
    all_reduce) and the statistics: the loss terms, firing counts fired [F] and the sums the
    FVU needs (`rows`: the tokens the aux losses read; x: the targets, a transcoder's other
    hookpoint). Returns the global StepOut, fired
    counts [F] and metrics."""
    shares = contributions(result.terms, x, result.x_hat, world, rows)
    sum(shares.values()).backward()
    params = list(sae.parameters())
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    flat = all_reduce(torch.cat([g.flatten() for g in grads]), "gradients")
    for p, g in zip(params, flat.split([p.numel() for p in params]), strict=True):
        p.grad = g.view_as(p).clone()
    with torch.no_grad():
        err = (result.x_hat - x).double().pow(2).sum()
        x64 = x.double()
        local = [torch.stack([s.detach().double() for s in shares.values()]), fired.double()]
        local += [torch.stack([err, x64.pow(2).sum()]), x64.sum(0)]
        stats = all_reduce(torch.cat(local), "stats")
    n = len(shares)
    terms = dict(zip(shares, stats[:n].float(), strict=True))
    fired = stats[n : n + len(fired)].round().long()
    err, sq, total = stats[n + len(fired)], stats[n + len(fired) + 1], stats[n + len(fired) + 2 :]
    B = x.shape[0] * world.size
    variance = (sq - total.pow(2).sum() / B).clamp_min(1e-12)  # Σ|x − mean(x)|² of the batch
    metrics = {"fvu": (err / variance).float(), "l0": fired.sum() / B}
    return result._replace(loss=sum(terms.values()), terms=terms), fired, metrics
