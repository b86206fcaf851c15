"""PEFT's LoRA adapters computed with fewer, larger kernels, and in the base's compute dtype
(train.lora_compute_dtype, train.fuse_lora; applied by table2text.model.lora.build_model).

PEFT computes each adapted linear as base(x) + B(A(dropout(x))) * scale, every one on its own, with the
adapter weights in fp32 and the bf16 input cast up to fp32: on an H200 profile of the NF4 step the ~3,200
fp32 adapter matmuls (SIMT sgemm, split-K reductions) a step cost more than the bf16 base matmuls. Here:

* lora_compute_dtype: the adapter's matmuls run in that dtype (bf16 when the base computes in bf16): the
  fp32 master weights are cast to it on each pass (a few kB), so the optimiser still updates fp32 weights;
  autograd takes their gradients back through the cast (dA = cast_fp32(dA_bf16)).
* one addmm adds the adapter to the base output: out = base + scale * u @ B^T, the scale and the add in
  the matmul's epilogue instead of two more kernels.
* fuse_lora: q/k/v of an attention module and gate/up of an MLP are one group: their frozen base weights
  are one concatenated matrix (built once; the modules' own weights become views into it, so no memory is
  added), their A matrices one matmul (with dropout: one batched matmul over the independently dropped
  inputs), their B matrices one block-diagonal matmul. The outputs are split back as the model expects.

What stays PEFT's: the modules, their parameter names and state dict (save_adapter, checkpoints, resume
and the merge stage see the same adapter), and the function computed. Dropout masks are drawn from the
same RNG stream with the same probability, independently per module as PEFT does, but in one call per
group, so they are not PEFT's masks draw for draw. tests/test_fused_lora.py checks fused = PEFT (forward,
gradients, dropout off and in eval mode), the bf16 path against fp32, and unchanged state-dict keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from table2text.model.nf4 import DequantizedLinear

# The projections that read the same input, fused per module class name (Gemma 3's).
GROUPS = {"Gemma3Attention": ("q_proj", "k_proj", "v_proj"), "Gemma3MLP": ("gate_proj", "up_proj")}


def lora_parts(module):
    """(A weight, B weight, scale, dropout module) of a PEFT LoRA Linear holding one plain adapter; None for
    anything else (not LoRA, several adapters, DoRA or other variants, LoRA bias, fan_in_fan_out)."""
    from peft.tuners.lora import Linear as LoraLinear

    if not isinstance(module, LoraLinear) or list(module.lora_A.keys()) != ["default"]:
        return None
    if module.lora_variant or module.lora_bias.get("default") or module.fan_in_fan_out:
        return None
    return (module.lora_A["default"].weight, module.lora_B["default"].weight, module.scaling["default"],
            module.lora_dropout["default"])


def _dropout_p(dropout: torch.nn.Module) -> float:
    return float(dropout.p) if isinstance(dropout, torch.nn.Dropout) else 0.0  # peft: Identity when 0


def add_lora(base: torch.Tensor, x: torch.Tensor, lora_a: list, lora_b: list, scale: float, p: float,
             training: bool, dtype: torch.dtype) -> torch.Tensor:
    """base + scale * [B_1 A_1 drop_1(x), ..., B_G A_G drop_G(x)] (concatenated along the features), for
    2-D x (tokens, in) and base (tokens, sum of out_i); the adapter's matmuls in `dtype`, the result in
    base's dtype (as PEFT: the sum in the wider dtype, then cast back)."""
    xa = x.to(dtype)
    a = [w.to(dtype) for w in lora_a]
    if training and p > 0 and len(a) > 1:
        # one independent mask per module (as PEFT's separate Dropout modules), in one call: the expanded
        # (G, tokens, in) input gets an output, and a mask, of its own per slice
        dropped = F.dropout(xa.expand(len(a), *xa.shape), p, True)
        u = torch.bmm(dropped, torch.stack(a).transpose(1, 2))  # (G, tokens, r)
        u = u.transpose(0, 1).reshape(xa.shape[0], -1)  # (tokens, G r): module i's r columns at i r
    else:
        u = F.linear(F.dropout(xa, p, training), torch.cat(a) if len(a) > 1 else a[0])
    b = torch.block_diag(*[w.to(dtype) for w in lora_b]) if len(lora_b) > 1 else lora_b[0].to(dtype)
    # the add in the wider of the two dtypes, as PEFT's base + adapter promotes (bf16 and bf16: all bf16)
    wide = torch.promote_types(base.dtype, dtype)
    return torch.addmm(base.to(wide), u.to(wide), b.to(wide).t(), alpha=scale).to(base.dtype)


class ComputeDtypeLoraLinear:
    """Mixed into a PEFT LoRA Linear's class (see apply): its forward in `lora_compute_dtype`, the
    scale-and-add in the B matmul. Disabled or merged adapters keep PEFT's own forward."""

    lora_compute_dtype = torch.float32

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters or self.merged or args or kwargs:
            return super().forward(x, *args, **kwargs)
        a, b, scale, dropout = lora_parts(self)
        base = self.base_layer(x)
        out = add_lora(base.reshape(-1, base.shape[-1]), x.reshape(-1, x.shape[-1]), [a], [b], scale,
                       _dropout_p(dropout), dropout.training, self.lora_compute_dtype)
        return out.reshape(base.shape)


