"""The fine-tuned model: the adapter's identity (training_info.json), the base exactly as training computed
with it, and the adapter on top. One home for merge, evaluate and infer.

Two bases can carry an adapter (merge.base):
- trained: the base as training saw it. Under train.quantization nf4 that is the base quantised to NF4 by
  bitsandbytes in training's compute dtype and dequantised (table2text.model.nf4), the weights QLoRA optimised the
  adapter against; under none, the base in training's dtype. This is the model that was trained.
- original: the base weights as saved, what PEFT's merge_and_unload puts the adapter on.
The packaged Gemma 3 is itself a dequantised Q4_K_M model, so NF4 moves it far (BENCHMARKS.md, merge
fidelity): the adapter on the original base is a different model from the one that was trained.

Under train.method full (training_info.json's "method") the folder holds no adapter but the whole trained
model (fp32 safetensors, table2text.model.full): that is the model that was trained, on no base at all.
"""

from __future__ import annotations

from pathlib import Path

import torch

from table2text.model import sources as model_sources
from table2text.model import nf4
from table2text.io import readers
from table2text.errors import UserError

ADAPTER_DIR = Path("models/adapter")
INFO_FILE = "training_info.json"
BASES = ("trained", "original")
METHODS = ("lora", "full")  # training_info.json "method"; folders from before it are lora


class AdapterError(UserError, ValueError):
    """An adapter folder that cannot be used: missing or unreadable files, or trained on other weights."""


def read_training_info(adapter_dir: Path, required: bool = True) -> dict | None:
    """training_info.json of an adapter folder (written by the train stage); None if absent and not required."""
    file = Path(adapter_dir) / INFO_FILE
    if not file.exists():
        if required:
            raise AdapterError(f"{file.as_posix()}: missing (run the train stage)")
        return None
    try:
        return readers.read_json_file(file, "the adapter's training_info.json", fix="rerun the train stage")
    except readers.InputFileError as err:
        raise AdapterError(str(err)) from None


def base_name(info: dict | None) -> str | None:
    """The model.name the adapter was trained on, None if not recorded."""
    return ((info or {}).get("base_model") or {}).get("name")


def check_base_identity(adapter_dir: Path, info: dict | None, base_dir: Path) -> str:
    """Refuse an adapter trained on other base weights (its outputs would be meaningless); returns the
    base's weights sha256."""
    actual = model_sources.weights_sha256(base_dir)
    expected = ((info or {}).get("base_model") or {}).get("weights_sha256")
    if expected and expected != actual:
        raise AdapterError(
            f"{(Path(adapter_dir) / INFO_FILE).as_posix()}: field 'base_model.weights_sha256': the adapter was "
            f"trained on base weights sha256 {expected[:16]}... ({base_name(info)}), but {Path(base_dir).as_posix()} "
            f"has {actual[:16]}...: retrain the adapter or point model.name at the base it was trained on")
    return actual


def records_training_base(info: dict | None) -> bool:
    """Whether training_info.json says how training held its base (this project's train stage records it;
    an adapter made elsewhere may not)."""
    train = ((info or {}).get("params") or {}).get("train") or {}
    return "quantization" in train and "dtype" in (info or {})


def training_base(info: dict | None) -> tuple[str, torch.dtype]:
    """(quantization, compute dtype) of the base that training computed with, from training_info.json."""
    try:
        quantization = info["params"]["train"]["quantization"]
        dtype = getattr(torch, info["dtype"])
    except (KeyError, TypeError, AttributeError):
        raise AdapterError(f"{INFO_FILE}: no params.train.quantization / dtype recorded: cannot rebuild the base "
                           "as training saw it (re-run the train stage, or use merge.base: original)") from None
    if quantization not in ("nf4", "none") or not isinstance(dtype, torch.dtype):
        raise AdapterError(f"{INFO_FILE}: unknown training base quantization={quantization!r} dtype={info['dtype']!r}")
    return quantization, dtype


