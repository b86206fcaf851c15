"""The pipeline's settings: one typed, validated configuration (the defaults live here and only here).

    cfg = load_config("params.yaml")      # a Config: cfg.train.learning_rate, cfg.lora.r, ...
    params = cfg.to_dict()                # the same as plain dicts, every key present (table2text.params)

One dataclass per group of params.yaml, in the style of TRL's SFTConfig: every field has a `help` in its
metadata, and __post_init__ checks types, ranges and enums. Loading refuses, with ONE line naming the key:
  * unknown groups and keys, with the closest valid name (`unknown key train.learning_rte (did you mean
    train.learning_rate?)`), so a typo never silently runs the default;
  * wrong types: no string is coerced ("eight", "abc", "true"), a float is no int (1e3), a bool no number;
  * out-of-range values, unknown enum values, and settings that contradict each other;
  * YAML syntax errors (a tab, a duplicate key), naming file and line.
lora.target_modules is checked against the model's module names by check_target_modules, before any
weights load (the model is built on the meta device: no weights are read).

Fields marked math=True in their metadata change what training computes; stages.train derives its
checkpoint run key from them (and the whole lora group), so no deny-list has to be kept by hand.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from table2text.errors import UserError

# Enums (the modules that implement them import nothing heavy from here, and torch is not imported here:
# validation must take well under a second).
SOURCES = ("demo", "totto", "fetaqa")  # or hf:<dataset id>
LINEARIZATIONS = ("subtable", "full_table")
ON_BAD_RECORD = ("error", "skip")
QUANTIZATIONS = ("nf4", "none")
TRAIN_METHODS = ("lora", "full")  # table2text.training.loop: adapters on the frozen base | every weight
LR_SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
MERGE_BASES = ("trained", "original")
MERGE_DTYPES = ("auto", "bfloat16", "float32", "float16")
EXPORT_TYPES = ("f32", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")  # what table2text.model.gguf writes
EXPORT_BOUND_KEYS = ("max_mean_kl", "min_top1_agreement")
EVAL_MODELS = ("merged", "adapter")
EVAL_CACHES = ("static", "dynamic")
EVAL_DECODERS = ("auto", "generate", "graph")  # table2text.generation.DECODER_CHOICES
EVAL_DTYPES = ("float32", "bfloat16", "auto")
FP32_MATMULS = ("tf32", "ieee")
LORA_COMPUTE_DTYPES = ("auto", "float32", "bfloat16")  # table2text.training.fused_lora
DEVICE_RE = re.compile(r"auto|cpu|cuda|cuda:\d+")


class ConfigError(UserError, ValueError):
    """A bad setting; the message names the key (group.key)."""


def setting(default, help: str, *, math: bool = False):
    """A field with its help text; math=True: it changes what training computes (see run key)."""
    metadata = {"help": help, "math": math}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


# ------------------------------------------------------------------------------------------ checks
def _kind(value) -> str:
    return "a bool" if isinstance(value, bool) else f"a {type(value).__name__}"


def _check_type(key: str, value, kind: str) -> None:
    """kind: int | float | bool | str | list[str] | float | str (the annotation). No coercion at all."""
    if kind == "bool":
        ok = isinstance(value, bool)
        want = "true or false"
    elif kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
        want = "an integer"
    elif kind == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        want = "a finite number"
    elif kind == "str":
        ok = isinstance(value, str)
        want = "a string"
    elif kind == "list[str]":
        ok = isinstance(value, list) and all(isinstance(v, str) and v for v in value)
        want = "a list of names"
    elif kind == "dict":
        ok = isinstance(value, dict)
        want = "a mapping"
    elif kind == "float | str":  # a number or a keyword; the field's own check says which keyword
        ok = isinstance(value, str) or (isinstance(value, (int, float)) and not isinstance(value, bool)
                                        and math.isfinite(value))
        want = "a number or a keyword"
    else:  # pragma: no cover - a field with an annotation this function does not know
        raise TypeError(f"{key}: unsupported field type {kind!r}")
    if not ok:
        raise ConfigError(f"{key} must be {want}, got {value!r} ({_kind(value)})")


class Group:
    """Base of the group dataclasses: type checks of every field, then the group's own checks."""

    GROUP = ""

    def __post_init__(self) -> None:
        for f in fields(self):
            _check_type(self._key(f.name), getattr(self, f.name), f.type)
        self.check()

    def _key(self, name: str) -> str:
        return f"{self.GROUP}.{name}"

    def check(self) -> None:
        """Ranges, enums and combinations; subclasses raise ConfigError naming the key."""

    def _one_of(self, name: str, choices) -> None:
        value = getattr(self, name)
        if value not in choices:
            raise ConfigError(f"{self._key(name)} must be one of {sorted(choices)}, got {value!r}")

    def _at_least(self, name: str, low) -> None:
        value = getattr(self, name)
        if value < low:
            raise ConfigError(f"{self._key(name)} must be >= {low}, got {value!r}")

    def _positive(self, name: str) -> None:
        value = getattr(self, name)
        if not value > 0:
            raise ConfigError(f"{self._key(name)} must be > 0, got {value!r}")

    def _fraction(self, name: str, *, low_open: bool = False) -> None:
        """0 <= value < 1 (0 < value < 1 with low_open)."""
        value = getattr(self, name)
        if not ((0 < value) if low_open else (0 <= value)) or not value < 1:
            bound = "0 <" if low_open else "0 <="
            raise ConfigError(f"{self._key(name)} must be {bound} value < 1, got {value!r}")

    def _device(self, name: str) -> None:
        value = getattr(self, name)
        if not DEVICE_RE.fullmatch(value):
            raise ConfigError(f"{self._key(name)} must be auto, cpu, cuda or cuda:N, got {value!r}")


