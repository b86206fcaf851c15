"""One decoding step of a Gemma 3 text model in fewer, larger kernels: the graph decoder's step
(table2text.graph_decode), the same arithmetic as transformers' forward.

Why: a decoding step of the 270M model over a few hundred rows is a few GFLOP, but transformers' forward
issues ~1,700 kernels for it (per layer: six RMS norms of six kernels each, three q/k/v and two gate/up
matmuls, rotary per tensor, cache index arithmetic, dtype casts that are no-ops in fp32 yet still
dispatch), and on a GPU each kernel costs a few microseconds even replayed from a CUDA graph. Here a layer
is ~25 kernels: RMS norm as one torch rms_norm each, q/k/v and gate/up each one matmul over weights
concatenated once, rotary once over q and k together, the cache written at a slot index the step
advances on the device, attention as transformers runs it for one query token (the query heads of a
key/value head as that head's queries, pack_gqa).

The values are transformers' formulas (Gemma3RMSNorm's x * rsqrt(mean(x^2) + eps) * (1 + w) in fp32,
rotate_half, gelu_pytorch_tanh, the embedding scale, the tied head), so logits agree to rounding:
tests/test_gemma3_step.py compares them with the model's own step and greedy tokens with `generate`.
The prompts' prefill is the same layer over all their tokens (attention through SDPA, as the model's
forward), writing any subset of a bucket's rows at any slot offset, so a bucket can be prefilled in chunks
of similar length (graph_decode) instead of at its longest prompt's width.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


def unsupported(model) -> str | None:
    """Why `model` cannot take this step (None: it can). Plain Gemma 3 text models only: every projection a
    torch.nn.Linear without bias (a PEFT-wrapped or quantised layer would compute something else)."""
    config = getattr(model, "config", None)
    text = getattr(model, "model", None)
    if type(model).__name__ != "Gemma3ForCausalLM" or text is None or not hasattr(text, "layers"):
        return f"not a Gemma3ForCausalLM ({type(model).__name__})"
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return "attention logit soft-capping"
    if getattr(config, "hidden_activation", None) != "gelu_pytorch_tanh":
        return f"activation {getattr(config, 'hidden_activation', None)!r}"
    for layer in text.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for linear in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            if type(linear) is not torch.nn.Linear or linear.bias is not None:
                return f"a projection of type {type(linear).__name__}"
    if type(model.lm_head) is not torch.nn.Linear or model.lm_head.bias is not None:
        return f"a head of type {type(model.lm_head).__name__}"
    return None


def _norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma3RMSNorm: in fp32, times (1 + w) (weight holds 1 + w), back to x's dtype."""
    return F.rms_norm(x.float(), (x.shape[-1],), weight, eps).to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class _Layer:
    def __init__(self, layer):
        attn, mlp = layer.self_attn, layer.mlp
        with torch.no_grad():
            self.qkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).contiguous()
            self.gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).contiguous()
            norms = (layer.input_layernorm, layer.post_attention_layernorm, layer.pre_feedforward_layernorm,
                     layer.post_feedforward_layernorm, attn.q_norm, attn.k_norm)
            self.norms = [1.0 + n.weight.float() for n in norms]
        self.o, self.down = attn.o_proj.weight, mlp.down_proj.weight
        self.eps = layer.input_layernorm.eps
        self.type = attn.layer_type or "full_attention"
        self.scaling = attn.scaling
        self.heads = attn.q_proj.out_features // attn.head_dim
        self.kv_heads = attn.k_proj.out_features // attn.head_dim
        self.head_dim = attn.head_dim
        self.intermediate = mlp.gate_proj.out_features


ATTENTIONS = ("matmul", "matmul_tf32", "sdpa")


