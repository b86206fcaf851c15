"""Write a Hugging Face Gemma3ForCausalLM folder as a GGUF file that llama.cpp, Ollama and LM Studio load
without extra files, and read one back.

The layout follows llama.cpp's own converter (convert_hf_to_gguf.py, Gemma 3): architecture `gemma3`,
tensors under llama.cpp's names (gguf.TensorNameMap), every RMSNorm weight stored as `w + 1` (Gemma's
norm computes `x * (1 + w)`, llama.cpp's `x * w`), no `output.weight` when the head is tied to the
embedding, and the vocabulary as a SentencePiece-style `llama` tokenizer: tokens, scores and token types,
the special token ids, add_bos, and the chat template when the tokenizer has one. 1-D tensors (the norms)
stay float32, as llama.cpp's converter keeps them; 2-D tensors are written in the chosen type.

Only what llama.cpp's Gemma 3 graph computes can be exported: a config it would silently compute
differently (another attention scale, layer pattern or local RoPE base) is refused, naming the key.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np

from table2text.io.atomic import current_umask
from table2text.errors import UserError

# Types the pinned gguf package can write, by the name used in params (export.types) and file names.
# Norms and other 1-D tensors are float32 in every type.
TYPES = {
    "f32": ("F32", "ALL_F32"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "q5_1": ("Q5_1", "MOSTLY_Q5_1"),
    "q5_0": ("Q5_0", "MOSTLY_Q5_0"),
    "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
}
ARCH = "gemma3"
# llama.cpp's Gemma 3 graph: every 6th layer attends globally, the others in a sliding window with RoPE
# base 10000; the query scale is 1/sqrt(head_dim). These are not read from the file, so they must hold.
SWA_PATTERN = 6
SWA_ROPE_BASE = 10000.0
# SentencePiece token types, as llama.cpp's converter writes them
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPIECE_SPACE = "\u2581"
END_OF_TURN = "<end_of_turn>"


class ExportError(UserError, RuntimeError):
    """An export that cannot be written or verified, or a GGUF file that cannot be read (named)."""


def check_exportable(config: dict, source: str = "config.json") -> None:
    """Refuse, naming the key, a model llama.cpp's Gemma 3 graph would compute differently."""

    def refuse(key: str, why: str):
        raise ExportError(f"{source}: {key} {why}; llama.cpp's gemma3 graph cannot represent it")

    if config.get("model_type") != "gemma3_text" or "Gemma3ForCausalLM" not in config.get("architectures", []):
        refuse("model_type", f"is {config.get('model_type')!r} ({config.get('architectures')}), not a Gemma3ForCausalLM")
    head_dim = config["head_dim"]
    if config.get("query_pre_attn_scalar", head_dim) != head_dim:
        refuse("query_pre_attn_scalar", f"is {config['query_pre_attn_scalar']}, not head_dim ({head_dim})")
    n = config["num_hidden_layers"]
    expected = ["full_attention" if (i + 1) % SWA_PATTERN == 0 else "sliding_attention" for i in range(n)]
    if config.get("layer_types", expected) != expected:
        refuse("layer_types", f"is not llama.cpp's pattern (every {SWA_PATTERN}th layer global)")
    rope = config.get("rope_parameters") or {}
    local = (rope.get("sliding_attention") or {}).get("rope_theta", config.get("rope_local_base_freq", SWA_ROPE_BASE))
    if float(local) != SWA_ROPE_BASE:
        refuse("rope_parameters.sliding_attention.rope_theta", f"is {local}, not {SWA_ROPE_BASE:g}")
    full = rope.get("full_attention", rope)
    if full.get("rope_type", "default") not in ("default", "linear"):
        refuse("rope_parameters.full_attention.rope_type", f"is {full.get('rope_type')!r} (default or linear only)")
    if config.get("attn_logit_softcapping") is not None:
        refuse("attn_logit_softcapping", "is set (Gemma 3 has none)")
    if config.get("use_bidirectional_attention"):
        refuse("use_bidirectional_attention", "is true")
    if config.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        refuse("hidden_activation", f"is {config['hidden_activation']!r}, not gelu_pytorch_tanh")
    if config.get("attention_bias"):
        refuse("attention_bias", "is true")


