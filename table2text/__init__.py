"""The library behind the pipeline's stages (stages/ holds only the entry points).

    data/      where examples come from (ToTTo, FeTaQA), table heuristics, linearisation, prompts
    model/     base-model sources, NF4 weights, the fine-tuned model (adapter, merge, its fidelity), GGUF
    training/  schedule, batching and packed attention, graphed forward, checkpoints, throughput, the loop
    generation.py  batched decoding, one path for evaluate, infer and the checks
    metrics/   the official ToTTo BLEU / PARENT, error analysis
    io/        reading inputs once and well, atomic outputs
    config.py  the typed, validated settings of params.yaml (params.py loads them)

Known-harmless library warnings are silenced before any module imports its libraries (see quiet.py).
"""
from table2text.quiet import install as _quiet

_quiet()
