"""benchmarks/gpu.py (the GPU readiness run of benchmarks/gpu.sh) in process on CPU, tiny, with
schedulefree and sparsify installed: the rows that need them run (tests/test_gpu_rehearsal.py
runs the script without them)."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "gpu.py"
SIZES = "--device cpu --d-in 32 --num-latents 256 --batch-size 128 --k 4 --steps 2 --warmup 1"
CHECK = "--check-d-in 16 --check-latents 128 --check-batch 64"
LARGE = (
    "--large-batches 256 512 --large-d-in 16 --large-true 32 --large-latents 64 --large-k 4 "
    "--large-tokens 5120 --large-rows 2048"
)


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_script_checks_every_sparsifier_and_times_every_method(capsys):
    pytest.importorskip("sparsify")
    pytest.importorskip("schedulefree")
    gpu = load_script()
    argv = [*SIZES.split(), *CHECK.split(), *LARGE.split(), "--sections", "check", "throughput"]
    assert gpu.main([*argv, "large"]) == 0
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
    for B in (256, 512):  # both methods, then Feature Choice's FVUs over TopK's
        at_B = [ln.split() for ln in lines if ln.split()[:1] == [str(B)]]
        assert [row[3] for row in at_B] == ["topk", "feature_choice"]
    ratios = [ln.split()[-2:] for ln in lines if "FC ÷ TopK" in ln]
    assert len(ratios) == 2 and all(float(r) > 0 for pair in ratios for r in pair)
    assert "skipped (0): -" in lines and "erred (0): -" in lines


def test_gpu_script_starts_no_row_past_its_budget(capsys):
    gpu = load_script()
    assert gpu.main([*SIZES.split(), *CHECK.split(), *LARGE.split(), "--budget", "0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "skip check fp32 topk: out of time (0 s of the budget left)" in lines
    assert "ran (0): -" in lines and "skip large B=512: out of time" in lines
    assert not [ln for ln in lines if ln.endswith("PASS")]


def test_gpu_script_refuses_large_batches_that_do_not_fit(capsys):
    gpu = load_script()
    with pytest.raises(SystemExit):
        gpu.parse(["--large-batches", "3000", "4096", "--large-rows", "8192"])
    assert "--large-batches 3000" in capsys.readouterr().err
