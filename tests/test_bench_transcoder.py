"""`choicesae bench transcoder` end to end on a tiny BERT: stores, runs, results, table."""

import json
import math

from test_evaluate import TOPICS
from tiny_models import save_tiny_model

from choicesae.bench.transcoder import TranscoderBenchConfig, transcoder_bench
from choicesae.data.store import Store


def test_the_bench_compares_transcoders_and_saes_and_resumes(tmp_path):
    folder, _ = save_tiny_model("bert", tmp_path / "model")
    for name, keys in (("train", sorted(TOPICS)[:30]), ("test", sorted(TOPICS)[30:40])):
        (tmp_path / f"{name}.txt").write_text("\n\n".join(TOPICS[k] for k in keys))
    cfg = TranscoderBenchConfig(
        out=str(tmp_path / "bench"),
        model=str(folder),
        hookpoint="encoder.layer.1.attention.output",
        target="encoder.layer.1.output.dense",
        k=4,
        expansion=2,
        text=str(tmp_path / "train.txt"),
        tokens=3000,
        steps=4,
        batch_size=256,
        heldout_text=str(tmp_path / "test.txt"),
        heldout_tokens=1024,
        splice_contexts=8,
    )
    table = transcoder_bench(cfg).read_text()
    pairs = Store(tmp_path / "bench" / "stores" / "transcoder-train")
    alone = Store(tmp_path / "bench" / "stores" / "sae-train")
    assert (pairs.d_target, alone.d_target) == (32, 0)
    # the SAE reads exactly the transcoder's targets: the same tokens, the same model
    assert (pairs[:100][:, 32:] - alone[:100]).abs().max() < 1e-2  # float16 storage
    results = tmp_path / "bench" / "results.jsonl"
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert sorted((r["method"], r["kind"]) for r in records) == sorted(
        (m, kind)
        for m in ("topk", "mutual_choice", "feature_choice")
        for kind in ("sae", "transcoder")
    )
    for r in records:
        assert math.isfinite(r["loss_recovered"]) and 0 < r["fvu"] < 10 and r["l0"] > 0
    topk = [r for r in records if r["method"] == "topk"]
    assert all(r["l0"] == 4 for r in topk)  # TopK's L0 is exact: the same for both kinds
    assert table.count("| transcoder |") == 3 and table.count("| sae |") == 3
    transcoder_bench(cfg)  # every run is in results.jsonl already: nothing is trained again
    assert len(results.read_text().splitlines()) == len(records)
