"""Decode attention over the static cache: a split-KV (flash-decoding) Triton kernel.

A decoding forward has few queries a row (1 to k_max + 1 new tokens) and many keys (a video
prompt's 1-5k), so its attention is a read of the cache, and its speed is the share of HBM
bandwidth that read reaches. Each program takes one (row, kv head, stretch of keys) and folds the
kv head's query heads times the row's new tokens into one block of query rows, so every key is read
once for all of them (grouped-query attention), and it reads only the row's band: key i is visible
to new token j when pad <= i <= length + j. Stretches of one row are merged by a second kernel
(their softmax maxima and sums), which writes the output in the layout the output projection reads.

The same pass can sum each query's attention on the row's video keys (`video`: the relevance
probe), so a probed layer needs no score matrix either. Runs on CUDA, or anywhere with
TRITON_INTERPRET=1 (Triton's interpreter: what the CPU tests use, float32 only).
"""

from __future__ import annotations

import functools
import math
import os
import types

import torch

BLOCK_N = 64  # keys a program reads per step
MAX_SPLITS = 16


def available(device: torch.device) -> bool:
    """Whether `split_attention` can run on `device` (CUDA with Triton, or Triton's interpreter)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return device.type == "cuda" or _interpreting()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def splits_for(rows: int, kv_heads: int, capacity: int, sms: int) -> int:
    """How many stretches each row's keys are cut into: enough programs for several per SM
    (a program reads its stretch in sequence, so bandwidth needs many in flight), each stretch at
    least one block of keys."""
    want = -(-4 * sms // (rows * kv_heads))
    return max(1, min(want, -(-capacity // BLOCK_N), MAX_SPLITS))


def split_attention(query: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pad: torch.Tensor,
                    length: torch.Tensor, scale: float, video: torch.Tensor | None = None,
                    live: torch.Tensor | None = None, splits: int | None = None, block_n: int = BLOCK_N,
                    stages: int = 2, warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of the new tokens' queries over a layer's cache.

    query [S, q, heads, hd] (any strides but the last), keys and values [S, kv_heads, capacity, hd];
    new token j of row s sees keys pad[s] <= i <= length[s] + j. Returns the output [S, q, heads, hd]
    and, with `video` ([S, capacity] bool: the row's video keys), each head's attention mass on them
    [S, heads, q] (float32), else None. `live` ([S] bool): rows whose output is wanted; the others
    read no keys and get zeros (a slot that is not decoding, a row past its own draft length).
    `splits`: stretches a row's keys are cut into (None: `splits_for`); `block_n`, `stages`,
    `warps`: the kernel's launch configuration (bench.attention sweeps them)."""
    S, q, heads, hd = query.shape
    kvh, capacity = k.shape[1], k.shape[2]
    group = heads // kvh
    block_m = max(16, 1 << (group * q - 1).bit_length())
    if splits is None:
        sms = _sms(query.device.index or 0) if query.device.type == "cuda" else 8
        splits = splits_for(S, kvh, capacity, sms)
    stretch = -(-capacity // splits)
    stretch = -(-stretch // block_n) * block_n  # whole blocks of keys
    splits = -(-capacity // stretch)
    dev = query.device
    out = torch.empty(S, q, heads, hd, dtype=query.dtype, device=dev)
    probe = video is not None
    mass = torch.empty(S, heads, q, dtype=torch.float32, device=dev) if probe else None
    # Tensors a launch does not read stand in for the ones it has no use for (no PROBE, LIVE, SPLITS).
    vid = video.view(torch.uint8) if probe else pad
    alive = live.view(torch.uint8) if live is not None else pad
    mass_out = mass if probe else out
    if splits > 1:  # each stretch's partial result: its softmax maximum, sum and weighted values
        part = (S, kvh, splits, block_m)
        acc = torch.empty(*part, hd, dtype=torch.float32, device=dev)
        top, total = (torch.empty(part, dtype=torch.float32, device=dev) for _ in range(2))
        vmass = torch.empty(part, dtype=torch.float32, device=dev) if probe else total
    else:
        acc = top = total = vmass = out
    kernels = _kernels(_interpreting())
    ieee = query.dtype == torch.float32  # float32 models (toy, tests): no tf32 rounding in the products
    qs, ks, vs = query.stride(), k.stride(), v.stride()
    kernels.attend[(S, kvh, splits)](
        query, k, v, pad, length, vid, alive, out, acc, top, total, vmass, mass_out,
        qs[0], qs[1], qs[2], ks[0], ks[1], ks[2], vs[0], vs[1], vs[2], vid.stride(0),
        out.stride(0), out.stride(1), out.stride(2), q, group, capacity, stretch, scale * math.log2(math.e),
        BLOCK_M=block_m, BLOCK_N=block_n, D=hd, SPLITS=splits, PROBE=probe, IEEE=ieee, LIVE=live is not None,
        num_warps=warps or (8 if block_m >= 128 else 4), num_stages=stages)
    if splits > 1:
        merge_m = 16
        kernels.merge[(S, kvh, block_m // merge_m)](
            acc, top, total, vmass, out, mass_out, out.stride(0), out.stride(1), out.stride(2), q, group,
            SPLITS=splits, BLOCK_M=block_m, MERGE_M=merge_m, D=hd, PROBE=probe, num_warps=4)
    return out, mass


def rotate_and_store(qkv: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor, row: torch.Tensor,
                     at: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """One kernel for what a layer does between its qkv projection and its attention: RoPE on the
    queries and keys (HF's half-split convention, `decoder._rotate`, rounded as it rounds), each
    token's key and value written into the caches at [row, :, at], the rotated queries returned.

    qkv [N, heads + 2 * kv_heads, hd] (the projection's output; any strides but the last), cos and
    sin_signed [N, 1, hd] (sin with its first half negated), row and at [N] long, k and v
    [S, kv_heads, capacity, hd]. Returns the queries [N, heads, hd]. Where eager PyTorch runs
    about seven kernels (two products, the roll, two indexed writes and their copies), a decoding
    step's tokens are too few for any of them to reach the bandwidth they need: their launches are
    the cost."""
    N, width, hd = qkv.shape
    kvh = k.shape[1]
    assert width == heads + 2 * kvh and hd % 2 == 0, (qkv.shape, heads, kvh)
    query = torch.empty(N, heads, hd, dtype=qkv.dtype, device=qkv.device)
    if N == 0:
        return query
    kernels = _kernels(_interpreting())
    cos, sin_signed = cos.reshape(N, hd), sin_signed.reshape(N, hd)
    kernels.rotate_store[(N,)](
        qkv, cos, sin_signed, row, at, query, k, v, qkv.stride(0), qkv.stride(1), cos.stride(0), sin_signed.stride(0),
        query.stride(0), query.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        heads, kvh, HALF=hd // 2, BLOCK_H=_pow2(heads + kvh), BLOCK_V=_pow2(kvh),
        ROUND=qkv.dtype != torch.float32, num_warps=4)
    return query


def _pow2(n: int) -> int:
    """The least power of two >= n (a Triton block's size)."""
    return 1 << max(n - 1, 0).bit_length()


@functools.cache
def _kernels(interpret: bool):
    """The jitted kernels (built on first use: Triton decides at decoration whether it interprets)."""
    del interpret  # the cache key: a test may switch the interpreter on after another built the kernels
    import triton
    import triton.language as tl

    @triton.jit
    def attend(Q, K, V, Pad, Length, Video, Live, Out, Acc, Top, Total, VMass, Mass,
               sq_s, sq_j, sq_h, sk_s, sk_h, sk_n, sv_s, sv_h, sv_n, s_vid, so_s, so_j, so_h,
               q_len, group, capacity, stretch, scale_log2,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr,
               PROBE: tl.constexpr, IEEE: tl.constexpr, LIVE: tl.constexpr):
        s, h, part = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        r = tl.arange(0, BLOCK_M)
        d = tl.arange(0, D)
        g, j = r // q_len, r % q_len  # folded query row r: new token j of the kv head's query head g
        real = r < group * q_len
        head = h * group + g
        start = tl.load(Length + s)
        pad = tl.load(Pad + s)
        query = tl.load(Q + s * sq_s + j[:, None] * sq_j + head[:, None] * sq_h + d[None, :], mask=real[:, None], other=0.0)
        lo = tl.maximum(pad, part * stretch)
        hi = tl.minimum(tl.minimum(start + q_len, (part + 1) * stretch), capacity)
        if LIVE:
            hi = tl.where(tl.load(Live + s) != 0, hi, lo)  # a row not wanted reads nothing
        last = start + j  # the newest key each query row sees: its own
        top = tl.full([BLOCK_M], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_M], tl.float32)
        vmass = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        for n0 in range(lo, hi, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            inside = n < hi
            key = tl.load(K + s * sk_s + h * sk_h + n[:, None] * sk_n + d[None, :], mask=inside[:, None], other=0.0)
            if IEEE:
                score = tl.dot(query, tl.trans(key), input_precision="ieee")
            else:
                score = tl.dot(query, tl.trans(key))
            score = tl.where((n[None, :] <= last[:, None]) & inside[None, :], score * scale_log2, float("-inf"))
            new_top = tl.maximum(top, tl.max(score, 1))
            safe = tl.where(new_top == float("-inf"), 0.0, new_top)
            p = tl.exp2(score - safe[:, None])
            alpha = tl.exp2(top - safe)
            total = total * alpha + tl.sum(p, 1)
            if PROBE:
                on_video = tl.load(Video + s * s_vid + n, mask=inside, other=0).to(tl.float32)
                vmass = vmass * alpha + tl.sum(p * on_video[None, :], 1)
            value = tl.load(V + s * sv_s + h * sv_h + n[:, None] * sv_n + d[None, :], mask=inside[:, None], other=0.0)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(value.dtype), value, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(value.dtype), value)
            top = new_top
        if SPLITS == 1:
            norm = tl.where(total > 0, total, 1.0)
            tl.store(Out + s * so_s + j[:, None] * so_j + head[:, None] * so_h + d[None, :],
                     (acc / norm[:, None]).to(Out.dtype.element_ty), mask=real[:, None])
            if PROBE:
                tl.store(Mass + (s * group * tl.num_programs(1) + head) * q_len + j, vmass / norm, mask=real)
        else:
            at = ((s * tl.num_programs(1) + h) * SPLITS + part) * BLOCK_M + r
            tl.store(Top + at, top)
            tl.store(Total + at, total)
            if PROBE:
                tl.store(VMass + at, vmass)
            tl.store(Acc + at[:, None] * D + d[None, :], acc)

    @triton.jit
    def merge(Acc, Top, Total, VMass, Out, Mass, so_s, so_j, so_h, q_len, group,
              SPLITS: tl.constexpr, BLOCK_M: tl.constexpr, MERGE_M: tl.constexpr, D: tl.constexpr,
              PROBE: tl.constexpr):
        s, h, chunk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        r = chunk * MERGE_M + tl.arange(0, MERGE_M)
        d = tl.arange(0, D)
        g, j = r // q_len, r % q_len
        real = r < group * q_len
        head = h * group + g
        top = tl.full([MERGE_M], float("-inf"), tl.float32)
        total = tl.zeros([MERGE_M], tl.float32)
        vmass = tl.zeros([MERGE_M], tl.float32)
        acc = tl.zeros([MERGE_M, D], tl.float32)
        for part in tl.static_range(SPLITS):
            at = ((s * tl.num_programs(1) + h) * SPLITS + part) * BLOCK_M + r
            t = tl.load(Top + at)
            new_top = tl.maximum(top, t)
            safe = tl.where(new_top == float("-inf"), 0.0, new_top)
            alpha, beta = tl.exp2(top - safe), tl.exp2(t - safe)
            total = total * alpha + tl.load(Total + at) * beta
            if PROBE:
                vmass = vmass * alpha + tl.load(VMass + at) * beta
            acc = acc * alpha[:, None] + tl.load(Acc + at[:, None] * D + d[None, :]) * beta[:, None]
            top = new_top
        norm = tl.where(total > 0, total, 1.0)
        tl.store(Out + s * so_s + j[:, None] * so_j + head[:, None] * so_h + d[None, :],
                 (acc / norm[:, None]).to(Out.dtype.element_ty), mask=real[:, None])
        if PROBE:
            tl.store(Mass + (s * group * tl.num_programs(1) + head) * q_len + j, vmass / norm, mask=real)

    @triton.jit
    def rotate_store(QKV, Cos, Sin, Row, At, Query, K, V, s_n, s_h, sc_n, ss_n, sq_n, sq_h, sk_s, sk_h, sk_n,
                     sv_s, sv_h, sv_n, heads, kv_heads,
                     HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_V: tl.constexpr, ROUND: tl.constexpr):
        n = tl.program_id(0)
        h = tl.arange(0, BLOCK_H)  # the query heads, then the key heads: the rotated ones
        d = tl.arange(0, HALF)
        rotated = h < heads + kv_heads
        src = QKV + n * s_n + h[:, None] * s_h + d[None, :]
        lo = tl.load(src, mask=rotated[:, None], other=0.0).to(tl.float32)
        hi = tl.load(src + HALF, mask=rotated[:, None], other=0.0).to(tl.float32)
        c_lo = tl.load(Cos + n * sc_n + d).to(tl.float32)[None, :]
        c_hi = tl.load(Cos + n * sc_n + HALF + d).to(tl.float32)[None, :]
        s_lo = tl.load(Sin + n * ss_n + d).to(tl.float32)[None, :]
        s_hi = tl.load(Sin + n * ss_n + HALF + d).to(tl.float32)[None, :]
        # torch.addcmul(x * cos, roll(x), sin): the product x * cos rounded to x's dtype first, then
        # the sum in float32, rounded once (a half-precision product of two halves is exact in float32)
        a_lo, a_hi = lo * c_lo, hi * c_hi
        if ROUND:
            a_lo = a_lo.to(Query.dtype.element_ty).to(tl.float32)
            a_hi = a_hi.to(Query.dtype.element_ty).to(tl.float32)
        out_lo = (a_lo + hi * s_lo).to(Query.dtype.element_ty)  # rotate_half: the first half takes -x_hi
        out_hi = (a_hi + lo * s_hi).to(Query.dtype.element_ty)
        is_q = h < heads
        q_at = Query + n * sq_n + h[:, None] * sq_h + d[None, :]
        tl.store(q_at, out_lo, mask=is_q[:, None])
        tl.store(q_at + HALF, out_hi, mask=is_q[:, None])
        row, slot = tl.load(Row + n), tl.load(At + n)
        is_k = rotated & (h >= heads)
        k_at = K + row * sk_s + (h - heads)[:, None] * sk_h + slot * sk_n + d[None, :]
        tl.store(k_at, out_lo, mask=is_k[:, None])
        tl.store(k_at + HALF, out_hi, mask=is_k[:, None])
        g = tl.arange(0, BLOCK_V)
        e = tl.arange(0, 2 * HALF)
        is_v = g < kv_heads
        value = tl.load(QKV + n * s_n + (heads + kv_heads + g)[:, None] * s_h + e[None, :], mask=is_v[:, None])
        tl.store(V + row * sv_s + g[:, None] * sv_h + slot * sv_n + e[None, :], value, mask=is_v[:, None])

    return types.SimpleNamespace(attend=attend, merge=merge, rotate_store=rotate_store)
