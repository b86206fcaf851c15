"""table2text.model.tokenizer: transformers' tokenizer, its built backend cached by content."""

from __future__ import annotations

import filecmp
import json
import os
import shutil

import pytest
from transformers import AutoTokenizer

from table2text import warm_start
from table2text.model import tokenizer as tokenizers_cache


@pytest.fixture()
def folder(tiny_model_dir, tmp_path):
    """A model folder's tokenizer files (the packaged model's real tokenizer), in a folder of its own."""
    target = tmp_path / "model"
    target.mkdir()
    for name in tokenizers_cache.TOKENIZER_FILES:
        if (tiny_model_dir / name).is_file():
            shutil.copyfile(tiny_model_dir / name, target / name)
    return target


def no_build(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("AutoTokenizer.from_pretrained called: the cache was not used")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", refuse)


def test_a_cached_load_tokenises_as_transformers_does_and_is_the_same_class(folder, tmp_path, monkeypatch):
    built = AutoTokenizer.from_pretrained(folder)
    first = tokenizers_cache.load_tokenizer(folder, cache_dir=tmp_path / "cache")  # builds, checks, writes
    assert len(list((tmp_path / "cache").iterdir())) == 1
    no_build(monkeypatch)
    cached = tokenizers_cache.load_tokenizer(folder, cache_dir=tmp_path / "cache")
    assert tokenizers_cache.difference(built, first) is None
    assert tokenizers_cache.difference(built, cached) is None
    assert isinstance(cached, type(built)) and type(cached).__name__ == type(built).__name__
    text = "| 1999 | Ünïcode  café |<end_of_turn>"
    assert cached(text).input_ids == built(text).input_ids
    assert cached.padding_side == built.padding_side and cached.name_or_path == str(folder)


def test_a_cached_load_saves_the_same_files(folder, tmp_path):
    tokenizers_cache.load_tokenizer(folder, cache_dir=tmp_path / "cache")
    cached = tokenizers_cache.load_tokenizer(folder, cache_dir=tmp_path / "cache")
    AutoTokenizer.from_pretrained(folder).save_pretrained(tmp_path / "built")
    cached.save_pretrained(tmp_path / "saved")
    names = sorted(p.name for p in (tmp_path / "built").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "saved").iterdir())
    assert all(filecmp.cmp(tmp_path / "built" / n, tmp_path / "saved" / n, shallow=False) for n in names)


def test_changed_tokenizer_files_are_a_new_entry(folder, tmp_path):
    key = tokenizers_cache.cache_key(folder)
    config = folder / "tokenizer_config.json"
    settings = json.loads(config.read_text(encoding="utf-8"))
    settings["padding_side"] = "right"
    config.write_text(json.dumps(settings), encoding="utf-8")
    assert tokenizers_cache.cache_key(folder) != key
    assert tokenizers_cache.load_tokenizer(folder, cache_dir=tmp_path / "cache").padding_side == "right"
    assert tokenizers_cache.load_tokenizer(folder, cache_dir=tmp_path / "cache").padding_side == "right"


def test_a_damaged_entry_is_rebuilt_with_a_note(folder, tmp_path, capsys):
    tokenizers_cache.load_tokenizer(folder, cache_dir=tmp_path / "cache")
    entry = tmp_path / "cache" / tokenizers_cache.cache_key(folder)
    (entry / "backend.json").write_text("{not json", encoding="utf-8")
    rebuilt = tokenizers_cache.load_tokenizer(folder, cache_dir=tmp_path / "cache")
    assert "unreadable" in capsys.readouterr().err
    assert tokenizers_cache.difference(AutoTokenizer.from_pretrained(folder), rebuilt) is None
    assert json.loads((entry / "backend.json").read_text(encoding="utf-8"))  # rewritten whole


def test_nothing_is_cached_when_the_reloaded_tokenizer_differs(folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tokenizers_cache, "difference", lambda expected, actual: "ids of 'x'")
    loaded = tokenizers_cache.load_tokenizer(folder, cache_dir=tmp_path / "cache")
    assert "not cached: the reloaded one differs (ids of 'x')" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())
    assert loaded("a b").input_ids == AutoTokenizer.from_pretrained(folder)("a b").input_ids


