"""Data parallel and feature sharding (--parallel features) on 2 CPU processes (torchrun,
gloo) against one process on the same global batches: the same selected pairs and, after 20
steps, the same weights, optimizer state and counters.

The test launches this file under torchrun; the `__main__` part is what each rank runs."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from choicesae.core.config import SAEConfig, TrainConfig
from choicesae.core.sae import SAE
from choicesae.core.sparsifiers import (
    feature_choice,
    mutual_choice,
    topk,
    uniform_capacities,
)
from choicesae.errors import ConfigError
from choicesae.training.loop import train

B, F, K = 64, 32, 4  # global batch, latents, k: m = k·B/F = 8 per feature
RUNS = [
    (s, kernels)
    for s in ("topk", "mutual_choice", "feature_choice", "relu")
    for kernels in ("sparse", "dense")
]
SPARSIFIERS = ("topk", "mutual_choice", "feature_choice")


def affinities(ties: bool) -> torch.Tensor:
    """[B, F] z', continuous or on a coarse grid (many ties at every threshold)."""
    z = torch.randn(B, F, generator=torch.Generator().manual_seed(1))
    return (z * 2).round() / 2 if ties else z


def config(out: Path, sparsifier: str, kernels: str, tag: str = "", **kw) -> TrainConfig:
    return TrainConfig(
        activations=str(out / "x.npy"),
        out=str(out / f"{sparsifier}-{kernels}{tag}"),
        sae=SAEConfig(sparsifier=sparsifier, k=K, num_latents=F),
        batch_size=B,
        steps=20,
        lr=1e-2,
        warmup_steps=2,
        log_every=5,
        dead_tokens=2 * B,
        density_tokens=4 * B,  # dead and dying latents within 20 steps
        k_aux=4 * K,  # the aux losses read every 4th token (losses.aux_rows), on every rank
        kernels=kernels,
        progress=False,
        **{"checkpoint_every": 20, **kw},
    )


def ranked(z: torch.Tensor, n: int) -> torch.Tensor:
    """Boolean [len(z)] of the n largest entries, ties to the lower index (the tie rule)."""
    order = torch.sort(-z, stable=True).indices[:n]
    return torch.zeros(len(z), dtype=torch.bool).index_fill_(0, order, True)


def reference(name: str, z: torch.Tensor, sharded: bool = False) -> torch.Tensor:
    """[B, F] selection of one process on the whole batch, with the stated tie rule; the
    plain sparsifiers agree wherever there are no ties. Sharded TopK breaks ties by the rule
    too (data parallel keeps torch.topk's choice, the same on one process)."""
    if name == "topk" and sharded:
        return torch.stack([ranked(row, K) for row in z])
    if name == "topk":
        return topk(z, K).acts != 0
    if name == "mutual_choice":  # positive only: a non-positive winner is a zero activation
        return ranked(z.flatten(), K * B).view(B, F) & (z > 0)
    m = uniform_capacities(K, B, F)
    return torch.stack([ranked(z[:, i], int(m[i])) for i in range(F)], 1)


def worker(out: Path) -> None:
    """What each torchrun rank does: global selections of both affinity sets, then every
    training run (rank 0 writes it)."""
    from choicesae.parallel import comm
    from choicesae.parallel.data import DataParallel
    from choicesae.parallel.features import FeatureSharded
    from choicesae.step.kernels import select_topk

    world = comm.init_from_env("cpu")
    data, features = DataParallel(world), FeatureSharded(world, F)
    for ties in (False, True):
        z = comm.shard(affinities(ties), world)
        m = uniform_capacities(K, B, F)
        for name in SPARSIFIERS:  # topk: the local selection is the global one
            p = data.select(name, z, K, m) or select_topk(z, K)
            token = p.token + world.rank * z.shape[0]  # index in the global batch
            torch.save((token, p.feature), out / f"pairs-{name}-{ties}-{world.rank}.pt")
        latents = features.latents
        for name in SPARSIFIERS:  # feature sharding: every token, this rank's latents
            p = features.select(name, affinities(ties)[:, latents], K, m[latents])
            found = (p.token, p.feature + latents.start)
            torch.save(found, out / f"pairs-features-{name}-{ties}-{world.rank}.pt")
    x = torch.from_numpy(np.load(out / "x.npy"))
    for sparsifier, kernels in RUNS:
        train(config(out, sparsifier, kernels), x)
    for sparsifier, kernels in RUNS:
        train(config(out, sparsifier, kernels, "-features", parallel="features"), x)
    for sparsifier in SPARSIFIERS:
        setting = SETTINGS["-features-4k"]
        train(config(out, sparsifier, "sparse", "-features-4k", parallel="features", **setting), x)
    train(config(out, "mutual_choice", "sparse", "-local", distributed_selection="local"), x)
    for sparsifier in SPARSIFIERS:  # transcoders: each rank's slice of (input, target) rows
        train(config(out, sparsifier, "sparse", "-transcoder", transcoder=True), targets(x))
    # halfway checkpoints at another world size: resume one process's on two, and write one
    train(halfway(out, "mutual_choice", "-from1", parallel="features", resume=True), x)
    train(halfway(out, "topk", "-from2", parallel="features"), x)


