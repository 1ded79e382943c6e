"""The text decoder of a Qwen2-family Video-LLM, as every decoding forward runs it.

Both families' language models are Qwen2 decoders: LLaVA-OneVision's is Qwen2 itself, and
Qwen2.5-VL's is Qwen2 with M-RoPE, whose three position axes are equal for generated text, so a
plain rotation at that position is the same thing. The prompt forward stays on the HF modules
(video splicing, 3-D positions); decoding forwards run here, on the same weights, packed so that
q/k/v and gate/up are one matmul each. The forward has fixed shapes, builds its mask and
positions on the device and never waits on the host, so a whole draft loop or verify forward is
captured as one CUDA graph. It launches about 15 kernels a layer where HF's modules launch about
40, which at draft-model sizes is most of a step's time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lvspec import parallel
from lvspec.adapter import text_config
from lvspec.attention import available, rotate_and_store, split_attention
from lvspec.cache import StaticCache
from lvspec.relevance import RelevanceProbe


@dataclass
class _Layer:
    norm_in: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    norm_post: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor


def _local(param: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter (the parameter itself unless it is a sharded DTensor)."""
    return param.to_local() if hasattr(param, "to_local") else param.data


def _pack(owners: list[tuple[torch.nn.Module, str]]) -> torch.Tensor:
    """One tensor holding the named parameters end to end (this rank's parts of sharded ones); each
    parameter becomes a view of its part, so the HF modules compute exactly as before and no second
    copy of the weights exists."""
    parts = [_local(getattr(module, name)) for module, name in owners]
    packed = torch.cat(parts)
    start = 0
    for (module, name), part in zip(owners, parts):
        view, param = packed[start:start + part.shape[0]], getattr(module, name)
        if hasattr(param, "to_local"):  # a DTensor: same layout, local part now a view
            from torch.distributed.tensor import DTensor

            module._parameters[name] = torch.nn.Parameter(DTensor.from_local(
                view, param.device_mesh, param.placements, run_check=False, shape=param.shape,
                stride=param.stride()), requires_grad=False)
        else:
            param.data = view
        start += part.shape[0]
    return packed


def _check_supported(cfg) -> None:
    rope = getattr(cfg, "rope_parameters", None) or {"rope_type": "default", "rope_theta": cfg.rope_theta}
    problems = []
    if rope.get("rope_type", "default") != "default":
        problems.append(f"rope_type {rope.get('rope_type')!r}")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {cfg.hidden_act!r}")
    if any(t != "full_attention" for t in getattr(cfg, "layer_types", None) or []) or getattr(cfg, "use_sliding_window", False):
        problems.append("sliding-window attention")
    if problems:
        raise ValueError(f"lvspec decodes Qwen2-style text decoders; this model has {', '.join(problems)}")


