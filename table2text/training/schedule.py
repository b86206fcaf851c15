"""The schedule: how many optimiser steps, which examples each step reads (a function of the step alone,
so a resumed run reads what the uninterrupted one would have), and the learning-rate schedule."""

from __future__ import annotations

import math

import torch

from table2text.training import distributed
from table2text.training.batching import plan_packed_micro_batches


def lr_scheduler(cfg: dict, optimizer, n_steps: int):
    """train.lr_scheduler with train.warmup_ratio of `n_steps` as warm-up, transformers' own schedules."""
    from transformers import get_scheduler  # imports peft and bitsandbytes (~2 s): only when training

    return get_scheduler(cfg["lr_scheduler"], optimizer,
                         num_warmup_steps=math.ceil(float(cfg["warmup_ratio"]) * n_steps),
                         num_training_steps=n_steps)


def steps_per_epoch(n_examples: int, effective_batch: int) -> int:
    return math.ceil(n_examples / effective_batch)


def total_steps(cfg: dict, n_examples: int) -> int:
    if cfg["max_steps"] > 0:
        return int(cfg["max_steps"])
    return steps_per_epoch(n_examples, cfg["effective_batch"]) * int(cfg["epochs"])


def batch_indices(step: int, n_examples: int, effective_batch: int, seed: int) -> list[int]:
    """Examples of optimiser step `step` (0-based): a seeded shuffle per epoch, a function of the step
    alone so that a resumed run reads exactly what the uninterrupted one would have."""
    per_epoch = steps_per_epoch(n_examples, effective_batch)
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return order[position * effective_batch : (position + 1) * effective_batch]


def step_examples(examples, step: int, effective_batch: int, seed: int, rank: int = 0, world: int = 1):
    """(the whole effective batch of optimiser step `step`, this process's share of it).

    Every rank draws the whole batch and computes its share (table2text.training.distributed.shard)."""
    chosen = [examples[i] for i in batch_indices(step, len(examples), effective_batch, seed)]
    return chosen, [chosen[i] for i in distributed.shard([len(ids) for ids, _ in chosen], rank, world)]


def micro_batch_shapes(examples, steps, effective_batch: int, seed: int, row_tokens: int,
                       rows_per_micro_batch: int, rank: int = 0, world: int = 1) -> set[int]:
    """The row counts of every micro-batch this process will run in `steps` (the data order is fixed)."""
    shapes = set()
    for step in steps:
        _, share = step_examples(examples, step, effective_batch, seed, rank, world)
        lengths = [len(ids) for ids, _ in share]
        shapes.update(len(micro) for micro in plan_packed_micro_batches(lengths, row_tokens, rows_per_micro_batch))
    return shapes


def row_length(lengths: list[int], multiple: int = 64) -> int:
    """Length of the packed rows: the longest example, rounded up (one shape for the whole run)."""
    return -(-max(lengths) // multiple) * multiple


def steps_with_nonzero_lr(cfg: dict, n_steps: int) -> int:
    """How many of the run's optimiser steps have a learning rate above 0 under train.lr_scheduler and
    train.warmup_ratio (a linear warm-up starts at 0): with none, the adapter stays at its initialisation.
    Replays the schedule on a throwaway optimiser, so it is the scheduler's own arithmetic."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=float(cfg["learning_rate"]))
    scheduler = lr_scheduler(cfg, optimizer, n_steps)
    count = 0
    for _ in range(n_steps):
        count += scheduler.get_last_lr()[0] > 0
        optimizer.step()
        scheduler.step()
    return count