def test_difference_names_what_differs(folder):
    built = AutoTokenizer.from_pretrained(folder)
    other = AutoTokenizer.from_pretrained(folder)
    other.padding_side = "right" if built.padding_side == "left" else "left"
    assert tokenizers_cache.difference(built, other).startswith("padding_side")


def test_a_folder_without_tokenizer_json_is_not_cached(folder, tmp_path):
    shutil.move(folder / "tokenizer.json", tmp_path / "elsewhere.json")
    assert tokenizers_cache.cache_key(folder) is None


# ------------------------------------------------------------------ a backend the warm-start helper parsed
def helper_parsed(backend_file, tmp_path, monkeypatch):
    """What the warm-start helper does between stages: read the hint a stage left, parse the backend."""
    monkeypatch.setattr(warm_start, "_PRELOADED", {})
    hint = tmp_path / "helper.preload"
    hint.write_text(str(backend_file.resolve()), encoding="utf-8")
    warm_start._preload(hint)
    assert str(backend_file.resolve()) in warm_start._PRELOADED


def test_a_backend_the_helper_parsed_gives_the_tokenizer_the_file_gives(folder, tmp_path, monkeypatch):
    from tokenizers import Tokenizer

    tokenizers_cache.load_tokenizer(folder, cache_dir=tmp_path / "cache")  # builds and writes the entry
    from_file = tokenizers_cache.load_tokenizer(folder, cache_dir=tmp_path / "cache")  # parses its backend
    backend_file = tmp_path / "cache" / tokenizers_cache.cache_key(folder) / "backend.json"
    helper_parsed(backend_file, tmp_path, monkeypatch)
    with monkeypatch.context() as patched:
        patched.setattr(Tokenizer, "from_file", lambda *a: pytest.fail("parsed again"))
        handed = tokenizers_cache.load_tokenizer(folder, cache_dir=tmp_path / "cache")
    assert tokenizers_cache.difference(from_file, handed) is None
    assert type(handed) is type(from_file) and handed.name_or_path == from_file.name_or_path
    from_file.save_pretrained(tmp_path / "from_file")
    handed.save_pretrained(tmp_path / "handed")
    names = sorted(p.name for p in (tmp_path / "from_file").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "handed").iterdir())
    assert all(filecmp.cmp(tmp_path / "from_file" / n, tmp_path / "handed" / n, shallow=False) for n in names)
    assert warm_start._PRELOADED == {}  # given out once: a second tokenizer parses its own
    assert tokenizers_cache.difference(from_file, tokenizers_cache.load_tokenizer(
        folder, cache_dir=tmp_path / "cache")) is None


def test_a_backend_file_changed_since_the_helper_read_it_is_parsed_again(folder, tmp_path, monkeypatch):
    tokenizers_cache.load_tokenizer(folder, cache_dir=tmp_path / "cache")
    backend_file = tmp_path / "cache" / tokenizers_cache.cache_key(folder) / "backend.json"
    helper_parsed(backend_file, tmp_path, monkeypatch)
    held = warm_start._PRELOADED[str(backend_file.resolve())][1]
    info = backend_file.stat()
    os.utime(backend_file, ns=(info.st_atime_ns, info.st_mtime_ns + 1_000_000_000))
    loaded = tokenizers_cache.load_tokenizer(folder, cache_dir=tmp_path / "cache")
    assert loaded.backend_tokenizer is not held
    assert tokenizers_cache.difference(AutoTokenizer.from_pretrained(folder), loaded) is None


def test_a_stage_of_a_helper_names_the_backend_it_parsed_and_others_name_nothing(folder, tmp_path, monkeypatch):
    monkeypatch.setattr(warm_start, "_PRELOADED", {})
    monkeypatch.delenv(warm_start.CHILD_ENV, raising=False)
    tokenizers_cache.load_tokenizer(folder, cache_dir=tmp_path / "cache")
    assert not list(tmp_path.glob("*.preload"))  # no helper: no hint
    monkeypatch.setenv("TOTTO_WARM_START", "1")
    monkeypatch.setenv(warm_start.CHILD_ENV, str(tmp_path / "helper.sock"))
    tokenizers_cache.load_tokenizer(folder, cache_dir=tmp_path / "cache")
    backend_file = tmp_path / "cache" / tokenizers_cache.cache_key(folder) / "backend.json"
    assert (tmp_path / "helper.preload").read_text(encoding="utf-8") == str(backend_file.resolve())
