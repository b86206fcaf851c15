"""The model's tokenizer, loaded the way transformers builds it, without paying that build in every stage.

transformers 5 reads a Gemma tokenizer by parsing the 33 MB tokenizer.json in Python and rebuilding the
Rust backend from its vocabulary and merges: 2.4-3.9 s in each stage that loads it (BENCHMARKS.md). The
backend it built is the same every time for the same files and versions, so the first load serialises it
(tokenizers' own format, read back in Rust) into a cache keyed by the tokenizer files' content and the
transformers and tokenizers versions, as DVC keys its run cache; later loads read that. A cache entry is
only written after the reloaded tokenizer has been compared with transformers' own on probe texts, its
vocabulary and its special tokens; when they differ, nothing is cached and transformers' tokenizer is
used (the same tokenizer, only slower), with a note on stderr.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import sys
from pathlib import Path

from table2text import warm_start
from table2text.paths import cache_root

# what a tokenizer folder may hold besides the model (the files transformers' save_pretrained writes)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "tokenizer.model", "added_tokens.json")
FORMAT = 1  # of a cache entry: backend.json + init.json
# probe texts of the equivalence check: special tokens, digits, runs of spaces and tabs, non-ASCII, markup
PROBES = ("<start_of_turn>user\n| Year | Title | Role |\n| 1999 | Ünïcode  café | — |<end_of_turn>",
          "  leading spaces,\ttabs\t\tand\n\nnew lines  ", "<bos><eos><pad> 3.14159 -42 1,000,000 ½ 東京 🙂",
          "The table's highlighted cells: [Row 2] Team = Köln; Points = 1.5e3.")


def cache_key(model_dir: Path) -> str | None:
    """sha256 over the tokenizer files (names and bytes) and the versions that build the backend; None
    when the folder has no tokenizer.json (a tokenizer transformers converts from another format)."""
    import tokenizers
    import transformers

    model_dir = Path(model_dir)
    if not (model_dir / "tokenizer.json").is_file():
        return None
    digest = hashlib.sha256(f"{FORMAT} {transformers.__version__} {tokenizers.__version__}".encode("utf-8"))
    for name in TOKENIZER_FILES:
        file = model_dir / name
        if file.is_file():
            digest.update(f"\0{name}\0".encode("utf-8"))
            digest.update(file.read_bytes())
    return digest.hexdigest()


def default_cache_dir() -> Path:
    """Beside the converted packaged model (TOTTO_GEMMA_CACHE moves both): one per user, shared by every
    project folder and test, since an entry is named by what it was built from."""
    return cache_root() / "tokenizer"


def load_tokenizer(model_dir: Path, *, cache: bool = True, cache_dir: Path | None = None):
    """The tokenizer transformers' AutoTokenizer gives for model_dir (remote code never trusted), from the
    cache (cache_dir, default default_cache_dir()) when it holds this folder's; cache False always builds it."""
    model_dir = Path(model_dir)
    key = cache_key(model_dir) if cache else None
    entry = Path(cache_dir or default_cache_dir()) / key if key else None
    if entry is not None:
        cached = _read_entry(entry, model_dir)
        if cached is not None:
            return cached
    from transformers import AutoTokenizer

    built = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    if entry is not None:
        _write_entry(built, entry, model_dir)
    return built


@functools.lru_cache(maxsize=None)
def fast_class(cls):
    """cls (e.g. GemmaTokenizer) with TokenizersBackend's __init__, which takes a serialised backend
    (tokenizer_file=) instead of rebuilding it from the vocabulary: the class's own attributes (padding
    side, input names, the name save_pretrained records) stay, so the tokenizer is still a cls. One class
    per cls, however often a process loads."""
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    if cls is TokenizersBackend:
        return cls
    return type(cls.__name__, (cls,), {"__init__": TokenizersBackend.__init__, "__module__": cls.__module__,
                                       "__qualname__": cls.__qualname__})


def _class_named(module: str, name: str):
    import importlib

    cls = getattr(importlib.import_module(module), name, None)
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    if not (isinstance(cls, type) and issubclass(cls, TokenizersBackend)):
        raise ValueError(f"{module}.{name} is not a transformers tokenizers-backed class")
    return cls


