"""The evaluation report of one run, and the comparison of several: PNG figures (matplotlib)
and self-contained HTML pages (figures embedded as base64, no script, no external file).

Figures: the Zipf fit of feature densities on log-log axes (section 3.2, figure 3), the
features-per-token histogram with the first-token share (appendix D), progressive codes on the
L0–FVU plane (TopK paper 5.3; appendix E), dead and dying features over training.
"""

import base64
import html
import json
import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from choicesae.errors import ConfigError, DataError  # noqa: E402
from choicesae.evaluation.splice import headline_variant  # noqa: E402

STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
img{max-width:100%;border:1px solid #eee;margin:.5em 0}"""


def save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def zipf_figure(result: dict, path: Path) -> Path:
    """Sorted feature densities against rank on log-log axes, with the fitted Zipf curves."""
    alloc = result["allocation"]
    density = np.asarray(alloc["density_sorted"])
    rank = np.arange(1, len(density) + 1)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.loglog(rank[density > 0], density[density > 0], ".", ms=3, label="held-out density")
    for key, style in (("zipf", "--"), ("zipf_middle", ":")):
        fit = alloc[key]
        if math.isfinite(fit["alpha"]):
            curve = np.exp(fit["log_c"] - fit["alpha"] * np.log(rank + fit["beta"]))
            label = f"{key}: α={fit['alpha']:.2f} β={fit['beta']:.1f} R²={fit['r2']:.3f}"
            ax.loglog(rank, curve, style, label=label)
    ax.set(xlabel="feature rank", ylabel="density", title="Feature densities and Zipf fit")
    ax.legend(fontsize=8)
    return save(fig, path)


def features_per_token_figure(result: dict, path: Path) -> Path:
    """Histogram of active features per token; first (BOS/CLS) tokens stacked apart."""
    fpt = result["features_per_token"]
    other, first = np.asarray(fpt["histogram"]), np.asarray(fpt["histogram_first"])
    x = np.arange(len(other))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(x, other, width=1.0, label="other tokens")
    if fpt["first_tokens"]:
        ax.bar(
            x,
            first,
            width=1.0,
            bottom=other,
            color="C3",
            label=f"first token (BOS/CLS): mean L0 {fpt['first_token_l0']:.1f}",
        )
    else:
        ax.bar([], [], color="C3", label="first token: not in the store (harvest drop_first)")
    ax.axvline(result["l0"], color="k", ls="--", lw=1, label=f"mean L0 {result['l0']:.2f}")
    ax.set(xlabel="active features per token", ylabel="tokens", title="Features per token")
    ax.legend(fontsize=8)
    return save(fig, path)


def progressive_figure(result: dict, path: Path) -> Path:
    """FVU against L0 for the test-time sweeps, with the batch and threshold inference points."""
    fig, ax = plt.subplots(figsize=(6, 4))
    names = {"topk": "TopK(k')", "batch": f"{result['sparsifier']}(k')", "jumprelu": "JumpReLU(θ)"}
    for key, label in names.items():
        points = result["progressive"][key]
        if points:
            ls = "--" if key == "jumprelu" else "-"
            ax.plot([p["l0"] for p in points], [p["fvu"] for p in points], "o" + ls, label=label)
    for name, mark in (("batch", "k*"), ("feature_threshold", "rs"), ("global_threshold", "g^")):
        if name not in result["inference"]:  # an imported JumpReLU SAE has only its own
            continue
        p = result["inference"][name]
        ax.plot(p["l0"], p["fvu"], mark, ms=10, label=f"{name} inference")
    ax.set_xscale("log")
    ax.set(xlabel="L0", ylabel="FVU", title="Progressive codes (L0–FVU)")
    ax.legend(fontsize=7)
    return save(fig, path)


def training_figure(result: dict, path: Path) -> Path:
    """Dead and dying features logged during training."""
    curves = result["training"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ("dead", "dying"):
        pairs = [(s, v) for s, v in zip(curves["step"], curves[key], strict=True) if v is not None]
        if pairs:
            ax.plot(*zip(*pairs, strict=True), "o-", ms=3, label=key)
    if not curves["step"]:
        ax.text(0.5, 0.5, "no metrics.jsonl records", ha="center", transform=ax.transAxes)
    ax.set(xlabel="step", ylabel="features", title="Dead and dying features over training")
    ax.legend(fontsize=8)
    return save(fig, path)


FIGURES = {
    "zipf": zipf_figure,
    "features_per_token": features_per_token_figure,
    "progressive": progressive_figure,
    "training": training_figure,
}


def embed(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def table(header: list[str], rows: list[list]) -> str:
    """An HTML table; floats shown with 4 significant digits."""

    def cell(v) -> str:
        return f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def page(title: str, body: str) -> str:
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}'
        f"</title><style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{body}"
        "</body></html>\n"
    )


def summary_rows(result: dict) -> list[list]:
    """The headline metrics of one evaluation."""
    alloc, zipf = result["allocation"], result["allocation"]["zipf"]
    rows = [
        [
            "sparsifier, k, latents",
            f"{result['sparsifier']}, {result['k']}, {result['num_latents']}",
        ],
        ["held-out tokens", result["tokens"]],
    ]
    if t := result.get("transcoder"):  # MSE and FVU below are of its prediction of the target
        rows.append(["transcoder (input -> target)", f"{t['hookpoint']} -> {t['target']}"])
        rows.append(["target width d_out", t["d_out"]])
    rows += [
        ["L0 (mean ± std)", f"{result['l0']:.3f} ± {result['l0_std']:.3f}"],
        ["MSE (normalized)", result["mse"]],
        ["FVU (normalized)", result["fvu"]],
        ["FVU (model space)", result["fvu_raw"]],
        ["dead features", f"{alloc['dead']} ({alloc['dead_pct']:.2f}%)"],
        ["dying features (Def. 3.1)", alloc["dying"]],
        ["Zipf α, β, R²", f"{zipf['alpha']:.3f}, {zipf['beta']:.2f}, {zipf['r2']:.4f}"],
        ["global threshold θ", result["thresholds"]["threshold_global"]],
    ]
    if "splice" in result:
        s = result["splice"]
        v = headline_variant(result)  # the default codes' variant
        rows.append([f"loss recovered ({s['measure']})", s["loss_recovered"][v]])
        rows.append(["loss recovered vs mean ablation", s["loss_recovered_mean_ablation"]])
        rows.append([f"Δ{'CE (nats)' if 'kl' in s else ' loss'}", s["delta_loss"][v]])
        if "kl" in s:
            rows.append(["KL(clean ‖ spliced), nats per token", s["kl"][v]])
            rows.append(["KL recovered (vs zero ablation)", s["kl_recovered"][v]])
    return rows


def inference_table(result: dict) -> str:
    header = ["inference", "L0", "FVU", "MSE", "density corr.", "density rel. error"]
    rows = [
        [
            name,
            p["l0"],
            p["fvu"],
            p["mse"],
            p.get("density_corr", "—"),
            p.get("density_rel_error", "—"),
        ]
        for name, p in result["inference"].items()
    ]
    return table(header, rows)


def splice_table(result: dict) -> str:
    s = result.get("splice")
    if not s:
        return "<p>Splice skipped (--splice-contexts 0).</p>"
    rec, kl, kl_rec = s["loss_recovered"], s.get("kl", {}), s.get("kl_recovered", {})
    rows = [
        [name, loss, rec.get(name, "—"), kl.get(name, "—"), kl_rec.get(name, "—")]
        for name, loss in s["losses"].items()
    ]
    header = ["variant", "loss", "recovered", "KL", "KL recovered"]
    return (
        f"<p>{s['kind']} model, {s['contexts']} contexts, downstream loss: "
        f"{html.escape(s['measure'])}</p>" + table(header, rows)
    )


def write_report(result: dict, out: Path) -> Path:
    """OUT/{zipf,features_per_token,progressive,training}.png and OUT/report.html."""
    out = Path(out)
    images = {name: draw(result, out / f"{name}.png") for name, draw in FIGURES.items()}
    body = (
        f"<p>Run <code>{html.escape(result['run'])}</code> on the held-out store "
        f"<code>{html.escape(result['store'])}</code> ({html.escape(str(result['model']))} at "
        f"{html.escape(str(result['hookpoint']))}). All numbers: metrics.json.</p>"
        + table(["metric", "value"], summary_rows(result))
        + "<h2>Batch vs single-token inference (appendix B)</h2>"
        + inference_table(result)
        + "<h2>Downstream loss recovered</h2>"
        + splice_table(result)
        + "<h2>Figures</h2>"
        + "".join(embed(p, name) for name, p in images.items())
    )
    path = out / "report.html"
    path.write_text(page(f"choicesae evaluation: {Path(result['run']).name}", body))
    return path


def read_metrics(run: str | Path) -> dict:
    path = Path(run) / "eval" / "metrics.json"
    if not path.is_file():
        raise DataError(f"{run} has no eval/metrics.json; run `choicesae eval {run}` first")
    return json.loads(path.read_text())


@dataclass(frozen=True)
class CompareConfig:
    """Compare evaluated runs: the L0–FVU and L0–ΔCE (causal LM; else L0–loss recovered) Pareto
    plots and a table."""

    runs: str = ""
    """Comma-separated run folders, each evaluated first (also accepted as arguments)."""
    out: str = "compare"
    """Folder for compare.png, compare.html and compare.json."""


def pareto(points: list[tuple[float, float]]) -> list[bool]:
    """Which (l0, error) points no other point beats on both (lower is better on both)."""
    return [not any(o[0] <= p[0] and o[1] <= p[1] and o != p for o in points) for p in points]


def downstream_error(result: dict) -> tuple[str, float] | None:
    """(name, value) of a run's downstream error with its default codes, lower is better: ΔCE
    in nats for a causal LM, else 1 − loss recovered; None when evaluated without the splice."""
    s = result.get("splice")
    if not s:
        return None
    v = headline_variant(result)
    if "kl" in s:
        return "ΔCE (nats)", s["delta_loss"][v]
    return "1 − loss recovered", 1 - s["loss_recovered"][v]


def compare_figure(results: list[dict], path: Path) -> Path:
    """L0–FVU (with each run's own progressive curve) and L0–downstream error (ΔCE for a
    causal LM), one mark per run."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    ylabel = "downstream error"
    for i, r in enumerate(results):
        label = f"{Path(r['run']).name} ({r['sparsifier']})"
        curve = r["progressive"]["batch"]
        left.plot(
            [p["l0"] for p in curve], [p["fvu"] for p in curve], "-", color=f"C{i}", alpha=0.4
        )
        left.plot(r["l0"], r["fvu"], "o", color=f"C{i}", ms=8, label=label)
        if error := downstream_error(r):
            ylabel = error[0]
            right.plot(r["l0"], error[1], "o", color=f"C{i}", label=label)
    left.set(xscale="log", xlabel="L0", ylabel="FVU", title="L0–FVU (lines: k' sweep)")
    right.set(xlabel="L0", ylabel=ylabel, title=f"L0–{ylabel}")
    left.legend(fontsize=7)
    return save(fig, path)


def compare(cfg: CompareConfig) -> Path:
    """Read RUN/eval/metrics.json of every run; write the plot, the table and its JSON."""
    runs = [r.strip() for r in cfg.runs.split(",") if r.strip()]
    if not runs:
        raise ConfigError("compare needs at least one run: choicesae compare RUN [RUN ...]")
    results = [read_metrics(run) for run in runs]
    on_front = pareto([(r["l0"], r["fvu"]) for r in results])
    errors = [downstream_error(r) for r in results]
    spliced = [(r["l0"], e[1]) for r, e in zip(results, errors, strict=True) if e]
    on_downstream = iter(pareto(spliced))
    rows = []
    for r, front, error in zip(results, on_front, errors, strict=True):
        s, v = r.get("splice", {}), headline_variant(r)
        rows.append(
            [
                Path(r["run"]).name,
                r["sparsifier"],
                r["k"],
                r["num_latents"],
                r["l0"],
                r["fvu"],
                s["loss_recovered"][v] if s else "—",
                s["delta_loss"][v] if s else "—",
                s["kl"][v] if "kl" in s else "—",
                r["allocation"]["dead_pct"],
                "yes" if front else "no",
                ("yes" if next(on_downstream) else "no") if error else "—",
            ]
        )
    header = ["run", "sparsifier", "k", "latents", "L0", "FVU", "loss recovered"]
    header += ["ΔCE / Δloss", "KL", "dead %", "Pareto (L0, FVU)", "Pareto (L0, downstream)"]
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    image = compare_figure(results, out / "compare.png")
    (out / "compare.json").write_text(
        json.dumps([dict(zip(header, r, strict=True)) for r in rows], indent=1) + "\n"
    )
    path = out / "compare.html"
    path.write_text(page("choicesae comparison", table(header, rows) + embed(image, "Pareto")))
    return path
