"""`choicesae bench transcoder`: a transcoder of an MLP against an SAE of the MLP's output, at
the same L0, scored by the loss recovered when each is spliced into the model in place of the
MLP's output.

Both read the same tokens of the same text. The transcoder reads the MLP's input (--hookpoint)
and predicts its output (--target), from a harvest of both (`choicesae harvest --target`); the
SAE reads and reconstructs the MLP's output alone, from a harvest of the target. Each is
evaluated by `choicesae eval` on held-out text (by default, other documents of the same kind:
the Python library reference for training, the Python tutorial held out), harvested the same
two ways: L0, FVU of the MLP's output, and the loss recovered with the MLP's output replaced
(splice.py), by batch inference and by per-feature thresholds (appendix B). Every sparsifier
trains with its library defaults, so Feature Choice is the phased default.

Results accumulate in OUT/results.jsonl (a run already there is not trained again), then
OUT/table.md: mean ± std over seeds.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from choicesae.core.config import SAEConfig, TrainConfig
from choicesae.data.harvest import HarvestConfig, harvest
from choicesae.data.hooks import DEFAULT_MODEL
from choicesae.data.text import PYTHON_DOCS
from choicesae.errors import ConfigError
from choicesae.evaluation.evaluate import EvalConfig, evaluate
from choicesae.training.loop import train

KINDS = ("sae", "transcoder")
SPARSIFIERS = ("topk", "mutual_choice", "feature_choice")  # relu's L0 is not set by k
SETTINGS = (
    "model",
    "hookpoint",
    "target",
    "k",
    "expansion",
    "text",
    "tokens",
    "steps",
    "batch_size",
)


@dataclass(frozen=True)
class TranscoderBenchConfig:
    """Transcoders of an MLP against SAEs of its output at the same L0, every sparsifier,
    scored by the loss recovered in the model (table over seeds)."""

    out: str = ""
    """Folder of the stores, runs, results.jsonl and table.md; empty: runs/bench-transcoder."""
    model: str = DEFAULT_MODEL
    """Model folder or hub name (the embedded MiniLM by default)."""
    hookpoint: str = "encoder.layer.3.attention.output"
    """The MLP's input: the module whose output the MLP reads (MiniLM's layer 3 MLP)."""
    target: str = "encoder.layer.3.output.dense"
    """The MLP's output, before the residual sum and LayerNorm (MiniLM's layer 3 MLP)."""
    methods: str = ",".join(SPARSIFIERS)
    """Comma-separated sparsifiers, each trained as a transcoder and as an SAE."""
    k: int = 32
    """Target L0 of every run."""
    expansion: int = 8
    """Latents as a multiple of the input width."""
    text: str = ""
    """Training text (as harvest's --text); empty: the Python documentation's library
    reference (python3-doc)."""
    tokens: int = 400_000
    """Training rows harvested from --text."""
    steps: int = 250
    """Optimiser steps of every run."""
    batch_size: int = 1536
    """Tokens per step (the paper's)."""
    heldout_text: str = ""
    """Held-out text (as harvest's --text); empty: the Python tutorial, other documents of the
    training text's kind, so that the comparison is not one of domain transfer."""
    heldout_tokens: int = 32_768
    """Held-out rows harvested from --heldout-text."""
    splice_contexts: int = 128
    """Held-out contexts run through the model for the loss recovered."""
    seeds: int = 1
    """Seeds: each initialises and shuffles every run."""
    device: str = "cpu"
    """Torch device."""
    progress: bool = False
    """Show the harvests' and runs' progress bars."""

    def __post_init__(self):
        if not self.method_list or set(self.method_list) - set(SPARSIFIERS):
            raise ConfigError(
                f"methods must be among {', '.join(SPARSIFIERS)}, got {self.methods!r}"
            )
        for name in ("k", "expansion", "tokens", "steps", "batch_size", "heldout_tokens", "seeds"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.hookpoint == self.target:
            raise ConfigError("hookpoint and target must be two modules: the MLP's input, output")

    @property
    def method_list(self) -> list[str]:
        return [m.strip() for m in self.methods.split(",") if m.strip()]

    @property
    def folder(self) -> Path:
        return Path(self.out or "runs/bench-transcoder")


def python_docs(part: str) -> str:
    """A folder of the Python documentation's sources (python3-doc)."""
    found = sorted(PYTHON_DOCS.glob(f"python3*/html/_sources/{part}"))
    if not found:
        raise ConfigError(
            f"no Python documentation here ({PYTHON_DOCS}/python3*/html/_sources/{part}, the "
            "python3-doc package); give --text and --heldout-text"
        )
    return str(found[-1])


def stores(cfg: TranscoderBenchConfig) -> dict[tuple[str, str], str]:
    """{(kind, split): store folder}: the training and held-out text harvested as (input,
    target) pairs for the transcoders and as the target alone for the SAEs; a finished harvest
    is reused."""
    found = {}
    for split, text, tokens in (
        ("train", cfg.text or python_docs("library"), cfg.tokens),
        ("heldout", cfg.heldout_text or python_docs("tutorial"), cfg.heldout_tokens),
    ):
        for kind in KINDS:
            out = cfg.folder / "stores" / f"{kind}-{split}"
            hookpoint, target = (
                (cfg.hookpoint, cfg.target) if kind == "transcoder" else (cfg.target, "")
            )
            harvest(
                HarvestConfig(
                    model=cfg.model, hookpoint=hookpoint, target=target, text=text, tokens=tokens,
                    out=str(out), device=cfg.device, progress=cfg.progress,
                )
            )  # fmt: skip
            found[kind, split] = str(out)
    return found


def run_one(cfg: TranscoderBenchConfig, found: dict, kind: str, method: str, seed: int) -> dict:
    """Train one run on the training store of its kind and evaluate it on the held-out one."""
    out = cfg.folder / "runs" / f"{kind}-{method}-seed{seed}"
    train_cfg = TrainConfig(
        store=found[kind, "train"],
        transcoder=kind == "transcoder",
        sae=SAEConfig(sparsifier=method, k=cfg.k, expansion=cfg.expansion),
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        seed=seed,
        out=str(out),
        overwrite=True,
        device=cfg.device,
        progress=cfg.progress,
    )
    train(train_cfg)
    eval_cfg = EvalConfig(
        run=str(out),
        store=found[kind, "heldout"],
        max_tokens=cfg.heldout_tokens,
        splice_contexts=cfg.splice_contexts,
        report=False,
        seed=seed,
        device=cfg.device,
    )
    result = evaluate(eval_cfg)
    recovered = result["splice"]["loss_recovered"]
    return {
        "kind": kind,
        "method": method,
        "seed": seed,
        **settings(cfg),
        "l0": result["l0"],
        "fvu": result["fvu_raw"],
        "l0_feature_threshold": result["inference"]["feature_threshold"]["l0"],
        "fvu_feature_threshold": result["inference"]["feature_threshold"]["fvu_raw"],
        "loss_recovered": recovered["sae"],
        "loss_recovered_feature_threshold": recovered["sae_feature_threshold"],
        "dead": result["allocation"]["dead"],
    }


def settings(cfg: TranscoderBenchConfig) -> dict:
    return {name: getattr(cfg, name) for name in SETTINGS}


def transcoder_bench(cfg: TranscoderBenchConfig) -> Path:
    """Harvest, train and evaluate every (kind, method, seed) not yet in OUT/results.jsonl;
    write OUT/table.md and return it."""
    cfg.folder.mkdir(parents=True, exist_ok=True)
    results = cfg.folder / "results.jsonl"
    records = read_records(results)
    done = {(r["kind"], r["method"], r["seed"]) for r in records if _same(r, cfg)}
    found = stores(cfg)
    for seed in range(cfg.seeds):
        for method in cfg.method_list:
            for kind in KINDS:
                if (kind, method, seed) in done:
                    continue
                record = run_one(cfg, found, kind, method, seed)
                with results.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                records.append(record)
                print(json.dumps(record))
    text = table(cfg, [r for r in records if _same(r, cfg)])
    (cfg.folder / "table.md").write_text(text + "\n")
    print(text)
    return cfg.folder / "table.md"


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _same(record: dict, cfg: TranscoderBenchConfig) -> bool:
    """Whether a stored record was measured with this bench's settings."""
    return all(record.get(k) == v for k, v in settings(cfg).items())


def table(cfg: TranscoderBenchConfig, records: list[dict]) -> str:
    """Mean ± std over seeds of each (method, kind): L0, FVU and the loss recovered by batch
    inference and by per-feature thresholds."""
    head = (
        f"{cfg.model}: {cfg.hookpoint} -> {cfg.target}, k {cfg.k}, F = {cfg.expansion} x d, "
        f"{cfg.steps} x {cfg.batch_size} tokens\n\n"
        "| method | kind | L0 | FVU | loss recovered | L0 (θ) | FVU (θ) | loss recovered (θ) "
        "| dead |\n|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    keys = ("l0", "fvu", "loss_recovered", "l0_feature_threshold", "fvu_feature_threshold")
    keys += ("loss_recovered_feature_threshold", "dead")
    for method in cfg.method_list:
        for kind in KINDS:
            rows = [r for r in records if (r["method"], r["kind"]) == (method, kind)]
            if rows:
                cells = [_cell([r[key] for r in rows]) for key in keys]
                lines.append(f"| {method} | {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(values: list[float]) -> str:
    mean = float(np.mean(values))
    return f"{mean:.4g} ± {float(np.std(values)):.2g}" if len(values) > 1 else f"{mean:.4g}"
