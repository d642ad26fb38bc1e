"""Downstream loss recovered: the model run on held-out contexts with its hookpoint's output
replaced (by the SAE's reconstruction, zeros, or the mean activation). A transcoder's target
module B has its output replaced instead, by the transcoder's prediction from the hookpoint A's
output at the same positions, captured earlier in the same forward pass (A runs before B).

The contexts are rebuilt from the store's token ids (rows are whole contexts in order; a first
token the harvest dropped is the tokenizer's BOS/CLS, put back and left unreplaced: the SAE
never saw it). The downstream loss L is, per context:
- causal LMs: the next-token cross-entropy (the paper's measure);
- encoders (BERT, MiniLM): 1 − cos(e, e_clean) of the mean-pooled final hidden state, the
  sentence embedding all-MiniLM-L6-v2 produces, against the clean one (0 when untouched).
loss recovered = 1 − (L_sae − L_clean) / (L_ablated − L_clean): 1 for a perfect
reconstruction, 0 for one as bad as zero (or mean) ablation; ΔL = L_sae − L_clean (ΔCE, in
nats, for a causal LM). A causal LM also gives the KL divergence of the spliced next-token
distribution from the clean one, averaged over predictions, and KL recovered = 1 − KL_sae /
KL_ablated, as SAEBench's core evaluation defines its KL score (with zero ablation).
"""

import contextlib
import functools
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F_
from torch import Tensor, nn

from choicesae.data.hooks import find_module, from_pretrained, load_tokenizer
from choicesae.data.store import Store
from choicesae.data.text import special_tokens
from choicesae.errors import ConfigError, DataError

Replace = Callable[[Tensor], Tensor]  # source rows [n, d_in] -> replacement rows [n, d_out]
Splice = tuple[nn.Module, nn.Module | None, Replace]  # (module replaced, its source, replace)


def at(
    module: nn.Module, source: nn.Module | None, replacements: dict[str, Replace]
) -> dict[str, list[Splice]]:
    """Variants that each replace one module's output (see `spliced_into`)."""
    return {name: [(module, source, replace)] for name, replace in replacements.items()}


