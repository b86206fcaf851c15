"""bench/full_finetune.py: the full fine-tuning row trains every weight with the project's completion-only
loss and scores its outputs with the project's scorer; its --tiny dry run goes through preprocess, Trainer,
greedy and beam decoding on the CPU."""

import gzip
import json

import pytest
import torch

from bench import full_finetune
from bench.full_finetune import CompletionCollator, completion_sum
from conftest import processed_record
from table2text.model import sources as model_sources
from table2text.training.batching import encode_record, naive_loss


def test_the_loss_is_the_cross_entropy_of_the_completion_tokens_only(tiny_model_dir, real_tokenizer):
    records = [processed_record(i, f"Team {i} scored {i * 7} points.") for i in (1, 23)]
    features = [dict(zip(("ids", "prompt_len"), encode_record(real_tokenizer, r))) for r in records]
    batch = CompletionCollator(real_tokenizer.pad_token_id)(features)
    model = model_sources.load_model(tiny_model_dir, dtype=torch.float32, device=torch.device("cpu"))

    loss, count = completion_sum(model, batch)

    completions = sum(len(f["ids"]) - f["prompt_len"] for f in features)
    assert count == completions and int((batch["shift_labels"] != -100).sum()) == completions
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(loss, naive_loss(logits, batch["shift_labels"]), rtol=1e-5)
    smoothed, _ = completion_sum(model, batch, label_smoothing=0.1)
    assert torch.allclose(smoothed, naive_loss(logits, batch["shift_labels"], 0.1), rtol=1e-5)


def test_bad_settings_are_refused_before_anything_runs(tmp_path):
    fetaqa = tmp_path / "fetaqa"
    fetaqa.mkdir()
    for name in ("train.jsonl.gz", "validation.jsonl.gz"):
        with gzip.open(fetaqa / name, "wt", encoding="utf-8") as fh:
            fh.write("{}\n")
    work = tmp_path / "work"
    with pytest.raises(SystemExit, match="--micro-batch 3: must divide train.effective_batch"):
        full_finetune.main(["--fetaqa", str(fetaqa), "--micro-batch", "3", "--workroot", str(work)])
    with pytest.raises(SystemExit, match="--totto: ToTTo has no questions"):
        full_finetune.main(["--fetaqa", str(fetaqa), "--set", "data.include_question=true", "--totto", str(tmp_path),
                            "--workroot", str(work)])
    with pytest.raises(SystemExit, match="full fine-tuning: train.label_smoothing must be 0 <= value < 1"):
        full_finetune.main(["--fetaqa", str(fetaqa), "--set", "train.label_smoothing=1.5", "--workroot", str(work)])
    assert not (work / "project").exists()
    with pytest.raises(SystemExit, match="validation.jsonl.gz: not found"):
        (fetaqa / "validation.jsonl.gz").unlink()
        full_finetune.main(["--fetaqa", str(fetaqa), "--workroot", str(work)])


def test_the_tiny_dry_run_trains_every_weight_and_scores_both_decodings(tmp_path, capsys):
    # the demo data through stages.preprocess, 6 steps of 4 examples in micro-batches of 2, then greedy and
    # beam 4 on 3 demo dev examples
    status = full_finetune.main(["--tiny", "--workroot", str(tmp_path / "work"), "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert status == 0, out
    (result,) = (tmp_path / "out").glob("*-full-ft-tiny.json")
    doc = json.loads(result.read_text(encoding="utf-8"))
    training = doc["training"]
    assert training["steps"] == 6 and training["examples"] == 8 and training["micro_batch"] == 2
    weights = training["weights"]
    assert weights["tied_head"] and weights["embedding"] == 262144 * 64
    assert weights["changed_tensors"] == weights["tensors"] and training["trainable_params"] == weights["total"]
    losses = [row["loss"] for row in training["history"]]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.2, losses  # the loss goes down
    scored = doc["scores"]["demo dev"]
    assert set(scored) == {"greedy", "beam4"}
    for decoding in scored.values():
        assert decoding["scores"]["count"] == 3 and 0 <= decoding["scores"]["bleu"] <= 100
        assert "error" in decoding["vs_t5_large"]  # the demo shares no ids with T5's 500
    assert "| tiny | greedy | demo dev (3) |" in out and "| tiny | beam4 | demo dev (3) |" in out
