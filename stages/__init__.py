"""Entry points: the DVC stages (preprocess, train, merge, evaluate, export) and the user CLIs (infer,
score, error_analysis, pull), each `python -m stages.<name>`, over the table2text library."""
import table2text  # noqa: F401  (silences known-harmless library warnings first)
