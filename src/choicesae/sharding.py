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

from choicesae import distributed, kernels
from choicesae.distributed import (
    World,
    _first,
    _pairs,
    _ties_taken,
    all_gather,
    all_reduce,
    dense_acts,
    global_threshold,
)
from choicesae.errors import ConfigError
from choicesae.kernels import AUX, Pairs
from choicesae.losses import aux_rows, fvu, l1, mse
from choicesae.sae import SAE

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


def pre_acts(sae, x: Tensor) -> Tensor:
    """This rank's affinities z' [B, F/W] of x [B, d] (SAE.pre_acts on the shard)."""
    return _Replicated.apply(x - sae.b_dec) @ sae.W_enc + sae.b_enc


def decode(sae, acts: Tensor, bias: bool = True) -> Tensor:
    """x̂ [B, d] of the whole SAE from this rank's activations acts [B, F/W]."""
    x_hat = _SumShards.apply(acts @ sae.W_dec)
    return x_hat + sae.b_dec if bias else x_hat


# ---- exact selection over the shards ---------------------------------------------------------


def _first_in_rows(mask: Tensor, count: Tensor) -> Tensor:
    """mask [B, f] with only the first count[b] true entries of each row b kept."""
    return _first(mask.t(), count, 0).t()


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
    take = _ties_taken((every == t[:, None]).sum(2), need, world.rank)  # [B]
    return _pairs((z > t[:, None]) | _first_in_rows(z == t[:, None], take))


def select_mutual_choice(z: Tensor, k: int, world: World) -> Pairs:
    """The M = k·B largest affinities of the batch over all F latents; z [B, F/W]. Ties at
    the threshold go in (token, rank) order: each rank's tie count per token is gathered.
    Non-positive winners are left out (zeros after ReLU), as in distributed.py."""
    B, f = z.shape
    M = min(k * B, B * f * world.size)
    z = z.detach().float()
    t, every = global_threshold(z, M)
    if t <= 0:  # fewer than M positive affinities: every positive one is selected
        return _pairs(z > 0)
    need = M - (every > t).sum()
    ties = all_gather((z == t).sum(1).int(), "selection")  # [W, B]
    flat = ties.t().flatten()  # (token, rank) order
    before = (flat.cumsum(0) - flat).view(B, -1)[:, world.rank]  # [B]
    take = (need - before).clamp(min=0).minimum(ties[world.rank])
    return _pairs((z > t) | _first_in_rows(z == t, take))


def select_feature_choice(z: Tensor, m: Tensor) -> Pairs:
    """Each of this rank's features keeps its m[i] largest tokens (ties: the earlier token);
    z [B, F/W], m [F/W] its slice of the global capacities. Nothing to exchange."""
    z = z.detach().float()
    m = m.to(z.device)
    ranked = z.topk(int(m.max()), dim=0).values  # [m_max, F/W], sorted
    t = ranked.gather(0, (m - 1).clamp(min=0)[None]).squeeze(0)  # [F/W]
    t = torch.where(m > 0, t, float("inf"))  # capacity 0: nothing is selected
    return _pairs((z > t) | _first(z == t, m - (z > t).sum(0), 0))


def select(name: str, z: Tensor, k: int, m: Tensor | None, world: World) -> Pairs:
    """kernels.select over the whole SAE from this rank's z [B, F/W]; m [F/W] (feature_choice)."""
    if name == "topk":
        return select_topk(z, k, world)
    if name == "mutual_choice":
        return select_mutual_choice(z, k, world)
    if name == "feature_choice" and m is not None:
        return select_feature_choice(z, m)
    raise ConfigError(f"no sharded selection for sparsifier {name!r} (m given: {m is not None})")


# ---- the step ---------------------------------------------------------------------------------


def select_code(sae, name: str, z: Tensor, k: int, world: World) -> Pairs:
    """The code of sparsifier `name` (not relu) over the whole SAE from this rank's z [B, F/W];
    Feature Choice's capacities come from the whole [F] ranking, then this rank's slice."""
    m = None
    if name == "feature_choice":
        m = sae.capacities(z.shape[0], k)[span(sae.cfg.num_latents, world)]
    return select(name, z.detach(), k, m, world)


