"""Command line: `choicesae COMMAND --flags`; a command parses its config, calls one function."""

import argparse
import dataclasses
import sys

import torch

from choicesae.bench.layers import LayersBenchConfig, layers_bench
from choicesae.bench.paper import BenchConfig, bench
from choicesae.bench.synthsaebench import SynthSAEBenchConfig, synthsaebench
from choicesae.bench.transcoder import TranscoderBenchConfig, transcoder_bench
from choicesae.core.config import TrainConfig, add_arguments, file_defaults, from_arguments
from choicesae.data.harvest import HarvestConfig, harvest
from choicesae.data.hooks import HookpointsConfig, load_model, module_table
from choicesae.data.synthetic import SyntheticConfig, write_synthetic
from choicesae.errors import ChoiceSAEError, Interrupted
from choicesae.evaluation.browser import BrowseConfig, browse
from choicesae.evaluation.evaluate import EvalConfig, evaluate, summary_line
from choicesae.evaluation.report import CompareConfig, compare
from choicesae.evaluation.verify import VerifyConfig, verify
from choicesae.interop.convert import ExportConfig, ImportConfig, export, import_
from choicesae.parallel import comm
from choicesae.training.many import train_many


def _train(cfg: TrainConfig) -> None:
    if len(train_many(cfg)) > 1:
        print(f"saved one model per hookpoint in {cfg.out}/HOOKPOINT (sae/, metrics.jsonl)")
        return
    world = comm.init_from_env(cfg.device)  # the group train() joined under torchrun
    if world.size > 1:
        torch.distributed.destroy_process_group()  # before exit, or gloo may abort
    if world.main:
        print(f"saved the SAE to {cfg.out}/sae, metrics in {cfg.out}/metrics.jsonl")


def _bench(cfg: BenchConfig) -> None:
    print(f"wrote {bench(cfg)} and the plots beside it")


def _synthsaebench(cfg: SynthSAEBenchConfig) -> None:
    print(f"wrote {synthsaebench(cfg)}")


def _transcoder_bench(cfg: TranscoderBenchConfig) -> None:
    print(f"wrote {transcoder_bench(cfg)}")


def _layers_bench(cfg: LayersBenchConfig) -> None:
    print(f"wrote {layers_bench(cfg)}")


def _synthetic(cfg: SyntheticConfig) -> None:
    x_path, dict_path = write_synthetic(cfg)
    print(f"wrote {cfg.tokens} activations to {x_path} and the true dictionary to {dict_path}")


def _harvest(cfg: HarvestConfig) -> None:
    store = harvest(cfg)
    pairs = f", targets [{store.d_target}] at {cfg.target}" if cfg.target else ""
    print(
        f"{cfg.out}: {len(store)} activations [{store.d_model}] of {cfg.model} at "
        f"{cfg.hookpoint}{pairs}"
    )


def _hookpoints(cfg: HookpointsConfig) -> None:
    print("\n".join(module_table(load_model(cfg.model)[0])))


def _verify(cfg: VerifyConfig) -> None:
    print(verify(cfg.path))


def _eval(cfg: EvalConfig) -> None:
    result = evaluate(cfg)
    out = cfg.out or f"{cfg.run}/eval"
    print(f"{summary_line(result)}\nthresholds saved to {cfg.run}/sae; metrics in {out}")


def _compare(cfg: CompareConfig) -> None:
    print(f"wrote {compare(cfg)}")


def _browse(cfg: BrowseConfig) -> None:
    print(f"wrote {browse(cfg)}")


def _export(cfg: ExportConfig) -> None:
    print(f"wrote {cfg.sae} in {cfg.format}'s format to {export(cfg)}")


def _import(cfg: ImportConfig) -> None:
    print(f"read {cfg.path} ({cfg.format}) and saved it to {import_(cfg)}")