def _init_kwargs(tokenizer) -> dict:
    kwargs = {k: v for k, v in tokenizer.init_kwargs.items() if k not in ("added_tokens_decoder", "name_or_path")}
    kwargs = tokenizer.convert_added_tokens(kwargs, add_type_field=True, save=True)
    json.dumps(kwargs)  # only what JSON holds: anything else raises TypeError and nothing is cached
    return kwargs


def _build(entry: Path, model_dir: Path, meta: dict, backend=None):
    """The tokenizer of a cache entry; backend: its backend.json already parsed (table2text.warm_start)."""
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    cls = fast_class(_class_named(meta["module"], meta["class"]))
    kwargs = PreTrainedTokenizerBase.convert_added_tokens(meta["init_kwargs"], save=False)
    if backend is None:
        tokenizer = cls(tokenizer_file=str(entry / "backend.json"), name_or_path=str(model_dir), **kwargs)
    else:
        # TokenizersBackend.__init__ keeps a backend already set on the instance (its `self._tokenizer is
        # None` branches), as it keeps one it parsed from tokenizer_file; tokenizer_object= would deep-copy
        # it, which costs as much as parsing the file (tests/test_tokenizer.py compares both ways).
        tokenizer = cls.__new__(cls)
        tokenizer._tokenizer = backend
        tokenizer.__init__(name_or_path=str(model_dir), **kwargs)
    if meta.get("chat_template") is not None:
        tokenizer.chat_template = meta["chat_template"]
    tokenizer.init_kwargs.pop("tokenizer_file", None)  # as a from_pretrained load's: saves the same config
    return tokenizer


def _read_entry(entry: Path, model_dir: Path):
    try:
        meta = json.loads((entry / "init.json").read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT:
            return None
        backend_file = entry / "backend.json"
        backend = warm_start.take_tokenizer_backend(backend_file)
        tokenizer = _build(entry, model_dir, meta, backend)
        if backend is None:
            warm_start.note_tokenizer_backend(backend_file)  # the next stages may get it parsed
        return tokenizer
    except FileNotFoundError:
        return None  # not cached yet
    except Exception as err:  # a damaged entry: rebuilt and rewritten below
        print(f"note: tokenizer cache {entry.as_posix()} unreadable ({type(err).__name__}: {err}); rebuilding it",
              file=sys.stderr)
        return None


def _write_entry(built, entry: Path, model_dir: Path) -> None:
    from table2text.io.atomic import staged_dir

    try:
        meta = {"format": FORMAT, "module": type(built).__module__, "class": type(built).__name__,
                "init_kwargs": _init_kwargs(built), "chat_template": built.chat_template}
        with staged_dir(entry) as tmp:
            built.backend_tokenizer.save(str(tmp / "backend.json"))
            (tmp / "init.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n", encoding="utf-8")
            problem = difference(built, _build(tmp, model_dir, meta))
            if problem:
                raise _NotEquivalent(problem)
    except _NotEquivalent as err:
        print(f"note: tokenizer of {model_dir.as_posix()} not cached: the reloaded one differs ({err})", file=sys.stderr)
    except (OSError, TypeError, ValueError) as err:  # a full disk or an unserialisable setting: only slower
        shutil.rmtree(entry, ignore_errors=True)
        print(f"note: tokenizer of {model_dir.as_posix()} not cached ({type(err).__name__}: {err})", file=sys.stderr)


class _NotEquivalent(Exception):
    pass


def difference(expected, actual) -> str | None:
    """The first way `actual` tokenises differently from `expected`, or None: every probe text's ids with
    and without special tokens, their decoding with and without special tokens, the vocabulary, the
    special tokens, padding and truncation sides, and the chat template."""
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "padding_side", "truncation_side",
                 "model_max_length", "chat_template", "all_special_tokens", "clean_up_tokenization_spaces"):
        if getattr(expected, attr, None) != getattr(actual, attr, None):
            return f"{attr}: {getattr(expected, attr, None)!r} vs {getattr(actual, attr, None)!r}"
    if len(expected) != len(actual) or expected.get_vocab() != actual.get_vocab():
        return "vocabulary"
    for text in PROBES:
        for special in (True, False):
            ids = expected(text, add_special_tokens=special).input_ids
            if actual(text, add_special_tokens=special).input_ids != ids:
                return f"ids of {text[:30]!r} (special tokens {special})"
            for skip in (True, False):
                if expected.decode(ids, skip_special_tokens=skip) != actual.decode(ids, skip_special_tokens=skip):
                    return f"decoding of {text[:30]!r}"
    return None