def packed_layers(model) -> list[_Layer]:
    """The language model's layers with packed q/k/v and gate/up weights (packed once per model)."""
    if getattr(model, "_lvspec_layers", None) is None:
        layers = []
        with torch.no_grad():
            for layer in model.model.language_model.layers:
                attn, mlp = layer.self_attn, layer.mlp
                projections = [attn.q_proj, attn.k_proj, attn.v_proj]
                biased = all(p.bias is not None for p in projections)
                layers.append(_Layer(
                    norm_in=_local(layer.input_layernorm.weight),
                    qkv=_pack([(p, "weight") for p in projections]),
                    qkv_bias=_pack([(p, "bias") for p in projections]) if biased else None,
                    o=_local(attn.o_proj.weight), norm_post=_local(layer.post_attention_layernorm.weight),
                    gate_up=_pack([(mlp.gate_proj, "weight"), (mlp.up_proj, "weight")]),
                    down=_local(mlp.down_proj.weight)))
        model._lvspec_layers = layers
    return model._lvspec_layers


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """RoPE in HF's half-split convention: x*cos + rotate_half(x)*sin, where rotate_half(x) is x
    rolled by half a head with the first half negated (folded into `sin_signed`)."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin_signed)


def eager_rotate_and_store(qkv: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor, row: torch.Tensor,
                           at: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """`attention.rotate_and_store` as eager ops (the masked paths'): RoPE on queries and keys, each
    token's key and value written at [row, :, at], the rotated queries [N, heads, hd] returned."""
    kvh = k.shape[1]
    qk = _rotate(qkv[:, : heads + kvh], cos, sin_signed)
    k[row, :, at] = qk[:, heads:]
    v[row, :, at] = qkv[:, heads + kvh:]
    return qk[:, :heads]


ATTENTION = ("matmul", "sdpa", "sdpa_gqa", "split")


def attention_paths(device: torch.device) -> tuple[str, ...]:
    """The attention paths a decoder can run on `device` ("split" needs Triton: CUDA)."""
    return tuple(m for m in ATTENTION if m != "split" or (device.type == "cuda" and available(device)))


class TextDecoder:
    """Decoding forwards of one model over a `StaticCache`.

    Attention runs one of four ways, chosen per forward size ("step": 1-2 tokens, "verify":
    more) by `attention` (the engine times them on each new state; None: a default rule):
    "matmul" (scores, softmax, product: batched GEMMs parallel over the whole cache), "sdpa"
    (the fused kernel with the query group folded into the query length: each kv head read
    once), "sdpa_gqa" (the fused kernel with its own grouped-query support: more blocks in flight,
    which long caches at larger batches need), all three over the whole capacity through a mask;
    "split" (`attention.split_attention`: each row's band of keys only, cut into stretches read
    in parallel, the relevance probe's video mass summed in the same pass).
    """

    def __init__(self, model, vocab: int):
        cfg = text_config(model)
        _check_supported(cfg)
        lm = model.model.language_model
        self.tp = parallel.of(model)  # sharded over ranks: this rank's heads and MLP columns
        world = self.tp.world if self.tp else 1
        self.layers = packed_layers(model)
        self.embed, self.norm = _local(lm.embed_tokens.weight), _local(lm.norm.weight)
        self.head = _local(model.lm_head.weight)[:vocab]  # ids past `vocab` are padding rows of larger embeddings
        self.eps = cfg.rms_norm_eps
        self.hidden = cfg.hidden_size
        self.heads, self.kv_heads = cfg.num_attention_heads // world, cfg.num_key_value_heads // world
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scale = self.head_dim ** -0.5
        self.attention: dict[str, str | None] = {"step": None, "verify": None}
        theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        # As HF computes it: float32 on the host, then moved.
        self.inv_freq = (1.0 / theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float) / self.head_dim)).to(self.device)

    @property
    def device(self):
        return self.embed.device

    @property
    def dtype(self):
        return self.embed.dtype

    def new_cache(self, slots: int, capacity: int) -> StaticCache:
        return StaticCache(len(self.layers), slots, self.kv_heads, capacity, self.head_dim, self.dtype, self.device)

    def weight_bytes(self) -> int:
        """Bytes of weights one decoding forward reads (embedding rows aside)."""
        tensors = [self.norm, self.head] + [t for layer in self.layers for t in vars(layer).values() if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def _residual(self, x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x + h @ weight.T over x's [N, H] tokens: one fused GEMM, or under tensor parallelism the sum
        over ranks of each rank's part (its heads / MLP columns) added once."""
        if self.tp is None:
            return torch.addmm(x, h, weight.t())
        return x + self.tp.reduce(torch.mm(h, weight.t()))

    def forward(self, cache: StaticCache, tokens: torch.Tensor, last_only: bool = False,
                probe: RelevanceProbe | None = None, logits: bool = True,
                live: torch.Tensor | None = None, pack: torch.Tensor | None = None) -> torch.Tensor | None:
        """Run `tokens` [S, q] at each slot's `length` (writing their keys, not committing them);
        returns logits [S, q, V] (or [S, 1, V] with `last_only`; None without `logits`: keys only).
        `live` ([S] bool): the slots whose results are used; on the "split" path the others read no
        keys (their results, and their keys past the first layer, are then meaningless).
        `pack` ([N] long, `packed_tokens`): run the weights over only these of the S * q tokens (flat
        index s * q + j; S * q: a filler, whose keys go to the caches' last slot, which no row reads);
        attention still sees the [S, q] layout; the logits are then [N, V], in pack's order."""
        S, q = tokens.shape
        nh, kvh, hd, H = self.heads, self.kv_heads, self.head_dim, self.hidden
        group = nh // kvh
        dt, dev = self.dtype, tokens.device
        slot = cache.length[:, None] + torch.arange(q, device=dev)  # [S, q] cache slots of the new tokens
        position = (slot + cache.offset[:, None]).flatten()  # [S * q]
        row, at = torch.arange(S * q, device=dev) // q, slot.flatten()  # where each token's keys go
        if pack is not None:
            filler = pack >= S * q
            index = pack.clamp(max=S * q - 1)
            row = torch.where(filler, 0, row[index])
            at = torch.where(filler, cache.capacity - 1, at[index])
            position = position[index]
        angle = position.float()[:, None] * self.inv_freq  # [N, hd/2]
        cos = torch.cat([angle.cos(), angle.cos()], -1).to(dt)[:, None]  # [N, 1, hd]
        sin = torch.cat([-angle.sin(), angle.sin()], -1).to(dt)[:, None]
        mode = self.attention["step" if q <= 2 else "verify"] or ("matmul" if S * kvh < 32 else "sdpa")
        if mode != "split":  # the masked paths: every slot's band as a bias over the whole capacity
            keys = torch.arange(cache.capacity, device=dev)
            visible = (keys >= cache.pad[:, None, None]) & (keys <= slot[..., None])  # [S, q, capacity]
            bias = torch.zeros(visible.shape, dtype=dt, device=dev).masked_fill_(~visible, -math.inf)[:, None]
            if mode != "sdpa_gqa" or probe is not None:
                # The query group folded into the query length: each kv head's keys are read once for
                # all of its query heads. Folded row g * q + j is query j of group head g.
                folded = bias.expand(S, group, q, cache.capacity).reshape(S, 1, group * q, cache.capacity)

        x = F.embedding(tokens.flatten() if pack is None else tokens.flatten()[index], self.embed)  # [N, H]
        for i, layer in enumerate(self.layers):
            h = F.rms_norm(x, (H,), layer.norm_in, self.eps)
            qkv = F.linear(h, layer.qkv, layer.qkv_bias).view(-1, nh + 2 * kvh, hd)
            store = rotate_and_store if mode == "split" else eager_rotate_and_store  # split: one kernel
            query = store(qkv, cos, sin, row, at, cache.k[i], cache.v[i], nh)
            query = (query if pack is None else unpacked(query, pack, S * q)).view(S, q, nh, hd)
            probed = probe is not None and i in probe.layers
            if mode == "split":
                out, mass = split_attention(query, cache.k[i], cache.v[i], cache.pad, cache.length,
                                            self.scale, probe.video_keys if probed else None, live=live)
                if probed:
                    probe.add_mass(i, mass)
                out = out.view(S * q, nh * hd)
            elif mode == "sdpa_gqa" and not probed:
                out = F.scaled_dot_product_attention(query.transpose(1, 2), cache.k[i], cache.v[i],
                                                     attn_mask=bias, scale=self.scale, enable_gqa=True)
                out = out.transpose(1, 2).reshape(S * q, nh * hd)
            else:
                query = query.reshape(S, q, kvh, group, hd).permute(0, 2, 3, 1, 4).reshape(S, kvh, group * q, hd)
                if probed or mode == "matmul":
                    scores = torch.matmul(query, cache.k[i].transpose(-1, -2)).mul_(self.scale).add_(folded)
                    probs = scores.softmax(-1, dtype=torch.promote_types(dt, torch.float32))
                    if probed:
                        probe.add(i, probs, group, q)
                    out = torch.matmul(probs.to(dt), cache.v[i])
                else:
                    out = F.scaled_dot_product_attention(query, cache.k[i], cache.v[i], attn_mask=folded, scale=self.scale)
                out = out.view(S, kvh, group, q, hd).permute(0, 3, 1, 2, 4).reshape(S * q, nh * hd)
            if pack is not None:
                out = out[index]  # a filler reads some row: its result is dropped
            x = self._residual(x, out, layer.o)
            gate, up = F.linear(F.rms_norm(x, (H,), layer.norm_post, self.eps), layer.gate_up).chunk(2, -1)
            x = self._residual(x, F.silu(gate) * up, layer.down)
        if not logits:
            return None
        if pack is not None:  # the head over the packed tokens only: logits [N, V], in pack's order
            return F.linear(F.rms_norm(x, (H,), self.norm, self.eps), self.head)
        x = x.view(S, q, H)
        if last_only:
            x = x[:, -1:]
        return F.linear(F.rms_norm(x, (H,), self.norm, self.eps), self.head)


def unpacked(x: torch.Tensor, pack: torch.Tensor, n: int) -> torch.Tensor:
    """Packed rows of `x` back at their flat indices among `n` (zeros elsewhere; fillers dropped)."""
    out = x.new_zeros(n + 1, *x.shape[1:]).index_copy_(0, pack, x)
    return out[:n]


def packed_tokens(want: torch.Tensor, width: int) -> torch.Tensor:
    """The flat indices ([width] long) of the True entries of `want` [S, q], in order, then fillers
    (S * q) up to `width`; on the device, no host sync (the host knows how many are True and picks
    `width` >= that: `packed_width`)."""
    flat = want.flatten()
    n = flat.numel()
    order = flat.long().cumsum(0) - 1
    dest = torch.where(flat & (order < width), order, width)  # the rest goes to a dropped last entry
    pack = torch.full((width + 1,), n, dtype=torch.long, device=want.device)
    return pack.scatter_(0, dest, torch.arange(n, device=want.device))[:width]


def packed_width(tokens: int, full: int) -> int | None:
    """How many tokens a packed forward runs for `tokens` wanted of `full`: rounded up to a
    granule of about an eighth of its power of two (at least 8), so that a few CUDA graphs serve a
    batch's cycles; None where packing would not run fewer than `full`."""
    granule = max(8, 1 << max(tokens.bit_length() - 4, 0))
    width = -(-max(tokens, 1) // granule) * granule
    return width if width < full else None
