import itertools
import json

import numpy as np
import pytest
import torch

from choicesae.core.config import SAEConfig, TrainConfig
from choicesae.data.store import Store, StoreWriter, shuffled
from choicesae.errors import ConfigError, DataError
from choicesae.training.loop import train

META = {"model": "m", "hookpoint": "h", "d_model": 8, "dtype": "float32", "context": 4}


def write_store(path, shards, dtype="float32", d=8):
    """A store of `shards` shards whose rows are [row number, random...]: identifiable rows."""
    writer = StoreWriter(path, META | {"dtype": dtype, "d_model": d})
    rows, start = [], 0
    for n in shards:
        x = torch.randn(n, d)
        x[:, 0] = torch.arange(start, start + n)
        writer.write_shard(x, np.arange(start, start + n) % 7)
        rows.append(x)
        start += n
    writer.finish()
    return torch.cat(rows)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_rows_come_back_in_the_storage_dtype(tmp_path, dtype):
    x = write_store(tmp_path / "s", [100, 50, 7], dtype, d=8)
    store = Store(tmp_path / "s")
    expected = x.to(getattr(torch, dtype)).float()
    assert store.shape == (157, 8) and store.num_shards == 3
    assert torch.equal(store[:], expected)
    idx = np.array([0, 99, 100, 156])
    assert torch.equal(store[idx], expected[idx])
    assert np.array_equal(store.tokens(), np.arange(157) % 7)
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["tokens"] == 157


def test_shuffled_batches_mix_shards_and_repeat_no_row_early(tmp_path):
    write_store(tmp_path / "s", [3000, 3000, 3000])
    store = Store(tmp_path / "s")
    batches = store.batches(batch_size=500, seed=1)
    seen = torch.cat([next(batches)[:, 0] for _ in range(18)]).long()  # 9000 rows = 1 epoch
    assert seen.bincount().max() <= 2  # at most two epochs are in the buffer at once
    assert len(seen.unique()) > 0.6 * 9000
    first_batch = seen[:500] // 3000  # which shard each row came from
    assert len(first_batch.unique()) == 3
    assert not torch.equal(seen[:500], torch.sort(seen[:500]).values)
    again = torch.cat(list(itertools.islice(store.batches(500, seed=1), 18)))[:, 0].long()
    other = torch.cat(list(itertools.islice(store.batches(500, seed=2), 18)))[:, 0].long()
    assert torch.equal(seen, again) and not torch.equal(seen, other)


def test_shuffle_buffer_yields_each_row_once_when_it_holds_everything():
    blocks = iter([torch.arange(10.0)[:, None] + 10 * i for i in range(100)])
    out = torch.cat(list(itertools.islice(shuffled(blocks, 50, seed=0, buffer_rows=500), 10)))
    assert sorted(out[:, 0].tolist()) != list(range(500))  # shuffled...
    assert len(out[:, 0].unique()) == 500  # ... and no row lost or doubled


def test_a_corrupt_shard_is_named(tmp_path):
    write_store(tmp_path / "s", [64, 64])
    acts = tmp_path / "s" / "shard-00001" / "acts.npy"
    data = bytearray(acts.read_bytes())
    data[-5] ^= 0xFF
    acts.write_bytes(bytes(data))
    store = Store(tmp_path / "s")
    store.shard(0)
    with pytest.raises(DataError, match="shard-00001 .* corrupt"):
        store.shard(1)
    acts.write_bytes(bytes(data[:100]))  # truncated
    with pytest.raises(DataError, match="shard-00001"):
        Store(tmp_path / "s").shard(1)