def select_masked_topk(
    z: Tensor, mask: Tensor, k_aux: int, rows: slice, world: World
) -> Pairs | None:
    """kernels.select_masked_topk over the shards: each token's top k_aux latents among mask
    [F] (whole on every rank), for the tokens `rows`; z [B, F/W]. None when the mask is
    empty."""
    count = int(mask.sum())
    if count == 0:
        return None
    masked = z.detach()[rows].masked_fill(~mask[span(len(mask), world)], float("-inf"))
    return kernels.at_rows(select_topk(masked, min(k_aux, count), world), rows, len(z))


def _unexplained(residual: Tensor, e_hat: Tensor, rows: slice) -> Tensor:
    """losses.aux_k's |e − ê|² / |e|² over the tokens `rows` of the residual e [B, d] and its
    reconstruction ê."""
    e, e_hat = residual[rows], e_hat[rows]
    return (e - e_hat).pow(2).sum() / e.pow(2).sum().clamp_min(1e-12)


def sparse_acts(sae, name: str, z: Tensor, k: int, world: World) -> Tensor:
    """This rank's activations [B, F/W] of sparsifier `name` over the whole SAE."""
    if name == "relu":
        return z.relu()
    return dense_acts(z, select_code(sae, name, z, k, world))


def aux_loss(sae, z: Tensor, mask: Tensor, residual: Tensor, k_aux: int, world: World) -> Tensor:
    """losses.aux_k over the shards: each token's top-k_aux latents among mask [F] (whole on
    every rank) reconstruct the residual [B, d] at the tokens losses.aux_rows; z [B, F/W]."""
    rows = aux_rows(sae.cfg.k, k_aux)
    pairs = select_masked_topk(z, mask, k_aux, rows, world)
    if pairs is None:
        return z.new_zeros(())
    return _unexplained(residual, decode(sae, dense_acts(z, pairs), bias=False), rows)


def loss_terms(sae, x: Tensor, cfg, sparsifier: str, masks, step: int, world: World):
    """train.loss_terms with the latents sharded; x [B, d] the whole batch. The terms and x̂
    are the whole SAE's (the same on every rank); acts [B, F/W] are this rank's."""
    from choicesae.train import StepOut  # train imports this module

    k = sae.cfg.k
    z = pre_acts(sae, x)  # [B, F/W]
    acts = sparse_acts(sae, sparsifier, z, k, world)
    x_hat = decode(sae, acts)
    terms = {"mse": mse(x_hat, x)}
    if cfg.multi_topk:  # Gao et al. 5.3.1: L(k) + L(4k)/8
        terms["mse_4k"] = mse(decode(sae, sparse_acts(sae, sparsifier, z, 4 * k, world)), x) / 8
    if sparsifier == "relu":  # a sum over latents: the shards' sums add up
        terms["l1"] = cfg.l1_coeff * _SumShards.apply(l1(acts, sae.W_dec))
    elif sparsifier != "feature_choice":  # section 4.4: Feature Choice trains without them
        residual = (x - x_hat).detach()
        for name, (coeff, mask) in AUX.items():
            if getattr(cfg, coeff):
                aux = aux_loss(sae, z, getattr(masks, mask), residual, cfg.k_aux, world)
                terms[name] = getattr(cfg, coeff) * aux
    return StepOut(sum(terms.values()), terms, acts, x_hat)