class FusedGroup:
    """The projections `names` of a module, computed together: x -> (their outputs, split). It holds no
    tensor: the adapters and the fused weight are read from the module at each call, through module
    attributes, so that torch.compile sees them as the module's parameters and buffers (trainable
    parameters reached through a plain object could be taken for constants)."""

    def __init__(self, owner: torch.nn.Module, names: tuple[str, ...], dtype: torch.dtype):
        self.names, self.dtype = names, dtype
        bases = [getattr(owner, n).base_layer for n in names]
        self.sizes = [b.out_features for b in bases]
        # One frozen weight; each module's own weight becomes a view of it (the same values, no copy kept)
        weight = torch.cat([b.weight.detach() for b in bases])
        start = 0
        for b, n in zip(bases, self.sizes):
            b.weight = torch.nn.Parameter(weight[start:start + n], requires_grad=False)
            start += n
        self.weight_name = f"fused_{'_'.join(names)}_weight"
        owner.register_buffer(self.weight_name, weight, persistent=False)

    def active(self, owner: torch.nn.Module) -> bool:
        """False while PEFT's own forward must run (adapters disabled or merged into the base)."""
        return not any(getattr(owner, n).disable_adapters or getattr(owner, n).merged for n in self.names)

    def __call__(self, owner: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        parts = [lora_parts(getattr(owner, n)) for n in self.names]
        weight = getattr(owner, self.weight_name)
        x2 = x.reshape(-1, x.shape[-1])
        # the base as DequantizedLinear / nn.Linear computes it: input in the weight's dtype, back after
        base = F.linear(x2.to(weight.dtype), weight).to(x.dtype)
        _, _, scale, dropout = parts[0]  # the same for all (fusable)
        out = add_lora(base, x2, [p[0] for p in parts], [p[1] for p in parts], scale, _dropout_p(dropout),
                       dropout.training, self.dtype)
        return [t.reshape(*x.shape[:-1], t.shape[-1]) for t in out.split(self.sizes, dim=-1)]


def fusable(owner: torch.nn.Module, names: tuple[str, ...]) -> bool:
    """Every projection of the group a plain-weight linear (bf16 base or NF4 held dequantised) under a
    plain LoRA adapter with the same scale and dropout: what FusedGroup can concatenate."""
    layers = [getattr(owner, n, None) for n in names]
    parts = [lora_parts(m) if m is not None else None for m in layers]
    if any(p is None for p in parts):
        return False
    bases = [m.base_layer for m in layers]
    # exact types: bitsandbytes' Linear4bit is an nn.Linear too, but its weight is packed NF4
    if any(type(b) not in (torch.nn.Linear, DequantizedLinear) or b.bias is not None for b in bases):
        return False
    same = {(p[2], _dropout_p(p[3]), p[0].shape[0]) for p in parts}
    return len(same) == 1 and len({b.weight.dtype for b in bases}) == 1


class FusedAttention:
    """Mixed into Gemma3Attention's class: its forward (transformers 5.24) with q/k/v from one FusedGroup."""

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        from transformers.models.gemma3 import modeling_gemma3 as g3

        if not self.fused_group.active(self):
            return super().forward(hidden_states, position_embeddings, attention_mask, cache=cache, **kwargs)
        hidden_shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        q, k, v = (t.reshape(hidden_shape).transpose(1, 2) for t in self.fused_group(self, hidden_states))
        q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = position_embeddings
        q, k = g3.apply_rotary_pos_emb(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
        attention = g3.ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                             g3.eager_attention_forward)
        out, weights = attention(self, q, k, v, attention_mask,
                                 dropout=self.attention_dropout if self.training else 0.0,
                                 scaling=self.scaling, sliding_window=self.sliding_window, **kwargs)
        out = out.reshape(*hidden_states.shape[:-1], -1).contiguous()
        return self.o_proj(out), weights


class FusedMLP:
    """Mixed into Gemma3MLP's class: its forward with gate/up from one FusedGroup."""

    def forward(self, x):
        if not self.fused_group.active(self):
            return super().forward(x)
        gate, up = self.fused_group(self, x)
        return self.down_proj(self.act_fn(gate) * up)


MIXINS = {"Gemma3Attention": FusedAttention, "Gemma3MLP": FusedMLP}


def _swap_class(module: torch.nn.Module, mixin: type, attrs: dict | None = None) -> None:
    """module.__class__ = (mixin, its class) with `attrs`: the mixin's forward first, super() its own.
    One class per (class, mixin, attrs), so the modules of a layer type share theirs (one compilation)."""
    cls = type(module)
    key = (cls, mixin, tuple(sorted((attrs or {}).items(), key=lambda kv: kv[0])))
    if key not in _CLASSES:
        _CLASSES[key] = type(f"{mixin.__name__}{cls.__name__}", (mixin, cls), {"__module__": __name__, **(attrs or {})})
    module.__class__ = _CLASSES[key]


_CLASSES: dict = {}


def apply(model: torch.nn.Module, compute_dtype: torch.dtype, fuse: bool) -> dict:
    """Give the LoRA linears of `model` (a PEFT model) the forwards above; returns counts:
    {"fused_groups": groups fused, "unfused_groups": groups left as separate modules (not all projections
    adapted, or a base without a plain weight), "linears": LoRA linears computed in compute_dtype}."""
    counts = {"fused_groups": 0, "unfused_groups": 0, "linears": 0}
    if fuse:
        for module in list(model.modules()):
            names = GROUPS.get(type(module).__name__)
            if names is None:
                continue
            if not fusable(module, names):
                counts["unfused_groups"] += 1
                continue
            kind = type(module).__name__
            module.fused_group = FusedGroup(module, names, compute_dtype)
            _swap_class(module, MIXINS[kind])
            counts["fused_groups"] += 1
    for module in list(model.modules()):
        if lora_parts(module) is not None:
            _swap_class(module, ComputeDtypeLoraLinear, {"lora_compute_dtype": compute_dtype})
            counts["linears"] += 1
    return counts