def test_missing_store_and_unfinished_shards_are_not_read(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        Store(tmp_path / "nothing")
    writer = StoreWriter(tmp_path / "s", META)
    with pytest.raises(DataError, match="no complete shard"):
        Store(tmp_path / "s")
    writer.write_shard(torch.ones(10, 8), np.zeros(10))
    (tmp_path / "s" / "shard-00001.tmp").mkdir()  # as a killed writer leaves it
    assert Store(tmp_path / "s").shape == (10, 8)
    writer = StoreWriter(tmp_path / "s", META)  # resuming removes the leftover
    assert writer.done == 1 and not (tmp_path / "s" / "shard-00001.tmp").exists()
    with pytest.raises(ConfigError, match="hookpoint='h', not 'other'"):
        StoreWriter(tmp_path / "s", META | {"hookpoint": "other"})
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not an activation store"):
        StoreWriter(tmp_path / "mine", META, overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_a_transcoder_store_holds_hookpoint_then_target_columns(tmp_path):
    meta = META | {"target": "t", "d_target": 4}
    writer = StoreWriter(tmp_path / "s", meta)
    x = torch.randn(10, 12)  # [rows, d_model + d_target]
    writer.write_shard(x, np.zeros(10))
    writer.finish()
    store = Store(tmp_path / "s")
    assert store.shape == (10, 12) and (store.d_model, store.d_target) == (8, 4)
    assert torch.equal(store[:], x)
    with pytest.raises(ConfigError, match="target='t', not ''"):  # resuming as an SAE harvest
        StoreWriter(tmp_path / "s", META | {"target": "", "d_target": 0})
    writer = StoreWriter(tmp_path / "narrow", meta)
    writer.write_shard(torch.randn(10, 8), np.zeros(10))  # the hookpoint's columns alone
    with pytest.raises(DataError, match=r"shard-00000 .* has shape \(10, 8\), not \(10, 12\)"):
        Store(tmp_path / "narrow").shard(0)


def test_manifests_without_a_target_read_as_sae_stores(tmp_path):
    write_store(tmp_path / "s", [10], d=8)  # META has neither target nor d_target
    file = tmp_path / "s" / "manifest.json"
    manifest = json.loads(file.read_text())
    assert "target" not in manifest and "d_target" not in manifest
    store = Store(tmp_path / "s")
    assert store.shape == (10, 8) and (store.d_model, store.d_target) == (8, 0)
    assert store.manifest["target"] == ""
    StoreWriter(tmp_path / "s", META | {"target": "", "d_target": 0})  # an SAE harvest resumes
    for bad in (-1, "4", 1.5, None):
        file.write_text(json.dumps(manifest | {"d_target": bad}))
        with pytest.raises(DataError, match="damaged"):
            Store(tmp_path / "s")


def test_a_full_disk_keeps_the_written_shards(tmp_path, monkeypatch):
    import errno

    import choicesae.data.store as store_module

    writer = StoreWriter(tmp_path / "s", META)
    writer.write_shard(torch.ones(10, 8), np.zeros(10))

    def full(path, array):
        path.write_bytes(b"\x93NUMPY")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_module, "_save", full)
    with pytest.raises(DataError, match="disk is full. The 1 complete shards are kept"):
        writer.write_shard(torch.ones(10, 8), np.zeros(10))
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["manifest.json", "shard-00000"]
    assert torch.equal(Store(tmp_path / "s")[:], torch.ones(10, 8))


def test_train_reads_a_store(tmp_path, synthetic):
    x, _ = synthetic
    writer = StoreWriter(tmp_path / "s", META | {"d_model": 32, "dtype": "float16"})
    for part in x[:16384].split(4096):
        writer.write_shard(part, np.zeros(len(part)))
    writer.finish()
    cfg = TrainConfig(
        store=str(tmp_path / "s"),
        out=str(tmp_path / "run"),
        steps=150,
        batch_size=256,
        lr=3e-3,
        log_every=10,
        sae=SAEConfig(sparsifier="mutual_choice", k=5, expansion=4),
        progress=False,
    )
    train(cfg)
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert log[-1]["fvu"] < 0.6 * log[0]["fvu"]  # it learns from the store