# ------------------------------------------------------------------------------------------ groups
@dataclass
class DataConfig(Group):
    GROUP = "data"
    source: str = setting("demo", "demo | totto | fetaqa | hf:<dataset id> (see README 'Data sources')")
    path: str = setting("", "folder holding the source's files (empty: the demo's own for demo, else required; "
                            "single files: train_file / validation_file)")
    train_file: str = setting("", "optional explicit file for the train split (overrides path)")
    validation_file: str = setting("", "optional explicit file for the validation split (overrides path)")
    linearization: str = setting("subtable", "subtable (highlighted cells + headers) | full_table (all cells)")
    include_question: bool = setting(False, "FeTaQA only: put the question into the input")
    train_samples: int = setting(0, "subsample the train split to this many (0 = all)")
    validation_samples: int = setting(0, "subsample the validation split to this many (0 = all)")
    seed: int = setting(42, "seed of the subsampling")
    max_length: int = setting(1024, "prompt + target tokens; the table part is truncated to fit, never the target")
    on_bad_record: str = setting("error", "error (stop with file, line, field) | skip (count and report)")

    def check(self) -> None:
        if not (self.source in SOURCES or (self.source.startswith("hf:") and len(self.source) > 3)):
            raise ConfigError(f"data.source={self.source!r}: expected demo, totto, fetaqa or hf:<dataset id>")
        self._one_of("linearization", LINEARIZATIONS)
        self._one_of("on_bad_record", ON_BAD_RECORD)
        for name in ("train_samples", "validation_samples", "seed"):
            self._at_least(name, 0)
        self._positive("max_length")


@dataclass
class ModelConfig(Group):
    GROUP = "model"
    name: str = setting("packaged", "packaged (PyPI Gemma 3 270M, offline) | local folder | hub id org/name")

    def check(self) -> None:
        if not self.name.strip():
            raise ConfigError("model.name must not be empty")


@dataclass
class LoRAConfig(Group):
    GROUP = "lora"
    r: int = setting(8, "LoRA rank", math=True)
    alpha: float = setting(16, "LoRA scaling numerator (scale = alpha / r)", math=True)
    dropout: float = setting(0.05, "dropout on the LoRA input, 0 <= dropout < 1", math=True)
    target_modules: list[str] = setting(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "names of the modules that get adapters; each must match at least one module of the model", math=True)

    def check(self) -> None:
        self._positive("r")
        self._positive("alpha")
        self._fraction("dropout")
        if not self.target_modules:
            raise ConfigError("lora.target_modules must name at least one module")
        repeated = sorted({m for m in self.target_modules if self.target_modules.count(m) > 1})
        if repeated:
            raise ConfigError(f"lora.target_modules lists {', '.join(repeated)} more than once")


