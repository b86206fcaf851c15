"""The baselines that the project's train stage is measured against, each on the same processed data.

* original_recipe: HF Trainer, NF4 QLoRA, batch 1 x accumulation 16, gradient checkpointing, eager
  attention: the scripts this project replaces.
* plain_trainer: HF Trainer, NF4 QLoRA, batch 16, sdpa, full logits for every token.
* trl_liger: TRL SFTTrainer with Liger kernels (fused linear cross-entropy), completion-only loss,
  batch 16: the strongest peer that runs offline.

Each runs a fixed number of optimiser steps and reports the same numbers as the project's runner.
"""

from __future__ import annotations

import math
import time

import torch


def tokenize_records(tokenizer, records):
    """prompt ids (BOS once) + completion ids; loss only on the completion (the processed-data contract)."""
    rows = []
    for rec in records:
        p = tokenizer(rec["prompt"], add_special_tokens=True).input_ids
        c = tokenizer(rec["completion"], add_special_tokens=False).input_ids
        rows.append({"input_ids": p + c, "labels": [-100] * len(p) + c})
    return rows


class CountingCollator:
    """Right-pads a batch and remembers how many real tokens each batch held (for tokens/s)."""

    def __init__(self, pad_id):
        self.pad_id = pad_id
        self.tokens = []
        self.samples = []

    def __call__(self, batch):
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[i, :n] = torch.tensor(b["input_ids"])
            labels[i, :n] = torch.tensor(b["labels"])
            mask[i, :n] = 1
        self.tokens.append(int(mask.sum()))
        self.samples.append(len(batch))
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _step_timer_callback():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times = []
            self.losses = []

        def on_step_end(self, args, state, control, **kw):
            torch.cuda.synchronize()
            self.times.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    return StepTimer()


def _summary(name, timer, tokens_per_step, samples_per_step, warmup):
    times = timer.times
    measured = len(times) - 1 - warmup
    elapsed = times[-1] - times[warmup]
    toks = sum(tokens_per_step[warmup + 1 : warmup + 1 + measured])
    samples = sum(samples_per_step[warmup + 1 : warmup + 1 + measured])
    return {
        "name": name,
        "steps_measured": measured,
        "step_time_s": elapsed / measured,
        "samples_per_s": samples / elapsed,
        "tokens_per_s": toks / elapsed,
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
        "final_loss": timer.losses[-1] if timer.losses else math.nan,
        "loss_curve": timer.losses,
    }


def run_hf_trainer(name, model_dir, tokenizer, records, *, steps, warmup, batch, accum, grad_ckpt, attn, quant,
                   lora, lr, out_dir):
    """HF Trainer + PEFT on NF4 (or bf16) Gemma 3, as the original scripts and a plain batched variant do."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import Trainer, TrainingArguments

    from table2text.model.sources import load_model

    torch.cuda.reset_peak_memory_stats()
    model = load_model(model_dir, quantization=quant, dtype=torch.bfloat16, device=torch.device("cuda"),
                       attn_implementation=attn)
    if quant == "nf4":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=grad_ckpt)
    model = get_peft_model(model, LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                             target_modules=lora["target_modules"], task_type="CAUSAL_LM"))
    collator = CountingCollator(tokenizer.pad_token_id)
    total = steps + warmup + 1
    args = TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=batch, gradient_accumulation_steps=accum,
        gradient_checkpointing=grad_ckpt, bf16=True, learning_rate=lr, lr_scheduler_type="cosine",
        warmup_steps=max(1, round(0.06 * total)), max_steps=total, logging_steps=1, save_strategy="no",
        report_to="none", remove_unused_columns=False, dataloader_num_workers=0, seed=42,
    )
    timer = _step_timer_callback()
    trainer = Trainer(model=model, args=args, train_dataset=tokenize_records(tokenizer, records),
                      data_collator=collator, callbacks=[timer])
    trainer.train()
    per_step_tokens = [sum(collator.tokens[i * accum:(i + 1) * accum]) for i in range(total)]
    per_step_samples = [sum(collator.samples[i * accum:(i + 1) * accum]) for i in range(total)]
    result = _summary(name, timer, per_step_tokens, per_step_samples, warmup)
    del trainer, model
    torch.cuda.empty_cache()
    return result


def run_trl_liger(name, model_dir, tokenizer, records, *, steps, warmup, batch, quant, lora, lr, out_dir,
                  effective_batch=16):
    """TRL SFTTrainer with Liger kernels, completion-only loss: the strongest offline peer. effective_batch:
    examples per optimiser step (batch x accumulation); 16 is the recipe's."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from table2text.model.sources import load_model

    torch.cuda.reset_peak_memory_stats()
    model = load_model(model_dir, quantization=quant, dtype=torch.bfloat16, device=torch.device("cuda"))
    total = steps + warmup + 1
    config = SFTConfig(
        output_dir=str(out_dir), per_device_train_batch_size=batch,
        gradient_accumulation_steps=max(1, effective_batch // batch),
        bf16=True, learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=max(1, round(0.06 * total)),
        max_steps=total, logging_steps=1, save_strategy="no", report_to="none", use_liger_kernel=True,
        completion_only_loss=True, max_length=1024, packing=False, seed=42, dataset_num_proc=None,
    )
    data = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in records])
    timer = _step_timer_callback()
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                         peft_config=LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                                target_modules=lora["target_modules"], task_type="CAUSAL_LM"),
                         callbacks=[timer])
    # Count real tokens per optimiser step from the tokenised dataset in the order the sampler uses.
    lengths = [len(x) for x in trainer.train_dataset["input_ids"]]
    mean_tokens = sum(lengths) / len(lengths)
    trainer.train()
    per_step_samples = [effective_batch] * total
    per_step_tokens = [effective_batch * mean_tokens] * total  # TRL shuffles internally; the mean over the data set is used
    result = _summary(name, timer, per_step_tokens, per_step_samples, warmup)
    result["tokens_note"] = "tokens/s from the data set's mean length x samples (TRL shuffles internally)"
    del trainer, model
    torch.cuda.empty_cache()
    return result
