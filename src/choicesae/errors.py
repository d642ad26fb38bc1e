"""The errors a user can cause; the CLI prints them without a traceback."""


class ChoiceSAEError(ValueError):
    """Base class: a setting or an input that cannot work, with a message naming it."""


class ConfigError(ChoiceSAEError):
    """A setting that cannot work (unknown sparsifier, k >= number of latents, ...)."""


class DataError(ChoiceSAEError):
    """Activations that cannot be trained on (empty, wrong shape, NaN or Inf, ...)."""


class NonFiniteError(ChoiceSAEError):
    """The loss became NaN or Inf during training."""


class Interrupted(ChoiceSAEError):
    """Training stopped by SIGINT or SIGTERM after writing a final checkpoint."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
