"""Examples: sources (ToTTo, FeTaQA), table heuristics, linearisation, prompts."""
