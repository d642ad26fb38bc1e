"""Runs that survive: checkpoints, exact resume after kills, signals, NaN, bad settings."""

import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_store import write_store  # noqa: E402

from choicesae.cli.main import main, parser
from choicesae.core.config import SAEConfig, TrainConfig, from_arguments
from choicesae.data.activations import load_activations
from choicesae.data.store import Store
from choicesae.errors import ChoiceSAEError, ConfigError, NonFiniteError
from choicesae.training import loop as train_module
from choicesae.training.checkpoint import checkpoint_paths, load_checkpoint, read_checkpoint
from choicesae.training.loop import train
from choicesae.training.run import check_resumable, resolve


def small(tmp_path, **kw):
    defaults = {"steps": 30, "batch_size": 256, "lr": 3e-3, "log_every": 5, "progress": False}
    defaults["sae"] = SAEConfig(k=4, expansion=4)
    return TrainConfig(out=str(tmp_path / "run"), **defaults | kw)


def test_last_k_checkpoints_are_kept(tmp_path, synthetic):
    train(small(tmp_path, checkpoint_every=5, keep_checkpoints=3), synthetic[0])
    steps = [int(p.stem.split("-")[1]) for p in checkpoint_paths(tmp_path / "run")]
    assert steps == [20, 25, 30]


def test_a_corrupt_newest_checkpoint_falls_back_to_the_one_before(tmp_path, synthetic):
    x = synthetic[0]
    straight = train(small(tmp_path / "a", steps=40, checkpoint_every=10), x)
    train(small(tmp_path / "b", steps=40, checkpoint_every=10), x)
    newest = checkpoint_paths(tmp_path / "b" / "run")[-1]
    newest.write_bytes(newest.read_bytes()[:1000])  # torn
    with pytest.warns(UserWarning, match="skipping unreadable checkpoint"):
        assert load_checkpoint(tmp_path / "b" / "run")["step"] == 30
    newest.unlink()
    with pytest.warns(UserWarning):
        (checkpoint_paths(tmp_path / "b" / "run")[-1]).write_bytes(b"junk")
        resumed = train(small(tmp_path / "b", steps=40, checkpoint_every=10, resume=True), x)
    assert torch.equal(resumed.W_enc, straight.W_enc)


def assert_same_weights(a, b):
    for name, tensor in a.state_dict().items():
        torch.testing.assert_close(
            b.state_dict()[name], tensor, rtol=0, atol=0, equal_nan=True, msg=name
        )  # equal, NaN for NaN (densities before a window has closed)


def test_a_finished_run_extends_bit_exactly(tmp_path, synthetic):
    """--resume with a larger --steps goes on from the last checkpoint: the same weights as a
    run asked for the larger number of steps from the start (the lr does not depend on it)."""
    x = synthetic[0]
    straight = train(small(tmp_path / "a", steps=40, checkpoint_every=10), x)
    train(small(tmp_path / "b", steps=20, checkpoint_every=10), x)
    extended = train(small(tmp_path / "b", steps=40, checkpoint_every=10, resume=True), x)
    assert_same_weights(straight, extended)
    saved = json.loads((tmp_path / "b" / "run" / "config.json").read_text())
    assert saved["steps"] == 40
    assert [json.loads(ln)["step"] for ln in open(tmp_path / "b" / "run" / "metrics.jsonl")] == [
        5,
        10,
        15,
        20,
        25,
        30,
        35,
        40,
    ]
    with pytest.raises(ConfigError, match="checkpoint is at step 40"):
        train(small(tmp_path / "b", steps=30, resume=True), x)


def test_a_moved_run_resumes_bit_exactly(tmp_path, synthetic):
    x = synthetic[0]
    straight = train(small(tmp_path / "a", steps=40, checkpoint_every=10), x)
    train(small(tmp_path / "b", steps=20, checkpoint_every=10), x)
    shutil.move(tmp_path / "b", tmp_path / "elsewhere")
    moved = train(small(tmp_path / "elsewhere", steps=40, checkpoint_every=10, resume=True), x)
    assert_same_weights(straight, moved)


def test_resume_refuses_a_schedule_that_rewrites_the_past(tmp_path, synthetic):
    x = synthetic[0]
    phased = "mutual_choice:10,topk:10"
    train(small(tmp_path, steps=0, schedule=phased, checkpoint_every=10), x)
    longer = train(small(tmp_path, steps=0, schedule="mutual_choice:10,topk:20", resume=True), x)
    assert longer.cfg.sparsifier == "topk"
    with pytest.raises(ConfigError, match="change the .* steps already trained"):
        train(small(tmp_path, steps=0, schedule="mutual_choice:5,topk:30", resume=True), x)


