"""Full fine-tuning of the 270M model (every weight, the tied embedding/head included): one row beside the
LoRA rows of the recipe search (issue 20), on the same records, loss, decoding and scorer.

The pipeline now does the same itself: `train.method: full` in params.yaml (table2text.training.loop, with
table2text.model.full; README "Full fine-tuning in the pipeline"), through the train stage's own loop
(packed rows, its chunked loss giving the tied head its gradient) rather than Trainer. This script stays
as the measured row's recipe.

    python -m bench.full_finetune --fetaqa DIR [--set KEY=VALUE ...] [--selection] [--totto DIR]
                                  [--micro-batch N] [--name NAME] [--out DIR] [--workroot DIR]
    python -m bench.full_finetune --tiny [--out DIR]      # CPU dry run on a tiny random Gemma 3 (seconds)

Data: `python -m stages.preprocess` (through bench/run_recipe.py, in a copy of the project as
bench/run_rows.copy_project makes it) writes data/processed/{train,validation}.jsonl from params.yaml +
bench/run_rows.py's COMMON + FULL_FT below + --set, so the prompts are the pipeline's. --selection trains on
the recipe search's split (bench/recipe_grid.yaml's holdout and seed: 1,804 of the 2,004) and scores the
200 held out, so that lr and epochs can be chosen without the validation set; without it the model trains on
all of DIR's training examples and is scored on its validation file.

Training: transformers' Trainer, with the project's completion-only loss: the records are encoded by
table2text.training.batching.encode_record and collated by its `collate` (prompt positions carry no
target), and the loss is the summed cross-entropy over the completion positions of a step divided by the
completion tokens of the whole effective batch (Trainer's num_items_in_batch), the train stage's
normalisation; the vocabulary head runs on those positions only. train.* gives the effective batch (16),
learning rate, schedule, warm-up, weight decay, clipping, label smoothing, epochs / max_steps and seed.

Precision: fp32 master weights, bf16 autocast on GPUs (Trainer's bf16=True), never fp16 (Gemma 3
overflows it). Pure bf16 weights would lose the update: AdamW moves a weight by about lr per step, and at
lr 5e-5 that is less than half of bf16's spacing (8 significant bits) for any weight of magnitude 1/64
(0.016) or more, so such a weight would round back to its old value at every step. fp32 master weights + AdamW state cost 16 bytes a weight,
4.3 GB for 270M. CPUs compute in fp32.

Tied embedding: Gemma 3's input embedding is its output head (one 262,144 x 640 tensor, 168M of the 268M
weights). It is trained, once, as one parameter: its gradient is the sum of the head's (completion
positions) and the embedding lookup's (every input token), as in the model's own tied forward. The
project's chunked loss (completion_loss) refuses a trainable head (it computes no weight gradient), so the
head here is a plain F.linear + cross-entropy on the completion positions (fp32 logits, ~1 GB a step).

Decoding and scoring: the trained model as it is (fp32, eval.dtype), table2text.generation.generate with
the eval settings (table2text.evaluation.generation_settings), greedy and beam 4, scored by
table2text.metrics.totto.compute_metrics (what stages.evaluate and stages.score use), with a paired
bootstrap against the published T5-large predictions on the 500 validation examples. Writes
OUT/<date>-<gpu>-full-ft-<name>.json and prints markdown rows of the recipe search's final table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.recipe_search import PEER, SCORES, checked_params, environment, load_grid, split_training
from bench.run_rows import COMMON, copy_project, recipe_cmd
from bench.significance import paired_bootstrap, per_example
from table2text.evaluation import eval_dtype, generation_settings, read_processed
from table2text.generation import generate
from table2text.metrics.totto import compute_metrics
from table2text.model import sources as model_sources
from table2text.training.batching import IGNORE, collate, encode_record

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "full-ft"
# The stated recipe (every run, before --set): full fine-tuning of a small model wants a learning rate
# about ten times below LoRA's (2e-4 there), a short warm-up for Adam's first steps, and a few epochs
# (Google's Gemma 3 270M full fine-tuning guide: 5e-5; the LoRA search's best took 2 epochs).
FULL_FT = ["train.learning_rate=5.0e-5", "train.epochs=3", "train.warmup_ratio=0.06", "train.quantization=none"]
DECODINGS = {"greedy": {"num_beams": 1}, "beam4": {"num_beams": 4, "length_penalty": 1.0}}
# --tiny: the demo data through preprocess, a tiny random Gemma 3, a few steps at a rate that moves it
TINY_SETS = ["data.source=demo", f"data.path={ROOT / 'data' / 'demo'}", "data.train_samples=8", "data.max_length=256",
             "train.effective_batch=4", "train.max_steps=6", "train.learning_rate=2.0e-3", "train.warmup_ratio=0.0",
             "train.device=cpu", "merge.device=cpu", "eval.device=cpu", "eval.max_examples=3",
             "eval.max_new_tokens=6", "eval.batch_tokens=0"]


# -------------------------------------------------------------------------------------------- data
def prepare_data(workdir: Path, overrides: list[str], log) -> Path:
    """data/processed/{train,validation}.jsonl of `overrides`, written by stages.preprocess in a copy of the
    project at `workdir` (bench/run_recipe.py, as every row of the results table runs it)."""
    copy_project(workdir)
    cmd = recipe_cmd("full-ft-preprocess", overrides, workdir / "results", ["preprocess"])
    log.write("$ " + " ".join(cmd) + "\n")
    log.flush()
    done = subprocess.run(cmd, cwd=workdir, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"preprocess failed (exit {done.returncode}): see {log.name}")
    return workdir / "data" / "processed"


class CompletionCollator:
    """Trainer's data collator: table2text.training.batching.collate of (ids, prompt length) examples.
    `shift_labels` are its targets (position t holds the completion token t+1 must predict, else IGNORE),
    which Trainer counts for num_items_in_batch; `labels` (the same tensor) only tells Trainer to count."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features: list[dict]) -> dict:
        batch = collate([(f["ids"], f["prompt_len"]) for f in features], self.pad_id)
        targets = batch.pop("targets")
        return {**batch, "labels": targets, "shift_labels": targets}


