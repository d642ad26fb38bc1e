"""Metrics of a trained SAE on held-out activations, as pure functions of tensors.

One pass encodes rows [N, d_in] a batch at a time with a selection rule (the model's batch
sparsifier, test-time TopK(k'), JumpReLU(θ)) and measures L0, MSE and FVU over all N rows:
FVU = Σ|y − ŷ|² / Σ|y − mean(y)|², the mean taken over the whole held-out set, where the
target y is the input x for an SAE and the target hookpoint's output for a transcoder (rows
[N, d_in + d_out]); L0 and the firing counts are of the codes of x either way.
"""

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from choicesae.core.allocation import dying_features, fit_zipf, middle_segment, rank_order
from choicesae.core.preprocess import Stats, denormalize
from choicesae.core.sae import SAE

Select = Callable[[Tensor], Tensor]  # affinities z' [B, F] -> activations [B, F]


class Pass(NamedTuple):
    """What one encoding pass over N held-out rows measured."""

    l0: Tensor  # [N] active features per token
    counts: Tensor  # [F] tokens each feature fired on
    mse: float  # mean over tokens of |y − ŷ|², normalized space (the training loss term)
    fvu: float  # normalized space, as training logs it
    fvu_raw: float  # in the model's own activation space

    def summary(self) -> dict:
        return {
            "l0": float(self.l0.float().mean()),
            "mse": self.mse,
            "fvu": self.fvu,
            "fvu_raw": self.fvu_raw,
        }


def variance(x: Tensor) -> float:
    """Σ|x − mean(x)|² over rows x [N, d], in float64."""
    x = x.double()
    return float((x - x.mean(0)).pow(2).sum())


def _slice(stats: Stats, rows: slice) -> Stats:
    """The normalisation stats of `rows` (per-token stats are [N, 1], dataset ones scalars)."""
    return Stats(*(t[rows] if t.ndim else t for t in stats))


@torch.no_grad()
def sae_pass(sae: SAE, rows: Tensor, batch_size: int, select: Select) -> Pass:
    """Encode raw rows [N, d_in (+ d_out)] `batch_size` rows at a time with `select`, decode,
    and measure the reconstruction of the target (sae.split: x itself for an SAE)."""
    x, y = sae.split(rows)
    x_n, y_n = sae.prepare(rows)
    stats = sae.output_stats(x)
    l0, counts = [], torch.zeros(sae.cfg.num_latents, dtype=torch.long, device=x.device)
    sse = sse_raw = 0.0
    for start in range(0, len(x), batch_size):
        b = slice(start, start + batch_size)
        acts = select(sae.pre_acts(x_n[b]))  # [B, F]
        y_hat = sae.decode(acts, x_n[b])  # [B, d_target]
        sse += float((y_hat - y_n[b]).double().pow(2).sum())
        y_hat_raw = denormalize(y_hat, _slice(stats, b))
        sse_raw += float((y_hat_raw - y[b]).double().pow(2).sum())
        fired = acts != 0
        l0.append(fired.sum(-1))
        counts += fired.sum(0)
    N = len(x)
    return Pass(torch.cat(l0), counts, sse / N, sse / variance(y_n), sse_raw / variance(y))


def density_agreement(reference: Tensor, other: Tensor, tokens: int) -> dict:
    """How closely per-feature densities from `other` counts [F] follow `reference` [F]:
    Pearson correlation, and the mean |Δdensity| relative to the mean density."""
    a, b = reference.double() / tokens, other.double() / tokens
    corr = float(torch.corrcoef(torch.stack([a, b]))[0, 1]) if a.std() and b.std() else 1.0
    return {"density_corr": corr, "density_rel_error": float((a - b).abs().mean() / a.mean())}


def allocation_metrics(counts: Tensor, tokens: int, alpha: float | None = None) -> dict:
    """Dead features (never fired on the held-out rows), the Zipf fits (all ranks; the middle
    segment, figure 3) with α fixed to `alpha` as in training (None fits it too: on the whole
    range, the under-used tail then drives α to implausible values), and dying features against
    the middle fit (Def. 3.1)."""
    density = counts.double() / tokens
    ordered = density[rank_order(density)]
    full = fit_zipf(ordered, alpha)
    middle = fit_zipf(ordered, alpha, middle_segment(len(density)))
    dying = dying_features(density, middle)
    return {
        "dead": int((counts == 0).sum()),
        "dead_pct": 100 * float((counts == 0).double().mean()),
        "dying": int(dying.sum()),
        "zipf": full._asdict(),
        "zipf_middle": middle._asdict(),
        "density_sorted": ordered.tolist(),
    }


def features_per_token(l0: Tensor, first: Tensor) -> dict:
    """The distribution of active features per token (appendix D), with the first (BOS/CLS)
    token of each context counted apart: l0 [N], first [N] bool."""
    l0_np, first_np = l0.cpu().numpy(), first.cpu().numpy()
    width = int(l0_np.max()) + 1 if len(l0_np) else 1
    return {
        "histogram": np.bincount(l0_np[~first_np], minlength=width).tolist(),
        "histogram_first": np.bincount(l0_np[first_np], minlength=width).tolist(),
        "first_tokens": int(first_np.sum()),
        "first_token_l0": float(l0_np[first_np].mean()) if first_np.any() else None,
        "other_l0": float(l0_np[~first_np].mean()) if (~first_np).any() else None,
    }
