"""choicesae: sparse autoencoders with Token, Mutual and Feature Choice sparsifiers."""

from choicesae.threads import passive_openmp

passive_openmp()  # before torch is imported: OpenMP reads its wait policy when it loads

from choicesae.config import SAEConfig, TrainConfig
from choicesae.errors import ChoiceSAEError, ConfigError, DataError
from choicesae.evaluate import EvalConfig, evaluate
from choicesae.harvest import HarvestConfig, OnlineActivations, harvest
from choicesae.sae import SAE
from choicesae.sparsifiers import (
    Sparse,
    feature_choice,
    jumprelu,
    mutual_choice,
    relu,
    sparsify,
    topk,
    uniform_capacities,
)
from choicesae.store import Store
from choicesae.synthetic import SyntheticConfig, sparse_dictionary
from choicesae.train import train

__all__ = [
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
]
