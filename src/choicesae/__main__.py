"""Command line: `choicesae COMMAND --flags`; a command parses its config, calls one function."""

import argparse
import sys

from choicesae.config import TrainConfig, add_arguments, from_arguments
from choicesae.errors import ChoiceSAEError, Interrupted
from choicesae.harvest import HarvestConfig, harvest
from choicesae.hooks import HookpointsConfig, load_model, module_table
from choicesae.interop import ExportConfig, ImportConfig, export, import_
from choicesae.synthetic import SyntheticConfig, write_synthetic
from choicesae.train import train
from choicesae.verify import VerifyConfig, verify


def _train(cfg: TrainConfig) -> None:
    train(cfg)
    print(f"saved the SAE to {cfg.out}/sae, metrics in {cfg.out}/metrics.jsonl")


def _synthetic(cfg: SyntheticConfig) -> None:
    x_path, dict_path = write_synthetic(cfg)
    print(f"wrote {cfg.tokens} activations to {x_path} and the true dictionary to {dict_path}")


def _harvest(cfg: HarvestConfig) -> None:
    store = harvest(cfg)
    rows, d_model = store.shape
    print(f"{cfg.out}: {rows} activations [{d_model}] of {cfg.model} at {cfg.hookpoint}")


def _hookpoints(cfg: HookpointsConfig) -> None:
    print("\n".join(module_table(load_model(cfg.model)[0])))


def _verify(cfg: VerifyConfig) -> None:
    print(verify(cfg.path))


def _export(cfg: ExportConfig) -> None:
    print(f"wrote {cfg.sae} in {cfg.format}'s format to {export(cfg)}")


def _import(cfg: ImportConfig) -> None:
    print(f"read {cfg.path} ({cfg.format}) and saved it to {import_(cfg)}")


COMMANDS = {
    "train": (TrainConfig, _train, "Train an SAE on an activation file."),
    "synthetic": (SyntheticConfig, _synthetic, "Write a synthetic sparse-dictionary dataset."),
    "harvest": (HarvestConfig, _harvest, "Harvest a model's activations over text to a store."),
    "hookpoints": (HookpointsConfig, _hookpoints, "List the module paths a harvest can hook."),
    "verify": (VerifyConfig, _verify, "Check a store's checksums or a run's files."),
    "export": (ExportConfig, _export, "Write an SAE in SAELens's or sparsify's format."),
    "import": (ImportConfig, _import, "Read an SAE in SAELens's or sparsify's format."),
}
# commands whose main setting may also be given positionally: `choicesae hookpoints MODEL`
POSITIONAL = {"hookpoints": "model", "verify": "path"}


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="choicesae", description=__doc__)
    commands = top.add_subparsers(dest="command", required=True)
    for name, (cls, _, text) in COMMANDS.items():
        sub = commands.add_parser(name, help=text, description=f"{text} {cls.__doc__}")
        add_arguments(sub, cls)
        if name in POSITIONAL:
            field = POSITIONAL[name]
            sub.add_argument(
                "positional", nargs="?", metavar=field.upper(), help=f"same as --{field}"
            )
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    cls, run, _ = COMMANDS[args.command]
    if getattr(args, "positional", None):
        setattr(args, POSITIONAL[args.command], args.positional)
    try:
        run(from_arguments(cls, args))
    except Interrupted as e:
        print(f"choicesae {args.command}: {e}", file=sys.stderr)
        return 128 + e.signum  # the shell's convention for a process ended by a signal
    except ChoiceSAEError as e:
        print(f"choicesae {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
