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

from table2text.model import finetuned
from table2text.model import sources as model_sources
from table2text.io import readers
from table2text.errors import run_cli
from table2text.generation import generate
from table2text.data.linearize import MODES
from table2text.params import default_params_file, load_params
from table2text.data.user_tables import InputError, make_prompt, to_example


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
    info = check_folder(args)  # and the model folder, before the device line: a bad one is the only line
    device = model_sources.pick_device(args.device)
    dtype = model_sources.pick_dtype(device)
    model, tokenizer = load(args, device, dtype, info)

    on_bad = params["data"].get("on_bad_record", "error")
    prompts = [make_prompt(tokenizer, example, where, mode, include_question, budget, on_bad)
               for where, example in examples]
    num_beams, length_penalty = decoding(args, params["eval"])
    sentences = generate(model, tokenizer, prompts, args.max_new_tokens, args.batch_size, device,
                         progress=len(prompts) > 1, num_beams=num_beams, length_penalty=length_penalty)
    for sentence in sentences:
        print(readers.one_line(sentence), flush=True)  # one line per input, whatever the model wrote
    return sentences


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
    """(location, normalised example) for every input table, read by table2text.io.readers as every other
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


# --------------------------------------------------------------------------------------------------
# Model


def check_folder(args) -> dict | None:
    """The --model or --adapter folder, checked without loading it (one line naming the file): its files there,
    its configs readable and agreeing with the weights' shapes, an adapter's base named. Returns the
    adapter's training_info.json (None for --model, or an adapter without one)."""
    if args.model is not None:
        folder = args.model
        if not (folder / "config.json").is_file():
            raise InputError(f"--model {folder.as_posix()}: no config.json (not a model folder; run the merge stage?)")
        if not (folder / "tokenizer_config.json").is_file():
            raise InputError(f"--model {folder.as_posix()}: no tokenizer files")
        model_sources.check_model_files(folder)
        return None

    folder = args.adapter
    if not (folder / "adapter_config.json").is_file():
        if (folder / finetuned.INFO_FILE).is_file() and finetuned.training_method(
                finetuned.read_training_info(folder)) == "full":
            raise InputError(f"--adapter {folder.as_posix()}: holds a fully fine-tuned model (train.method full), "
                             f"not an adapter: give it as --model {folder.as_posix()}")
        raise InputError(f"--adapter {folder.as_posix()}: no adapter_config.json (not an adapter folder)")
    model_sources.check_adapter_files(folder)
    info = finetuned.read_training_info(folder, required=False)
    if not (args.base or finetuned.base_name(info)):
        raise InputError(f"--adapter {folder.as_posix()}: training_info.json names no base model "
                         "(field 'base_model.name'); give it with --base")
    return info


def load(args, device, dtype, info: dict | None):
    """(model, tokenizer) for --model or --adapter (checked by check_folder; info: its training_info.json)."""
    if args.model is not None:
        model = model_sources.load_model(args.model, quantization="none", dtype=dtype, device=device)
        return model, model_sources.load_tokenizer(args.model)

    folder = args.adapter
    base_dir = model_sources.resolve_model(args.base or finetuned.base_name(info))
    # The model that was trained: the adapter on the base as training saw it (table2text.model.finetuned). An adapter
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
