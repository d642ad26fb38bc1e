"""JumpReLU thresholds for single-token inference with batch-trained SAEs (paper, appendix B).

Mutual and Feature Choice select within a batch, so one token alone has no batch to compete
in. Appendix B imputes a threshold and swaps the sparsifier for JumpReLU, z = z'·1(z' > θ):

- global θ (BatchTopK, as SAELens and dictionary_learning estimate it): the mean over batches
  of the smallest activation the batch sparsifier selected;
- per-feature θ_i: the value that makes feature i fire, token by token, on exactly as many
  calibration tokens as batch inference selects it for, so that single-token inference keeps
  every feature's density, and hence the L0 (= Σ_i density_i), of batch inference.

Both live on z' of normalized inputs (a transcoder's too: its codes read its input hookpoint,
whatever it predicts), in the SAE's buffers `threshold_global` [] and
`threshold` [F]; `sae.encode(x, threshold="feature" | "global")` uses them. The functions here
take normalized batches; `evaluate.calibrate_thresholds_` fits them on raw activations (an
array, tensor or store), and `choicesae eval` calls it.
"""

import torch
from torch import Tensor

from choicesae.core.sae import SAE
from choicesae.errors import DataError


@torch.no_grad()
def global_threshold(sae: SAE, batches: list[Tensor]) -> float:
    """Mean over batches [B, d_in] (normalized) of the smallest selected activation."""
    smallest = []
    for x in batches:
        acts = sae.encode(x).acts  # [B, F]
        selected = acts[acts > 0]
        if selected.numel():
            smallest.append(selected.min().double())
    if not smallest:
        raise DataError("the SAE selected no feature on the calibration data: no threshold")
    return float(torch.stack(smallest).mean())


@torch.no_grad()
def fire_counts(sae: SAE, batches: list[Tensor]) -> Tensor:
    """[F] tokens each feature is selected for by batch inference over `batches`."""
    return sum((sae.encode(x).acts > 0).sum(0) for x in batches)


@torch.no_grad()
def feature_thresholds(sae: SAE, x: Tensor, counts: Tensor, chunk: int = 512) -> Tensor:
    """[F] θ_i such that exactly counts[i] of the tokens x [N, d_in] (normalized) have
    z'_i > θ_i (ties aside): the (counts[i]+1)-th largest z'_i, floored at 0 as ReLU is.
    A feature never selected gets its largest z' (it then never fires on these tokens)."""
    N, F = x.shape[0], sae.cfg.num_latents
    centred = sae.centred(x)
    theta = torch.empty(F, dtype=x.dtype, device=x.device)
    for start in range(0, F, chunk):  # N x chunk at a time, never the whole N x F
        cols = slice(start, min(start + chunk, F))
        z_pre = centred @ sae.W_enc[:, cols] + sae.b_enc[cols]  # [N, c]
        ordered = z_pre.sort(0, descending=True).values  # [N, c]
        n = counts[cols].clamp(max=N - 1).long()
        theta[cols] = ordered.gather(0, n[None, :])[0]
    return theta.where(counts < N, torch.zeros_like(theta)).clamp(min=0.0)


@torch.no_grad()
def estimate_thresholds_(sae: SAE, batches: list[Tensor]) -> dict:
    """Estimate both thresholds on calibration `batches` of normalized inputs [B, d_in] of the
    training batch size, store them in the SAE, and return what they were fitted to."""
    counts = fire_counts(sae, batches)
    tokens = sum(len(x) for x in batches)
    sae.threshold_global.fill_(global_threshold(sae, batches))
    sae.threshold.copy_(feature_thresholds(sae, torch.cat(batches), counts))
    return {
        "calibration_tokens": tokens,
        "calibration_l0": float(counts.sum()) / tokens,
        "threshold_global": float(sae.threshold_global),
        "threshold_feature_mean": float(sae.threshold.mean()),
    }
