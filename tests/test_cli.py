import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

from choicesae.cli.main import main, parser
from choicesae.core.config import SAEConfig, TrainConfig, _field_docs
from choicesae.data.synthetic import SyntheticConfig


@pytest.mark.parametrize("cls", [TrainConfig, SAEConfig, SyntheticConfig])
def test_every_option_is_explained(cls, capsys):
    docs = _field_docs(cls)
    for f in dataclasses.fields(cls):
        if not dataclasses.is_dataclass(f.type):
            assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"
    command = "synthetic" if cls is SyntheticConfig else "train"
    with pytest.raises(SystemExit):
        parser().parse_args([command, "--help"])
    text = capsys.readouterr().out
    for f in dataclasses.fields(cls):
        if not dataclasses.is_dataclass(f.type):
            assert "--" + f.name.replace("_", "-") in text


def test_flags_reach_the_config(monkeypatch):
    seen = {}
    monkeypatch.setitem(
        sys.modules["choicesae.cli.main"].COMMANDS,
        "train",
        (TrainConfig, lambda cfg: seen.setdefault("cfg", cfg), ""),
    )
    argv = [
        "train",
        "--activations",
        "a.npy",
        "--sparsifier",
        "mutual_choice",
        "--k",
        "16",
        "--expansion",
        "4",
        "--multi-topk",
        "--lr",
        "1e-3",
        "--no-progress",
    ]
    assert main(argv) == 0
    cfg = seen["cfg"]
    assert cfg.sae == SAEConfig(sparsifier="mutual_choice", k=16, expansion=4)
    assert cfg.multi_topk and cfg.lr == 1e-3 and not cfg.progress and cfg.activations == "a.npy"


def test_synthetic_then_train_end_to_end(tmp_path):
    data, run = tmp_path / "syn.npy", tmp_path / "run"
    cli = [sys.executable, "-m", "choicesae"]
    subprocess.run(
        [
            *cli,
            "synthetic",
            "--out",
            str(data),
            "--tokens",
            "8192",
            "--d-in",
            "16",
            "--num-features",
            "48",
            "--mean-active",
            "3",
        ],
        check=True,
    )
    assert np.load(data).shape == (8192, 16)
    assert np.load(tmp_path / "syn.dictionary.npy").shape == (49, 16)  # + the first-token row
    done = subprocess.run(
        [
            *cli,
            "train",
            "--activations",
            str(data),
            "--out",
            str(run),
            "--steps",
            "40",
            "--batch-size",
            "256",
            "--k",
            "4",
            "--expansion",
            "4",
            "--log-every",
            "20",
            "--sparsifier",
            "feature_choice",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    assert "saved the SAE" in done.stdout
    log = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    assert [r["step"] for r in log] == [20, 40]
    assert (run / "sae" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--k", "64", "--expansion", "4"], "k=64 must be smaller than the number of latents (64)"),
        (["--activations", "{empty}"], "is empty"),
        (["--activations", "{nan}"], "NaN or Inf (first at row 3)"),
        (["--activations", "{flat}"], "must be 2-D"),
    ],
)
def test_cli_errors_are_one_clear_line(tmp_path, capsys, argv, message):
    (tmp_path / "empty.npy").write_bytes(b"")
    x = np.ones((100, 16), np.float32)
    x[3, 2] = np.nan
    np.save(tmp_path / "nan.npy", x)
    np.save(tmp_path / "flat.npy", np.ones(100, np.float32))
    np.save(tmp_path / "good.npy", np.ones((100, 16), np.float32))
    argv = [a.format(**{n: tmp_path / f"{n}.npy" for n in ("empty", "nan", "flat")}) for a in argv]
    if "--activations" not in argv:
        argv += ["--activations", str(tmp_path / "good.npy")]
    code = main(["train", "--out", str(tmp_path / "run"), "--batch-size", "8", *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_unknown_sparsifier_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--sparsifier", "topq"])
    assert exit_.value.code == 2
    assert "invalid choice: 'topq'" in capsys.readouterr().err