@dataclass
class TrainConfig(Group):
    GROUP = "train"
    method: str = setting("lora", "lora (adapters on the frozen base) | full (every weight, fp32 master weights, "
                          "bf16 autocast on CUDA; needs quantization none, one GPU; lora.*, fuse_lora, "
                          "lora_compute_dtype and nf4_* apply to lora only)", math=True)
    quantization: str = setting("nf4", "nf4 (4-bit NF4 QLoRA, bf16 compute) | none (bf16 LoRA)", math=True)
    effective_batch: int = setting(16, "examples per optimiser step", math=True)
    micro_batch_tokens: int = setting(4096, "tokens per forward pass; accumulation covers the rest")
    cpu_micro_batch_tokens: int = setting(1024, "used instead on CPU (0 = micro_batch_tokens)")
    max_memory_gb: float | str = setting(0, "cap on peak GPU memory in GiB (0 = no cap) | auto")
    learning_rate: float = setting(5.0e-5, "peak learning rate", math=True)
    warmup_ratio: float = setting(0.06, "fraction of steps with linear warm-up", math=True)
    lr_scheduler: str = setting("cosine", "cosine | linear | constant | constant_with_warmup", math=True)
    weight_decay: float = setting(0.0, "AdamW weight decay", math=True)
    max_grad_norm: float = setting(1.0, "gradient clipping", math=True)
    label_smoothing: float = setting(0.0, "label smoothing of the completion loss, 0 <= value < 1 (0 = plain "
                                     "cross-entropy; the logged loss includes it)", math=True)
    epochs: int = setting(1, "passes over the train split", math=True)
    max_steps: int = setting(0, "stop after this many optimiser steps (0 = epochs decide)", math=True)
    seed: int = setting(42, "seed of LoRA init, dropout and data order", math=True)
    logging_steps: int = setting(1, "log every N optimiser steps")
    save_steps: int = setting(10, "checkpoint every N optimiser steps (resume point)")
    device: str = setting("auto", "auto | cpu | cuda | cuda:N")
    num_gpus: int = setting(1, "data-parallel processes, one per GPU, through torchrun")
    num_threads: int = setting(0, "CPU threads for torch (0 = torch default)")
    nf4_fp32_upcast: bool = setting(False, "nf4: cast the non-quantised weights to fp32 (peft's recipe)", math=True)
    nf4_dequantize_once: bool = setting(True, "nf4: hold the frozen NF4 weights dequantised (same values)")
    cuda_graphs: bool = setting(True, "CUDA: capture the packed forward/backward once per row count and replay it "
                                "(lora only: method full runs eager, and says so)")
    # math: compiled kernels are tested equal to eager on CPU only, so a resume across it is not assumed safe
    compile_layers: bool = setting(False, "torch.compile each decoder layer", math=True)
    peak_flops: float = setting(0, "device peak FLOP/s for MFU (0 = known GPUs by name)")
    lora_compute_dtype: str = setting("auto", "dtype of the adapter matmuls: float32 (PEFT's: the input cast "
                                      "up) | bfloat16 | auto (the base's compute dtype); weights and optimiser "
                                      "stay fp32", math=True)
    # math: the function is PEFT's, but the dropout masks are drawn in another order (fused_lora)
    fuse_lora: bool = setting(True, "compute q/k/v and gate/up (base and LoRA) as one matmul each",
                              math=True)

    def check(self) -> None:
        self._one_of("method", TRAIN_METHODS)
        self._one_of("quantization", QUANTIZATIONS)
        if self.method == "full" and self.quantization != "none":
            raise ConfigError(f"train.quantization must be none with train.method full (every weight is trained, "
                              f"in fp32 master weights: frozen NF4 weights cannot be), got {self.quantization!r}")
        if self.method == "full" and self.num_gpus > 1:
            # one process only: the data-parallel path is measured for LoRA's few gradients, not for 268M
            raise ConfigError(f"train.num_gpus must be 1 with train.method full (full fine-tuning runs in one "
                              f"process), got {self.num_gpus}")
        if self.lora_compute_dtype == "float16":
            raise ConfigError("train.lora_compute_dtype must be auto, float32 or bfloat16, got 'float16' "
                              "(Gemma 3 overflows fp16)")
        self._one_of("lora_compute_dtype", LORA_COMPUTE_DTYPES)
        self._one_of("lr_scheduler", LR_SCHEDULERS)
        for name in ("effective_batch", "micro_batch_tokens", "learning_rate", "max_grad_norm", "epochs",
                     "logging_steps", "save_steps", "num_gpus"):
            self._positive(name)
        for name in ("cpu_micro_batch_tokens", "max_steps", "seed", "num_threads", "weight_decay", "peak_flops"):
            self._at_least(name, 0)
        self._fraction("warmup_ratio")
        self._fraction("label_smoothing")
        self._device("device")
        if isinstance(self.max_memory_gb, str):
            if self.max_memory_gb != "auto":
                raise ConfigError(f"train.max_memory_gb must be a number >= 0 or auto, got {self.max_memory_gb!r}")
        else:
            self._at_least("max_memory_gb", 0)
        if self.lr_scheduler == "constant" and self.warmup_ratio > 0:
            raise ConfigError(f"train.lr_scheduler: constant has no warm-up, but train.warmup_ratio is "
                              f"{self.warmup_ratio}: set train.warmup_ratio: 0, or train.lr_scheduler: "
                              "constant_with_warmup")


