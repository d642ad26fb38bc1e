import json
import shutil
import subprocess

import numpy as np
import pytest
import torch
from test_evaluate import harvest_pair, train_run
from tiny_models import save_tiny_model

from choicesae.cli.main import main
from choicesae.errors import ConfigError, DataError
from choicesae.evaluation.browser import BrowseConfig, parse_features, top_contexts
from choicesae.evaluation.report import CompareConfig, compare, pareto

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A tiny GPT-2 run evaluated through the CLI, with its report and feature browser."""
    root = tmp_path_factory.mktemp("report")
    folder, hookpoint = save_tiny_model("gpt2", root / "model")
    train_store, test_store = harvest_pair(folder, hookpoint, root)
    run = train_run(train_store, root / "run")
    assert main(["eval", str(run), "--store", str(test_store), "--splice-contexts", "16"]) == 0
    argv = ["browse", str(run), "--store", str(test_store), "--top", "3", "--features", "5"]
    assert main(argv) == 0
    return run, test_store


def test_report_files_are_self_contained(evaluated):
    run, _ = evaluated
    out = run / "eval"
    for name in ("zipf", "features_per_token", "progressive", "training"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 4
    assert "http" not in page.replace("http-equiv", "") and "<script" not in page
    metrics = json.loads((out / "metrics.json").read_text())
    assert f"{metrics['fvu']:.4g}" in page and "loss recovered" in page


def test_feature_browser_pages(evaluated):
    run, _ = evaluated
    pages = sorted(p.name for p in (run / "browser").glob("feature-*.html"))
    assert len(pages) in (3, 4) and "feature-00005.html" in pages
    index = (run / "browser" / "index.html").read_text()
    assert all(f'href="{p}"' in index for p in pages)
    one = (run / "browser" / pages[0]).read_text()
    assert "Top-activating contexts" in one and "background:rgba(255,140,0,1.00)" in one


def test_top_contexts_stay_inside_the_peak_context():
    acts = torch.zeros(40)
    acts[[3, 17, 21]] = torch.tensor([1.0, 3.0, 2.0])
    spans = top_contexts(acts, per_context=10, n=5, window=4)
    assert spans == [(17, 13, 20), (21, 20, 26), (3, 0, 8)]  # only the 3 active rows


def test_browse_and_compare_errors():
    with pytest.raises(ConfigError, match="out of range"):
        parse_features("3,200", 128)
    with pytest.raises(ConfigError, match="comma-separated"):
        parse_features("3;4", 128)
    with pytest.raises(ConfigError, match="contexts"):
        BrowseConfig(contexts=0)
    with pytest.raises(ConfigError, match="at least one run"):
        compare(CompareConfig(runs=""))


def test_pareto_against_a_plain_definition():
    points = [(4.0, 0.5), (8.0, 0.3), (8.0, 0.6), (2.0, 0.9), (16.0, 0.3)]
    plain = [not any(q[0] <= p[0] and q[1] <= p[1] and q != p for q in points) for p in points]
    assert pareto(points) == plain == [True, True, False, True, False]


def test_compare_runs(evaluated, tmp_path, capsys):
    run, _ = evaluated
    with pytest.raises(DataError, match="choicesae eval"):
        compare(CompareConfig(runs=str(tmp_path)))
    assert main(["compare", str(run), str(run), "--out", str(tmp_path / "cmp")]) == 0
    rows = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert len(rows) == 2 and rows[0]["FVU"] == metrics["fvu"]
    headline = "sae_feature_threshold"  # a Mutual Choice SAE's default codes
    assert rows[0]["loss recovered"] == metrics["splice"]["loss_recovered"][headline]
    assert "compare.html" in capsys.readouterr().out


def chromium_render(page, shot) -> str:
    """Render `page` headless to the PNG `shot`; returns chromium's log (console included)."""
    done = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--enable-logging=stderr",
            "--v=0",
            "--window-size=1000,1200",
            f"--screenshot={shot}",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done.stdout + done.stderr


def console_errors(log: str) -> list[str]:
    return [line for line in log.splitlines() if ":CONSOLE" in line]


def non_blank(shot) -> bool:
    import matplotlib.image

    pixels = np.asarray(matplotlib.image.imread(shot))[..., :3]
    return pixels.std() > 0.02 and (pixels < 0.5).mean() > 0.001  # dark text or lines on it


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_pages_render_in_chromium_without_console_errors(evaluated, tmp_path):
    run, _ = evaluated
    feature = sorted((run / "browser").glob("feature-*.html"))[0]
    for page in (run / "eval" / "report.html", run / "browser" / "index.html", feature):
        shot = tmp_path / f"{page.stem}.png"
        log = chromium_render(page, shot)
        assert console_errors(log) == [], log
        assert non_blank(shot), f"{page} rendered blank"
    broken = tmp_path / "broken.html"  # the checks can fail: a page with a script error
    broken.write_text("<html><body><script>undefined_function()</script></body></html>")
    log = chromium_render(broken, tmp_path / "broken.png")
    assert console_errors(log) and not non_blank(tmp_path / "broken.png")


def test_tokens_display_as_running_text(tmp_path):
    from transformers import AutoTokenizer

    from choicesae.data.hooks import load_tokenizer
    from choicesae.evaluation.browser import display_tokens

    wordpiece = load_tokenizer("all-MiniLM-L6-v2")
    ids = wordpiece("Unbelievable exceptions, he said", add_special_tokens=False)["input_ids"]
    assert "".join(display_tokens(wordpiece, ids)) == " unbelievable exceptions , he said"
    folder, _ = save_tiny_model("gpt2", tmp_path / "gpt2")
    bpe = AutoTokenizer.from_pretrained(folder)
    ids = bpe("def f(x):\n    return x", add_special_tokens=False)["input_ids"]
    assert "".join(display_tokens(bpe, ids)) == "def f(x):\n    return x"
