"""Metric writers behind one small interface: RUN/metrics.jsonl always, TensorBoard event files
and Weights & Biases when --log asks for them. The training loop calls `log(record)` with one
metrics record (a flat dict with a "step") every --log-every steps."""

import contextlib
import dataclasses
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from choicesae.core.config import chosen


class MetricsLogger(Protocol):
    def log(self, record: dict) -> None: ...

    def close(self) -> None: ...


def scalars(record: dict) -> dict[str, float]:
    """The numeric entries of a record (TensorBoard and W&B plot these; "phase" is text)."""
    return {
        name: float(value)
        for name, value in record.items()
        if isinstance(value, int | float) and not isinstance(value, bool) and name != "step"
    }


class JsonlLogger:
    """One JSON object per line in RUN/metrics.jsonl, flushed at once (a crash loses none)."""

    def __init__(self, path: Path):
        self.file = open(path, "a")  # noqa: SIM115 (closed by close())

    def log(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class TensorBoardLogger:
    """Event files in RUN/tensorboard (`tensorboard --logdir RUN`), one scalar per metric."""

    def __init__(self, folder: Path, step: int):
        from torch.utils.tensorboard import SummaryWriter

        # a resumed run drops the events written after its checkpoint, as metrics.jsonl does
        self.writer = SummaryWriter(str(folder), purge_step=step or None)

    def log(self, record: dict) -> None:
        for name, value in scalars(record).items():
            self.writer.add_scalar(name, value, record["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    """A Weights & Biases run in RUN/wandb, offline by default (`wandb sync` uploads it later);
    the run's id comes from its folder, so a resumed run continues the same W&B run."""

    def __init__(self, out: Path, config: dict, project: str, mode: str):
        import wandb

        run_id = hashlib.sha1(str(out.resolve()).encode()).hexdigest()[:16]
        (out / "wandb").mkdir(exist_ok=True)
        self.run = wandb.init(
            project=project,
            name=out.name,
            id=run_id,
            resume="allow",
            dir=str(out),
            config=config,
            mode=mode,
        )

    def log(self, record: dict) -> None:
        self.run.log(scalars(record), step=record["step"])

    def close(self) -> None:
        self.run.finish()


class Loggers:
    """Every chosen writer, as one."""

    def __init__(self, loggers: list[MetricsLogger]):
        self.loggers = loggers

    def log(self, record: dict) -> None:
        for logger in self.loggers:
            logger.log(record)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


@contextlib.contextmanager
def open_loggers(cfg, out: Path, step: int) -> Iterator[MetricsLogger]:
    """The writers of the run `cfg` (a TrainConfig) in the folder `out`, from `step` on."""
    loggers: list[MetricsLogger] = []
    try:
        for name in chosen(cfg.log):
            if name == "jsonl":
                loggers.append(JsonlLogger(out / "metrics.jsonl"))
            elif name == "tensorboard":
                loggers.append(TensorBoardLogger(out / "tensorboard", step))
            else:
                config = dataclasses.asdict(cfg)
                loggers.append(WandbLogger(out, config, cfg.wandb_project, cfg.wandb_mode))
        yield Loggers(loggers)
    finally:
        Loggers(loggers).close()
