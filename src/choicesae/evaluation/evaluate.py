"""`choicesae eval RUN --store TEST_STORE`: a trained SAE measured on held-out activations.
From Python, `evaluate(cfg, activations, calibrate=..., sae=...)` takes arrays and an SAE
object as well, on the same code path.

1. the thresholds (appendix B) that training saved with the model (or, given calibration rows
   or for an SAE without them, estimated on calibration rows of the training data and saved
   in RUN/sae), then batch and single-token inference compared on the held-out rows;
2. L0, MSE, FVU; dead, dying, Zipf; features per token (appendix D), all of the SAE's default
   codes (single-token: Mutual and Feature Choice at their per-feature thresholds);
3. progressive codes (TopK paper 5.3, appendix E): test-time TopK(k'), the model's own
   sparsifier at k', and JumpReLU(θ) over sweeps, each an (L0, FVU) point;
4. downstream loss recovered with the SAE spliced into the model (splice.py).
Everything lands in RUN/eval/metrics.json (report.py draws it). Deterministic: the same run
and store give the same numbers.
"""

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from choicesae.core.config import SAEConfig
from choicesae.core.sae import SAE
from choicesae.core.sparsifiers import SPARSIFIERS, jumprelu, topk
from choicesae.core.thresholds import estimate_thresholds_
from choicesae.data.activations import Rows, check_targets, load_activations, paired
from choicesae.data.hooks import capture_all, find_module
from choicesae.data.store import Store, open_store
from choicesae.errors import ConfigError, DataError
from choicesae.evaluation import cross_layer, metrics, splice
from choicesae.step.ops import batch_codes


@dataclass(frozen=True)
class EvalConfig:
    """Evaluate a trained run on a held-out activation store and write its report."""

    run: str = ""
    """Run folder written by `choicesae train` (also accepted as the first argument); from
    Python, evaluate(cfg, sae=SAE) takes an SAE without a run instead."""
    store: str = ""
    """Held-out activation store (same model and hookpoint as training, other text); from
    Python, evaluate(cfg, activations) takes rows [N, d_in] in memory instead."""
    calibrate: str = ""
    """Store or activation file to estimate the inference thresholds on again (from Python,
    evaluate(cfg, calibrate=rows)); empty: those the SAE holds (training estimates them at its
    end), or for an SAE without them (a ReLU SAE, one saved before) the run's own training
    data (its --store or --activations)."""
    batch_size: int = 0
    """Tokens per batch of batch inference and of the thresholds' calibration; 0 means the run's
    training batch size (an SAE given without a run needs it)."""
    calibration_tokens: int = 32_768
    """Rows of the calibration data used for the thresholds (whole training batches)."""
    max_tokens: int = 65_536
    """Held-out rows measured (the store's first, whole training batches)."""
    splice_contexts: int = 128
    """Held-out contexts run through the model for the loss recovered (0 skips it)."""
    out: str = ""
    """Folder for metrics.json, the figures and report.html; empty: RUN/eval."""
    report: bool = True
    """Write the figures and report.html besides metrics.json."""
    seed: int = 0
    """Seed for the choice of calibration rows."""
    device: str = "cpu"
    """Torch device."""

    def __post_init__(self):
        for name in ("calibration_tokens", "max_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("splice_contexts", "batch_size"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative, got {getattr(self, name)}")


def load_run(run: str | Path, device: str = "cpu") -> tuple[SAE, dict]:
    """(the trained SAE, the run's config.json as a dict)."""
    run = Path(run)
    if not (run / "config.json").is_file():
        raise DataError(f"{run} is not a run folder (no config.json); train one first")
    return SAE.from_pretrained(run / "sae", device), json.loads((run / "config.json").read_text())