COMMANDS = {
    "train": (TrainConfig, _train, "Train an SAE or transcoder (or one per hookpoint)."),
    "synthetic": (SyntheticConfig, _synthetic, "Write a synthetic sparse-dictionary dataset."),
    "harvest": (HarvestConfig, _harvest, "Harvest a model's activations over text to a store."),
    "hookpoints": (HookpointsConfig, _hookpoints, "List the module paths a harvest can hook."),
    "verify": (VerifyConfig, _verify, "Check a store's checksums or a run's files."),
    "export": (ExportConfig, _export, "Write to SAELens, sparsify or circuit-tracer's format."),
    "import": (ImportConfig, _import, "Read an SAE in SAELens's or sparsify's format."),
    "eval": (EvalConfig, _eval, "Evaluate a run on a held-out store; thresholds and report."),
    "compare": (CompareConfig, _compare, "Pareto plot and table of evaluated runs."),
    "browse": (BrowseConfig, _browse, "Static HTML pages of a run's top features."),
    "bench": (
        BenchConfig,
        _bench,
        "Compare every sparsifier at matched L0 (docs/results.md); `bench synthsaebench "
        "--help`: on SAELens's SynthSAEBench; `bench transcoder --help`: transcoders "
        "against SAEs; `bench layers --help`: per-layer transcoder sets and cross-layer "
        "transcoders.",
    ),
}
# `bench TARGET`: targets with settings of their own, in place of the paper bench's
BENCH_TARGETS = {
    "synthsaebench": (
        SynthSAEBenchConfig,
        _synthsaebench,
        "The bench on SAELens's SynthSAEBench (`choicesae bench synthsaebench`).",
    ),
    "transcoder": (
        TranscoderBenchConfig,
        _transcoder_bench,
        "Transcoders of an MLP against SAEs of its output (`choicesae bench transcoder`).",
    ),
    "layers": (
        LayersBenchConfig,
        _layers_bench,
        "Per-layer transcoder sets and cross-layer transcoders at the same total L0, every MLP "
        "of a slice replaced (`choicesae bench layers`).",
    ),
}
# commands whose main setting may also be given positionally: `choicesae hookpoints MODEL`
POSITIONAL = {
    "bench": "data",
    "hookpoints": "model",
    "verify": "path",
    "eval": "run",
    "browse": "run",
}
VARIADIC = {"compare": "runs"}  # several positional values, joined with commas


def command_table(argv: list[str]) -> dict:
    """COMMANDS, with bench's settings and function a target's when argv reads `bench TARGET`."""
    if len(argv) > 1 and argv[0] == "bench" and argv[1] in BENCH_TARGETS:
        return COMMANDS | {"bench": BENCH_TARGETS[argv[1]]}
    return COMMANDS


def parser(
    defaults: dict[str, dict] | None = None, table: dict | None = None
) -> argparse.ArgumentParser:
    """The CLI of the commands `table` (COMMANDS); `defaults` = {command: {setting: value}}
    replaces the dataclass defaults (with the values of a --config file, which flags then
    override)."""
    top = argparse.ArgumentParser(prog="choicesae", description=__doc__)
    commands = top.add_subparsers(dest="command", required=True)
    for name, (cls, _, text) in (table or COMMANDS).items():
        sub = commands.add_parser(name, help=text, description=f"{text} {cls.__doc__}")
        add_arguments(sub, cls)
        sub.add_argument(
            "--config",
            metavar="FILE",
            help="YAML or JSON file of settings (flag names, nested or not, e.g. a run's "
            "config.json); flags given on the command line override it",
        )
        sub.set_defaults(**(defaults or {}).get(name, {}))
        if name in POSITIONAL and POSITIONAL[name] in {f.name for f in dataclasses.fields(cls)}:
            field = POSITIONAL[name]
            sub.add_argument(
                "positional", nargs="?", metavar=field.upper(), help=f"same as --{field}"
            )
        elif name in POSITIONAL:  # `bench TARGET`, whose settings these are
            sub.add_argument("positional", choices=list(BENCH_TARGETS), metavar="TARGET")
        if name in VARIADIC:
            field = VARIADIC[name]
            sub.add_argument("positional", nargs="*", metavar="RUN", help=f"same as --{field}")
    return top


def parse(argv: list[str]) -> argparse.Namespace:
    """Parse the command line; with --config FILE, again with the file's settings as defaults."""
    table = command_table(argv)
    args = parser(table=table).parse_args(argv)
    if args.config:
        cls = table[args.command][0]
        args = parser({args.command: file_defaults(cls, args.config)}, table).parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse(argv)
    except ChoiceSAEError as e:  # an unreadable or invalid --config file
        print(f"choicesae: error: {e}", file=sys.stderr)
        return 2
    cls, run, _ = command_table(argv)[args.command]
    if args.command in VARIADIC and args.positional:
        setattr(args, VARIADIC[args.command], ",".join(args.positional))
    elif getattr(args, "positional", None):
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
