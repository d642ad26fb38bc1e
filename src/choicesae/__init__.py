"""choicesae: sparse autoencoders with Token, Mutual and Feature Choice sparsifiers."""

from importlib.metadata import PackageNotFoundError, version

from choicesae.threads import passive_openmp

passive_openmp()  # before torch is imported: OpenMP reads its wait policy when it loads

from choicesae.core.config import SAEConfig, TrainConfig
from choicesae.core.sae import SAE
from choicesae.core.sparsifiers import (
    Sparse,
    feature_choice,
    jumprelu,
    mutual_choice,
    relu,
    sparsify,
    topk,
    uniform_capacities,
)
from choicesae.data.harvest import HarvestConfig, OnlineActivations, harvest
from choicesae.data.store import Store
from choicesae.data.synthetic import SyntheticConfig, sparse_dictionary
from choicesae.errors import ChoiceSAEError, ConfigError, DataError
from choicesae.evaluation.evaluate import EvalConfig, calibrate_thresholds_, evaluate
from choicesae.interop.saelens import from_saelens, to_saelens
from choicesae.training.loop import train

try:
    __version__ = version("choicesae")  # the installed metadata: pyproject.toml's version
except PackageNotFoundError:  # a source tree on sys.path, never installed
    __version__ = "0+unknown"

__all__ = [
    "__version__",
    "SAE",
    "SAEConfig",
    "TrainConfig",
    "SyntheticConfig",
    "train",
    "sparse_dictionary",
    "Sparse",
    "topk",
    "mutual_choice",
    "feature_choice",
    "relu",
    "jumprelu",
    "sparsify",
    "uniform_capacities",
    "ChoiceSAEError",
    "ConfigError",
    "DataError",
    "HarvestConfig",
    "harvest",
    "OnlineActivations",
    "Store",
    "EvalConfig",
    "evaluate",
    "calibrate_thresholds_",
    "to_saelens",
    "from_saelens",
]