def completion_sum(model, batch: dict, label_smoothing: float = 0.0) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy over the completion positions of `batch`, their count): the model body to
    hidden states, the (tied, trainable) head on the completion positions only."""
    targets = batch["shift_labels"]
    hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = targets != IGNORE
    logits = model.lm_head(hidden[mask]).float()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    if softcap:  # Gemma's final logit cap (None on Gemma 3), as its own forward applies it
        logits = torch.tanh(logits / softcap) * softcap
    loss = F.cross_entropy(logits, targets[mask], reduction="sum", label_smoothing=label_smoothing)
    return loss, int(mask.sum())


def trainer_class():
    from transformers import Trainer

    class CompletionTrainer(Trainer):
        """Trainer with the train stage's loss: summed over a micro-batch's completion tokens, divided by
        those of the whole effective batch (num_items_in_batch), so accumulation is one big batch."""

        loss_is_scaled_for_ga = True  # divided by the effective batch's tokens already

        def __init__(self, *args, label_smoothing: float = 0.0, **kwargs):
            super().__init__(*args, **kwargs)
            self.label_smoothing = label_smoothing

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if num_items_in_batch is None:  # Trainer counts it whenever the batch has labels
                raise RuntimeError("Trainer passed no num_items_in_batch: the loss would not be the train stage's")
            loss, _ = completion_sum(model, inputs, self.label_smoothing)
            loss = loss / num_items_in_batch
            return (loss, None) if return_outputs else loss

    return CompletionTrainer


# ---------------------------------------------------------------------------------------- training
def training_arguments(cfg: dict, out_dir: Path, device: torch.device, micro_batch: int, n_examples: int):
    from transformers import TrainingArguments

    effective = int(cfg["effective_batch"])
    steps = int(cfg["max_steps"]) or math.ceil(n_examples / effective) * int(cfg["epochs"])
    return TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=effective // micro_batch, learning_rate=float(cfg["learning_rate"]),
        weight_decay=float(cfg["weight_decay"]), max_grad_norm=float(cfg["max_grad_norm"]),
        num_train_epochs=int(cfg["epochs"]), max_steps=int(cfg["max_steps"]) or -1,
        lr_scheduler_type=cfg["lr_scheduler"],
        warmup_steps=math.ceil(float(cfg["warmup_ratio"]) * steps),  # the train stage's rounding
        logging_steps=1, save_strategy="no", report_to="none", seed=int(cfg["seed"]), data_seed=int(cfg["seed"]),
        bf16=device.type == "cuda",  # autocast over the fp32 master weights (module docstring)
        use_cpu=device.type == "cpu", optim="adamw_torch_fused" if device.type == "cuda" else "adamw_torch",
        remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=True)


def train_full(params: dict, model_dir: Path, records: list[dict], device: torch.device, micro_batch: int,
               scratch: Path):
    """(the fully fine-tuned model in fp32, training stats): every weight trained by Trainer."""
    cfg = params["train"]
    tokenizer = model_sources.load_tokenizer(model_dir)
    examples = [dict(zip(("ids", "prompt_len"), encode_record(tokenizer, r))) for r in records]
    torch.manual_seed(int(cfg["seed"]))
    model = model_sources.load_model(model_dir, quantization="none", dtype=torch.float32, device=device)
    model.config.use_cache = False
    tied = model.get_input_embeddings().weight is model.get_output_embeddings().weight
    weights = {"total": sum(p.numel() for p in model.parameters()),
               "embedding": model.get_input_embeddings().weight.numel(), "tied_head": tied}
    for p in model.parameters():
        p.requires_grad_(True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}  # to count what training moved
    args = training_arguments(cfg, scratch, device, micro_batch, len(examples))
    trainer = trainer_class()(model=model, args=args, train_dataset=examples,
                              data_collator=CompletionCollator(tokenizer.pad_token_id or 0),
                              label_smoothing=float(cfg["label_smoothing"]))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    out = trainer.train()
    seconds = time.perf_counter() - start
    history = [{k: row[k] for k in ("step", "loss", "learning_rate", "grad_norm") if k in row}
               for row in trainer.state.log_history if "loss" in row]
    model.config.use_cache = True  # for the decoding that follows
    weights["tensors"] = len(before)
    weights["changed_tensors"] = sum(not torch.equal(before[n], p.detach()) for n, p in model.named_parameters())
    del before
    stats = {"steps": out.global_step, "examples": len(examples), "train_seconds": seconds,
             "seconds_per_step": seconds / max(1, out.global_step),
             "example_tokens": sum(len(e["ids"]) for e in examples),
             "final_loss": history[-1]["loss"] if history else None,
             "history": history, "weights": weights, "trainable_params": sum(p.numel() for p in model.parameters()
                                                                           if p.requires_grad),
             "micro_batch": micro_batch, "precision": "fp32 master weights, bf16 autocast" if args.bf16 else "fp32"}
    if device.type == "cuda":
        stats["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return model, tokenizer, stats


# ---------------------------------------------------------------------------------------- decoding
def decode_and_score(model, tokenizer, records: list[dict], eval_cfg: dict, device: torch.device,
                     peer: dict | None) -> dict:
    """Per decoding (greedy, beam 4): the scores of compute_metrics, the time, and the paired bootstrap
    against T5-large where the examples are its (FeTaQA validation)."""
    from accelerate.utils import extract_model_from_parallel

    # Trainer (accelerate, bf16=True) wraps model.forward in autocast; decoding runs the model as it is
    # shipped, so the wrapper goes (with it, the prefill wrote bf16 keys that an fp32 step cannot join)
    model = extract_model_from_parallel(model, keep_fp32_wrapper=False)
    model.to(eval_dtype(eval_cfg["dtype"], device)).eval()
    prompts = [r["prompt"] for r in records]
    out = {}
    for name, settings in DECODINGS.items():
        gen_args = generation_settings({**eval_cfg, "length_penalty": 1.0, **settings}, device)
        start = time.perf_counter()
        predictions = generate(model, tokenizer, prompts, progress=False, **gen_args)
        seconds = time.perf_counter() - start
        summary, scored = compute_metrics(predictions, records)
        out[name] = {"scores": {k: summary["overall"][k] for k in SCORES}, "decode_seconds": seconds}
        if peer is not None:
            try:
                out[name]["vs_t5_large"] = paired_bootstrap(per_example(predictions, records, scored),
                                                            peer["per_example"])
            except ValueError as err:  # other examples than T5's 500 (held-out split, tiny data)
                out[name]["vs_t5_large"] = {"error": str(err)}
    return out


# ------------------------------------------------------------------------------------------ report
def markdown(doc: dict) -> str:
    lines = ["| full fine-tuning | decoding | scored on | BLEU | P | R | F | vs T5-large: ΔF · ΔBLEU |",
             "|---|---|---|---|---|---|---|---|"]
    for split, decodings in doc["scores"].items():
        for name, d in decodings.items():
            s, vs = d["scores"], d.get("vs_t5_large", {})
            delta = "—"
            if "parent_f" in vs:
                f, b = vs["parent_f"], vs["bleu"]
                delta = (f"{f['mean']:+.3f} [{f['low']:+.3f}, {f['high']:+.3f}] · "
                         f"{b['mean']:+.1f} [{b['low']:+.1f}, {b['high']:+.1f}]")
            lines.append(f"| {doc['name']} | {name} | {split} ({s['count']}) | {s['bleu']:.2f} | "
                         f"{s['parent_precision']:.3f} | {s['parent_recall']:.3f} | {s['parent_f']:.3f} | {delta} |")
    return "\n".join(lines)


def write(doc: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    gpu = doc["env"]["gpu"].replace(" ", "-").replace("/", "-")
    path = out / f"{doc['date']}-{gpu}-full-ft-{doc['name']}.json"
    path.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return path


def default_name(params: dict) -> str:
    t = params["train"]
    task = "q" if params["data"]["include_question"] else "nq"
    length = f"{t['max_steps']}steps" if t["max_steps"] else f"{t['epochs']}ep"
    return f"{task}-lr{t['learning_rate']:g}-{length}"


# -------------------------------------------------------------------------------------------- main
def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fetaqa", type=Path, help="folder with FeTaQA train/validation .jsonl.gz")
    parser.add_argument("--tiny", action="store_true", help="CPU dry run: tiny random Gemma 3, demo data, 6 steps")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="params, after FULL_FT")
    parser.add_argument("--selection", action="store_true",
                        help="train on the recipe search's split, score the held-out examples (no validation)")
    parser.add_argument("--totto", type=Path, help="also score the same model on this ToTTo folder's dev set")
    parser.add_argument("--micro-batch", type=int, default=0, help="examples per forward (default: train.effective_batch)")
    parser.add_argument("--name", help="row name (default: task, lr and epochs)")
    parser.add_argument("--out", type=Path, help=f"results folder (default {OUT.relative_to(ROOT)}; --tiny: the workroot)")
    parser.add_argument("--workroot", type=Path, help="project copies, logs (default: a temporary folder)")
    parser.add_argument("--peer", type=Path, default=PEER, help="T5-large per-example scores (bench/score_peers.py)")
    args = parser.parse_args(argv)
    if args.tiny == bool(args.fetaqa):
        parser.error("give exactly one of --fetaqa DIR and --tiny")
    return args


def plan(args, workroot: Path) -> tuple[list[str], dict, Path | None]:
    """(the params overrides, the checked params, the model folder of --tiny); nothing runs."""
    model_dir = None
    if args.tiny:
        from bench.decode_bench import tiny_model_dir

        model_dir = tiny_model_dir(workroot / "tiny-gemma3")
        data = [*TINY_SETS, f"model.name={model_dir}"]
    else:
        fetaqa = args.fetaqa.resolve()
        for name in ("train.jsonl.gz", "validation.jsonl.gz"):
            if not (fetaqa / name).is_file():
                raise SystemExit(f"{fetaqa / name}: not found (--fetaqa is a folder with FeTaQA's train and validation)")
        data = ["data.source=fetaqa", f"data.path={workroot / 'split' if args.selection else fetaqa}"]
    overrides = [*COMMON, *FULL_FT, *data, *args.set]
    params = checked_params(overrides, "full fine-tuning")  # every setting checked before anything loads
    effective = int(params["train"]["effective_batch"])
    args.micro_batch = args.micro_batch or (2 if args.tiny else effective)  # --tiny: 2 accumulation steps
    if args.micro_batch < 1 or effective % args.micro_batch:
        raise SystemExit(f"--micro-batch {args.micro_batch}: must divide train.effective_batch ({effective})")
    if args.totto and params["data"]["include_question"]:
        raise SystemExit("--totto: ToTTo has no questions; the ToTTo dev set is for a data.include_question=false run")
    if args.totto and not args.totto.is_dir():
        raise SystemExit(f"--totto {args.totto}: not a folder (ToTTo's train and dev files)")
    return overrides, params, model_dir


def main(argv=None) -> int:
    args = parse_args(argv)
    scratch = tempfile.TemporaryDirectory(prefix="full-ft-") if not args.workroot else None
    workroot = (args.workroot or Path(scratch.name)).resolve()
    workroot.mkdir(parents=True, exist_ok=True)
    overrides, params, model_dir = plan(args, workroot)
    name = args.name or ("tiny" if args.tiny else default_name(params))
    doc = {"date": dt.date.today().isoformat(), "kind": "full-ft", "name": name, "env": environment(),
           "command": "python -m bench.full_finetune " + " ".join(map(str, argv if argv is not None else sys.argv[1:])),
           "overrides": overrides, "train": params["train"], "data": params["data"]}
    if args.selection:
        grid = load_grid(ROOT / "bench" / "recipe_grid.yaml")
        doc["split"] = split_training(args.fetaqa.resolve() / "train.jsonl.gz", workroot / "split",
                                      int(grid["holdout"]), int(grid["holdout_seed"]))
        doc["split"].pop("held_out_lines")
    with open(workroot / "log.txt", "w", encoding="utf-8") as log:
        processed = prepare_data(workroot / "project", overrides, log)
        totto = None
        if args.totto:
            totto = prepare_data(workroot / "project-totto", [*overrides, "data.source=totto",
                                                              f"data.path={args.totto.resolve()}"], log)
    device = model_sources.pick_device(params["train"]["device"])
    model_dir = model_dir or model_sources.resolve_model(params["model"]["name"])
    train_records = read_processed(processed / "train.jsonl")
    model, tokenizer, doc["training"] = train_full(params, model_dir, train_records, device, args.micro_batch,
                                                   workroot / "trainer")
    peer = json.loads(args.peer.read_text(encoding="utf-8")) if args.peer.is_file() else None
    eval_device = model_sources.pick_device(params["eval"]["device"])
    model.to(eval_device)
    max_examples = int(params["eval"]["max_examples"])
    split = "held-out" if args.selection else ("demo dev" if args.tiny else "validation")
    doc["scores"] = {split: decode_and_score(model, tokenizer, read_processed(processed / "validation.jsonl",
                                                                               max_examples),
                                             params["eval"], eval_device, peer)}
    if totto is not None:
        doc["scores"]["totto dev"] = decode_and_score(model, tokenizer, read_processed(totto / "validation.jsonl"),
                                                      params["eval"], eval_device, None)
    path = write(doc, args.out or (workroot if args.tiny else OUT))
    print(markdown(doc))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
