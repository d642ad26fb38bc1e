"""Text in, fixed-length token contexts out.

Sources: plain text files (paragraphs of one file are one document), JSONL (one document per
record), Hugging Face `datasets` (`hf:NAME_OR_FOLDER`), and the embedded default corpus
(docs/data.md says where it comes from). Documents are tokenised, joined with the tokenizer's
separator into one stream and cut into contexts, so no context is padded except the very last.
"""

import gzip
import itertools
import json
import pydoc_data.topics
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

from choicesae.errors import DataError

# The embedded default corpus: public-domain and freely licensed English prose that Debian
# packages (installed by the README's main command), with Python's own pydoc text as fallback.
JARGON = Path("/usr/share/doc/jargon-text/jargon.txt.gz")
FORTUNES = Path("/usr/share/games/fortunes")
PYTHON_DOCS = Path("/usr/share/doc")  # python3.X/html/_sources/**/*.rst.txt from python3-doc
DEBIAN_PACKAGES = "jargon-text fortunes python3-doc"
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text", ".gz"}


def documents(spec: str, text_field: str = "text", split: str = "train") -> Iterator[str]:
    """Every document of `spec`: a comma-separated list of files, folders, `hf:DATASET` or
    `default`, in a fixed order (the same text always gives the same stream)."""
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        if item == "default":
            yield from default_corpus()
        elif item.startswith("hf:"):
            yield from dataset_documents(item[3:], text_field, split)
        else:
            for path in _files(Path(item)):
                yield from file_documents(path, text_field)


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _is_text(p))
        if not files:
            raise DataError(f"text folder {path} holds no .txt, .md, .rst or .jsonl files")
        return files
    if not path.is_file():
        raise DataError(f"text file {path} does not exist")
    return [path]


def _is_text(path: Path) -> bool:
    return path.suffix in TEXT_SUFFIXES | {".jsonl"} or path.name.endswith(".jsonl.gz")


def _read(path: Path) -> str:
    try:
        if path.suffix == ".gz":
            return gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace")
        return path.read_text(encoding="utf-8", errors="replace")
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read text file {path}: {e}") from e


def file_documents(path: Path, text_field: str = "text") -> Iterator[str]:
    """JSONL: the `text_field` of each record; plain text: the whole file."""
    text = _read(path)
    if not path.name.removesuffix(".gz").endswith(".jsonl"):
        yield text
        return
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            yield record[text_field]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(
                f"{path}, line {number}: not a JSON object with a {text_field!r} string ({e})"
            ) from e


def dataset_documents(name: str, text_field: str, split: str) -> Iterator[str]:
    """A Hugging Face dataset: a local folder of data files, one saved with save_to_disk, or a
    hub name (only where the hub is reachable). Streamed, so it may exceed memory."""
    import datasets  # imported here: it is slow to import and only this source needs it

    try:
        if (Path(name) / "dataset_info.json").is_file() and (Path(name) / "state.json").is_file():
            data = datasets.load_from_disk(name)
            data = data[split] if isinstance(data, datasets.DatasetDict) else data
        else:
            data = datasets.load_dataset(name, split=split, streaming=True)
    except Exception as e:  # datasets raises many types for a missing or unreachable dataset
        raise DataError(f"cannot load the dataset {name!r} (split {split!r}): {e}") from e
    for record in data:
        if text_field not in record:
            raise DataError(f"dataset {name!r} has no field {text_field!r}: {list(record)}")
        yield record[text_field]


def default_corpus() -> Iterator[str]:
    """The embedded corpus (docs/data.md): the Jargon File, the fortunes' quotations and
    the Python documentation when their Debian packages are installed, and always the pydoc
    topics that every Python carries (0.13M tokens on their own)."""
    files = default_corpus_files()
    if not files:
        warnings.warn(
            f"the Debian packages of the default corpus are not installed ({DEBIAN_PACKAGES}): "
            "using only Python's pydoc text, 0.13M tokens; install them for 4.5M tokens",
            stacklevel=2,
        )
    for path in files:
        if path.parent == FORTUNES:
            yield from _read(path).split("\n%\n")  # one quotation per document
        else:
            yield _read(path)
    topics = pydoc_data.topics.topics
    yield from (topics[key] for key in sorted(topics))


def default_corpus_files() -> list[Path]:
    """The Debian-packaged files of the default corpus that are present, in a fixed order."""
    files = [JARGON] if JARGON.is_file() else []
    if FORTUNES.is_dir():  # plain fortune files only: not the .dat indexes nor .u8 links
        files += sorted(p for p in FORTUNES.iterdir() if p.is_file() and not p.suffix)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    found = sorted(PYTHON_DOCS.glob("python3*/html/_sources"), key=lambda p: p.parts[-3] != version)
    if found:  # this Python's docs first, else any python3.X-doc
        files += sorted(found[0].rglob("*.rst.txt"))
    return files


def special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """(prefix, suffix) the tokenizer puts around one sequence: [CLS] .. [SEP] for BERT, <s>
    for Llama. GPT-2 and GPT-NeoX add none, so their BOS is prepended, as SAE work does."""
    bare = tokenizer("a b", add_special_tokens=False)["input_ids"]
    full = tokenizer("a b", add_special_tokens=True)["input_ids"]
    start = next(i for i in range(len(full)) if full[i : i + len(bare)] == bare)
    prefix, suffix = full[:start], full[start + len(bare) :]
    if not prefix and tokenizer.bos_token_id is not None:
        prefix = [tokenizer.bos_token_id]
    return prefix, suffix


def token_stream(docs: Iterator[str], tokenizer) -> Iterator[int]:
    """Token ids of every document, documents separated by the tokenizer's EOS (or SEP).
    Lazy: a harvest of a few contexts tokenises only their text, not a book-length file."""
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    started = False
    for doc in docs:
        new_doc = True
        for ids in _paragraph_ids(doc, tokenizer):
            if new_doc and started and sep is not None:
                yield sep
            new_doc, started = False, True
            yield from ids


PARAGRAPHS_PER_CALL = 64


def _paragraph_ids(doc: str, tokenizer) -> Iterator[list[int]]:
    """Token ids of each paragraph of `doc` that has any: bounded tokenizer calls on
    book-length files, PARAGRAPHS_PER_CALL at a time (one call per paragraph costs more in
    Python than the tokenising itself)."""
    # blank text is no text, even to byte-level tokenizers
    paragraphs = (p for p in doc.split("\n\n") if p.strip())
    while chunk := list(itertools.islice(paragraphs, PARAGRAPHS_PER_CALL)):
        encoded = tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]
        yield from (ids for ids in encoded if ids)


def contexts(docs: Iterator[str], tokenizer, context: int) -> Iterator[list[int]]:
    """Contexts of exactly `context` token ids (prefix + text + suffix), the last one shorter."""
    prefix, suffix = special_tokens(tokenizer)
    body = context - len(prefix) - len(suffix)
    if body < 1:
        raise DataError(f"context {context} leaves no room for text besides the special tokens")
    chunk: list[int] = []
    for token in token_stream(docs, tokenizer):
        chunk.append(token)
        if len(chunk) == body:
            yield prefix + chunk + suffix
            chunk = []
    if chunk:
        yield prefix + chunk + suffix