def load_base(base_dir: Path, info: dict | None, base: str, device: torch.device, dtype: torch.dtype):
    """The base model that carries the adapter (module docstring), its weights cast to `dtype`."""
    if base not in BASES:
        raise AdapterError(f"base must be one of {BASES}, got {base!r}")
    if base == "original":
        return model_sources.load_model(base_dir, quantization="none", dtype=dtype, device=device)
    quantization, train_dtype = training_base(info)
    # A plain model in `dtype` (its non-persistent buffers, e.g. Gemma's embedding scale, computed fresh
    # in that dtype, as any later load of a merged checkpoint computes them), holding the weights training
    # computed with: every weight rounded to training's dtype, and under NF4 the linears' weights exactly
    # what training's path gives (stages.train.build_model: load in NF4, dequantise once).
    model = model_sources.load_model(base_dir, quantization="none", dtype=dtype, device=device)
    with torch.no_grad():
        for weight in model.parameters():
            weight.copy_(weight.to(train_dtype))
        if quantization == "nf4":
            held = model_sources.load_model(base_dir, quantization="nf4", dtype=train_dtype, device=device)
            nf4.dequantize_frozen_nf4(held)
            linears = {n: m.weight for n, m in held.named_modules() if isinstance(m, nf4.DequantizedLinear)}
            for name, module in model.named_modules():
                if name in linears:
                    module.weight.copy_(linears[name])
            if not linears:
                raise AdapterError(f"{Path(base_dir).as_posix()}: no NF4 linear layers to rebuild the trained base from")
            del held
    return model


def is_peft(model) -> bool:
    """A PeftModel (an adapter on a base), else a plain model (a full run's, trained whole)."""
    return hasattr(model, "peft_config")


def training_method(info: dict | None) -> str:
    """What a train folder holds, from its training_info.json: lora (an adapter) | full (the trained model).
    A folder whose info predates the field, or an adapter made elsewhere, is lora."""
    method = (info or {}).get("method", "lora")
    if method not in METHODS:
        raise AdapterError(f"{INFO_FILE}: field 'method': unknown training method {method!r} (known: {METHODS})")
    return method


def load_full_model(train_dir: Path, base_dir: Path, device: torch.device, dtype: torch.dtype,
                    info: dict | None = None):
    """The model a full run trained (train_dir's weights, cast to `dtype`), after checking that it was
    trained from base_dir's weights (eval mode)."""
    train_dir = Path(train_dir)
    info = read_training_info(train_dir) if info is None else info
    if training_method(info) != "full":
        raise AdapterError(f"{(train_dir / INFO_FILE).as_posix()}: method {training_method(info)!r}: not a full "
                           "fine-tuning run")
    check_base_identity(train_dir, info, base_dir)
    return model_sources.load_model(train_dir, quantization="none", dtype=dtype, device=device).eval()


def load_trained_model(train_dir: Path, base_dir: Path, device: torch.device, dtype: torch.dtype):
    """The model training optimised, whatever train.method was: the adapter on the base as training saw it,
    or a full run's weights."""
    info = read_training_info(train_dir, required=False)
    if training_method(info) == "full":
        return load_full_model(train_dir, base_dir, device, dtype, info)
    return load_adapter_model(train_dir, base_dir, device, dtype, base="trained", info=info)


def load_adapter_model(adapter_dir: Path, base_dir: Path, device: torch.device, dtype: torch.dtype,
                       base: str = "trained", info: dict | None = None):
    """The adapter of adapter_dir on the chosen base (PEFT, unmerged, eval mode). With base "trained" this
    is the model training optimised."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        if training_method(info or read_training_info(adapter_dir, required=False)) == "full":
            raise AdapterError(f"{adapter_dir.as_posix()}: holds a fully fine-tuned model (train.method full), "
                               "not an adapter: load it as a model (its folder has config.json)")
        raise AdapterError(f"{adapter_dir.as_posix()}: no adapter_config.json (run the train stage)")
    if info is None:
        info = read_training_info(adapter_dir, required=(base == "trained"))
    check_base_identity(adapter_dir, info, base_dir)
    model_sources.check_adapter_files(adapter_dir)  # safetensors only, its rank the weights' rank
    model = load_base(base_dir, info, base, device, dtype)
    return PeftModel.from_pretrained(model, adapter_dir, is_trainable=False).to(device).eval()