@dataclass
class MergeConfig(Group):
    GROUP = "merge"
    base: str = setting("trained", "trained (the adapter on the base as training saw it: NF4-dequantised under "
                        "train.quantization nf4) | original (the unquantised base, PEFT's merge_and_unload)")
    dtype: str = setting("auto", "auto (bf16 when the check proves it faithful, else fp32) | bfloat16 | float32 | "
                         "float16")
    verify_prompts: int = setting(8, "validation prompts of the fidelity check (fp32)")
    max_error_ratio: float = setting(0.01, "pass when the merge error's mean KL <= this x the adapter effect's")
    device: str = setting("auto", "auto | cpu | cuda | cuda:N (where the merge and its check run)")

    def check(self) -> None:
        self._one_of("base", MERGE_BASES)
        self._one_of("dtype", MERGE_DTYPES)
        self._positive("verify_prompts")
        self._fraction("max_error_ratio", low_open=True)
        self._device("device")


@dataclass
class EvalConfig(Group):
    GROUP = "eval"
    model: str = setting("merged", "merged | adapter (the model training optimised: trained base + adapter; "
                                   "after train.method full, the trained weights)")
    compare_base: bool = setting(True, "also score the untuned base model on the same examples")
    batch_size: int = setting(16, "generation batch size")
    cache: str = setting("static", "static (KV cache allocated once) | dynamic (grows as tokens come)")
    batch_tokens: int = setting(0, "cap on a batch's prompts x (longest prompt + max_new_tokens) (0 = none)")
    fp32_matmul: str = setting("tf32", "tf32 | ieee: how a float32 model multiplies on a GPU")
    decoder: str = setting("auto", "auto (graph on CUDA when greedy over a static cache, else generate) | generate "
                                   "(transformers' generate) | graph (own greedy loop, CUDA-graphed step, length "
                                   "buckets; needs cache static)")
    dtype: str = setting("float32", "float32 | bfloat16 | auto (= bf16 on GPUs); never float16")
    max_new_tokens: int = setting(64, "generation length cap")
    num_beams: int = setting(1, "1 = greedy decoding; N > 1 = beam search with N beams, batched as greedy")
    length_penalty: float = setting(1.0, "beam search: a finished beam's log-probability is divided by its length "
                                    "to this power (> 1 favours longer sentences, < 1 shorter)")
    max_examples: int = setting(0, "evaluate on the first N validation examples (0 = all)")
    bleurt_checkpoint: str = setting("", "local BLEURT checkpoint folder; empty = BLEURT not computed")
    device: str = setting("auto", "auto | cpu | cuda | cuda:N")
    num_threads: int = setting(0, "CPU threads for torch (0 = torch default)")

    def check(self) -> None:
        self._one_of("model", EVAL_MODELS)
        self._one_of("cache", EVAL_CACHES)
        self._one_of("fp32_matmul", FP32_MATMULS)
        self._one_of("decoder", EVAL_DECODERS)
        if self.decoder == "graph" and self.cache != "static":
            raise ConfigError(f"eval.decoder 'graph' needs eval.cache 'static', got {self.cache!r}")
        if self.decoder == "graph" and self.num_beams > 1:
            raise ConfigError(f"eval.decoder 'graph' decodes greedily: it needs eval.num_beams 1, got {self.num_beams}")
        if self.dtype == "float16":
            raise ConfigError("eval.dtype must be auto, float32 or bfloat16, got 'float16' (Gemma 3 overflows fp16)")
        self._one_of("dtype", EVAL_DTYPES)
        for name in ("batch_size", "max_new_tokens", "num_beams"):
            self._positive(name)
        if self.num_beams == 1 and self.length_penalty != 1.0:  # greedy never reads it: refuse a silent no-op
            raise ConfigError(f"eval.length_penalty {self.length_penalty} applies to beam search only: set "
                              "eval.num_beams > 1, or leave eval.length_penalty at 1.0")
        if not -10 <= self.length_penalty <= 10:
            raise ConfigError(f"eval.length_penalty must be between -10 and 10, got {self.length_penalty!r}")
        for name in ("batch_tokens", "max_examples", "num_threads"):
            self._at_least(name, 0)
        self._device("device")


