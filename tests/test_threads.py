"""OpenMP's wait policy: set to PASSIVE before torch loads, for the CLI and for `import
choicesae`, unless the environment chose one."""

import os
import subprocess
import sys

SHOW = "import choicesae, os; print(os.environ.get('OMP_WAIT_POLICY'))"


def policy(code: str, **env: str) -> str:
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", *env)}
    done = subprocess.run(
        [sys.executable, "-c", code], env=base | env, capture_output=True, text=True, check=True
    )
    return done.stdout.split()[-1]


def test_import_sets_a_passive_wait_policy_before_torch_loads():
    code = "import choicesae, sys, os; print('torch' in sys.modules, os.environ['OMP_WAIT_POLICY'])"
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.split() == ["True", "PASSIVE"]  # torch is loaded, the policy set


def test_the_users_policy_and_the_opt_out_are_kept():
    assert policy(SHOW, OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"
    assert policy(SHOW, CHOICESAE_OMP_DEFAULTS="0") == "None"


def test_the_cli_entry_point_imports_the_package_first():
    code = "import choicesae.cli.main, os; print(os.environ.get('OMP_WAIT_POLICY'))"
    assert policy(code) == "PASSIVE"


def test_training_warns_when_torch_was_loaded_first(tmp_path):
    code = f"""
import torch, warnings
torch.set_num_threads(2)
import choicesae as cs
x = torch.randn(512, 16)
cfg = cs.TrainConfig(out={str(tmp_path)!r}, overwrite=True, steps=1, batch_size=256, progress=False,
                     sae=cs.SAEConfig(k=2, expansion=2))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    cs.train(cfg, x)
print(any("imported before choicesae" in str(w.message) for w in caught))
"""
    assert policy(code) == "True"
    assert policy(code, OMP_WAIT_POLICY="PASSIVE") == "False"  # the user chose: nothing to say
