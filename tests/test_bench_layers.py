"""`choicesae bench layers` end to end on a tiny Llama: one harvest of every MLP of the slice,
one read per (method, skip, seed), per-layer held-out rows and the whole set spliced in; a
cross-layer transcoder over the slice measured the same way."""

import json

from tiny_models import save_tiny_model

from choicesae.bench.layers import CLT_METHODS, LayersBenchConfig, layers_bench
from choicesae.core.sae import SAE


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


def test_clts_run_at_the_sets_total_l0_on_the_same_store(tmp_path):
    """Each clt_ method is one cross-layer transcoder over the slice at k per layer (k·L in
    all), measured per layer and spliced in whole as a set is, in the same record format."""
    folder, _ = save_tiny_model("llama", tmp_path / "llama")
    clts = list(CLT_METHODS)
    cfg = LayersBenchConfig(
        out=str(tmp_path / "bench"), model=str(folder), layers="0,1",
        methods=",".join(["topk", *clts]), skips="false", k=4, expansion=2, tokens=3000,
        steps=6, batch_size=256, heldout_tokens=1024, splice_contexts=8, seeds=1,
    )  # fmt: skip
    table = layers_bench(cfg).read_text()
    records = {
        r["method"]: r
        for r in map(json.loads, (tmp_path / "bench" / "results.jsonl").read_text().splitlines())
    }
    assert set(records) == {"topk", *clts}
    keys = set(records["topk"])
    for method in clts:
        r = records[method]
        assert set(r) == keys and len(r["per_layer"]) == 2  # the sets' record format
        assert 0 < r["kl"] and r["loss_recovered"] < 1
        assert all(0 < layer["fvu"] for layer in r["per_layer"])
        sae = SAE.from_pretrained(tmp_path / "bench" / "runs" / f"{method}-seed0" / "sae")
        assert (sae.cfg.layers, sae.cfg.k, sae.cfg.num_latents) == (2, 8, 2 * 2 * 32)
    # per-layer TopK gives each layer exactly k, as the set's TopK transcoders do
    assert all(layer["l0"] == 4 for layer in records["clt_topk_per_layer"]["per_layer"])
    assert table.count("| clt_topk |") == 1 and "| topk | no | 8 |" in table