@contextlib.contextmanager
def _ieee_fp32_matmuls():
    """fp32 matmuls in IEEE fp32 while inside (TF32 otherwise rounds their inputs to 10 bits): the
    attention products stay as exact as the memory-efficient kernel that transformers' step runs."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


class Gemma3Step:
    """step(token [rows, 1], position [rows, 1], masks {layer type: bool [rows, 1, 1, slots]}, slot, cache)
    -> logits [rows, vocabulary] of the next token; writes the token's keys and values to cache slot `slot`
    (a 0-d device tensor) of transformers' static cache layers, which prefill() (or the model) filled.

    attention (the decoding step's; the prompts' is always SDPA): "matmul" (default) computes one query
    token's attention as two batched matrix products (in IEEE fp32) and a softmax; "matmul_tf32" does so
    at the session's fp32 matmul precision (TF32 under eval.fp32_matmul: tf32); "sdpa" calls
    scaled_dot_product_attention as transformers does. Why matmul: in fp32 SDPA
    takes its memory-efficient kernel, which for one query token runs one thread block per row and key/value
    head over the whole cache, so a bucket of few rows and long prompts leaves most of the GPU idle
    (bench/decode_profile.py measures both)."""

    def __init__(self, model, attention: str = "matmul"):
        reason = unsupported(model)
        if reason:
            raise ValueError(f"the lean Gemma 3 step cannot run this model: {reason}")
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        text = model.model
        self.model = model
        self.attention = attention
        self.rotary = text.rotary_emb
        self.embed = text.embed_tokens
        self.layers = [_Layer(layer) for layer in text.layers[: model.config.num_hidden_layers]]
        self.final_norm = 1.0 + text.norm.weight.float()
        self.final_eps = text.norm.eps
        self.head = model.lm_head.weight
        self.softcap = getattr(model.config, "final_logit_softcapping", None)

    def __call__(self, token, position, masks, slot, cache) -> torch.Tensor:
        hidden = self._embed(token, cache, prefill=False)
        rope = self._rope(hidden, position)
        index = slot.view(1)
        for i, layer in enumerate(self.layers):
            hidden = self._layer(layer, hidden, rope[layer.type], masks[layer.type], index, cache.layers[i])
        return self._logits(hidden[:, -1])

    def prefill(self, ids, positions, masks, cache, rows: torch.Tensor | None = None, start: int = 0,
                cache_rows: int | None = None) -> torch.Tensor:
        """The prompts' forward: ids and positions [n, width] (left-padded), masks {layer type: bool
        [n, 1, width, >= width slots]}; writes the prompts' keys and values to cache slots
        start..start+width-1 of cache rows `rows` (None: rows 0..n-1) and returns the logits [n, vocabulary]
        of the token after the last position. A cache layer not yet allocated is allocated here for
        `cache_rows` rows (None: n) in the dtype the keys are computed in, as transformers' update does;
        its slots that no prompt writes stay zero, masked. The head runs on the last position's hidden state
        only, as one matrix product (the model's forward with logits_to_keep=1 multiplies a [n, 1, hidden]
        view, which runs as a batched matrix-vector product)."""
        width = ids.shape[1]
        hidden = self._embed(ids, cache, prefill=True)
        rope = self._rope(hidden, positions)
        for i, layer in enumerate(self.layers):
            hidden = self._layer(layer, hidden, rope[layer.type], masks[layer.type][..., :width],
                                 (rows, start, cache_rows), cache.layers[i])
        return self._logits(hidden[:, -1])

    def _embed(self, ids, cache, prefill: bool) -> torch.Tensor:
        hidden = self.embed(ids)  # [rows, tokens, hidden]: the embedding times its scale, as the model's module
        if not prefill:
            held = {cache.layers[0].keys.dtype, cache.layers[0].values.dtype}
            if held != {hidden.dtype}:  # e.g. a prefill under autocast: say so, rather than mix dtypes
                raise ValueError(f"the cache holds {' and '.join(sorted(map(str, held)))} keys and values but the "
                                 f"model computes in {hidden.dtype} (was the prefill run under autocast?)")
        return hidden

    def _rope(self, hidden, positions) -> dict:
        return {t: self.rotary(hidden, positions, t) for t in {layer.type for layer in self.layers}}

    def _logits(self, last: torch.Tensor) -> torch.Tensor:
        """The head on [rows, hidden] (contiguous: one matrix product)."""
        logits = F.linear(_norm(last.contiguous(), self.final_norm, self.final_eps), self.head)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def _layer(self, layer: _Layer, hidden, rope, mask, index, cache_layer) -> torch.Tensor:
        """One decoder layer over hidden [rows, tokens, hidden]; `index` the cache slots of those tokens."""
        rows, n, h, g, d = hidden.shape[0], hidden.shape[1], layer.heads, layer.kv_heads, layer.head_dim
        norm_in, norm_attn, norm_pre_ff, norm_post_ff, norm_q, norm_k = layer.norms
        qkv = F.linear(_norm(hidden, norm_in, layer.eps), layer.qkv)
        q = _norm(qkv[..., : h * d].view(rows, n, h, d), norm_q, layer.eps)
        k = _norm(qkv[..., h * d : (h + g) * d].view(rows, n, g, d), norm_k, layer.eps)
        cos, sin = (t.view(rows, n, 1, d) for t in rope)
        qk = _rotate(torch.cat([q, k], dim=2), cos, sin)
        q, k = qk[:, :, :h], qk[:, :, h:]
        v = qkv[..., (h + g) * d :].view(rows, n, g, d)
        if n == 1:
            cache_layer.keys.index_copy_(2, index, k.view(rows, g, 1, d))
            cache_layer.values.index_copy_(2, index, v.view(rows, g, 1, d))
            out = self._one_query(layer, q.view(rows, g, h // g, d), cache_layer.keys, cache_layer.values, mask)
        else:  # the prompt: its keys and values into the cache, attention over them as the model's SDPA path
            keys, values = k.transpose(1, 2), v.transpose(1, 2)
            _store(cache_layer, keys, values, *index)
            keys, values = (_repeat_kv(t, h // g) for t in (keys, values))
            out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask,
                                                 scale=layer.scaling).transpose(1, 2)
        hidden = hidden + _norm(F.linear(out.reshape(rows, n, h * d), layer.o), norm_attn, layer.eps)
        gate, up = F.linear(_norm(hidden, norm_pre_ff, layer.eps), layer.gate_up).split(layer.intermediate, dim=-1)
        mlp = F.linear(F.gelu(gate, approximate="tanh") * up, layer.down)
        return hidden + _norm(mlp, norm_post_ff, layer.eps)

    def _one_query(self, layer: _Layer, q, keys, values, mask) -> torch.Tensor:
        """One query token's attention; q [rows, kv heads, its query heads, d] (pack_gqa: the query heads of
        a key/value head are that head's queries), mask bool [rows, 1, 1, slots]."""
        if self.attention == "sdpa":
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=layer.scaling)
        if self.attention == "matmul_tf32":
            return _attend(q * layer.scaling, keys, values, mask)
        with _ieee_fp32_matmuls():
            return _attend(q * layer.scaling, keys, values, mask)


