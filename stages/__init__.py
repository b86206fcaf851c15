"""Entry points: the DVC stages (preprocess, train, merge, evaluate, export) and the user CLIs (infer,
score, error_analysis, pull), each `python -m stages.<name>`, over the table2text library."""
from table2text import warm_start

# A DVC stage hands itself to the warm helper here, before torch is imported (table2text.warm_start).
warm_start.handoff()

import table2text  # noqa: F401,E402  (silences known-harmless library warnings first)