def check_rows(rows: Rows, sae: SAE, what: str) -> None:
    """Rows must be [tokens, d_in] for an autoencoder, [tokens, d_in + d_out] (input, then
    target) for a transcoder; a store must also hold targets exactly when the SAE is a
    transcoder, and those of its target hookpoint."""
    if getattr(rows, "manifest", None) is not None:  # a store says what its columns are
        check_store_targets(rows, sae.cfg, what)
    c = sae.cfg
    if len(rows.shape) != 2 or rows.shape[1] != c.d_in + c.d_out:
        reads = f"[tokens, {c.d_in} + {c.d_out}]" if c.transcoder else f"[tokens, {c.d_in}]"
        raise DataError(
            f"{what} has shape {tuple(rows.shape)}, the SAE reads {reads}: use activations of "
            "its training hookpoint" + (" and target" if c.transcoder else "")
        )


def check_store_targets(store: Store, c: SAEConfig, what: str) -> None:
    """A transcoder needs a store harvested with --target (its own target), an autoencoder one
    without."""
    target = store.manifest.get("target") or ""
    instead = "evaluate it on a harvest of its hookpoint alone (no --target)"
    names = {"hookpoint": c.hookpoint or "A", "target": c.target or "B"}
    check_targets(c.transcoder, bool(target), what, instead, **names)
    if c.target and target != c.target:
        raise DataError(
            f"{what} holds targets of {target}, the transcoder predicts {c.target}: harvest "
            f"with --target {c.target}"
        )