def selections(sae, z: Tensor, cfg, sparsifier: str, masks, world: World) -> dict[str, Pairs]:
    """kernels.selections over the shards from this rank's z [B, F/W]: the code, the
    Multi-TopK code and the latents of each aux loss whose mask is not empty."""
    k = sae.cfg.k
    pairs = {"mse": select_code(sae, sparsifier, z, k, world)}
    if cfg.multi_topk:  # Gao et al. 5.3.1: L(k) + L(4k)/8
        pairs["mse_4k"] = select_code(sae, sparsifier, z, 4 * k, world)
    for name, (coeff, mask) in AUX.items():
        if getattr(cfg, coeff) and sparsifier != "feature_choice":  # section 4.4
            rows = aux_rows(k, cfg.k_aux)
            chosen = select_masked_topk(z, getattr(masks, mask), cfg.k_aux, rows, world)
            if chosen is not None:
                pairs[name] = chosen
    return pairs


def fast_loss_terms(sae, x: Tensor, cfg, sparsifier: str, masks, step: int, world: World):
    """kernels.fast_loss_terms with the latents sharded: this rank's pairs go through the
    sparse encoder backward (b_dec's gradient summed over the shards) and the sparse decoder,
    whose partial sums are reduced as in `decode`. relu has no sparse form: `loss_terms`."""
    from choicesae.train import StepOut  # train imports this module

    if sparsifier == "relu":
        return loss_terms(sae, x, cfg, sparsifier, masks, step, world)
    z = kernels.pre_acts(sae, x)  # [B, F/W], no autograd
    pairs = selections(sae, z, cfg, sparsifier, masks, world)
    b_dec = _Replicated.apply(sae.b_dec)  # the encoder's use of b_dec, one per shard
    values = kernels.encode_pairs(sae, x, z, kernels.concat(list(pairs.values())), b_dec)
    acts = kernels.split(values.relu(), pairs)  # [n_i] this rank's activations per selection
    decoded = {  # [B, d] each: the whole SAE's product, no bias
        name: _SumShards.apply(kernels.decode_pairs(p, acts[name], sae.W_dec))
        for name, p in pairs.items()
    }
    x_hat = decoded["mse"] + sae.b_dec
    terms = {"mse": mse(x_hat, x)}
    if cfg.multi_topk:
        terms["mse_4k"] = mse(decoded["mse_4k"] + sae.b_dec, x) / 8
    residual = (x - x_hat).detach()  # the aux losses only move the latents they select
    for name, (coeff, _) in AUX.items():
        if getattr(cfg, coeff) and sparsifier != "feature_choice":  # empty mask: zero
            aux = x.new_zeros(())
            if name in decoded:
                aux = _unexplained(residual, decoded[name], aux_rows(sae.cfg.k, cfg.k_aux))
            terms[name] = getattr(cfg, coeff) * aux
    return StepOut(
        sum(terms.values()), terms, kernels.sparse_acts(pairs["mse"], acts["mse"]), x_hat
    )


def reduce_step(result, x: Tensor, world: World, fired: Tensor):
    """Backward (the loss is the global one on every rank), firing counts fired [F/W] gathered
    to [F]; returns the StepOut, fired [F] and the batch's metrics."""
    result.loss.backward()
    fired = all_gather(fired, "stats").flatten()  # [F]
    with torch.no_grad():
        metrics = {"fvu": fvu(result.x_hat, x), "l0": fired.sum() / x.shape[0]}
    return result, fired, metrics


@torch.no_grad()
def clip_grad_norm_(sae, max_norm: float) -> None:
    """torch.nn.utils.clip_grad_norm_ with the norm of the whole SAE's gradient."""
    sq = torch.stack([getattr(sae, name).grad.pow(2).sum() for name in DIMS]).sum()
    sq = all_reduce(sq, "stats") + sae.b_dec.grad.pow(2).sum()
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
        name: (
            distributed.gather_to_main(t, DIMS[name], world, "checkpoint")
            if name in DIMS
            else t.cpu()
        )
        for name, t in sae.state_dict().items()
    }
    return state if world.main else None


def full_optimizer_state(sae, optimizer, world: World) -> dict | None:
    """The optimizer state_dict one process would hold, on rank 0, the sharded parameters'
    moments on its CPU (None elsewhere; every rank must call it)."""

    def gather(t: Tensor, dim: int) -> Tensor | None:
        return distributed.gather_to_main(t, dim, world, "checkpoint")

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
