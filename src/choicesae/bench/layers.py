"""`choicesae bench layers`: per-layer transcoder sets, the replacement model of attribution
graphs, on a slice of a causal LM's layers: TopK, Mutual and Feature Choice, each with and
without a skip path, at the same k; and cross-layer transcoders (the `clt_` methods) over the
same slice at the same total L0, k per layer times the slice's L layers for the whole CLT.

One forward pass harvests every layer's MLP input and output of the slice into one store
(data/store.py), and the text that follows it, held out, into another; each (method, skip,
seed) trains the slice's transcoders from one read of the store (training/many.py). Each
transcoder is measured on the held-out rows, each token encoded on its own (the default codes):
L0, FVU of its MLP's output and dead latents (none fired on the held-out rows). The set is then
spliced in whole, every MLP of the slice replaced in one forward pass
(evaluate.set_splice_metrics): CE loss recovered (against zero ablation of those MLPs), ΔCE and
KL of the next-token distribution. A CLT is one run (train --cross-layer) on the same store,
measured on the same rows by `choicesae eval`'s cross-layer metrics (evaluation/cross_layer.py):
each layer's L0 (how its selection spreads the budget over depth), FVU and dead latents, and
every MLP of the slice replaced by its outputs in one pass.

Results accumulate in OUT/results.jsonl (a set already there is not trained again), then
OUT/table.md: mean ± std over seeds.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from choicesae.core.config import SAEConfig, TrainConfig
from choicesae.data.harvest import HarvestConfig, harvest
from choicesae.data.hooks import SMOLLM2
from choicesae.data.store import Store
from choicesae.errors import ConfigError
from choicesae.evaluation.evaluate import EvalConfig, evaluate, set_splice_metrics
from choicesae.training.many import train_many

SPARSIFIERS = ("topk", "mutual_choice", "feature_choice")
# a CLT method: (sparsifier, per_layer). Global selection spends the budget k·L over every
# layer's latents at once; per-layer selection gives each layer k (SAEConfig.per_layer)
CLT_METHODS = {
    "clt_topk": ("topk", False),
    "clt_topk_per_layer": ("topk", True),
    "clt_mutual_choice": ("mutual_choice", False),
    "clt_mutual_choice_per_layer": ("mutual_choice", True),
    "clt_feature_choice": ("feature_choice", False),
}
METHODS = (*SPARSIFIERS, *CLT_METHODS)
SETTINGS = ("model", "layers", "k", "expansion", "tokens", "steps", "batch_size", "heldout_tokens")


@dataclass(frozen=True)
class LayersBenchConfig:
    """Per-layer transcoder sets on a slice of layers (every MLP of the slice replaced),
    every sparsifier with and without skip, at the same k, and cross-layer transcoders at k
    per layer (table over seeds)."""

    out: str = ""
    """Folder of the stores, runs, results.jsonl and table.md; empty: runs/bench-layers."""
    model: str = SMOLLM2
    """A Llama-family causal LM (MLP input: layers.L.post_attention_layernorm; output:
    layers.L.mlp), SmolLM2-135M by default."""
    layers: str = "14,15"
    """Comma-separated layer indices: the slice whose MLPs the set replaces."""
    methods: str = ",".join(SPARSIFIERS)
    """Comma-separated methods: per-layer sets (topk, mutual_choice, feature_choice) and
    cross-layer transcoders at the same total L0 (clt_topk, clt_topk_per_layer,
    clt_mutual_choice, clt_mutual_choice_per_layer, clt_feature_choice)."""
    skips: str = "false,true"
    """Train without (false) and with (true) the skip path W_skip."""
    k: int = 32
    """Target L0 of every transcoder (a CLT's: k times the slice's layers)."""
    expansion: int = 4
    """Latents per transcoder (per layer of a CLT) as a multiple of the MLP's input width."""
    tokens: int = 98_304
    """Training rows harvested from the default corpus."""
    steps: int = 200
    """Optimiser steps of every run."""
    batch_size: int = 1024
    """Tokens per step."""
    heldout_tokens: int = 16_384
    """Held-out rows: the text that follows the training harvest."""
    splice_contexts: int = 64
    """Held-out contexts run through the model with the set spliced in."""
    seeds: int = 3
    """Seeds: each initialises and shuffles every run."""
    device: str = "cpu"
    """Torch device."""
    progress: bool = False
    """Show the harvests' and runs' progress bars."""

    def __post_init__(self):
        if not self.method_list or set(self.method_list) - set(METHODS):
            raise ConfigError(f"methods must be among {', '.join(METHODS)}, got {self.methods!r}")
        if not self.skip_list or not set(self.skips.split(",")) <= {"false", "true"}:
            raise ConfigError(f"skips must be false, true or both, got {self.skips!r}")
        if not self.layer_list:
            raise ConfigError(f"layers must be comma-separated indices, got {self.layers!r}")
        for name in ("k", "expansion", "tokens", "steps", "batch_size", "heldout_tokens", "seeds"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")

    @property
    def method_list(self) -> list[str]:
        return [m.strip() for m in self.methods.split(",") if m.strip()]

    @property
    def skip_list(self) -> list[bool]:
        return [s.strip() == "true" for s in self.skips.split(",") if s.strip()]

    @property
    def layer_list(self) -> list[int]:
        try:
            return [int(i) for i in self.layers.split(",") if i.strip()]
        except ValueError:
            return []

    @property
    def folder(self) -> Path:
        return Path(self.out or "runs/bench-layers")


def mlp_pairs(layers: list[int]) -> tuple[str, str]:
    """(--hookpoint, --target) of a Llama-family model's MLP inputs and outputs at `layers`."""
    hookpoints = ",".join(f"layers.{i}.post_attention_layernorm" for i in layers)
    return hookpoints, ",".join(f"layers.{i}.mlp" for i in layers)


def stores(cfg: LayersBenchConfig) -> tuple[Store, Store]:
    """(training store, held-out store): every MLP input and output of the slice from one pass
    over the default corpus, and over the text that follows it; finished harvests are reused."""
    hookpoint, target = mlp_pairs(cfg.layer_list)
    found = []
    for name, skip, tokens in (
        ("train", 0, cfg.tokens),
        ("heldout", cfg.tokens, cfg.heldout_tokens),
    ):
        harvest_cfg = HarvestConfig(
            model=cfg.model, hookpoint=hookpoint, target=target, tokens=tokens, skip=skip,
            out=str(cfg.folder / "stores" / name), device=cfg.device, progress=cfg.progress,
        )  # fmt: skip
        found.append(harvest(harvest_cfg))
    return found[0], found[1]


def train_config(cfg: LayersBenchConfig, train_store: Store, method, skip, seed) -> TrainConfig:
    """The run of (method, skip, seed) on the slice's store: one transcoder per layer at k, or
    one CLT over the slice at k per layer (k·L in all)."""
    clt = method in CLT_METHODS
    L = len(cfg.layer_list) if clt else 1  # the layers of one model
    sparsifier, per_layer = CLT_METHODS.get(method, (method, False))
    return TrainConfig(
        store=str(train_store.path), transcoder=True, cross_layer=clt,
        sae=SAEConfig(
            sparsifier=sparsifier, k=cfg.k * L, expansion=cfg.expansion, skip=skip, layers=L,
            per_layer=per_layer,
        ),
        steps=cfg.steps, batch_size=cfg.batch_size, seed=seed,
        out=str(cfg.folder / "runs" / f"{method}{'-skip' if skip else ''}-seed{seed}"),
        overwrite=True, device=cfg.device, progress=cfg.progress,
    )  # fmt: skip


def run_set(cfg: LayersBenchConfig, train_store: Store, heldout: Store, method, skip, seed) -> dict:
    """Train the slice's transcoders from one read (or its CLT), measure each layer on the
    held-out rows and the set spliced in whole."""
    train_cfg = train_config(cfg, train_store, method, skip, seed)
    if train_cfg.cross_layer:
        measured = run_clt(cfg, train_cfg, heldout)
    else:
        measured = run_per_layer(cfg, train_cfg, heldout)
    return {
        "method": method,
        "skip": skip,
        "seed": seed,
        **{name: getattr(cfg, name) for name in SETTINGS},
        **measured,
    }


def run_clt(cfg: LayersBenchConfig, train_cfg: TrainConfig, heldout: Store) -> dict:
    """Train the CLT and measure it on the held-out rows: each layer's L0, FVU and dead
    latents, and every MLP of the slice replaced by it in one pass."""
    train_many(train_cfg)
    eval_cfg = EvalConfig(
        run=train_cfg.out, store=str(heldout.path), max_tokens=cfg.heldout_tokens,
        splice_contexts=cfg.splice_contexts, report=False, seed=train_cfg.seed,
        device=cfg.device,
    )  # fmt: skip
    result = evaluate(eval_cfg)
    layers = result["layers"]
    per_layer = [
        {"l0": l0, "fvu": fvu, "dead": dead}
        for l0, fvu, dead in zip(layers["l0"], layers["fvu"], layers["dead"], strict=True)
    ]
    return {"per_layer": per_layer, **spliced(result["splice"])}


def spliced(result: dict) -> dict:
    """A record's downstream losses, of splice.replaced_set's result."""
    return {
        "loss_recovered": result["loss_recovered"]["transcoders"],
        "delta_ce": result["delta_loss"]["transcoders"],
        "kl": result["kl"]["transcoders"],
        "ce_clean": result["losses"]["clean"],
    }


def run_per_layer(cfg: LayersBenchConfig, train_cfg: TrainConfig, heldout: Store) -> dict:
    """Train the slice's transcoders from one read, measure each on the held-out rows and the
    set spliced in whole."""
    out, seed = Path(train_cfg.out), train_cfg.seed
    saes = train_many(train_cfg)
    per_layer = []
    for sae in saes:
        run = out / sae.cfg.hookpoint
        eval_cfg = EvalConfig(
            run=str(run), store=str(heldout.path), max_tokens=cfg.heldout_tokens,
            splice_contexts=0, report=False, seed=seed, device=cfg.device,
        )  # fmt: skip
        result = evaluate(eval_cfg)
        per_layer.append(
            {"l0": result["l0"], "fvu": result["fvu_raw"], "dead": result["allocation"]["dead"]}
        )
    set_result = set_splice_metrics(saes, heldout, cfg.splice_contexts, cfg.batch_size)
    return {"per_layer": per_layer, **spliced(set_result)}


def layers_bench(cfg: LayersBenchConfig) -> Path:
    """Harvest, train and measure every (method, skip, seed) not yet in OUT/results.jsonl;
    write OUT/table.md and return it."""
    cfg.folder.mkdir(parents=True, exist_ok=True)
    results = cfg.folder / "results.jsonl"
    records = [json.loads(x) for x in results.read_text().splitlines()] if results.is_file() else []
    mine = [r for r in records if all(r.get(k) == getattr(cfg, k) for k in SETTINGS)]
    done = {(r["method"], r["skip"], r["seed"]) for r in mine}
    train_store, heldout = stores(cfg)
    for seed in range(cfg.seeds):
        for method in cfg.method_list:
            for skip in cfg.skip_list:
                if (method, skip, seed) in done:
                    continue
                record = run_set(cfg, train_store, heldout, method, skip, seed)
                with results.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                mine.append(record)
                print(json.dumps(record))
    text = table(cfg, mine)
    (cfg.folder / "table.md").write_text(text + "\n")
    print(text)
    return cfg.folder / "table.md"


def table(cfg: LayersBenchConfig, records: list[dict]) -> str:
    """Mean ± std over seeds of each (method, skip): the L0 of all layers together (the
    budget), per-layer L0 (how it spreads over depth), FVU and dead latents, and the whole
    set's CE loss recovered, ΔCE and KL."""
    layers = cfg.layer_list
    per_layer = [f"L0 {i} | FVU {i} | dead {i}" for i in layers]
    head = (
        f"{cfg.model}: MLPs of layers {cfg.layers} replaced, k {cfg.k} per layer (a CLT's "
        f"{cfg.k * len(layers)} over all), F = {cfg.expansion} x d per layer, "
        f"{cfg.steps} x {cfg.batch_size} tokens, held-out {cfg.heldout_tokens} rows and "
        f"{cfg.splice_contexts} contexts\n\n"
        f"| method | skip | L0 | {' | '.join(per_layer)} | CE loss recovered | ΔCE | KL |\n"
        "|---|---|---|" + "---|" * (3 * len(layers) + 3)
    )
    lines = [head]
    for method in cfg.method_list:
        for skip in cfg.skip_list:
            rows = [r for r in records if (r["method"], r["skip"]) == (method, skip)]
            if not rows:
                continue
            cells = [_cell([sum(layer["l0"] for layer in r["per_layer"]) for r in rows])]
            cells += [
                _cell([r["per_layer"][j][key] for r in rows])
                for j in range(len(layers))
                for key in ("l0", "fvu", "dead")
            ]
            cells += [_cell([r[key] for r in rows]) for key in ("loss_recovered", "delta_ce", "kl")]
            lines.append(f"| {method} | {'yes' if skip else 'no'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(values: list[float]) -> str:
    mean = float(np.mean(values))
    return f"{mean:.4g} ± {float(np.std(values)):.2g}" if len(values) > 1 else f"{mean:.4g}"