def vocab_metadata(tokenizer_json: dict, tokenizer) -> dict:
    """The tokenizer as llama.cpp's SentencePiece (`llama`) model reads it.

    tokenizer_json is the tokenizer.json (a BPE model with byte fallback, as transformers writes Gemma's);
    tokenizer the loaded tokenizer (special tokens, add_bos, chat template). Like Gemma's SentencePiece
    model: special added tokens are CONTROL, other added tokens and the runs of 2+ spaces USER_DEFINED
    (spelled with real spaces, as SentencePiece keeps user-defined pieces), <0xNN> tokens BYTE. Scores
    fall with the vocabulary position, Gemma's merge order; the tokenizer's merges are checked to follow
    it, since llama.cpp merges by score."""
    model = tokenizer_json.get("model", {})
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        raise ExportError(f"tokenizer.json: model type {model.get('type')!r} (byte_fallback "
                          f"{model.get('byte_fallback')}): only Gemma's BPE with byte fallback is exported")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {a["id"]: a for a in tokenizer_json.get("added_tokens", [])}
    for token_id, a in added.items():
        vocab.setdefault(a["content"], token_id)
    size = max(vocab.values()) + 1
    tokens: list[str | None] = [None] * size
    for piece, token_id in vocab.items():
        tokens[token_id] = piece
    holes = [i for i, t in enumerate(tokens) if t is None]
    if holes:
        raise ExportError(f"tokenizer.json: token id {holes[0]} has no token ({len(holes)} ids missing)")
    types, scores = [], []
    for token_id, piece in enumerate(tokens):
        if token_id in added:
            kind = CONTROL if added[token_id]["special"] else USER_DEFINED
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            kind = BYTE
        elif len(piece) >= 2 and set(piece) == {SPIECE_SPACE}:
            kind = USER_DEFINED
            tokens[token_id] = " " * len(piece)
        else:
            kind = NORMAL
        types.append(kind)
        scores.append(-float(token_id) if kind == NORMAL else 0.0 if kind == BYTE else -1000.0)

    # llama.cpp merges the adjacent pair whose result scores highest: that must be the BPE merge order
    first_rank: dict[str, int] = {}
    for rank, merge in enumerate(model.get("merges", [])):
        a, b = merge if isinstance(merge, list) else merge.split(" ", 1)
        first_rank.setdefault(a + b, rank)
    order = sorted(first_rank.items(), key=lambda item: item[1])
    previous = None
    for result, rank in order:
        token_id = vocab.get(result)
        if token_id is None or types[token_id] != NORMAL:
            continue
        if previous is not None and token_id < previous[0]:
            raise ExportError(f"tokenizer.json: merge {rank} (to {result!r}) comes after the merge to "
                              f"{previous[1]!r} but the vocabulary has it earlier: SentencePiece scores "
                              "cannot express this merge order")
        previous = (token_id, result)

    normalizer = json.dumps(tokenizer_json.get("normalizer"))
    ids = tokenizer("a", add_special_tokens=True).input_ids
    eot = vocab.get(END_OF_TURN)
    meta = {
        "tokens": tokens,
        "scores": scores,
        "token_types": types,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "unknown_token_id": tokenizer.unk_token_id,
        "padding_token_id": tokenizer.pad_token_id,
        "eot_token_id": eot,
        "add_bos_token": tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id],
        "add_eos_token": tokenizer.eos_token_id is not None and ids[-1:] == [tokenizer.eos_token_id],
        # Gemma's normalizer only replaces spaces; a Prepend would mean SentencePiece's dummy prefix
        "add_space_prefix": '"Prepend"' in normalizer,
        "chat_template": tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None,
    }
    return meta


def _load_tensors(model_dir: Path) -> dict:
    """Every tensor of the model's safetensors files, as float32 numpy arrays."""
    import torch
    from safetensors import safe_open

    tensors = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as fh:
            for name in fh.keys():
                tensors[name] = fh.get_tensor(name).to(torch.float32).numpy()
    return tensors


