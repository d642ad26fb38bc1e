"""benchmarks/gpu.py (the GPU readiness run of benchmarks/gpu.sh) end to end on CPU, tiny."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "gpu.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_script_checks_every_sparsifier_and_times_every_method(capsys):
    pytest.importorskip("sparsify")
    gpu = load_script()
    sizes = "--d-in 32 --num-latents 256 --batch-size 128 --k 4 --steps 2 --warmup 1"
    check = "--check-d-in 16 --check-latents 128 --check-batch 64"
    assert gpu.main(["--device", "cpu", *sizes.split(), *check.split()]) == 0
    lines = capsys.readouterr().out.splitlines()
    for precision in ("fp32", "bf16"):
        for name in gpu.SPARSIFIERS:
            [line] = [ln for ln in lines if ln.startswith(f"check {precision} {name} ")]
            assert line.endswith("PASS")
    labels = ["sparsify topk"] + [
        f"choicesae {name}{suffix}" for suffix in ("", " bf16") for name in gpu.SPARSIFIERS
    ]
    methods = ("sparsify ", "choicesae ")
    rows = {ln[:30].strip(): ln[30:].split() for ln in lines if ln.startswith(methods)}
    for label in labels:
        ms, tokens, _, ratio = rows[label]
        assert float(ms) > 0 and float(tokens) > 0 and float(ratio) > 0