def _default_export_bounds() -> dict:
    return {"bf16": {"max_mean_kl": 1.0e-6, "min_top1_agreement": 0.999},
            "q8_0": {"max_mean_kl": 5.0e-3, "min_top1_agreement": 0.95}}


@dataclass
class ExportConfig(Group):
    GROUP = "export"
    enabled: bool = setting(True, "false: the stage writes no GGUF (metrics/export.json says so)")
    name: str = setting("totto-gemma-3-270m", "file stem: models/gguf/<name>-<type>.gguf")
    types: list[str] = setting(["bf16", "q8_0"], f"GGUF types to write: {' | '.join(EXPORT_TYPES)}")
    verify_prompts: int = setting(4, "validation prompts the read-back GGUF is checked on")
    max_new_tokens: int = setting(32, "length of the greedy outputs compared with the merged model's")
    device: str = setting("auto", "auto | cpu | cuda | cuda:N (where the verification computes, in fp32)")
    bounds: dict = field(default_factory=_default_export_bounds, metadata={
        "help": "per type: {max_mean_kl, min_top1_agreement} of the read-back GGUF against the merged model",
        "math": False})

    def check(self) -> None:
        if not self.name or any(c in self.name for c in '/\\:*?"<>| ') or self.name.startswith("."):
            raise ConfigError(f"export.name must be a plain file name stem (no spaces, slashes or leading dot), "
                              f"got {self.name!r}")
        if not self.types:
            raise ConfigError(f"export.types must list at least one of {list(EXPORT_TYPES)}")
        for t in self.types:
            if t not in EXPORT_TYPES:
                raise ConfigError(f"export.types: {t!r} is not one of {list(EXPORT_TYPES)}{_suggest(t, EXPORT_TYPES)}")
        if len(set(self.types)) != len(self.types):
            raise ConfigError(f"export.types lists a type twice: {self.types}")
        self._positive("verify_prompts")
        self._positive("max_new_tokens")
        self._device("device")
        for t in self.types:
            bound = self.bounds.get(t)
            if not isinstance(bound, dict):
                raise ConfigError(f"export.bounds.{t}: missing (every exported type needs its fidelity bound)")
            if sorted(bound) != sorted(EXPORT_BOUND_KEYS):
                raise ConfigError(f"export.bounds.{t} must have exactly {list(EXPORT_BOUND_KEYS)}, got {sorted(bound)}")
            _check_type(f"export.bounds.{t}.max_mean_kl", bound["max_mean_kl"], "float")
            _check_type(f"export.bounds.{t}.min_top1_agreement", bound["min_top1_agreement"], "float")
            if bound["max_mean_kl"] < 0:
                raise ConfigError(f"export.bounds.{t}.max_mean_kl must be >= 0, got {bound['max_mean_kl']!r}")
            if not 0 <= bound["min_top1_agreement"] <= 1:
                raise ConfigError(f"export.bounds.{t}.min_top1_agreement must be in [0, 1], "
                                  f"got {bound['min_top1_agreement']!r}")


@dataclass
class Config:
    """All settings. THE place where a group is registered: one field per group of params.yaml
    (a new stage adds its group here, e.g. `export: ExportConfig = field(default_factory=ExportConfig)`)."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def __post_init__(self) -> None:
        """Checks across groups (each group has checked its own keys)."""
        if self.train.method == "full" and self.merge.base == "original":
            raise ConfigError("merge.base must be trained with train.method full (original puts a LoRA adapter "
                              "on the unquantised base; a full run's weights are the model), got 'original'")

    def to_dict(self) -> dict:
        """{group: {key: value}} with every key: what stages index as params[group][key]."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw) -> Config:
        """Validate `raw` ({group: {key: value}}, as read from params.yaml); a missing group or key takes
        its default. Raises ConfigError naming the key."""
        if raw is None:
            raise ConfigError("the file is empty (expected a mapping of groups: data, model, lora, ...)")
        if not isinstance(raw, dict):
            raise ConfigError(f"expected a mapping of groups ({', '.join(GROUPS)}), got {_kind(raw)}")
        groups = {}
        for name, values in raw.items():
            if name not in GROUPS:
                raise ConfigError(f"unknown group {name}{_suggest(str(name), GROUPS)}")
            if values is None:  # `data:` with nothing under it
                values = {}
            if not isinstance(values, dict):
                raise ConfigError(f"{name} must be a mapping of settings, got {values!r} ({_kind(values)})")
            known = {f.name for f in fields(GROUPS[name])}
            for key in values:
                if key not in known:
                    raise ConfigError(f"unknown key {name}.{key}{_suggest_key(name, str(key))}")
            groups[name] = GROUPS[name](**values)
        return cls(**groups)


