"""Feature browser: static HTML pages, one per feature, with its top-activating held-out
contexts (tokens shaded by activation), its density and a histogram of its activations, and an
index page linking them. Activations come from batch inference (the training sparsifier) on the
store's rows, which are whole contexts in order.
"""

import html
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from choicesae.data.hooks import load_tokenizer  # noqa: E402
from choicesae.data.store import open_store  # noqa: E402
from choicesae.errors import ConfigError, DataError  # noqa: E402
from choicesae.evaluation.evaluate import check_rows, load_run, whole_batches  # noqa: E402
from choicesae.evaluation.report import embed, page, save, table  # noqa: E402


@dataclass(frozen=True)
class BrowseConfig:
    """Write static HTML pages of a run's features on a held-out store."""

    run: str = ""
    """Run folder (also accepted as the first argument)."""
    store: str = ""
    """Activation store harvested with a model and text (its tokens are shown)."""
    top: int = 16
    """Pages for this many of the most frequent features on the store."""
    features: str = ""
    """Comma-separated feature ids to add, e.g. 3,17,42."""
    contexts: int = 12
    """Top-activating contexts shown per feature."""
    window: int = 10
    """Tokens shown either side of the top-activating token."""
    max_tokens: int = 65_536
    """Store rows read."""
    out: str = ""
    """Folder for the pages; empty: RUN/browser."""
    device: str = "cpu"
    """Torch device."""

    def __post_init__(self):
        for name in ("top", "contexts", "max_tokens"):
            if getattr(self, name) < 0 or (name != "top" and getattr(self, name) < 1):
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.window < 0:
            raise ConfigError(f"window must not be negative, got {self.window}")


def parse_features(spec: str, num_latents: int) -> list[int]:
    """Feature ids from "3,17,42"; each must lie in [0, num_latents)."""
    try:
        ids = [int(s) for s in spec.split(",") if s.strip()]
    except ValueError as e:
        raise ConfigError(f"--features must be comma-separated integers, not {spec!r}") from e
    bad = [i for i in ids if not 0 <= i < num_latents]
    if bad:
        raise ConfigError(
            f"features {bad} out of range: the SAE has {num_latents} (0..{num_latents - 1})"
        )
    return ids


@torch.no_grad()
def feature_activations(sae, x: Tensor, batch_size: int, features: list[int] | None) -> Tensor:
    """Batch-inference activations of raw rows x [N, d_in (+ d_out)]: [F] firing counts if
    `features` is None, else the columns [N, len(features)] of those features (on the CPU:
    never N x F). A transcoder's features read its input, as an SAE's."""
    x_n, _ = sae.prepare(x)
    parts = []
    for batch in x_n.split(batch_size):
        acts = sae.encode(batch).acts  # [B, F]
        parts.append((acts > 0).sum(0) if features is None else acts[:, features].cpu())
    return sum(parts) if features is None else torch.cat(parts)


def top_contexts(acts: Tensor, per_context: int, n: int, window: int) -> list[tuple[int, int, int]]:
    """(row of the peak, first row, end row) of the n largest activations of one feature [N],
    each window cut to the peak's own context (rows per_context at a time)."""
    values, rows = acts.topk(min(n, int((acts > 0).sum())))
    spans = []
    for row in rows.tolist():
        start = row // per_context * per_context
        first, end = max(start, row - window), min(start + per_context, row + window + 1, len(acts))
        spans.append((row, first, end))
    return spans


def display_tokens(tokenizer, ids: list[int]) -> list[str]:
    """Each token as it reads in running text: byte-level BPE's Ġ/Ċ and SentencePiece's ▁
    become a space or newline, WordPiece words get a space unless they continue one (##)."""
    wordpiece = "##s" in tokenizer.get_vocab()
    words = []
    for token in tokenizer.convert_ids_to_tokens(ids):
        if wordpiece:
            words.append(token[2:] if token.startswith("##") else " " + token)
        else:
            words.append(token.replace("Ġ", " ").replace("Ċ", "\n").replace("▁", " "))
    return words