def test_a_default_feature_choice_run_is_extended_by_its_phases(tmp_path, synthetic):
    """Default Feature Choice switches at a share of the steps: a longer --steps would move
    the switch into the steps done, so it is refused; the same phases given as a --schedule
    extend the run. A run saved before the share existed trained Feature Choice alone."""
    x = synthetic[0]
    fc = SAEConfig(sparsifier="feature_choice", k=4, expansion=4)
    train(small(tmp_path, sae=fc, steps=20, checkpoint_every=20), x)  # 18 + 2 steps
    with pytest.raises(ConfigError, match=r"20 steps already trained \(mutual_choice:18,"):
        train(small(tmp_path, sae=fc, steps=40, resume=True), x)
    schedule = "mutual_choice:18,feature_choice:22"
    longer = train(small(tmp_path, sae=fc, steps=0, schedule=schedule, resume=True), x)
    assert longer.cfg.sparsifier == "feature_choice"
    cfg = resolve(small(tmp_path, sae=fc, steps=40, mutual_choice_share=0), 32)
    saved = json.loads(json.dumps(dataclasses.asdict(cfg)))
    del saved["mutual_choice_share"]  # as an older run saved it
    check_resumable(saved, cfg, 10)
    with pytest.raises(ConfigError, match="change the 10 steps"):
        check_resumable(saved, dataclasses.replace(cfg, mutual_choice_share=0.5), 10)


def test_overwrite_removes_the_old_runs_checkpoints(tmp_path, synthetic):
    x = synthetic[0]
    train(small(tmp_path, steps=20, checkpoint_every=10), x)
    train(small(tmp_path, steps=5, checkpoint_every=5, overwrite=True), x)
    assert [read_checkpoint(p)["step"] for p in checkpoint_paths(tmp_path / "run")] == [5]


def nan_at(step_with_nan):
    real = train_module.batches

    def batches(rows, batch_size, seed, device="cpu", start=0):
        stream = real(rows, batch_size, seed, device, start)
        if batch_size != 256:  # the initialisation sample
            return stream

        def generate():
            for step, x in enumerate(stream, start):
                yield torch.full_like(x, float("nan")) if step == step_with_nan else x

        return generate()

    return batches


def test_nan_batch_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, synthetic, monkeypatch):
    monkeypatch.setattr(train_module, "batches", nan_at(12))
    with pytest.raises(NonFiniteError, match="at step 13 \\(the batch holds NaN or Inf"):
        train(small(tmp_path, checkpoint_every=5), synthetic[0])
    saved = load_checkpoint(tmp_path / "run")
    assert saved["step"] == 10
    assert all(torch.isfinite(saved["sae"][n]).all() for n in ("W_enc", "W_dec", "b_enc", "b_dec"))


def test_nan_batches_can_be_skipped_and_counted(tmp_path, synthetic, monkeypatch):
    monkeypatch.setattr(train_module, "batches", nan_at(12))
    sae = train(small(tmp_path, skip_bad_batches=True), synthetic[0])
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert log[-1]["skipped"] == 1 and log[-1]["step"] == 30
    assert torch.isfinite(sae.W_enc).all() and torch.isfinite(sae.W_dec).all()


def test_zipf_capacities_past_the_budget_are_refused(tmp_path, synthetic):
    cfg = small(tmp_path, steps=0, schedule="mutual_choice:5,feature_choice:5", batch_size=32)
    cfg = dataclasses.replace(cfg, sae=dataclasses.replace(cfg.sae, capacities="zipf", k=1))
    with pytest.raises(ConfigError, match="past the budget k\\*batch_size = 32"):
        train(cfg, synthetic[0])
    assert not (tmp_path / "run").exists()


def cli_train(data, out, *extra):
    return [
        sys.executable,
        "-m",
        "choicesae",
        "train",
        "--activations",
        str(data),
        "--out",
        str(out),
        "--steps",
        "200",
        "--batch-size",
        "512",
        "--k",
        "8",
        "--expansion",
        "16",
        "--checkpoint-every",
        "4",
        "--log-every",
        "10",
        "--lr",
        "1e-3",
        "--no-progress",
        *extra,
    ]


@pytest.fixture(scope="module")
def wide_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "x.npy"
    np.save(path, np.random.default_rng(0).standard_normal((8192, 64)).astype(np.float32))
    return path


def test_sigterm_writes_a_final_checkpoint_and_exits_cleanly(tmp_path, wide_data):
    proc = subprocess.Popen(
        cli_train(wide_data, tmp_path / "run"), stderr=subprocess.PIPE, text=True
    )
    while not (tmp_path / "run" / "metrics.jsonl").exists() or not checkpoint_paths(
        tmp_path / "run"
    ):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "stopped by SIGTERM after step" in err and "Traceback" not in err
    step = int(err.split("after step ")[1].split(";")[0])
    assert load_checkpoint(tmp_path / "run")["step"] == step < 200