def write_gguf(model_dir: Path, out_path: Path, out_type: str, *, name: str, tokenizer) -> dict:
    """Write model_dir (a Gemma3ForCausalLM folder) to out_path as GGUF of out_type (TYPES); returns what
    was written (tensors_written, tensors: their GGUF names, metadata: key -> value, bytes). The file
    appears only when complete (written in a temp folder beside it, then renamed)."""
    import gguf

    if out_type not in TYPES:
        raise ExportError(f"export type {out_type!r} is not one of {sorted(TYPES)}")
    model_dir = Path(model_dir)
    config, vocab = _read_model_folder(model_dir, tokenizer)
    qtype = gguf.GGMLQuantizationType[TYPES[out_type][0]]
    file_type = gguf.LlamaFileType[TYPES[out_type][1]]

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_path.name}-", dir=out_path.parent))
    tmp = tmp_dir / out_path.name
    try:
        writer = gguf.GGUFWriter(tmp, ARCH)
        meta = gguf_metadata(config, vocab, name, qtype, file_type)
        for key, (value, kind) in meta.items():
            getattr(writer, f"add_{kind}")(key, value)
        writer.add_token_list(vocab["tokens"])
        writer.add_token_scores(vocab["scores"])
        writer.add_token_types(vocab["token_types"])
        written = _add_tensors(writer, model_dir, config, len(vocab["tokens"]), qtype, out_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # the file a plain open() would make, readable by others
        os.replace(tmp, out_path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    expected = {key: value for key, (value, _) in meta.items()}
    expected["general.architecture"] = ARCH
    expected["tokenizer.ggml.tokens"] = vocab["tokens"]
    expected["tokenizer.ggml.token_type"] = vocab["token_types"]
    return {"tensors_written": len(written), "tensors": written, "metadata": expected,
            "bytes": out_path.stat().st_size}


def _read_model_folder(model_dir: Path, tokenizer) -> tuple[dict, dict]:
    """model_dir's config.json (checked exportable) and its vocabulary as GGUF stores it (vocab_metadata)."""
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    check_exportable(config, (model_dir / "config.json").as_posix())
    if not (model_dir / "tokenizer.json").is_file():
        raise ExportError(f"{(model_dir / 'tokenizer.json').as_posix()} missing: the vocabulary is read from it")
    tokenizer_json = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = vocab_metadata(tokenizer_json, tokenizer)
    n_vocab = len(vocab["tokens"])
    if n_vocab > config["vocab_size"]:
        raise ExportError(f"tokenizer has {n_vocab} tokens but config.json vocab_size is {config['vocab_size']}")
    return config, vocab


def gguf_metadata(config: dict, vocab: dict, name: str, qtype, file_type) -> dict:
    """The GGUF metadata of a Gemma 3 model: key -> (value, GGUF value type); also what the read-back must find."""
    import gguf

    rope = config.get("rope_parameters") or {}
    full = rope.get("full_attention", rope)
    a = f"{ARCH}."
    meta = {
        "general.type": ("model", "string"),
        "general.name": (name, "string"),
        a + "context_length": (config["max_position_embeddings"], "uint32"),
        a + "embedding_length": (config["hidden_size"], "uint32"),
        a + "block_count": (config["num_hidden_layers"], "uint32"),
        a + "feed_forward_length": (config["intermediate_size"], "uint32"),
        a + "attention.head_count": (config["num_attention_heads"], "uint32"),
        a + "attention.head_count_kv": (config["num_key_value_heads"], "uint32"),
        a + "attention.layer_norm_rms_epsilon": (float(config["rms_norm_eps"]), "float32"),
        a + "attention.key_length": (config["head_dim"], "uint32"),
        a + "attention.value_length": (config["head_dim"], "uint32"),
        a + "rope.freq_base": (float(full.get("rope_theta", 1_000_000.0)), "float32"),
        a + "attention.sliding_window": (config["sliding_window"], "uint32"),
        "general.file_type": (int(file_type), "uint32"),
        "tokenizer.ggml.model": ("llama", "string"),
        "tokenizer.ggml.pre": ("default", "string"),
        "tokenizer.ggml.add_bos_token": (bool(vocab["add_bos_token"]), "bool"),
        "tokenizer.ggml.add_eos_token": (bool(vocab["add_eos_token"]), "bool"),
        "tokenizer.ggml.add_space_prefix": (bool(vocab["add_space_prefix"]), "bool"),
    }
    if full.get("rope_type") == "linear":
        meta[a + "rope.scaling.type"] = ("linear", "string")
        meta[a + "rope.scaling.factor"] = (float(full["factor"]), "float32")
    if config.get("final_logit_softcapping"):
        meta[a + "final_logit_softcapping"] = (float(config["final_logit_softcapping"]), "float32")
    if qtype not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.BF16):
        meta["general.quantization_version"] = (gguf.GGML_QUANT_VERSION, "uint32")
    for key in ("bos", "eos", "unknown", "padding", "eot"):
        if vocab[f"{key}_token_id"] is not None:
            meta[f"tokenizer.ggml.{key}_token_id"] = (int(vocab[f"{key}_token_id"]), "uint32")
    if vocab["chat_template"]:
        meta["tokenizer.chat_template"] = (vocab["chat_template"], "string")
    return meta


def _add_tensors(writer, model_dir: Path, config: dict, n_vocab: int, qtype, out_type: str) -> list[str]:
    """Every weight of model_dir added to `writer` under its GGUF name, quantised to qtype where 2-D; returns
    the names written."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, config["num_hidden_layers"])
    tensors = _load_tensors(model_dir)
    tied = config.get("tie_word_embeddings", True)
    if tied:
        tensors.pop("lm_head.weight", None)
    written = []
    for hf_name in sorted(tensors):
        data = tensors.pop(hf_name)
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ExportError(f"{model_dir.as_posix()}: tensor {hf_name} has no GGUF name for gemma3")
        if hf_name.endswith("norm.weight"):
            data = data + 1.0  # Gemma's RMSNorm scales by (1 + w); llama.cpp's by w
        if hf_name in ("model.embed_tokens.weight", "lm_head.weight"):
            data = data[:n_vocab]  # rows past the tokenizer's vocabulary are never used
        if data.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name, np.ascontiguousarray(data, dtype=np.float32))
        else:
            if data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
                raise ExportError(f"{hf_name}: rows of {data.shape[-1]} values do not split into "
                                  f"{out_type} blocks of {gguf.GGML_QUANT_SIZES[qtype][0]}")
            writer.add_tensor(gguf_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        written.append(gguf_name)
    return written


def plain_view_reader(reader_class):
    """reader_class (gguf.GGUFReader) reading its map through a plain numpy view: the same bytes and values.

    The reader slices its np.memmap once per element of each array field (22 million slices for the
    262,144-entry token, score and type arrays of a Gemma 3 file, tokenizer and config reads together), and
    np.memmap's Python-level __getitem__ and __array_finalize__ run on each: 40 of the export stage's
    270 s under cProfile on the 2-core CI machine. A plain ndarray view of the same read-only map slices
    in C. The map is kept (`memmap`), so the views stay valid and it closes when the reader goes."""

    class PlainViewReader(reader_class):
        @property
        def data(self):
            return self._plain

        @data.setter
        def data(self, value):
            self.memmap = value
            self._plain = value.view(np.ndarray) if isinstance(value, np.memmap) else value

    PlainViewReader.__name__ = PlainViewReader.__qualname__ = reader_class.__name__
    return PlainViewReader


@contextlib.contextmanager
def parse_each_file_once():
    """Within the block, every gguf.GGUFReader(path) of one unchanged file is the same, read-only reader.

    The gguf package's reader builds a numpy view for each element of the 262,144-entry token, score and
    type arrays: one parse of a Gemma 3 GGUF took 61 s on the 2-core CI machine under load (about 15 s
    idle). transformers' GGUF loader parses the file once for the config and again for the weights, and
    its tokenizer twice more, on top of the stage's own metadata read: 8 parses for the two default
    types, now 2. The bytes checked are the file's either way: the reader maps the file read-only
    (mode 'r'), and the key holds its size and modification time. transformers imports GGUFReader from
    the gguf package at each call, so it sees this one. Readers are dropped at the end (an open map
    would keep Windows from renaming the folder)."""
    import gguf

    original = gguf.GGUFReader
    readers: dict = {}
    plain = plain_view_reader(gguf.gguf_reader.GGUFReader)

    def reader(path, mode="r"):
        if mode != "r":
            return original(path, mode)
        stat = os.stat(path)
        key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
        if key not in readers:
            readers[key] = plain(path, mode)
        return readers[key]

    gguf.GGUFReader = reader
    try:
        yield readers
    finally:
        gguf.GGUFReader = original
        readers.clear()
        gc.collect()


def read_metadata(path: Path) -> dict:
    """The file's key-value metadata (arrays summarised by length, the token list in full) and its tensors'
    names, types and shapes. A file that is not a complete GGUF is named in one line (ExportError)."""
    import gguf

    path = Path(path)
    try:
        reader = gguf.GGUFReader(path)
        meta = {}
        for key, field in reader.fields.items():
            if key.startswith("GGUF."):
                continue
            value = field.contents()
            meta[key] = value
        tensors = {t.name: (t.tensor_type.name, [int(x) for x in t.shape]) for t in reader.tensors}
        # the reader maps tensor data lazily: check every tensor's bytes lie inside the file
        size = path.stat().st_size
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
        if end > size:
            raise ValueError(f"tensor data ends at byte {end:,} but the file has {size:,}")
    except (ValueError, KeyError, IndexError, TypeError, struct.error, OSError, UnicodeDecodeError) as err:
        raise ExportError(f"{path.as_posix()}: not a readable GGUF file, corrupt or truncated "
                          f"({type(err).__name__}: {err})") from None
    return {"metadata": meta, "tensors": tensors}


def load_gguf_model(path: Path, device=None):
    """The GGUF file as a transformers model (fp32 compute), through transformers' own GGUF loader."""
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                 trust_remote_code=False)
    if device is not None:
        model.to(device)
    return model.eval()


def load_gguf_tokenizer(path: Path):
    from transformers import AutoTokenizer

    path = Path(path)
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=False)