def shade(token: str, value: float, peak: float) -> str:
    """A token as a span whose orange background grows with its activation."""
    alpha = 0.0 if peak <= 0 else min(1.0, value / peak)
    text = html.escape(token).replace("\n", "↵") or "&nbsp;"
    return (
        f'<span title="{value:.3g}" style="background:rgba(255,140,0,{alpha:.2f});'
        f'white-space:pre">{text}</span>'
    )


def histogram(values: np.ndarray, path: Path, feature: int) -> Path:
    fig, ax = plt.subplots(figsize=(5, 2.6))
    ax.hist(values, bins=40)
    ax.set(xlabel="activation (when active)", ylabel="tokens", title=f"feature {feature}")
    return save(fig, path)


def feature_page(
    feature: int, acts: Tensor, words: list[str], per_context: int, cfg: BrowseConfig, folder: Path
) -> dict:
    """Write feature-XXXXX.html; returns its index-page entry."""
    active = acts[acts > 0].numpy()
    peak = float(acts.max())
    rows = []
    for row, first, end in top_contexts(acts, per_context, cfg.contexts, cfg.window):
        text = "".join(shade(words[r], float(acts[r]), peak) for r in range(first, end))
        rows.append(
            f"<tr><td>{float(acts[row]):.3g}</td><td style='text-align:left'>{text}</td></tr>"
        )
    density = len(active) / len(acts)
    image = (
        histogram(active, folder / f"feature-{feature:05d}.png", feature) if len(active) else None
    )
    body = (
        '<p><a href="index.html">all features</a></p>'
        + table(["density", "active tokens", "max activation"], [[density, len(active), peak]])
        + (embed(image, "activation histogram") if image else "<p>never active here</p>")
        + "<h2>Top-activating contexts</h2><table><tr><th>activation</th><th>context</th></tr>"
        + "".join(rows)
        + "</table>"
    )
    (folder / f"feature-{feature:05d}.html").write_text(page(f"Feature {feature}", body))
    top_word = words[int(acts.argmax())] if len(active) else ""
    return {"feature": feature, "density": density, "max": peak, "top": top_word}


def browse(cfg: BrowseConfig) -> Path:
    """Pages for the `top` most frequent features and those asked for; returns the index."""
    sae, train_cfg = load_run(cfg.run, cfg.device)
    store = open_store(cfg.store, sae.cfg.hookpoint)
    check_rows(store, sae, f"store {cfg.store}")
    if not isinstance(store.manifest.get("context"), int):
        raise DataError(f"store {cfg.store} records no context length: not a harvest")
    asked = parse_features(cfg.features, sae.cfg.num_latents)
    B = int(train_cfg.get("batch_size", 1536))
    x = whole_batches(store, cfg.max_tokens, B, f"store {cfg.store}").to(cfg.device)
    counts = feature_activations(sae, x, B, None)  # [F]
    order = counts.cpu().sort(descending=True, stable=True).indices
    chosen = list(dict.fromkeys([*order[: cfg.top].tolist(), *asked]))
    acts = feature_activations(sae, x, B, chosen)  # [N, len(chosen)]
    tokenizer = load_tokenizer(store.manifest["model"])
    words = display_tokens(tokenizer, store.tokens()[: len(x)].tolist())
    per_context = store.manifest["context"] - bool(store.manifest.get("drop_first"))
    folder = Path(cfg.out or Path(cfg.run) / "browser")
    folder.mkdir(parents=True, exist_ok=True)
    entries = [
        feature_page(f, acts[:, i], words, per_context, cfg, folder) for i, f in enumerate(chosen)
    ]
    links = [
        [
            f'<a href="feature-{e["feature"]:05d}.html">{e["feature"]}</a>',
            e["density"],
            e["max"],
            e["top"],
        ]
        for e in entries
    ]
    index = folder / "index.html"
    index.write_text(page(f"Features of {Path(cfg.run).name}", link_table(links)))
    return index


def link_table(rows: list[list]) -> str:
    """Index table whose first cells are (trusted) links."""
    body = "".join(
        f"<tr><td>{r[0]}</td><td>{r[1]:.4g}</td><td>{r[2]:.4g}</td><td>{html.escape(r[3])}</td></tr>"
        for r in rows
    )
    return (
        "<table><tr><th>feature</th><th>density</th><th>max activation</th>"
        f"<th>top token</th></tr>{body}</table>"
    )