def _store(cache_layer, keys, values, rows: torch.Tensor | None, start: int, cache_rows: int | None) -> None:
    """Write keys/values [n, kv heads, width, d] to slots start.. of cache rows `rows` (None: the first n)."""
    if not cache_layer.is_initialized:
        shape = (cache_rows or keys.shape[0], keys.shape[1], 0, keys.shape[3])
        cache_layer.lazy_initialization(keys.new_empty(shape), values.new_empty(shape))
    end = start + keys.shape[2]
    target = slice(0, keys.shape[0]) if rows is None else rows
    cache_layer.keys[target, :, start:end] = keys
    cache_layer.values[target, :, start:end] = values


def _attend(q, keys, values, mask) -> torch.Tensor:
    """softmax(q k^T, where mask) v for q already scaled; [.., queries, d] x [.., slots, d]."""
    scores = torch.matmul(q, keys.transpose(-1, -2))
    return torch.matmul(torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1), values)


def _repeat_kv(t: torch.Tensor, groups: int) -> torch.Tensor:
    """[rows, g, slots, d] -> [rows, g * groups, slots, d], each key/value head repeated for its query heads
    (transformers' repeat_kv, which its SDPA path uses under a mask)."""
    if groups == 1:
        return t
    rows, g, slots, d = t.shape
    return t[:, :, None].expand(rows, g, groups, slots, d).reshape(rows, g * groups, slots, d)
