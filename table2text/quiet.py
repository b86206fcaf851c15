"""The one home of the library warnings this project silences: each is known to be harmless here and asks
for an action nobody should take. Installed when the `table2text` package is imported (its __init__.py), so
every stage, `python -m stages.infer` and the tests get it before bitsandbytes or transformers load.
Anything not listed here still shows.
"""

from __future__ import annotations

import logging
import warnings

# (logger name, message start, why it is harmless)
LOGGED = [
    # bitsandbytes >= 0.48 tries, on CPUs with AVX512-BF16, to fetch an optional faster 4-bit CPU kernel from
    # the Hugging Face hub through the `kernels` package and falls back to its built-in kernel: the NF4
    # results are the same, the hub is not reachable offline, and training on a CPU is only the demo.
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
    # The packaged GGUF is converted once, dequantised to bf16 and saved as plain safetensors
    # (table2text.model.sources.convert_packaged): the "packed weights are fastest in float32" advice is about
    # running the GGUF itself, which this project never does.
    ("transformers.quantizers.quantizer_gguf", "Loading a GGUF checkpoint with its weights packed"),
]
WARNED = [
    # peft 0.21's PeftModel reads the deprecated alias when it wraps a model (train, merge, evaluate);
    # the renamed is_activation_checkpointing behaves the same until transformers v6 removes the alias.
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
]


class _DropMessages(logging.Filter):
    def __init__(self, starts: list[str]):
        super().__init__()
        self.starts = tuple(starts)

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


def install() -> None:
    """Silence exactly the messages above (idempotent)."""
    for name in {name for name, _ in LOGGED}:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages([start for n, start in LOGGED if n == name]))
    for category, message in WARNED:
        warnings.filterwarnings("ignore", message=message, category=category)


def silenced(logger_name: str, message: str) -> bool:
    """Whether `message` on `logger_name` is one of those silenced (for tests)."""
    return any(logger_name == n and message.startswith(s) for n, s in LOGGED)


__all__ = ["install", "silenced"]
