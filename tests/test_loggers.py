"""--log: metrics.jsonl always, TensorBoard event files and an offline W&B run on request, all
holding the same records."""

import json
import time

import numpy as np
import pytest

from choicesae.cli.main import main
from choicesae.core.config import SAEConfig, TrainConfig
from choicesae.errors import ConfigError
from choicesae.training.loggers import TensorBoardLogger, WandbLogger
from choicesae.training.loop import train


def event_scalars(folder, name):
    """(step, value) pairs of scalar `name` in the TensorBoard event files of `folder`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(name)]


def offline_run_bytes(folder, needle: bytes) -> bytes:
    """The content of the one offline W&B run file under `folder`, once it holds `needle`:
    wandb's service process may still be writing it when run.finish() returns."""
    (run_file,) = folder.glob("offline-run-*/run-*.wandb")
    for _ in range(600):
        if needle in (content := run_file.read_bytes()):
            return content
        time.sleep(0.05)
    return run_file.read_bytes()


def small_run(tmp_path, x, **kw):
    cfg = TrainConfig(
        out=str(tmp_path / "run"),
        steps=20,
        log_every=5,
        batch_size=256,
        sae=SAEConfig(sparsifier="mutual_choice", k=4, expansion=2),
        progress=False,
        **kw,
    )
    train(cfg, x[:8192])
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_tensorboard_and_wandb_get_the_jsonl_records(tmp_path, synthetic, monkeypatch):
    pytest.importorskip("wandb", reason="the log extra installs wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    x, _ = synthetic
    records = small_run(tmp_path, x, log="tensorboard,wandb")
    assert [r["step"] for r in records] == [5, 10, 15, 20]
    for name in ("loss", "fvu", "l0", "dead_pct", "lr"):
        logged = event_scalars(tmp_path / "run" / "tensorboard", name)
        assert [step for step, _ in logged] == [r["step"] for r in records]
        assert np.allclose([v for _, v in logged], [r[name] for r in records], rtol=1e-6)
    # the offline W&B run (RUN/wandb, for `wandb sync`) holds every record's metrics: W&B
    # writes each value as its JSON text into the run file
    last = json.dumps(records[-1]["fvu"]).encode()
    content = offline_run_bytes(tmp_path / "run" / "wandb", last)
    for r in records:
        for name in ("fvu", "loss", "lr"):
            assert json.dumps(r[name]).encode() in content, (name, r["step"])


def test_wandb_offline_run_and_resume_id(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the log extra installs wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(tmp_path, {"k": 4}, "choicesae-test", "offline")
    logger.log({"step": 5, "loss": 0.5, "phase": "mutual_choice", "dead": 3})
    logger.log({"step": 10, "loss": 0.25, "phase": "mutual_choice", "dead": 1})
    assert dict(logger.run.config) == {"k": 4}
    run_id = logger.run.id
    logger.close()
    content = offline_run_bytes(tmp_path / "wandb", b"0.25")
    assert b"0.25" in content and b"mutual_choice" not in content  # text is no scalar
    again = WandbLogger(tmp_path, {"k": 4}, "choicesae-test", "offline")
    assert again.run.id == run_id  # the same folder continues the same W&B run
    again.close()


def test_jsonl_is_the_default_and_alone(tmp_path, synthetic):
    x, _ = synthetic
    records = small_run(tmp_path, x)
    assert len(records) == 4
    assert not (tmp_path / "run" / "tensorboard").exists()
    assert not (tmp_path / "run" / "wandb").exists()


def test_a_resumed_run_drops_the_events_after_its_checkpoint(tmp_path):
    folder = tmp_path / "tb"
    first = TensorBoardLogger(folder, 0)
    for step in (1, 2, 3, 4):
        first.log({"step": step, "loss": float(step), "phase": "topk"})
    first.close()
    resumed = TensorBoardLogger(folder, 3)  # the checkpoint was at step 2: 3 and 4 rerun
    for step in (3, 4):
        resumed.log({"step": step, "loss": 10.0 * step})
    resumed.close()
    assert event_scalars(folder, "loss") == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


def test_bad_log_choices_are_refused(capsys):
    with pytest.raises(ConfigError, match="'csv' is not one of jsonl, tensorboard, wandb"):
        TrainConfig(log="jsonl,csv")
    assert main(["train", "--log", "tensorboard,nope", "--activations", "x.npy"]) == 2
    assert "nope" in capsys.readouterr().err