GROUPS: dict[str, type[Group]] = {f.name: f.default_factory for f in fields(Config)}


def group_settings(group: str, values: dict) -> dict:
    """One group's settings (e.g. params["data"], possibly partial) validated, with every key present."""
    return dataclasses.asdict(getattr(Config.from_dict({group: values}), group))


def math_keys(group: str) -> list[str]:
    """The keys of `group` marked math=True: those that change what training computes."""
    return [f.name for f in fields(GROUPS[group]) if f.metadata.get("math")]


def _suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else f" (valid: {', '.join(choices)})"


def _suggest_key(group: str, key: str) -> str:
    """The closest key of the group; else the same key in another group (eval.dtype for train.dtype)."""
    own = [f.name for f in fields(GROUPS[group])]
    close = difflib.get_close_matches(key, own, n=1, cutoff=0.6)
    if close:
        return f" (did you mean {group}.{close[0]}?)"
    elsewhere = [f"{g}.{key}" for g, cls in GROUPS.items() if g != group and key in {f.name for f in fields(cls)}]
    if elsewhere:
        return f" (did you mean {' or '.join(elsewhere)}?)"
    return f" (valid keys of {group}: {', '.join(own)})"


# ------------------------------------------------------------------------------------------ YAML
class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 floats (1e3 and -5e-5 are numbers, as in DVC's own reader, not
    strings as YAML 1.1 has them) and duplicate keys refused (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {seen[key] + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def read_yaml(path: str | Path):
    """The parsed YAML of `path`; a missing file or a syntax error is a ConfigError naming file and line."""
    label = Path(path).as_posix()
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise ConfigError(f"{label}: no such params file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{label}: cannot read ({err})") from None
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{label}:{mark.line + 1}:{mark.column + 1}" if mark else label
        problem = (err.problem or err.context or "invalid YAML").replace("\t", "\\t")
        if "\\t" in problem:
            problem += " (a tab: YAML indents with spaces)"
        elif "escape" in problem:  # the Windows trap: "C:\Users\..." in double quotes reads \U as an escape
            problem += " (a Windows path: write it with / or in single quotes; in double quotes \\ starts an escape)"
        raise ConfigError(f"{where}: YAML syntax error: {problem}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{label}: YAML syntax error: {err}") from None


def load_config(path: str | Path) -> Config:
    """Read and validate a params file; every error names the file and the key (or line)."""
    raw = read_yaml(path)
    try:
        return Config.from_dict(raw)
    except ConfigError as err:
        raise ConfigError(f"{Path(path).as_posix()}: {err}") from None
    except TypeError as err:  # pragma: no cover - from_dict checks keys before constructing
        raise ConfigError(f"{Path(path).as_posix()}: {err}") from None


# ------------------------------------------------------------------------------------------ model checks
def model_module_names(model_dir: Path) -> list[str]:
    """Dotted names of the model's modules that LoRA can adapt (linear, embedding, conv), read from a model
    built on the meta device from its config.json: no weights are read (about a second, plus importing
    transformers, which the stage needs anyway)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    kinds = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d)
    return [name for name, module in model.named_modules() if name and isinstance(module, kinds)]


def check_target_modules(targets: list[str], model_dir: Path, label: str | None = None) -> None:
    """Every lora.target_modules entry must match a module as peft matches them (the full dotted name, or
    its end after a dot); else ConfigError naming the bad entries and the valid names. label: the model's
    name in the message (default: the folder's)."""
    names = model_module_names(model_dir)
    bad = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    if bad:
        valid = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise ConfigError(f"lora.target_modules: {', '.join(bad)}: no such module in model {label or Path(model_dir).name} "
                          f"(its adaptable modules: {', '.join(valid)})")