def whole_batches(
    rows: Rows, n: int, batch_size: int, what: str, pick: np.ndarray | None = None
) -> Tensor:
    """The first n rows (or rows `pick`) cut to whole batches, float32 [N, d]; only these rows
    are read, and only these are checked for NaN and Inf."""
    index = np.arange(min(n, len(rows))) if pick is None else pick
    index = index[: len(index) // batch_size * batch_size]
    if not len(index):
        raise DataError(f"{what} holds fewer rows than one batch of {batch_size}")
    x = torch.as_tensor(rows[index], dtype=torch.float32)
    if not torch.isfinite(x).all():
        raise DataError(f"{what} holds NaN or Inf")
    return x


def calibrate_thresholds_(
    sae: SAE,
    activations: Rows | tuple[Rows, Rows],
    batch_size: int,
    tokens: int = 32_768,
    seed: int = 0,
) -> dict:
    """Estimate the JumpReLU thresholds for single-token inference (appendix B) on raw rows
    [N, d_in] (a transcoder's [N, d_in + d_out] or a pair (inputs, targets): only the inputs
    count; an array, tensor or Store), store them in the SAE, and return what they were fitted
    to. They imitate batch inference, which depends on the batch, so they are fitted on whole
    batches of the training `batch_size`: `tokens` rows drawn at random (seeded), like training
    batches rather than consecutive tokens of a few contexts."""
    activations = as_rows(activations)
    what = "calibration data"
    if isinstance(activations, Store):
        what = f"calibration store {activations.path}"
    check_rows(activations, sae, what)
    rng = np.random.default_rng(seed)
    N = len(activations)
    pick = np.sort(rng.choice(N, min(tokens, N), replace=False))
    rows = whole_batches(activations, 0, batch_size, what, pick)
    x_n, _ = sae.prepare(rows.to(sae.W_enc.device))  # thresholds live on the input's z'
    codes = functools.partial(batch_codes, sae)  # batch inference, as the sparse step selects
    return estimate_thresholds_(sae, list(x_n.split(batch_size)), codes)


def sae_store(path: str | Path, sae: SAE) -> Store:
    """The store at `path` as `sae` reads it: of a store of several hookpoints, the SAE's own
    hookpoint, or a cross-layer transcoder's whole rows."""
    return open_store(path, sae.cfg.hookpoint, sae.cfg.layers > 1)


def calibration_source(cfg: EvalConfig, train_cfg: dict, sae: SAE) -> Rows:
    """The calibration data named by --calibrate, else the run's training data, as `sae` reads
    it (`sae_store`)."""
    source = cfg.calibrate or train_cfg.get("store") or train_cfg.get("activations")
    if not source or not Path(source).exists():
        raise DataError(
            f"the run's training data {source!r} is not here to calibrate the "
            "thresholds on; pass --calibrate STORE_OR_FILE (from Python: calibrate=rows)"
        )
    return sae_store(source, sae) if Path(source).is_dir() else load_activations(source)


def first_tokens(manifest: dict, n: int) -> Tensor:
    """[n] bool: which store rows are the first token (BOS/CLS) of their context."""
    if manifest.get("drop_first", True) or not isinstance(manifest.get("context"), int):
        return torch.zeros(n, dtype=torch.bool)  # the harvest left them out
    return torch.arange(n) % manifest["context"] == 0


INFERENCE = {  # metrics.json's inference modes -> SAE.select's arguments
    "batch": {"batch": True},
    "feature_threshold": {"threshold": "feature"},
    "global_threshold": {"threshold": "global"},
}


def inference_mode(sae: SAE) -> str:
    """The mode of the SAE's default codes, which eval's headline numbers measure: per-feature
    thresholds for Mutual and Feature Choice (and jumprelu), the own rule (batch) for TopK and
    ReLU, which read one token at a time anyway."""
    return "batch" if sae.default_threshold is None else f"{sae.default_threshold}_threshold"


def selectors(sae: SAE) -> dict[str, metrics.Select]:
    """Batch inference (the training sparsifier) and single-token inference (JumpReLU at the
    per-feature or the global threshold; an imported jumprelu SAE may have no global one)."""
    return {
        name: lambda z, kw=kw: sae.select(z, **kw).acts
        for name, kw in INFERENCE.items()
        if "threshold" not in kw or sae.has_thresholds(kw["threshold"])
    }


def compare_inference(sae: SAE, x: Tensor, batch_size: int) -> tuple[dict, dict[str, metrics.Pass]]:
    """L0, MSE, FVU and dead features of each inference mode on raw rows x [N, d_in (+
    d_out)], how closely each single-token mode keeps the per-feature densities of batch
    inference, and each mode's pass."""
    passes = {name: metrics.sae_pass(sae, x, batch_size, s) for name, s in selectors(sae).items()}
    batch, N = passes["batch"], len(x)
    result = {}
    for name, p in passes.items():
        result[name] = p.summary() | {"dead": int((p.counts == 0).sum())}
        if name != "batch":
            result[name] |= metrics.density_agreement(batch.counts, p.counts, N)
    if not sae.density.isnan().any():  # the last training window's densities
        trained = (sae.density * N).round().long()
        result["batch"] |= {
            "training_" + k: v
            for k, v in metrics.density_agreement(trained, batch.counts, N).items()
        }
    return result, passes


def progressive_codes(sae: SAE, x: Tensor, batch_size: int) -> dict[str, list[dict]]:
    """(L0, FVU) points of the trained SAE re-run with test-time TopK(k'), its own sparsifier
    at budget k', and JumpReLU(θ) for θ around the global threshold (TopK paper 5.3)."""
    k, F = sae.cfg.k, sae.cfg.num_latents
    ks = sorted({min(max(1, k * m // 4), F - 1) for m in (1, 2, 4, 8, 16, 32)})
    theta = float(sae.threshold_global)  # NaN (an imported jumprelu SAE): no sweep
    feature_choice = sae.cfg.sparsifier == "feature_choice"
    curves = {"topk": [], "batch": [], "jumprelu": []}
    for k2 in ks:
        point = _point(sae, x, batch_size, lambda z, k2=k2: topk(z, k2).acts)
        curves["topk"].append({"k": k2, **point})
        has_rule = sae.cfg.sparsifier in SPARSIFIERS  # jumprelu has no budget to vary
        if has_rule and (not feature_choice or k2 * batch_size >= F):  # capacities >= 1
            own = lambda z, k2=k2: sae.sparsify(sae.cfg.sparsifier, z, k2).acts  # noqa: E731
            curves["batch"].append({"k": k2, **_point(sae, x, batch_size, own)})
    for scale in (0.125, 0.25, 0.5, 1.0, 2.0, 4.0) if sae.has_thresholds("global") else ():
        point = _point(sae, x, batch_size, lambda z, t=theta * scale: jumprelu(z, t).acts)
        curves["jumprelu"].append({"theta": theta * scale, **point})
    return curves


def _point(sae: SAE, x: Tensor, batch_size: int, select: metrics.Select) -> dict:
    return metrics.sae_pass(sae, x, batch_size, select).summary()


def training_curves(run: Path | None) -> dict[str, list]:
    """Step, L0, FVU, dead and dying counts from RUN/metrics.jsonl (what was logged; nothing
    for an SAE evaluated without its run)."""
    path = run / "metrics.jsonl" if run else None
    lines = path.read_text().splitlines() if path and path.is_file() else []
    records = [json.loads(line) for line in lines]
    keys = ("step", "l0", "fvu", "dead", "dying")
    return {key: [r.get(key) for r in records] for key in keys}


def splice_metrics(sae: SAE, store: Store, y_mean: Tensor, contexts: int, batch_size: int) -> dict:
    """Downstream losses and loss recovered (splice.py) on the store's first `contexts`
    contexts, run about one training batch of tokens at a time, so that batch inference sees
    batches like those it was trained on. `y_mean` [d_target]: the mean held-out target, for
    mean ablation. A transcoder replaces its target module's output by its prediction from
    the hookpoint's output in the same forward pass; an SAE, the hookpoint's own output."""
    model, base, tokenizer, kind = splice.load_spliceable(store.manifest["model"])
    model.to(y_mean.device)
    hookpoint = find_module(base, store.manifest["hookpoint"])
    target = find_module(base, store.manifest["target"]) if sae.cfg.transcoder else None
    ids, where = splice.store_contexts(store, tokenizer, contexts)
    per_batch = max(1, batch_size // int(where[0].sum()))
    keep = max(len(ids) // per_batch * per_batch, min(len(ids), per_batch))  # whole batches
    ids, where = ids[:keep].to(y_mean.device), where[:keep].to(y_mean.device)
    check_rows_match(model, hookpoint, ids[:per_batch], where[:per_batch], store, target)
    replacements = {  # hookpoint rows [n, d_in] -> the replaced module's rows [n, d_target]
        "sae": lambda h: sae.reconstruct(h, batch=True),
        "sae_feature_threshold": lambda h: sae.reconstruct(h, threshold="feature"),
        "sae_global_threshold": lambda h: sae.reconstruct(h, threshold="global"),
        "zero_ablation": lambda h: y_mean.new_zeros(len(h), len(y_mean)),
        "mean_ablation": lambda h: y_mean.expand(len(h), -1),
    }
    # an SAE replaces the hookpoint's own output; a transcoder its target's, read from the
    # hookpoint's output earlier in the same forward pass
    module, source = (hookpoint, None) if target is None else (target, hookpoint)
    variants = splice.at(module, source, replacements)
    measured = splice.downstream_losses(model, kind, ids, where, variants, per_batch)
    return splice.downstream_metrics(kind, len(ids), measured)


def set_splice_metrics(saes: list[SAE], store: Store, contexts: int, batch_size: int) -> dict:
    """Downstream losses with a per-layer transcoder set spliced in whole (splice.replaced_set):
    every transcoder replaces its target's output by its prediction, each token on its own (the
    default codes), from its hookpoint's output in the same pass. `store`: a held-out harvest of
    the set's hookpoints and targets (data/store.py)."""
    device, sites = saes[0].W_enc.device, []
    for sae in saes:
        pair = store.select(sae.cfg.hookpoint)
        check_store_targets(pair, sae.cfg, f"store {store.path}")
        y_mean = sae.split(pair[: min(len(pair), 65_536)].to(device))[1].mean(0)  # [d_out]
        sites.append((sae.cfg.target, sae.cfg.hookpoint, sae.reconstruct, y_mean))
    return splice.replaced_set(store, sites, contexts, batch_size, device)


def check_rows_match(model, module, ids: Tensor, where: Tensor, store: Store, target=None) -> None:
    """The hookpoint's clean output at the spliced positions must be the store's rows (up to
    the storage dtype), and the `target` module's (if given) their target half: otherwise the
    contexts were rebuilt wrong or the model differs."""
    rows = store[np.arange(int(where.sum()))].to(ids.device)  # [n, d_model (+ d_target)]
    x, y = rows.split([store.d_model, store.d_target], -1)
    checks = [(store.manifest["hookpoint"], module, x)]
    if target is not None:
        checks.append((store.manifest["target"], target, y))
    outs = capture_all(model, [m for _, m, _ in checks], ids, torch.ones_like(ids))  # [C, T, d]
    for (name, _, part), out in zip(checks, outs, strict=True):
        error = float((out[where] - part).norm() / part.norm().clamp_min(1e-12))
        if error > 0.02:
            raise DataError(
                f"the model's activations at {name} differ from the store's rows (relative "
                f"error {error:.3g}): the store was not harvested from this model"
            )


def evaluate(
    cfg: EvalConfig,
    activations: Rows | None = None,
    *,
    calibrate: Rows | None = None,
    sae: SAE | None = None,
) -> dict:
    """Measure everything on held-out rows, write OUT/metrics.json (and the report) and
    return the metrics: the CLI's path and Python's. The headline numbers (l0, fvu, dead, the
    summary line) are of the SAE's default codes, `inference_mode`.

    The SAE is the run's (cfg.run) or `sae`; thresholds estimated here (`thresholds_to_use`)
    are saved with the run's or set in `sae`. The held-out rows [N, d_in] (a transcoder's
    [N, d_in + d_out], or a pair (inputs, targets) as `train` takes) are `activations` (an
    array, tensor or Store) or cfg.store; the calibration rows `calibrate` or cfg.calibrate.
    Results are written to cfg.out, else RUN/eval, else (no run) not at all. The loss recovered
    needs a store's contexts and model, so rows given as an array skip it."""
    run = Path(cfg.run) if cfg.run else None
    sae, train_cfg = sae_to_evaluate(cfg, sae)
    B = cfg.batch_size or train_cfg.get("batch_size", 0)
    if not B:
        raise ConfigError("an SAE without its run needs EvalConfig(batch_size=its training's)")
    cross = sae.cfg.layers > 1  # a cross-layer transcoder: per-layer metrics and splice
    rows = sae_store(cfg.store, sae) if activations is None else as_rows(activations)
    what = f"store {cfg.store}" if activations is None else "held-out activations"
    check_rows(rows, sae, what)
    fitted = thresholds_to_use(sae, cfg, train_cfg, calibrate, B)
    if run and fitted["estimated_by"] == "eval":
        sae.save_pretrained(run / "sae")  # the thresholds travel with the model
    x = whole_batches(rows, cfg.max_tokens, B, what).to(sae.W_enc.device)
    result = measure(sae, x, B, getattr(rows, "manifest", {}))
    result = {"run": cfg.run, "store": cfg.store if activations is None else "", **result}
    result |= {"thresholds": fitted, "training": training_curves(run)}
    if cross:
        result["layers"] = cross_layer.layer_metrics(sae, x, B)
    if cfg.splice_contexts and isinstance(rows, Store) and cross:
        result["splice"] = cross_layer.splice_metrics(sae, rows, cfg.splice_contexts, B)
    elif cfg.splice_contexts and isinstance(rows, Store):
        y_mean = sae.split(x)[1].mean(0)  # mean ablation: the mean held-out target
        result["splice"] = splice_metrics(sae, rows, y_mean, cfg.splice_contexts, B)
    if cfg.out or run:
        write_results(result, Path(cfg.out or run / "eval"), cfg.report)
    return result


def thresholds_to_use(
    sae: SAE, cfg: EvalConfig, train_cfg: dict, calibrate: Rows | None, batch_size: int
) -> dict:
    """The SAE's JumpReLU thresholds, and where they come from: those saved with it
    (training estimates them at its end; a SAELens file holds them), unless calibration rows
    are given (`calibrate`, cfg.calibrate) or it has none (an SAE saved before training
    estimated them, a ReLU SAE): then estimated here, on those rows or the run's training
    data."""
    missing = not all(map(sae.has_thresholds, ("feature", "global")))
    if sae.cfg.sparsifier == "jumprelu" or (
        calibrate is None and not cfg.calibrate and not missing
    ):
        saved = {"threshold_global": float(sae.threshold_global)}
        saved["threshold_feature_mean"] = float(sae.threshold.mean())
        return {"estimated_by": "saved"} | saved  # by training, or in the SAE's file
    source = calibration_source(cfg, train_cfg, sae) if calibrate is None else as_rows(calibrate)
    fitted = calibrate_thresholds_(sae, source, batch_size, cfg.calibration_tokens, cfg.seed)
    return {"estimated_by": "eval"} | fitted


def as_rows(rows: Rows | tuple[Rows, Rows]) -> Rows:
    """Rows as given, or a transcoder's pair (inputs, targets) side by side as a store holds
    them."""
    return paired(*rows) if isinstance(rows, tuple) else rows


def sae_to_evaluate(cfg: EvalConfig, sae: SAE | None) -> tuple[SAE, dict]:
    """(the SAE, its run's config.json as a dict: empty for an SAE given without its run)."""
    if sae is None:
        return load_run(cfg.run, cfg.device)
    if cfg.run:
        raise ConfigError("evaluate takes a run folder (EvalConfig.run) or an SAE, not both")
    return sae, {}


def measure(sae: SAE, x: Tensor, batch_size: int, manifest: dict) -> dict:
    """Everything measured on the held-out rows x [N, d_in (+ d_out)] (raw, whole batches),
    the SAE's thresholds estimated already; `manifest`: the store's, if they came from one.
    A transcoder's MSE and FVU measure its prediction of the target; L0 and the densities are
    of its codes of the input, as for an SAE."""
    inference, passes = compare_inference(sae, x, batch_size)
    mode = inference_mode(sae)
    headline = passes[mode]  # the SAE's default codes
    c = sae.cfg
    names = {"hookpoint": c.hookpoint or manifest.get("hookpoint") or ""}
    names["target"] = c.target or manifest.get("target") or ""
    transcoder = {"transcoder": names | {"d_out": c.d_out}} if c.transcoder else {}
    return {
        "model": manifest.get("model"),
        "hookpoint": manifest.get("hookpoint"),
        "sparsifier": sae.cfg.sparsifier,
        "k": sae.cfg.k,
        "num_latents": sae.cfg.num_latents,
        "d_in": sae.cfg.d_in,
        **transcoder,
        "batch_size": batch_size,
        "tokens": len(x),
        "inference_mode": mode,
        **headline.summary(),
        "l0_std": float(headline.l0.float().std()) if len(x) > 1 else 0.0,
        "inference": inference,
        "allocation": metrics.allocation_metrics(headline.counts, len(x), float(sae.zipf[0])),
        "features_per_token": metrics.features_per_token(
            headline.l0, first_tokens(manifest, len(x))
        ),
        "progressive": progressive_codes(sae, x, batch_size),
    }


def write_results(result: dict, out: Path, report: bool) -> None:
    """OUT/metrics.json, and the figures and report.html when `report`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result, indent=1) + "\n")
    if report:
        from choicesae.evaluation.report import (
            write_report,  # matplotlib: imported when drawing only
        )

        write_report(result, out)


def transcoder_label(t: dict) -> str:
    """The label "A -> B (d_out N)" of metrics.json's "transcoder" entry; "?" for a name not
    known (a transcoder trained and evaluated on in-memory rows)."""
    return f"{t['hookpoint'] or '?'} -> {t['target'] or '?'} (d_out {t['d_out']})"


def summary_line(result: dict) -> str:
    """One line for the terminal."""
    t = result.get("transcoder")
    line = f"transcoder {transcoder_label(t)}  " if t else ""
    line += f"L0 {result['l0']:.2f}  FVU {result['fvu']:.4f}  dead {result['allocation']['dead']}"
    mode = result.get("inference_mode", "batch")  # metrics.json written before it: batch
    if mode != "batch":
        line += f"  ({mode.replace('_', ' ')}s)"
    if s := result.get("splice"):
        variant = splice.headline_variant(result)
        line += f"  loss recovered {100 * s['loss_recovered'][variant]:.2f}%"
        if "kl" in s:  # a causal LM
            line += f"  ΔCE {s['delta_loss'][variant]:.4f} nats  KL {s['kl'][variant]:.4f}"
    return line
