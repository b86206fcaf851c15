"""Write one sentence about the highlighted cells of a table, with the fine-tuned model.

    python -m stages.infer [FILE|-] (--model models/merged | --adapter models/adapter [--base NAME])
                           [--batch FILE.jsonl] [--max-new-tokens N] [--linearization MODE]
                           [--num-beams N] [--length-penalty X]

Input: FILE holds one JSON object (it may span several lines); `-` or no FILE reads it from stdin.
--batch FILE.jsonl holds one object per line and prints one sentence per line, in order. Each object is
  * a ToTTo example (official schema: example_id, table, highlighted_cells, table_page_title,
    table_section_title, optional table_section_text; sentence_annotations are not needed), or
  * a simple table:
        {"title": "...", "section": "...", "header": ["Year", "Team"],
         "rows": [["1998", "Ajax"], ["1999", "PSV"]], "highlight": [[1, 0], [1, 1]]}
    `rows` are the body rows only: highlight [r, c] is row r of `rows` (0 = the first row under the
    header) and column c. `title`, `section` and `header` may be left out; values are strings or numbers.
    With data.include_question (FeTaQA models) a "question" string is required.

The prompt is built exactly as the preprocess stage builds it (same linearisation, params.yaml
data.linearization unless --linearization, same prompt template); if it is longer than data.max_length
minus --max-new-tokens, the end of the table text is cut, as preprocess does, and a warning says so.
The model: --model is a merged model folder; --adapter a LoRA adapter folder whose base model is
named in its training_info.json (or given with --base). Bad input ends with one line naming the file,
line and field, and exit status 2.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from stages import finetuned, model_sources, readers
from stages.errors import UserError, run_cli
from stages.generation import generate
from stages.linearize import MODES
from stages.params import default_params_file, load_params
from stages.preprocess import cells_kept, fit_prompt_kept, table_text
from stages.sources import FieldError, check_text, totto_example  # the ToTTo record validator preprocess uses

SIMPLE_KEYS = {"title", "section", "header", "rows", "highlight", "question"}


class InputError(UserError):
    """Bad input or arguments, reported as one line without a traceback."""


def main(argv: list[str] | None = None) -> list[str]:
    args = parse_args(argv)
    params = load_params(args.params)
    mode = args.linearization or params["data"]["linearization"]
    if mode not in MODES:
        raise InputError(f"--linearization must be one of {MODES}, got {mode!r}")
    include_question = params["data"]["include_question"]
    budget = params["data"]["max_length"] - args.max_new_tokens

    decoding(args, params["eval"])  # checked before anything loads
    examples = read_inputs(args)  # all input is checked before the model is loaded
    device = model_sources.pick_device(args.device)
    dtype = model_sources.pick_dtype(device)
    model, tokenizer = load(args, device, dtype)

    on_bad = params["data"].get("on_bad_record", "error")
    prompts = [make_prompt(tokenizer, example, where, mode, include_question, budget, on_bad)
               for where, example in examples]
    num_beams, length_penalty = decoding(args, params["eval"])
    sentences = generate(model, tokenizer, prompts, args.max_new_tokens, args.batch_size, device,
                         progress=len(prompts) > 1, num_beams=num_beams, length_penalty=length_penalty)
    for sentence in sentences:
        print(readers.one_line(sentence), flush=True)  # one line per input, whatever the model wrote
    return sentences


def make_prompt(tokenizer, example: dict, where: str, mode: str, include_question: bool, budget: int,
                on_bad_record: str = "error") -> str:
    """The model input for one example, built as stages.preprocess builds it (table text cut to `budget`).
    A cut that leaves none of the highlighted cells is refused as preprocess refuses it; under
    data.on_bad_record: skip it is said in one line and the prompt kept (infer answers every input)."""
    question = example.get("question") if include_question else None
    if include_question and not question:
        raise InputError(f"{where}: field 'question': required by this model (data.include_question: true)")
    spans: list = []
    text = table_text(tokenizer, example, mode, budget, spans)
    prompt, _, truncated, kept_chars = fit_prompt_kept(tokenizer, text, question, budget)
    if prompt is None:
        raise InputError(f"{where}: the prompt cannot fit in data.max_length - --max-new-tokens = {budget} tokens")
    if truncated:
        kept, total = cells_kept(spans, kept_chars), len(example["highlighted_cells"])
        if kept == 0:
            message = (f"{where}: field 'highlighted_cells': the table text cut to fit {budget} tokens keeps none of "
                       f"the {total} highlighted cells (--linearization {mode}); use --linearization subtable, a "
                       "smaller --max-new-tokens or a larger data.max_length")
            if on_bad_record == "error":
                raise InputError(message + ", or data.on_bad_record: skip to answer anyway")
            print(f"infer: warning: {message}; answering anyway (data.on_bad_record: skip)", file=sys.stderr)
        else:
            print(f"infer: warning: {where}: table text cut to fit {budget} tokens, keeping {kept} of the {total} "
                  "highlighted cells", file=sys.stderr)
    return prompt


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m stages.infer", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[4:]))
    parser.add_argument("file", nargs="?", default=None, help="JSON file with one table ('-' or none: stdin)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", type=Path, help="merged model folder (e.g. models/merged)")
    which.add_argument("--adapter", type=Path, help="LoRA adapter folder (e.g. models/adapter)")
    parser.add_argument("--base", help="base model of --adapter (default: from its training_info.json)")
    parser.add_argument("--batch", type=Path, help="JSON lines file, one table per line")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="generation length cap (default 64)")
    parser.add_argument("--batch-size", type=int, default=16, help="examples generated together (default 16)")
    parser.add_argument("--num-beams", type=int, default=None,
                        help="1 = greedy, N > 1 = beam search (default: params eval.num_beams)")
    parser.add_argument("--length-penalty", type=float, default=None,
                        help="beam search length penalty (default: params eval.length_penalty)")
    parser.add_argument("--linearization", choices=MODES, help="table text mode (default: params data.linearization)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    parser.add_argument("--params", type=Path, default=default_params_file(),
                        help="params file (default: $TOTTO_PARAMS or params.yaml)")
    args = parser.parse_args(argv)
    if args.batch is not None and args.file is not None:
        parser.error("give either FILE or --batch, not both")
    if args.base is not None and args.adapter is None:
        parser.error("--base only goes with --adapter")
    if args.max_new_tokens < 1 or args.batch_size < 1:
        parser.error("--max-new-tokens and --batch-size must be at least 1")
    if args.num_beams is not None and args.num_beams < 1:
        parser.error("--num-beams must be at least 1")
    if args.length_penalty is not None and not math.isfinite(args.length_penalty):
        parser.error("--length-penalty must be a finite number")
    return args


def decoding(args, eval_params: dict) -> tuple[int, float]:
    """(num_beams, length_penalty): the command line's where given, else params.yaml's eval group (the
    decoding the evaluate stage scored)."""
    num_beams = eval_params["num_beams"] if args.num_beams is None else args.num_beams
    if args.length_penalty is None:  # params' penalty goes with params' beams; greedy never reads it
        length_penalty = eval_params["length_penalty"] if num_beams > 1 else 1.0
    else:
        length_penalty = args.length_penalty
        if num_beams == 1 and length_penalty != 1.0:
            raise InputError(f"--length-penalty {length_penalty} applies to beam search only: give --num-beams N > 1 "
                             "(or set eval.num_beams)")
    return num_beams, length_penalty


# --------------------------------------------------------------------------------------------------
# Input


def read_inputs(args) -> list[tuple[str, dict]]:
    """(location, normalised example) for every input table, read by stages.readers as every other
    reader reads its files (BOM, line endings, U+2028 inside strings, pipes, '-' for stdin)."""
    try:
        if args.batch is not None:
            label = readers.label_of(args.batch)
            examples = []
            for line_no, raw in readers.iter_lines(args.batch, "input tables"):
                if not raw.strip():
                    continue
                where = f"{label}:{line_no}"
                try:
                    obj = readers.parse_json_line(raw)
                except readers.LineError as err:
                    raise InputError(f"{where}: {err.message}") from None
                examples.append((where, to_example(obj, where, label, line_no)))
            if not examples:
                raise InputError(f"{label}: no tables (the file is empty)")
            return examples
        source = readers.STDIN if args.file in (None, readers.STDIN) else args.file
        label = readers.label_of(source)
        return [(label, to_example(readers.read_json_document(source, "input table"), label, label, 1))]
    except readers.InputFileError as err:
        raise InputError(str(err)) from None


def to_example(obj, where: str, source_file: str, line: int) -> dict:
    """A normalised example (stages.sources contract) from a ToTTo record or a simple table."""
    if not isinstance(obj, dict):
        raise InputError(f"{where}: field '<record>': expected a JSON object, got {type(obj).__name__}")
    try:
        if "table" in obj:
            example = totto_example(obj, require_references=False)
        elif "rows" in obj:
            example = simple_to_example(obj)
        else:
            raise FieldError("<record>", "expected a ToTTo example (with 'table') or a simple table "
                                          "(with 'rows', 'highlight', optional 'title', 'section', 'header')",
                              "unknown_format")
    except FieldError as err:
        raise InputError(f"{where}: field {err.field!r}: {err.message}") from None
    example["source_file"], example["line"] = source_file, line
    return example


def simple_to_example(obj: dict) -> dict:
    """{"title", "section", "header", "rows", "highlight"(, "question")} -> normalised example."""
    unknown = sorted(set(obj) - SIMPLE_KEYS)
    if unknown:
        raise FieldError(unknown[0], f"unknown field (expected {sorted(SIMPLE_KEYS)})", "unknown_field")
    title = _text_field(obj, "title")
    section = _text_field(obj, "section")
    header = obj.get("header") or []
    if not isinstance(header, list):
        raise FieldError("header", f"expected a list of column names, got {type(header).__name__}", "wrong_type")
    rows = obj.get("rows")
    if not isinstance(rows, list) or not rows:
        raise FieldError("rows", "expected a non-empty list of rows (lists of cell values)", "wrong_type")
    table = []
    if header:
        table.append([_cell(v, True, f"header[{c}]") for c, v in enumerate(header)])
    for r, row in enumerate(rows):
        if not isinstance(row, list) or not row:
            raise FieldError(f"rows[{r}]", "expected a non-empty list of cell values", "wrong_type")
        table.append([_cell(v, False, f"rows[{r}][{c}]") for c, v in enumerate(row)])

    highlight = obj.get("highlight")
    if not isinstance(highlight, list) or not highlight:
        raise FieldError("highlight", "expected a non-empty list of [row, column] pairs", "wrong_type")
    offset = 1 if header else 0  # rows are counted without the header row
    cells, seen = [], {}
    for i, pair in enumerate(highlight):
        if (not isinstance(pair, list) or len(pair) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in pair)):
            raise FieldError(f"highlight[{i}]", f"expected [row, column] integers, got {pair!r}", "wrong_type")
        r, c = pair
        if not 0 <= r < len(rows):
            raise FieldError(f"highlight[{i}]", f"row {r} outside rows 0..{len(rows) - 1} "
                                                 "(rows are counted without the header)", "out_of_range")
        if not 0 <= c < len(rows[r]):
            raise FieldError(f"highlight[{i}]", f"column {c} outside row {r}'s columns 0..{len(rows[r]) - 1}",
                              "out_of_range")
        if (r, c) in seen:  # the cell would be written into the prompt twice
            raise FieldError(f"highlight[{i}]", f"[{r}, {c}] repeats highlight[{seen[r, c]}]: list each cell once",
                             "duplicate_highlight")
        seen[r, c] = i
        cells.append([r + offset, c])

    question = obj.get("question")
    if question is not None and not isinstance(question, str):
        raise FieldError("question", f"expected str, got {type(question).__name__}", "wrong_type")
    if question is not None:
        check_text(question, "question")
    return {"id": "input", "table": table, "highlighted_cells": cells, "page_title": title,
            "section_title": section, "section_text": "", "references": [], "overlap": None,
            "question": question}


def _text_field(obj: dict, key: str) -> str:
    value = obj.get(key, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise FieldError(key, f"expected str, got {type(value).__name__}", "wrong_type")
    return check_text(value, key)


def _cell(value, is_header: bool, field: str) -> dict:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise FieldError(field, f"expected a string or number, got {type(value).__name__}", "wrong_type")
    if isinstance(value, float) and not math.isfinite(value):  # json.loads takes NaN and Infinity
        raise FieldError(field, f"expected a finite number, got {value}", "wrong_type")
    return {"value": check_text(value, field) if isinstance(value, str) else str(value), "is_header": is_header,
            "column_span": 1, "row_span": 1}


# --------------------------------------------------------------------------------------------------
# Model


def load(args, device, dtype):
    """(model, tokenizer) for --model or --adapter."""
    if args.model is not None:
        folder = args.model
        if not (folder / "config.json").is_file():
            raise InputError(f"--model {folder.as_posix()}: no config.json (not a model folder; run the merge stage?)")
        if not (folder / "tokenizer_config.json").is_file():
            raise InputError(f"--model {folder.as_posix()}: no tokenizer files")
        model = model_sources.load_model(folder, quantization="none", dtype=dtype, device=device)
        return model, model_sources.load_tokenizer(folder)

    folder = args.adapter
    if not (folder / "adapter_config.json").is_file():
        raise InputError(f"--adapter {folder.as_posix()}: no adapter_config.json (not an adapter folder)")
    info = finetuned.read_training_info(folder, required=False)
    base_name = args.base or finetuned.base_name(info)
    if not base_name:
        raise InputError(f"--adapter {folder.as_posix()}: training_info.json names no base model "
                         "(field 'base_model.name'); give it with --base")
    base_dir = model_sources.resolve_model(base_name)
    # The model that was trained: the adapter on the base as training saw it (stages.finetuned). An adapter
    # whose training_info.json does not say how training held its base goes on the base as saved.
    base = "trained" if finetuned.records_training_base(info) else "original"
    model = finetuned.load_adapter_model(folder, base_dir, device, dtype, base=base, info=info)
    if base == "original":
        print(f"infer: {folder.as_posix()}/training_info.json does not record how training held the base "
              "(train.quantization); the adapter is on the base weights as saved", file=sys.stderr)
    tok_dir = folder if (folder / "tokenizer_config.json").is_file() else base_dir
    return model, model_sources.load_tokenizer(tok_dir)


def cli(argv: list[str] | None = None) -> int:
    """Run main(); bad input or settings end with one line on stderr and exit status 2 (InputError,
    EvalError, WeightsError are UserErrors; FileNotFoundError: a model folder that is not there)."""
    return run_cli(main, "infer", argv, user_errors=(FileNotFoundError,))


if __name__ == "__main__":
    sys.exit(cli())
