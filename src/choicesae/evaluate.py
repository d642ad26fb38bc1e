"""`choicesae eval RUN --store TEST_STORE`: a trained SAE measured on held-out activations.

1. thresholds (appendix B) estimated on calibration rows of the training data and saved with
   the model (RUN/sae), then batch and single-token inference compared on the held-out rows;
2. L0, MSE, FVU; dead, dying, Zipf; features per token (appendix D);
3. progressive codes (TopK paper 5.3, appendix E): test-time TopK(k'), the model's own
   sparsifier at k', and JumpReLU(θ) over sweeps, each an (L0, FVU) point;
4. downstream loss recovered with the SAE spliced into the model (splice.py).
Everything lands in RUN/eval/metrics.json (report.py draws it). Deterministic: the same run
and store give the same numbers.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from choicesae import metrics, splice
from choicesae.data import load_activations
from choicesae.errors import ConfigError, DataError
from choicesae.hooks import capture, find_module
from choicesae.preprocess import normalize
from choicesae.sae import SAE
from choicesae.sparsifiers import jumprelu, topk
from choicesae.store import Store
from choicesae.thresholds import estimate_thresholds_


@dataclass(frozen=True)
class EvalConfig:
    """Evaluate a trained run on a held-out activation store and write its report."""

    run: str = ""
    """Run folder written by `choicesae train` (also accepted as the first argument)."""
    store: str = ""
    """Held-out activation store (same model and hookpoint as training, other text)."""
    calibrate: str = ""
    """Store or activation file to estimate the inference thresholds on; empty: the run's own
    training data (its --store or --activations)."""
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
        if self.splice_contexts < 0:
            raise ConfigError(f"splice_contexts must not be negative, got {self.splice_contexts}")


def load_run(run: str | Path, device: str = "cpu") -> tuple[SAE, dict]:
    """(the trained SAE, the run's config.json as a dict)."""
    run = Path(run)
    if not (run / "config.json").is_file():
        raise DataError(f"{run} is not a run folder (no config.json); train one first")
    return SAE.from_pretrained(run / "sae", device), json.loads((run / "config.json").read_text())


def whole_batches(rows, n: int, batch_size: int, what: str, pick: np.ndarray | None = None):
    """The first n rows (or rows `pick`) cut to whole batches, float32 [N, d]."""
    index = np.arange(min(n, len(rows))) if pick is None else pick
    index = index[: len(index) // batch_size * batch_size]
    if not len(index):
        raise DataError(f"{what} holds fewer rows than one batch of {batch_size}")
    return torch.as_tensor(np.asarray(rows[index]), dtype=torch.float32)


def calibration_rows(cfg: EvalConfig, train_cfg: dict, batch_size: int) -> Tensor:
    """Raw rows [N, d_in] drawn at random (seeded) from the calibration data."""
    source = cfg.calibrate or train_cfg.get("store") or train_cfg.get("activations")
    if not source or not Path(source).exists():
        raise DataError(
            f"the run's training data {source!r} is not here to calibrate the "
            "thresholds on; pass --calibrate STORE_OR_FILE"
        )
    rows = Store(source) if Path(source).is_dir() else load_activations(source)
    rng = np.random.default_rng(cfg.seed)
    pick = np.sort(rng.choice(len(rows), min(cfg.calibration_tokens, len(rows)), replace=False))
    return whole_batches(rows, 0, batch_size, f"calibration data {source}", pick)


def first_tokens(manifest: dict, n: int) -> Tensor:
    """[n] bool: which store rows are the first token (BOS/CLS) of their context."""
    if manifest.get("drop_first", True) or not isinstance(manifest.get("context"), int):
        return torch.zeros(n, dtype=torch.bool)  # the harvest left them out
    return torch.arange(n) % manifest["context"] == 0


def selectors(sae: SAE) -> dict[str, metrics.Select]:
    """Batch inference (the training sparsifier) and single-token inference (JumpReLU at the
    per-feature or the global threshold)."""
    return {
        "batch": lambda z: sae.sparsify(sae.cfg.sparsifier, z, sae.cfg.k).acts,
        "feature_threshold": lambda z: jumprelu(z, sae.thresholds("feature")).acts,
        "global_threshold": lambda z: jumprelu(z, sae.thresholds("global")).acts,
    }


def compare_inference(sae: SAE, x: Tensor, batch_size: int) -> tuple[dict, metrics.Pass]:
    """L0, MSE, FVU of each inference mode on raw rows x [N, d_in], and how closely each
    single-token mode keeps the per-feature densities of batch inference."""
    passes = {name: metrics.sae_pass(sae, x, batch_size, s) for name, s in selectors(sae).items()}
    batch, N = passes["batch"], len(x)
    result = {}
    for name, p in passes.items():
        result[name] = p.summary()
        if name != "batch":
            result[name] |= metrics.density_agreement(batch.counts, p.counts, N)
    if not sae.density.isnan().any():  # the last training window's densities
        trained = (sae.density * N).round().long()
        result["batch"] |= {
            "training_" + k: v
            for k, v in metrics.density_agreement(trained, batch.counts, N).items()
        }
    return result, batch


def progressive_codes(sae: SAE, x: Tensor, batch_size: int) -> dict[str, list[dict]]:
    """(L0, FVU) points of the trained SAE re-run with test-time TopK(k'), its own sparsifier
    at budget k', and JumpReLU(θ) for θ around the global threshold (TopK paper 5.3)."""
    k, F = sae.cfg.k, sae.cfg.num_latents
    ks = sorted({min(max(1, k * m // 4), F - 1) for m in (1, 2, 4, 8, 16, 32)})
    theta = float(sae.threshold_global)
    feature_choice = sae.cfg.sparsifier == "feature_choice"
    curves = {"topk": [], "batch": [], "jumprelu": []}
    for k2 in ks:
        point = _point(sae, x, batch_size, lambda z, k2=k2: topk(z, k2).acts)
        curves["topk"].append({"k": k2, **point})
        if not feature_choice or k2 * batch_size >= F:  # every feature needs a capacity >= 1
            own = lambda z, k2=k2: sae.sparsify(sae.cfg.sparsifier, z, k2).acts  # noqa: E731
            curves["batch"].append({"k": k2, **_point(sae, x, batch_size, own)})
    for scale in (0.125, 0.25, 0.5, 1.0, 2.0, 4.0):
        point = _point(sae, x, batch_size, lambda z, t=theta * scale: jumprelu(z, t).acts)
        curves["jumprelu"].append({"theta": theta * scale, **point})
    return curves


def _point(sae: SAE, x: Tensor, batch_size: int, select: metrics.Select) -> dict:
    return metrics.sae_pass(sae, x, batch_size, select).summary()


def training_curves(run: Path) -> dict[str, list]:
    """Step, L0, FVU, dead and dying counts from RUN/metrics.jsonl (what was logged)."""
    path = run / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    keys = ("step", "l0", "fvu", "dead", "dying")
    return {key: [r.get(key) for r in records] for key in keys}


def splice_metrics(sae: SAE, store: Store, x_mean: Tensor, contexts: int, batch_size: int) -> dict:
    """Downstream losses and loss recovered (splice.py) on the store's first `contexts`
    contexts, run about one training batch of tokens at a time, so that batch inference sees
    batches like those it was trained on."""
    model, base, tokenizer, kind = splice.load_spliceable(store.manifest["model"])
    model.to(x_mean.device)
    module = find_module(base, store.manifest["hookpoint"])
    ids, where = splice.store_contexts(store, tokenizer, contexts)
    per_batch = max(1, batch_size // int(where[0].sum()))
    keep = max(len(ids) // per_batch * per_batch, min(len(ids), per_batch))  # whole batches
    ids, where = ids[:keep].to(x_mean.device), where[:keep].to(x_mean.device)
    check_rows_match(model, module, ids[:per_batch], where[:per_batch], store)
    replacements = {
        "sae": sae.reconstruct,
        "sae_feature_threshold": lambda h: sae.reconstruct(h, threshold="feature"),
        "sae_global_threshold": lambda h: sae.reconstruct(h, threshold="global"),
        "zero_ablation": torch.zeros_like,
        "mean_ablation": lambda h: x_mean.expand_as(h),
    }
    losses = splice.downstream_losses(model, kind, module, ids, where, replacements, per_batch)
    clean, zero, mean = losses["clean"], losses["zero_ablation"], losses["mean_ablation"]
    recovered = {
        name: splice.loss_recovered(losses[name], clean, zero)
        for name in ("sae", "sae_feature_threshold", "sae_global_threshold")
    }
    return {
        "kind": kind,
        "measure": "cross-entropy" if kind == "causal" else "1 - cos(embedding, clean)",
        "contexts": len(ids),
        "losses": losses,
        "loss_recovered": recovered,
        "loss_recovered_mean_ablation": splice.loss_recovered(losses["sae"], clean, mean),
    }


def check_rows_match(model, module, ids: Tensor, where: Tensor, store: Store) -> None:
    """The hookpoint's clean output at the spliced positions must be the store's rows (up to
    the storage dtype): otherwise the contexts were rebuilt wrong or the model differs."""
    hidden = capture(model, module, ids, torch.ones_like(ids))[where]  # [n, d]
    rows = store[np.arange(len(hidden))].to(hidden.device)
    error = float((hidden - rows).norm() / rows.norm().clamp_min(1e-12))
    if error > 0.02:
        raise DataError(
            f"the model's activations at {store.manifest['hookpoint']} differ from the store's "
            f"rows (relative error {error:.3g}): the store was not harvested from this model"
        )


def evaluate(cfg: EvalConfig) -> dict:
    """Estimate and save the inference thresholds, measure everything on the held-out store,
    and write OUT/metrics.json (and the report); returns the metrics."""
    run = Path(cfg.run)
    sae, train_cfg = load_run(run, cfg.device)
    store = Store(cfg.store)
    if store.shape[1] != sae.cfg.d_in:
        raise DataError(
            f"store {cfg.store} holds width {store.shape[1]}, the SAE reads "
            f"{sae.cfg.d_in}: evaluate on activations of the training hookpoint"
        )
    B = int(train_cfg.get("batch_size", 1536))
    calibration = calibration_rows(cfg, train_cfg, B).to(cfg.device)
    x_cal, _ = normalize(calibration, sae.cfg.normalize, sae.scale)
    fitted = estimate_thresholds_(sae, list(x_cal.split(B)))
    sae.save_pretrained(run / "sae")  # the thresholds travel with the model
    x = whole_batches(store, cfg.max_tokens, B, f"store {cfg.store}").to(cfg.device)
    inference, batch = compare_inference(sae, x, B)
    result = {
        "run": str(run),
        "store": str(cfg.store),
        "model": store.manifest.get("model"),
        "hookpoint": store.manifest.get("hookpoint"),
        "sparsifier": sae.cfg.sparsifier,
        "k": sae.cfg.k,
        "num_latents": sae.cfg.num_latents,
        "d_in": sae.cfg.d_in,
        "batch_size": B,
        "tokens": len(x),
        **batch.summary(),
        "l0_std": float(batch.l0.float().std()) if len(x) > 1 else 0.0,
        "thresholds": fitted,
        "inference": inference,
        "allocation": metrics.allocation_metrics(batch.counts, len(x), float(sae.zipf[0])),
        "features_per_token": metrics.features_per_token(
            batch.l0, first_tokens(store.manifest, len(x))
        ),
        "progressive": progressive_codes(sae, x, B),
        "training": training_curves(run),
    }
    if cfg.splice_contexts:
        result["splice"] = splice_metrics(sae, store, x.mean(0), cfg.splice_contexts, B)
    out = Path(cfg.out or run / "eval")
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result, indent=1) + "\n")
    if cfg.report:
        from choicesae.report import write_report  # matplotlib: imported when drawing only

        write_report(result, out)
    return result


def summary_line(result: dict) -> str:
    """One line for the terminal."""
    line = f"L0 {result['l0']:.2f}  FVU {result['fvu']:.4f}  dead {result['allocation']['dead']}"
    if "splice" in result:
        line += f"  loss recovered {100 * result['splice']['loss_recovered']['sae']:.2f}%"
    return line
