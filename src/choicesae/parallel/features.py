"""Feature sharding (`--parallel features` under torchrun): the latents split across ranks.

Every rank sees the whole batch x [B, d] and holds latents [r·F/W, (r+1)·F/W): W_enc's
columns, b_enc and W_dec's rows; b_dec and the [F] buffers (density, ranks, Zipf) are whole on
every rank. A step is the one-process step:

- z' [B, F/W] is local. TopK and Mutual Choice find the global threshold from gathered
  candidate values (each rank's top k per token [B, k], or its top k·B [k·B]); Feature
  Choice is local, a feature lives on one rank (capacities from the whole [F] ranking);
- ties at a threshold go to the earliest (token, feature) of the full z', the one-process
  order: within a token the lower rank first;
- x̂ = Σ_r z_r W_dec,r + b_dec: one all_reduce of [B, d] partial sums, the same x̂ and loss on
  every rank, so the sharded parameters' gradients are the global ones; b_dec's encoder-side
  gradient (a sum over the shards' uses) is all_reduced in the backward pass;
- firing counts are gathered to [F]. No rank ever holds the whole SAE on its device: each
  builds its shard (SAE(cfg, latents), the whole SAE's initial values), reads its slice of a
  checkpoint on --resume, and sends its shard to rank 0's CPU, which writes checkpoints and
  the SAE in the one-process layout, loadable at any world size.
"""

import torch
from torch import Tensor

from choicesae.core.sae import SAE
from choicesae.errors import ConfigError
from choicesae.parallel import comm
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

DIMS = {"W_enc": 1, "W_dec": 0, "b_enc": 0}  # the sharded parameters: their latent dim


def feature_sharded(cfg, world: World) -> bool:
    return world.size > 1 and cfg.parallel == "features"


def span(num_latents: int, world: World) -> slice:
    """This rank's latents [lo, hi)."""
    if num_latents % world.size:
        raise ConfigError(
            f"--parallel features: num_latents {num_latents} must be a multiple of the "
            f"{world.size} processes"
        )
    n = num_latents // world.size
    return slice(world.rank * n, (world.rank + 1) * n)


class _SumShards(torch.autograd.Function):
    """Forward: the sum over ranks of their partial sums. Backward: the identity, as every rank
    computes the same loss from the sum."""

    @staticmethod
    def forward(ctx, partial: Tensor) -> Tensor:
        return all_reduce(partial.clone(), "activations")

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


class _Replicated(torch.autograd.Function):
    """Forward: the identity on a tensor every rank holds. Backward: the sum of the ranks'
    gradients, each from its own shard's use."""

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:
        return t.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return all_reduce(grad.clone(), "gradients")


# ---- exact selection over the shards ---------------------------------------------------------


def _first_in_rows(mask: Tensor, count: Tensor) -> Tensor:
    """mask [B, f] with only the first count[b] true entries of each row b kept."""
    return first_true(mask.t(), count, 0).t()


def select_topk(z: Tensor, k: int, world: World) -> Pairs:
    """Each token's k largest affinities over all F latents; z [B, F/W]. Each rank's top k per
    token [B, k] holds its winners, so the gathered [W, B, k] give each token's threshold."""
    B, f = z.shape
    z = z.detach().float()
    candidates = z.new_full((B, k), float("-inf"))
    candidates[:, : min(k, f)] = z.topk(min(k, f), dim=1, sorted=False).values
    every = all_gather(candidates, "selection")  # [W, B, k]
    t = every.permute(1, 0, 2).reshape(B, -1).topk(k, dim=1).values[:, -1]  # [B]
    need = k - (every > t[:, None]).sum((0, 2))  # [B]
    take = ties_taken((every == t[:, None]).sum(2), need, world.rank)  # [B]
    return pairs_of((z > t[:, None]) | _first_in_rows(z == t[:, None], take))


def select_mutual_choice(z: Tensor, k: int, world: World) -> Pairs:
    """The M = k·B largest affinities of the batch over all F latents; z [B, F/W]. Ties at
    the threshold go in (token, rank) order: each rank's tie count per token is gathered.
    Non-positive winners are left out (zeros after ReLU), as in parallel/data.py."""
    B, f = z.shape
    M = min(k * B, B * f * world.size)
    z = z.detach().float()
    t, every = global_threshold(z, M)
    if t <= 0:  # fewer than M positive affinities: every positive one is selected
        return pairs_of(z > 0)
    need = M - (every > t).sum()
    ties = all_gather((z == t).sum(1).int(), "selection")  # [W, B]
    flat = ties.t().flatten()  # (token, rank) order
    before = (flat.cumsum(0) - flat).view(B, -1)[:, world.rank]  # [B]
    take = (need - before).clamp(min=0).minimum(ties[world.rank])
    return pairs_of((z > t) | _first_in_rows(z == t, take))


def select_feature_choice(z: Tensor, m: Tensor) -> Pairs:
    """Each of this rank's features keeps its m[i] largest tokens (ties: the earlier token);
    z [B, F/W], m [F/W] its slice of the global capacities. Nothing to exchange."""
    z = z.detach().float()
    m = m.to(z.device)
    if int(m.max()) == 0:  # every capacity of this rank's latents 0: nothing is selected
        return pairs_of(torch.zeros_like(z, dtype=torch.bool))
    ranked = z.topk(int(m.max()), dim=0).values  # [m_max, F/W], sorted
    t = ranked.gather(0, (m - 1).clamp(min=0)[None]).squeeze(0)  # [F/W]
    t = torch.where(m > 0, t, float("inf"))  # capacity 0: nothing is selected
    return pairs_of((z > t) | first_true(z == t, m - (z > t).sum(0), 0))