def test_sigkill_at_random_moments_never_loses_the_run(tmp_path, wide_data):
    """Kill -9 during training and checkpoint writes, again and again; every time the newest
    checkpoint loads, and the resumed run ends with the weights of an uninterrupted one."""
    run, rng = tmp_path / "run", random.Random(0)
    for _ in range(10):
        resume = ["--resume"] if checkpoint_paths(run) else ["--overwrite"]
        before = len(checkpoint_paths(run)) and load_checkpoint(run)["step"]
        proc = subprocess.Popen(cli_train(wide_data, run, *resume), stderr=subprocess.DEVNULL)
        while proc.poll() is None and (
            not checkpoint_paths(run) or int(checkpoint_paths(run)[-1].stem[11:]) == before
        ):
            time.sleep(0.01)  # wait until this process is training and checkpointing
        time.sleep(rng.uniform(0.0, 0.3))
        proc.kill()
        proc.wait()
        if checkpoint_paths(run):
            assert load_checkpoint(run)["step"] > 0  # no warning: the newest is whole
    resume = ["--resume"] if checkpoint_paths(run) else ["--overwrite"]
    subprocess.run(cli_train(wide_data, run, *resume), check=True)
    subprocess.run(cli_train(wide_data, tmp_path / "straight"), check=True)
    ours = load_checkpoint(run)["sae"]
    reference = load_checkpoint(tmp_path / "straight")["sae"]
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert torch.equal(ours[name], reference[name])
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").open()]
    assert steps == list(range(10, 201, 10))


flag_values = st.one_of(
    st.sampled_from(["0", "-1", "1", "32", "1e9", "nan", "inf", "-0.5", "", "topk", "x", "zipf"]),
    st.text(max_size=6),
)
flags = st.sampled_from(
    [
        "--k",
        "--expansion",
        "--num-latents",
        "--sparsifier",
        "--batch-size",
        "--steps",
        "--lr",
        "--schedule",
        "--capacities",
        "--decay-fraction",
        "--dead-tokens",
        "--m-min",
        "--normalize",
        "--zipf-beta",
        "--density-tokens",
        "--keep-checkpoints",
        "--multi-topk",
    ]
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(flags, flag_values), max_size=6))
def test_any_command_line_parses_or_fails_cleanly(pairs):
    argv = ["train"] + [item for flag, value in pairs for item in (flag, value)]
    try:
        args = parser().parse_args(argv)
    except SystemExit as e:
        assert e.code == 2  # argparse's own one-line usage error
        return
    try:
        from_arguments(TrainConfig, args)
    except ChoiceSAEError as e:
        assert str(e)


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.binary(max_size=300), st.integers(0, 200))
def test_corrupted_activation_files_fail_cleanly(tmp_path, blob, cut):
    good = tmp_path / "good.npy"
    np.save(good, np.ones((4, 3), np.float32))
    raw = good.read_bytes()
    for content in (blob, raw[:cut] + blob, raw[:cut]):
        path = tmp_path / "bad.npy"
        path.write_bytes(content)
        try:
            rows = load_activations(path)
        except ChoiceSAEError:
            continue
        assert rows.ndim == 2 and np.isfinite(rows).all()  # whatever loads is checked data
        os.remove(path)


def test_verify_a_run_and_its_damage(tmp_path, synthetic, capsys):
    train(small(tmp_path, checkpoint_every=10), synthetic[0])
    run = tmp_path / "run"
    assert main(["verify", str(run)]) == 0
    assert "config valid, the trained SAE loads, 3 checkpoints load" in capsys.readouterr().out
    checkpoint_paths(run)[0].write_bytes(b"\0" * 64)
    assert main(["verify", str(run)]) == 2
    assert "checkpoint-000000010.pt is unreadable" in capsys.readouterr().err
    checkpoint_paths(run)[0].unlink()
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps(config | {"batch_size": "many"}))
    assert main(["verify", "--path", str(run)]) == 2
    assert "TrainConfig.batch_size must be an integer" in capsys.readouterr().err
    assert main(["verify", str(tmp_path)]) == 2
    assert "neither a store" in capsys.readouterr().err


def test_verify_a_store_finds_a_flipped_byte(tmp_path, capsys):
    write_store(tmp_path / "s", [40, 30])
    assert main(["verify", str(tmp_path / "s")]) == 0
    assert "2 shards, 70 rows of width 8, checksums match" in capsys.readouterr().out
    acts = tmp_path / "s" / "shard-00001" / "acts.npy"
    blob = bytearray(acts.read_bytes())
    blob[-5] ^= 1
    acts.write_bytes(bytes(blob))
    assert main(["verify", str(tmp_path / "s")]) == 2
    assert "shard-00001 of the store" in capsys.readouterr().err


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    target=st.sampled_from(["manifest.json", "shard-00000/acts.npy", "shard-00000/tokens.npy"]),
    position=st.integers(0, 10_000),
    junk=st.binary(min_size=1, max_size=64),
    truncate=st.booleans(),
)
def test_corrupted_stores_fail_cleanly_or_read_true_rows(
    tmp_path, target, position, junk, truncate
):
    path = tmp_path / "s"
    if path.exists():
        shutil.rmtree(path)
    rows = write_store(path, [16])
    file = path / target
    blob = file.read_bytes()
    position %= len(blob)
    file.write_bytes(
        blob[:position] if truncate else blob[:position] + junk + blob[position + len(junk) :]
    )
    try:
        store = Store(path)
        read = store[np.arange(store.shape[0])]
    except ChoiceSAEError as e:
        assert str(e)
        return
    assert torch.equal(read, rows[: len(read)])  # whatever reads back is the true data