def targets(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) for a transcoder: a fixed nonlinear map of the inputs, 8 wide."""
    return x, (x[:, :8] * 3).tanh() + x[:, 8:16]


def halfway(out: Path, sparsifier: str, tag: str, **kw) -> TrainConfig:
    """A run of 20 steps with a checkpoint at step 10, to resume from."""
    return config(out, sparsifier, "dense", tag, checkpoint_every=10, **kw)


def rewind(run: Path) -> None:
    """Leave a finished run as if stopped after its checkpoint of step 10."""
    (run / "checkpoint-000000020.pt").unlink()
    shutil.rmtree(run / "sae")


@pytest.fixture(scope="module")
def launched(tmp_path_factory, synthetic):
    out = tmp_path_factory.mktemp("ddp")
    np.save(out / "x.npy", synthetic[0][:4096].numpy())
    train(halfway(out, "mutual_choice", "-from1"), synthetic[0][:4096])  # one process
    rewind(out / "mutual_choice-dense-from1")  # the workers resume it
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        __file__,
        str(out),
    ]
    done = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        env={"OMP_NUM_THREADS": "1", **__import__("os").environ},
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return out


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("name", SPARSIFIERS)
@pytest.mark.parametrize("mode", ["", "features-"])
def test_global_selection_equals_one_process(launched, name, ties, mode):
    z = affinities(ties)
    chosen = torch.zeros(B, F, dtype=torch.bool)
    for rank in (0, 1):
        token, feature = torch.load(launched / f"pairs-{mode}{name}-{ties}-{rank}.pt")
        assert not chosen[token, feature].any()  # no pair twice
        chosen[token, feature] = True
    expected = reference(name, z, sharded=bool(mode))
    assert torch.equal(chosen, expected)
    if not ties:  # the plain sparsifiers, on the concatenated batch
        plain = {
            "topk": topk(z, K),
            "mutual_choice": mutual_choice(z, K),
            "feature_choice": feature_choice(z, uniform_capacities(K, B, F)),
        }[name]
        assert torch.equal(chosen & (z > 0), plain.acts != 0)


RUNS_ALL = [(s, kernels, "") for s, kernels in RUNS]
RUNS_ALL += [(s, kernels, "-features") for s, kernels in RUNS]
RUNS_ALL += [(s, "sparse", "-features-4k") for s in SPARSIFIERS]
RUNS_ALL += [(s, "sparse", "-transcoder") for s in SPARSIFIERS]
SETTINGS = {"-features-4k": {"multi_topk": True}, "-transcoder": {"transcoder": True}}


@pytest.mark.parametrize(("sparsifier", "kernels", "tag"), RUNS_ALL)
def test_twenty_steps_match_one_process(launched, tmp_path, sparsifier, kernels, tag):
    x = torch.from_numpy(np.load(launched / "x.npy"))
    settings = SETTINGS.get(tag, {})
    rows = targets(x) if settings.get("transcoder") else x
    single = train(config(tmp_path, sparsifier, kernels, **settings), rows)
    both = SAE.from_pretrained(launched / f"{sparsifier}-{kernels}{tag}" / "sae")
    for name, tensor in single.state_dict().items():
        torch.testing.assert_close(
            both.state_dict()[name], tensor, rtol=1e-4, atol=1e-5, equal_nan=True, msg=name
        )
    # the checkpoint is the one a single process writes: global counters, any world size
    one = torch.load(tmp_path / f"{sparsifier}-{kernels}" / "checkpoint-000000020.pt")
    two = torch.load(launched / f"{sparsifier}-{kernels}{tag}" / "checkpoint-000000020.pt")
    assert one.keys() == two.keys() and one["config"] != "" and one["step"] == two["step"] == 20
    assert torch.equal(one["since_fired"], two["since_fired"])
    assert torch.equal(one["counts"], two["counts"]) and torch.equal(one["dying"], two["dying"])
    for i, state in one["optimizer"]["state"].items():  # whole Adam moments, any world size
        for key, t in state.items():
            torch.testing.assert_close(two["optimizer"]["state"][i][key], t, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize(
    ("setting", "named"),
    [({"nfm_coeff": 0.1}, "nfm_coeff"), ({"distributed_selection": "local"}, "local")],
)
def test_feature_sharding_refuses_what_it_lacks(tmp_path, setting, named):
    with pytest.raises(ConfigError, match=named):
        config(tmp_path, "topk", "sparse", parallel="features", **setting)


@pytest.mark.parametrize(("sparsifier", "tag"), [("mutual_choice", "-from1"), ("topk", "-from2")])
def test_resume_at_another_world_size(launched, tmp_path, sparsifier, tag):
    """Stopped at step 10 of 20 on one process and resumed on two in feature mode (-from1),
    or the other way round (-from2): the uninterrupted run's weights."""
    x = torch.from_numpy(np.load(launched / "x.npy"))
    run = launched / f"{sparsifier}-dense{tag}"
    if tag == "-from2":  # two processes wrote its checkpoints: resume it on one
        rewind(run)
        train(halfway(launched, sparsifier, tag, resume=True), x)
    single = train(config(tmp_path, sparsifier, "dense"), x)
    both = SAE.from_pretrained(run / "sae")
    for name, tensor in single.state_dict().items():
        torch.testing.assert_close(
            both.state_dict()[name], tensor, rtol=1e-4, atol=1e-5, equal_nan=True, msg=name
        )
    assert torch.load(run / "checkpoint-000000020.pt")["step"] == 20


def test_local_selection_budgets_each_slice(launched):
    import json

    log = (launched / "mutual_choice-sparse-local" / "metrics.jsonl").read_text().splitlines()
    assert len(log) == 4 and all(json.loads(r)["l0"] <= K + 1e-6 for r in log)


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