SHARDED = {  # each sparsifier's selection over all latents from this rank's z' [B, F/W]
    "topk": lambda z, k, m, world: select_topk(z, k, world),
    "mutual_choice": lambda z, k, m, world: select_mutual_choice(z, k, world),
    "feature_choice": lambda z, k, m, world: select_feature_choice(z, m),
    "relu": None,  # per entry: the local one
}


class FeatureSharded(Local):
    """The ops' backend for feature sharding: every rank takes the whole batch and its latents;
    selections over all latents, x̂ summed over the shards (so every rank holds the whole
    SAE's loss), b_dec's encoder-side gradient summed in the backward pass."""

    feature_major = False
    dense_only = ("relu",)  # no sparse form over the shards: relu steps densely

    def __init__(self, world: World, num_latents: int):
        self.world, self.latents = world, span(num_latents, world)

    def capacities(self, sae, batch_size: int, k: int) -> Tensor:
        """This rank's slice of the whole [F] ranking's capacities."""
        return sae.capacities(batch_size, k)[self.latents]

    def select(self, name: str, z: Tensor, k: int, m: Tensor | None) -> Pairs | None:
        if name not in SHARDED:
            raise ConfigError(f"sparsifier {name!r} has no selection over sharded latents")
        form = SHARDED[name]
        return None if form is None else form(z, k, m, self.world)

    def select_masked(self, z: Tensor, mask: Tensor, k_aux: int, rows: slice) -> Pairs:
        """Each token's top k_aux latents among mask [F] (whole on every rank, not empty), for
        the tokens `rows`; z [B, F/W]."""
        masked = z.detach()[rows].masked_fill(~mask[self.latents], float("-inf"))
        chosen = select_topk(masked, min(k_aux, int(mask.sum())), self.world)
        return kernels.at_rows(chosen, rows, len(z))

    def replicated(self, t: Tensor) -> Tensor:
        return _Replicated.apply(t)

    def sum_shards(self, t: Tensor) -> Tensor:
        return _SumShards.apply(t)

    def reduce(self, sae, result, x: Tensor, fired: Tensor, cfg) -> tuple:
        """The one-process reduction (the loss is the global one on every rank) with the
        firing counts fired [F/W] gathered to [F]."""
        fired = all_gather(fired, "stats").flatten()  # [F]
        return super().reduce(sae, result, x, fired, cfg)

    @torch.no_grad()
    def clip_grad_norm_(self, sae, max_norm: float) -> None:
        """torch.nn.utils.clip_grad_norm_ with the norm of the whole SAE's gradient."""
        sq = torch.stack([getattr(sae, name).grad.pow(2).sum() for name in DIMS]).sum()
        whole = [p.grad.pow(2).sum() for p in (sae.b_dec, sae.W_skip) if p is not None]
        sq = all_reduce(sq, "stats") + sum(whole)  # the replicated ones, once
        coef = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
        for p in sae.parameters():
            p.grad.mul_(coef)


# ---- slicing and gathering the state ----------------------------------------------------------


def _names(sae, optimizer) -> list[str]:
    """The parameter name of each index in optimizer.state_dict()."""
    by_id = {id(p): name for name, p in sae.named_parameters()}
    return [by_id[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _map_state(state: dict, names: list[str], fn) -> dict:
    """A copy of an optimizer state_dict with fn(tensor, dim) applied to the per-element
    state (exp_avg, ...) of the sharded parameters."""
    per_param = {
        i: {
            key: fn(t, DIMS[names[i]]) if names[i] in DIMS and t.dim() else t
            for key, t in entry.items()
        }
        for i, entry in state["state"].items()
    }
    return {**state, "state": per_param}


def local_state(model: dict, moments: dict, sae, optimizer, world: World) -> tuple[dict, dict]:
    """This rank's slices of a whole SAE's state_dict `model` and its optimizer's state_dict
    `moments` (a checkpoint's, memory-mapped: only the slices are read), for the shards `sae`
    and `optimizer`."""
    s = span(sae.cfg.num_latents, world)

    def cut(t: Tensor, dim: int) -> Tensor:
        return t.narrow(dim, s.start, s.stop - s.start).clone()

    model = {name: cut(t, DIMS[name]) if name in DIMS else t for name, t in model.items()}
    return model, _map_state(moments, _names(sae, optimizer), cut)


def full_state(sae, world: World) -> dict[str, Tensor] | None:
    """The whole SAE's state_dict, on rank 0's CPU (None elsewhere; every rank must call it)."""
    state = {
        name: (comm.gather_to_main(t, DIMS[name], world, "checkpoint") if name in DIMS else t.cpu())
        for name, t in sae.state_dict().items()
    }
    return state if world.main else None


def full_optimizer_state(sae, optimizer, world: World) -> dict | None:
    """The optimizer state_dict one process would hold, on rank 0, the sharded parameters'
    moments on its CPU (None elsewhere; every rank must call it)."""

    def gather(t: Tensor, dim: int) -> Tensor | None:
        return comm.gather_to_main(t, dim, world, "checkpoint")

    state = _map_state(optimizer.state_dict(), _names(sae, optimizer), gather)
    return state if world.main else None


def whole(sae, world: World):
    """On rank 0 the whole SAE, on its CPU (it may not fit one device), gathered from the
    shards; on the other ranks their shard `sae`. Every rank must call it."""
    state = full_state(sae, world)
    if not world.main:
        return sae
    with torch.device("meta"):  # no weights drawn or allocated: the gathered ones are assigned
        out = SAE(sae.cfg)
    out.load_state_dict(state, assign=True)
    return out
