"""The bench's figures (bench/paper.py): the L0-FVU Pareto plot, FVU across the switch from Mutual
to Feature Choice, and the features-per-token histograms (appendix D)."""

from pathlib import Path

import numpy as np

from choicesae.evaluation.evaluate import training_curves
from choicesae.evaluation.report import plt, save

METHOD_STYLE = {
    "topk": ("tab:blue", "o"),
    "mutual_choice": ("tab:orange", "s"),
    "feature_choice": ("tab:green", "^"),
    "feature_choice_uniform": ("tab:olive", "P"),
    "feature_choice_zipf": ("tab:red", "v"),
    "relu": ("tab:gray", "D"),
    "mutual_choice_no_aux_zipf": ("tab:purple", "x"),
    "feature_choice_zipf_alpha": ("tab:pink", ">"),
    "topk_matryoshka": ("tab:cyan", "o"),
    "mutual_choice_matryoshka": ("gold", "s"),
    "feature_choice_matryoshka": ("lime", "^"),
    "mutual_choice_fc_inference": ("tab:brown", "s"),
    "feature_choice_mc_inference": ("darkgreen", "^"),
    "mutual_choice_unaveraged": ("navajowhite", "s"),
    "feature_choice_unaveraged": ("darkseagreen", "^"),
}


def pareto_plot(rows: list[dict], path: Path) -> Path:
    """Held-out FVU against mean L0 per method (one point per k, mean ± std over seeds);
    hollow markers: the same SAEs with per-feature-threshold inference."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, (color, marker) in METHOD_STYLE.items():
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["L0"][0])
        if not mine:
            continue
        l0, fvu = (np.array([r[c] for r in mine]) for c in ("L0", "FVU"))
        ax.errorbar(
            l0[:, 0],
            fvu[:, 0],
            yerr=fvu[:, 1],
            xerr=l0[:, 1],
            color=color,
            marker=marker,
            label=method,
            capsize=2,
        )
        threshold = [r for r in mine if "FVU θ_i" in r]
        if threshold:
            tl0 = [r["L0 θ_i"][0] for r in threshold]
            tfvu = [r["FVU θ_i"][0] for r in threshold]
            ax.plot(tl0, tfvu, marker=marker, ls=":", color=color, mfc="none")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="mean L0 (held-out)",
        ylabel="FVU (held-out)",
        title="L0–FVU; hollow: per-feature threshold inference",
    )
    ax.legend(fontsize=8)
    return save(fig, path)


def phase_switch_plot(cfg, path: Path, methods: tuple[str, ...]) -> Path:
    """Training FVU of the phased Feature Choice runs (seed 0) of `methods` beside the
    Mutual Choice run on the same batches, one panel per k, the switch marked."""
    ks = cfg.k_list
    fig, axes = plt.subplots(1, len(ks), figsize=(5 * len(ks), 3.8), squeeze=False)
    switch = round(cfg.switch * cfg.steps)
    start = max(0, switch - cfg.steps // 4)
    for ax, k in zip(axes[0], ks, strict=True):
        shown = []
        for method in methods:
            logged = training_curves(cfg.folder / "runs" / f"{method}-k{k}-s0")
            step, fvu = np.array(logged["step"]), np.array(logged["fvu"])
            if len(step):
                ax.plot(step, fvu, label=method, color=METHOD_STYLE[method][0], lw=1)
                shown.append(fvu[step >= start])
        ax.axvline(switch, color="k", ls="--", lw=0.8)
        ax.set(xlim=(start, cfg.steps), xlabel="step", ylabel="training FVU", title=f"k = {k}")
        if shown:
            lo, hi = float(np.min(np.concatenate(shown))), float(np.max(np.concatenate(shown)))
            ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
        ax.legend(fontsize=8)
    return save(fig, path)


def features_per_token_plot(records: list[dict], k: int, path: Path) -> Path:
    """Held-out histograms of active features per token at budget k (seed 0), first tokens
    stacked apart: adaptive computation (section 4.2) and the first-token peak (appendix D)."""
    chosen = [r for r in records if r["k"] == k and r["seed"] == 0 and r["method"] != "relu"]
    chosen.sort(key=lambda r: list(METHOD_STYLE).index(r["method"]))
    fig, axes = plt.subplots(
        1, max(len(chosen), 1), figsize=(3.6 * max(len(chosen), 1), 3.4), squeeze=False
    )
    for ax, r in zip(axes[0], chosen, strict=False):
        fpt = r["features_per_token"]
        other, first = np.asarray(fpt["histogram"]), np.asarray(fpt["histogram_first"])
        x = np.arange(len(other))
        ax.bar(x, other, width=1.0, color=METHOD_STYLE[r["method"]][0], label="other tokens")
        if first.sum():
            ax.bar(x, first, width=1.0, bottom=other, color="k", label="first tokens")
        ax.set(title=r["method"], xlabel="active features", ylabel="tokens")
        ax.set_xlim(-0.5, max(4 * k, 1))
        ax.legend(fontsize=7)
    return save(fig, path)