@functools.lru_cache(maxsize=1)
def load_spliceable(name: str) -> tuple[nn.Module, nn.Module, object, str]:
    """(model with its output head, its base model holding the hookpoints, tokenizer, kind):
    kind "encoder" for masked-LM families (mean-pooled embedding), else "causal" (LM head).
    The last model loaded is kept: a bench splices many SAEs into the same one."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES
    from transformers.utils import logging

    logging.set_verbosity_error()  # a base-model folder loads its LM head tied: no warning
    logging.disable_progress_bar()
    config = from_pretrained(AutoConfig, name)
    encoder = config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not config.is_decoder
    cls = AutoModel if encoder else AutoModelForCausalLM
    model = from_pretrained(cls, name, dtype=torch.float32).eval()
    return model, model.base_model, load_tokenizer(name), "encoder" if encoder else "causal"


def store_contexts(store: Store, tokenizer, max_contexts: int) -> tuple[Tensor, Tensor]:
    """(input_ids [C, T], spliced [C, T] bool) of the store's first complete contexts: the
    spliced positions, in row-major order, are the store's rows 0 .. C·(T − drop_first) − 1."""
    context, drop_first = store.manifest.get("context"), bool(store.manifest.get("drop_first"))
    if not isinstance(context, int):
        raise DataError(f"store {store.path} records no context length: not a harvest")
    per_context = context - drop_first
    C = min(len(store) // per_context, max_contexts)
    if C < 1:
        raise DataError(f"store {store.path} holds no complete context of {context} tokens")
    ids = torch.from_numpy(store.tokens()[: C * per_context].astype(np.int64)).view(C, -1)
    spliced = torch.ones(C, context, dtype=torch.bool)
    if drop_first:
        prefix = special_tokens(tokenizer)[0]
        if not prefix:
            raise DataError(
                "the harvest dropped each context's first token and the tokenizer "
                "has no BOS/CLS to restore it; harvest with --no-drop-first"
            )
        ids = torch.cat([torch.full((C, 1), prefix[0]), ids], 1)
        spliced[:, 0] = False
    return ids, spliced


@contextlib.contextmanager
def spliced_into(
    module: nn.Module, where: Tensor, replace: Replace | None, source: nn.Module | None = None
):
    """Within the block, `module`'s output [C, T, d_out] has the positions `where` [C, T]
    replaced by `replace` of the rows there of `source`'s output [C, T, d_in] (a transcoder's
    input, which must run before `module` in the forward pass), or of `module`'s own output
    when `source` is None (an SAE). `replace` None: left clean."""
    seen: list[Tensor] = []  # the source's rows at `where`, from this forward pass

    def read(_module, _inputs, output):
        seen[:] = [_hidden(output)[where]]

    def hook(_module, _inputs, output):
        h = _hidden(output)  # [C, T, d_out]
        if source is not None and not seen:
            raise ConfigError(
                f"the transcoder's input module ({type(source).__name__}) did not run before "
                f"its target ({type(module).__name__}): pick a target downstream of the hookpoint"
            )
        rows = h[where] if source is None else seen.pop()  # [n, d_in]
        new = h.clone()
        new[where] = replace(rows).to(h.dtype)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handles = []
    if replace is not None:
        handles += [source.register_forward_hook(read)] if source is not None else []
        handles.append(module.register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _hidden(output) -> Tensor:
    """A module's hidden states [C, T, d]: its output, or the first element of a tuple."""
    return output[0] if isinstance(output, tuple) else output


def model_output(model: nn.Module, kind: str, ids: Tensor) -> Tensor:
    """Per context: next-token log-probabilities [C, T-1, V] (causal) or the mean-pooled
    embedding [C, d] (encoder)."""
    if kind == "causal":
        return F_.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1)
    return model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state.mean(1)


def context_losses(kind: str, out: Tensor, clean: Tensor, ids: Tensor) -> dict[str, Tensor]:
    """Per context [C], of one variant's output against the clean output of contexts ids
    [C, T]. Causal: "loss", the next-token cross-entropy, and "kl", KL(P_clean || P_variant)
    of the next-token distributions, both averaged over the T − 1 predictions. Encoders:
    "loss" = 1 − cos(e, e_clean), computed as |ê − ê_clean|²/2 of the unit vectors (the same
    value), which is exactly 0 for an untouched output."""
    if kind == "causal":
        ce = -out.gather(-1, ids[:, 1:, None]).squeeze(-1).mean(-1)
        kl = (clean.exp() * (clean - out)).sum(-1).mean(-1)
        return {"loss": ce, "kl": kl}
    loss = (F_.normalize(out, dim=-1) - F_.normalize(clean, dim=-1)).pow(2).sum(-1) / 2
    return {"loss": loss}


@torch.no_grad()
def downstream_losses(
    model: nn.Module,
    kind: str,
    ids: Tensor,
    spliced: Tensor,
    variants: dict[str, list[Splice]],
    contexts_per_batch: int,
) -> dict[str, dict[str, float]]:
    """Mean downstream losses over the contexts ids [C, T] when, in each variant, every one of
    its modules has its output at `spliced` [C, T] replaced (of its source's rows there, for a
    transcoder; see `spliced_into`: one module, `at`, or a transcoder per layer, all in the
    same forward pass), and "clean" (untouched): {"loss": {variant: L}} and, for a causal LM,
    {"kl": {variant: KL}} (see `context_losses`)."""
    if kind not in ("causal", "encoder"):
        raise ConfigError(f"kind must be causal or encoder, not {kind!r}")
    parts: dict[str, dict[str, list[Tensor]]] = {}
    for batch in torch.arange(len(ids)).split(contexts_per_batch):
        clean = model_output(model, kind, ids[batch])
        outputs = {"clean": clean}
        for name, splices in variants.items():
            with contextlib.ExitStack() as stack:
                for module, source, replace in splices:
                    stack.enter_context(spliced_into(module, spliced[batch], replace, source))
                outputs[name] = model_output(model, kind, ids[batch])
        for name, out in outputs.items():
            for measure, v in context_losses(kind, out, clean, ids[batch]).items():
                parts.setdefault(measure, {}).setdefault(name, []).append(v)
    return {
        measure: {name: float(torch.cat(v).double().mean()) for name, v in per_name.items()}
        for measure, per_name in parts.items()
    }


def loss_recovered(loss: float, clean: float, ablated: float) -> float:
    """1 − (L − L_clean) / (L_ablated − L_clean) (NaN when ablation changes nothing)."""
    gap = ablated - clean
    return 1 - (loss - clean) / gap if gap else float("nan")


SAE_VARIANTS = ("sae", "sae_feature_threshold", "sae_global_threshold")
"""The SAE spliced in by batch inference and by its per-feature and global thresholds; the
replacements measured beside them are zero_ablation and mean_ablation."""


def downstream_metrics(
    kind: str,
    contexts: int,
    measured: dict[str, dict[str, float]],
    variants: tuple[str, ...] = SAE_VARIANTS,
) -> dict:
    """The "splice" entry of metrics.json from downstream_losses' means: the losses, ΔL
    (ΔCE for a causal LM), the loss recovered against zero and mean ablation and, for a causal
    LM, the KL divergences and the KL recovered (against zero ablation, as SAEBench), of each
    of `variants` (the first against mean ablation)."""
    losses = measured["loss"]
    clean, zero, mean = losses["clean"], losses["zero_ablation"], losses["mean_ablation"]
    result = {
        "kind": kind,
        "measure": "cross-entropy" if kind == "causal" else "1 - cos(embedding, clean)",
        "contexts": contexts,
        "losses": losses,
        "delta_loss": {name: losses[name] - clean for name in variants},
        "loss_recovered": {name: loss_recovered(losses[name], clean, zero) for name in variants},
        "loss_recovered_mean_ablation": loss_recovered(losses[variants[0]], clean, mean),
    }
    if "kl" in measured:
        kl = measured["kl"]
        result["kl"] = kl
        result["kl_recovered"] = {
            name: loss_recovered(kl[name], 0.0, kl["zero_ablation"]) for name in variants
        }
    return result


Site = tuple[str, str, Replace, Tensor]  # (target path, source path, replace, target mean [d])


def replaced_set(store: Store, sites: list[Site], contexts: int, batch_size: int, device) -> dict:
    """The downstream metrics of a replacement model on the store's first `contexts` contexts,
    run about `batch_size` tokens at a time: in one forward pass every site's target module has
    its output replaced by the site's prediction from its source's output ("transcoders",
    each read in that same, already replaced, pass), against zero and mean ablation of every
    target. `store`: a held-out harvest of the sites' modules."""
    model, base, tokenizer, kind = load_spliceable(store.manifest["model"])
    model.to(device)
    ids, where = store_contexts(store, tokenizer, contexts)
    ids, where = ids.to(device), where.to(device)
    variants: dict[str, list[Splice]] = {}
    for target, source, replace, mean in sites:
        replacements = {
            "transcoders": replace,
            "zero_ablation": lambda h, m=mean: m.new_zeros(len(h), len(m)),
            "mean_ablation": lambda h, m=mean: m.expand(len(h), -1),
        }
        modules = find_module(base, target), find_module(base, source)
        for name, splices in at(*modules, replacements).items():
            variants.setdefault(name, []).extend(splices)
    per_batch = max(1, batch_size // int(where[0].sum()))
    measured = downstream_losses(model, kind, ids, where, variants, per_batch)
    return downstream_metrics(kind, len(ids), measured, ("transcoders",))


SPLICED = {  # inference mode -> its variant in downstream_metrics' entries
    "batch": "sae",
    "feature_threshold": "sae_feature_threshold",
    "global_threshold": "sae_global_threshold",
}


def headline_variant(result: dict) -> str:
    """The splice variant of an eval result's default codes (its inference_mode; a
    metrics.json written before that existed measured batch inference)."""
    return SPLICED[result.get("inference_mode", "batch")]
