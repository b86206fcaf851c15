"""table2text/quiet.py: the known-harmless library messages are dropped, every other message still shows."""

from __future__ import annotations

import logging
import warnings

import stages  # noqa: F401  (importing the package installs the filters)
from table2text import quiet


class Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_the_listed_log_messages_are_dropped_and_others_kept():
    for name, start in quiet.LOGGED:
        logger, seen = logging.getLogger(name), Collect()
        logger.addHandler(seen)
        try:
            logger.warning(start + " %s", "(details)")
            logger.warning("something else went wrong")
        finally:
            logger.removeHandler(seen)
        assert seen.messages == ["something else went wrong"], name
    assert quiet.silenced("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community")
    assert not quiet.silenced("bitsandbytes.backends.cpu.ops", "out of memory")


def test_the_listed_warnings_are_ignored_and_others_shown():
    quiet.install()  # again: idempotent, no second filter
    assert sum(isinstance(f, quiet._DropMessages) for f in logging.getLogger(quiet.LOGGED[0][0]).filters) == 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        quiet.install()  # catch_warnings reset the filters: install them into this context
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
        warnings.warn("a different deprecation", FutureWarning)
    assert [str(w.message) for w in caught] == ["a different deprecation"]


def test_a_real_stage_import_prints_none_of_them():
    """Importing what train imports (transformers, peft, bitsandbytes) writes none of the silenced lines."""
    import subprocess
    import sys

    code = "import stages.train, stages.merge, stages.evaluate, peft, bitsandbytes"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8", timeout=300)
    assert result.returncode == 0, result.stderr
    for _, start in quiet.LOGGED:
        assert start not in result.stderr + result.stdout
