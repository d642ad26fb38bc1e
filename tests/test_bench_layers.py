"""`choicesae bench layers` end to end on a tiny Llama: one harvest of every MLP of the slice,
one read per (method, skip, seed), per-layer held-out rows and the whole set spliced in."""

import json

from tiny_models import save_tiny_model

from choicesae.bench.layers import LayersBenchConfig, layers_bench


def test_the_bench_trains_and_splices_every_set(tmp_path):
    folder, _ = save_tiny_model("llama", tmp_path / "llama")
    cfg = LayersBenchConfig(
        out=str(tmp_path / "bench"), model=str(folder), layers="0,1", methods="topk,mutual_choice",
        k=4, expansion=2, tokens=3000, steps=6, batch_size=256, heldout_tokens=1024,
        splice_contexts=8, seeds=1,
    )  # fmt: skip
    table = layers_bench(cfg).read_text()
    records = [
        json.loads(x) for x in (tmp_path / "bench" / "results.jsonl").read_text().splitlines()
    ]
    assert {(r["method"], r["skip"]) for r in records} == {
        (m, s) for m in ("topk", "mutual_choice") for s in (False, True)
    }
    for r in records:
        assert len(r["per_layer"]) == 2 and 0 < r["kl"] and r["loss_recovered"] < 1
        assert all(0 < layer["fvu"] for layer in r["per_layer"])
    topk = [r for r in records if r["method"] == "topk"]
    assert all(layer["l0"] == 4 for r in topk for layer in r["per_layer"])  # TopK: exactly k
    assert table.count("| topk |") == 2 and "CE loss recovered" in table
    layers_bench(cfg)  # a second call trains nothing again
    assert len((tmp_path / "bench" / "results.jsonl").read_text().splitlines()) == 4
