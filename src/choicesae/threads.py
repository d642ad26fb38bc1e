"""CPU threads that share the cores: OpenMP's idle threads spin by default, and beside one other
busy process on 2 cores a training run was 6x slower for it (benchmarks/threads.py). OpenMP reads
its wait policy once, when torch loads it, so the package sets it before importing torch."""

import os
import sys
import warnings

# torch was loaded before choicesae with OpenMP's own policy: too late to set it here
TORCH_FIRST = "torch" in sys.modules and "OMP_WAIT_POLICY" not in os.environ


def passive_openmp() -> None:
    """OMP_WAIT_POLICY=PASSIVE (idle threads sleep) unless the environment sets a policy, or
    CHOICESAE_OMP_DEFAULTS=0 asks for OpenMP's own."""
    if os.environ.get("CHOICESAE_OMP_DEFAULTS") != "0":
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def warn_if_spinning(device: str) -> None:
    """Say so when torch loaded OpenMP before choicesae could make its idle threads sleep."""
    import torch  # loaded by now; not at the top: this module must not load it first

    if TORCH_FIRST and device == "cpu" and torch.get_num_threads() > 1:
        warnings.warn(
            "torch was imported before choicesae, so OpenMP's idle threads spin: on cores "
            "shared with another busy process training can be several times slower; import "
            "choicesae first or set OMP_WAIT_POLICY=PASSIVE (benchmarks/threads.py)",
            stacklevel=3,
        )
