"""The errors a user can cause; the CLI prints them without a traceback."""


class ChoiceSAEError(ValueError):
    """Base class: a setting or an input that cannot work, with a message naming it."""


class ConfigError(ChoiceSAEError):
    """A setting that cannot work (unknown sparsifier, k >= number of latents, ...)."""


class DataError(ChoiceSAEError):
    """Activations that cannot be trained on (empty, wrong shape, NaN or Inf, ...)."""
