"""Config files (--config FILE, YAML or JSON) for every command; flags override them; the
resolved config of a run reads back as a config file."""

import dataclasses
import json
import typing

import numpy as np
import pytest

from choicesae.cli.main import COMMANDS, main, parse
from choicesae.core.config import TrainConfig, from_arguments, from_dict


def config_of(argv):
    args = parse(argv)
    return from_arguments(COMMANDS[args.command][0], args)


def a_string_setting(cls) -> str:
    """A free-text setting of `cls` (not a choice, not nested), to set from a file."""
    hints = typing.get_type_hints(cls)
    return next(f.name for f in dataclasses.fields(cls) if hints[f.name] is str)


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_every_command_reads_a_config_file(tmp_path, command, suffix):
    cls = COMMANDS[command][0]
    name = a_string_setting(cls)
    file = tmp_path / f"c{suffix}"
    text = json.dumps({name: "from-file"}) if suffix == ".json" else f"{name}: from-file\n"
    file.write_text(text)
    assert getattr(config_of([command, "--config", str(file)]), name) == "from-file"
    flag = "--" + name.replace("_", "-")
    cfg = config_of([command, "--config", str(file), flag, "from-flag"])
    assert getattr(cfg, name) == "from-flag"  # the command line wins


def test_train_yaml_nested_or_flat_flags_override_and_the_run_keeps_the_result(tmp_path, synthetic):
    x, _ = synthetic
    np.save(tmp_path / "x.npy", x[:4096].numpy())
    (tmp_path / "train.yml").write_text(
        f"activations: {tmp_path / 'x.npy'}\n"
        "sparsifier: mutual_choice   # an SAE setting at the top level, as its flag\n"
        "batch-size: 256\n"
        "steps: 3\n"
        "lr: 1  # an integer for a float\n"
        "sae:\n  expansion: 2\n  k: 8\n"
        "progress: false\n"
    )
    run = tmp_path / "run"
    argv = ["train", "--config", str(tmp_path / "train.yml"), "--k", "5", "--out", str(run)]
    assert main(argv) == 0
    saved = from_dict(TrainConfig, json.loads((run / "config.json").read_text()))
    assert (saved.sae.sparsifier, saved.sae.k, saved.sae.expansion) == ("mutual_choice", 5, 2)
    assert (saved.batch_size, saved.steps, saved.lr, saved.progress) == (256, 3, 1, False)
    assert saved.sae.num_latents == 64 and saved.sae.d_in == 32  # resolved before saving
    # the run's config.json is itself a config file: the same settings come back
    again = config_of(["train", "--config", str(run / "config.json"), "--out", "elsewhere"])
    assert again == dataclasses.replace(saved, out="elsewhere")


@pytest.mark.parametrize(
    "text,suffix,message",
    [
        ("stepz: 3\n", ".yaml", "unknown TrainConfig settings: stepz"),
        ("sae:\n  kk: 3\n", ".yaml", "unknown SAEConfig settings: kk"),
        ("steps: many\n", ".yaml", "TrainConfig.steps must be an integer"),
        ("k: 0\n", ".yaml", "k must be at least 1"),
        ("steps: [3\n", ".yaml", "cannot read the config file"),
        ('{"steps": 3,}', ".json", "cannot read the config file"),
        ("- 3\n", ".yaml", "must hold a mapping"),
        ("steps = 3\n", ".toml", "must end in .yaml, .yml or .json"),
    ],
)
def test_bad_config_files_are_named_errors(tmp_path, capsys, text, suffix, message):
    file = tmp_path / f"bad{suffix}"
    file.write_text(text)
    assert main(["train", "--config", str(file)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(file) in err and len(err.strip().splitlines()) == 1


def test_a_missing_config_file_is_a_named_error(tmp_path, capsys):
    assert main(["verify", "--config", str(tmp_path / "none.yaml")]) == 2
    assert "none.yaml" in capsys.readouterr().err
