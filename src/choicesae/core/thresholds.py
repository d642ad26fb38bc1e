"""JumpReLU thresholds for single-token inference with batch-trained SAEs (paper, appendix B).

Mutual and Feature Choice select within a batch, so one token alone has no batch to compete
in. Appendix B imputes a threshold and swaps the sparsifier for JumpReLU, z = z'·1(z' > θ):

- global θ (BatchTopK, as SAELens and dictionary_learning estimate it): the mean over batches
  of the smallest activation the batch sparsifier selected;
- per-feature θ_i: the value that makes feature i fire, token by token, on exactly as many
  calibration tokens as batch inference selects it for, so that single-token inference keeps
  every feature's density, and hence the L0 (= Σ_i density_i), of batch inference.

Both live on z' of normalized inputs (a transcoder's too: its codes read its input hookpoint,
whatever it predicts), in the SAE's buffers `threshold_global` [] and `threshold` [F];
`SAE.select` encodes every token with them by default. The functions here take normalized
batches: training estimates them at its end on the batches that follow its last step, and
`evaluation.evaluate.calibrate_thresholds_` on raw activations given (an array, tensor or
store).
"""

from collections.abc import Callable

import torch
from torch import Tensor

from choicesae.core.sae import SAE
from choicesae.errors import ConfigError, DataError

Codes = Callable[[Tensor], Tensor]  # normalized x [B, d_in] -> batch inference's acts [B, F]


@torch.no_grad()
def batch_selections(sae: SAE, batches: list[Tensor], codes: Codes) -> tuple[Tensor, float]:
    """What batch inference (`codes`) selects on `batches` [B, d_in] (normalized), in one
    pass: the tokens each feature is selected for [F], and the global threshold, the mean over
    batches of the smallest selected activation."""
    counts, smallest = 0, []
    for x in batches:
        acts = codes(x)  # [B, F]
        fired = acts > 0
        counts = counts + fired.sum(0)
        if fired.any():
            smallest.append(acts[fired].min().double())
    if not smallest:
        raise DataError("the SAE selected no feature on the calibration data: no threshold")
    return counts, float(torch.stack(smallest).mean())


@torch.no_grad()
def feature_thresholds(sae: SAE, x: Tensor, counts: Tensor, chunk: int = 512) -> Tensor:
    """[F] θ_i such that exactly counts[i] of the tokens x [N, d_in] (normalized) have
    z'_i > θ_i (ties aside): the (counts[i]+1)-th largest z'_i, floored at 0 as ReLU is.
    A feature never selected gets its largest z' (it then never fires on these tokens).

    Features are taken in order of their counts, `chunk` at a time (N x chunk affinities,
    never N x F), each chunk with one top-(its largest count + 1) over the tokens: most
    features fire on few tokens, and a top-k of small k costs far less than a sort."""
    N, F = x.shape[0], sae.cfg.num_latents
    centred = sae.centred(x)
    n = counts.clamp(max=N - 1).long()
    theta = torch.empty(F, dtype=x.dtype, device=x.device)
    for cols in n.argsort().split(chunk):
        z_pre = centred @ sae.W_enc[:, cols] + sae.b_enc[cols]  # [N, c]
        top = z_pre.topk(int(n[cols].max()) + 1, dim=0).values  # [k, c], sorted
        theta[cols] = top.gather(0, n[cols][None, :])[0]
    return theta.where(counts < N, torch.zeros_like(theta)).clamp(min=0.0)


@torch.no_grad()
def estimate_thresholds_(sae: SAE, batches: list[Tensor], codes: Codes | None = None) -> dict:
    """Estimate both thresholds on calibration `batches` of normalized inputs [B, d_in] of the
    training batch size, store them in the SAE, and return what they were fitted to. `codes`
    gives batch inference's activations (default: the reference rule, SAE.select with
    batch=True; training and eval pass the sparse step's index form of it, step.ops). A
    jumprelu SAE's thresholds are the model itself (read from its file): refused."""
    if sae.cfg.sparsifier == "jumprelu":
        raise ConfigError("a jumprelu SAE's thresholds are its own (from its file): not estimated")
    codes = codes or (lambda x: sae.select(sae.pre_acts(x), batch=True).acts)
    counts, theta = batch_selections(sae, batches, codes)
    tokens = sum(len(x) for x in batches)
    sae.threshold_global.fill_(theta)
    sae.threshold.copy_(feature_thresholds(sae, torch.cat(batches), counts))
    return {
        "calibration_tokens": tokens,
        "calibration_l0": float(counts.sum()) / tokens,
        "threshold_global": float(sae.threshold_global),
        "threshold_feature_mean": float(sae.threshold.mean()),
    }
