"""Models: base-model sources, NF4 weights, the fine-tuned model, its merge check, GGUF files."""
