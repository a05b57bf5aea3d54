"""FlashAttention in Triton: softmax(q k^T / sqrt(hs)) v without ever storing the (T, T) score matrix.

What this file teaches:
- Plain attention writes a (T, T) matrix of scores per head to memory, reads it back for the softmax and
  again for the product with v. For long sequences that traffic, not the arithmetic, is the cost.
  FlashAttention (Dao et al. 2022, https://arxiv.org/abs/2205.14135) keeps a tile of queries on chip and
  streams tiles of keys and values past it, so the scores only ever exist one (BLOCK_M, BLOCK_N) tile at a
  time. FlashAttention-2 (Dao 2023, https://arxiv.org/abs/2307.08691) reorders the loops so that each
  program owns its output rows and rescales them once at the end; that is the schedule written here.
- Online softmax: softmax needs the row maximum and the row sum before it can normalise, but the keys
  arrive tile by tile. Keep a running maximum m and a running sum l; when a new tile raises the maximum,
  multiply what was accumulated so far by exp(m_old - m_new) and carry on. After the last tile,
  out = acc / l is the exact softmax-weighted sum, not an approximation.
- The forward pass saves one number per query row, the log-sum-exp of its scores (lse). The backward pass
  recomputes each score tile from q and k and turns it straight into probabilities, p = exp(s - lse),
  instead of keeping the (T, T) probabilities from the forward pass: more arithmetic, far less memory.
- Backward, in FA2's split: delta = rowsum(dO * O) first (it is rowsum(P * dP), the softmax's Jacobian
  term); then one kernel owns a tile of keys and streams the queries past it to build dK and dV, and
  another owns a tile of queries and streams the keys past it to build dQ. Each output tile has exactly
  one writer, so no atomics are needed.
- Masks cost work only where they cut a tile: tiles entirely left of the causal diagonal and inside
  the key length run unmasked; only the diagonal and last tiles pay for the comparisons, and tiles that
  are all padding are skipped.

What each tile holds (shape letters as in minimm/ops.py: B batch, nh heads, T tokens, hs head size):
  forward   q (BLOCK_M, hs), the program's queries, stays in registers; k and v (BLOCK_N, hs) stream;
            s = q k^T and p (BLOCK_M, BLOCK_N) scores and probabilities of this tile only;
            acc (BLOCK_M, hs) fp32 un-normalised output; m, l (BLOCK_M,) running max and sum.
  dK, dV    k, v (BLOCK_N, hs) stay; q and dO (BLOCK_M, hs) stream; p^T, dp^T, ds^T (BLOCK_N, BLOCK_M).
  dQ        q, dO (BLOCK_M, hs) stay; k, v (BLOCK_N, hs) stream; p, dp, ds (BLOCK_M, BLOCK_N).
Scores are kept in base 2 (s * log2(e) / sqrt(hs)) so that exp2, the fast instruction, does the softmax;
the saved lse is in the same base-2 units. A query row with no keys gets lse = +inf, so every
probability recomputed from it is exactly 0 and its output and gradients are zeros.

Inputs are made contiguous (B, nh, T, hs); fp16 and bf16 on a GPU (fp32 works too, with exact fp32
matmuls), and the CPU interpreter (TRITON_INTERPRET=1) for the tests. Any head size up to 128 works: a
tile is BLOCK_D = the next power of two wide (48 -> 64), its extra columns loaded as zeros, which leave
every dot product unchanged; 32, 64 and 128 need no padding.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

LOG2_E = 1.4426950408889634  # exp(x) = exp2(x * log2(e))
MAX_HEAD_SIZE = 128
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _configs(*tiles: tuple[int, int, int, int]) -> list[triton.Config]:
    """Autotune candidates (BLOCK_M, BLOCK_N, num_warps, num_stages) on CUDA; one small tile in the
    interpreter, where every program runs in numpy and bigger tiles only mean slower tests.
    A candidate that does not fit in shared memory (fp32 at hs = 128, say) is skipped by the autotuner,
    so each list ends with one small enough for fp32."""
    if INTERPRET:
        tiles = ((32, 32, 1, 1),)
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in tiles]


@triton.jit
def _key_range(start_m, key_len, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """Keys a query tile [start_m, start_m + BLOCK_M) must visit: [0, full_end) every query may see,
    then [full_end, end) where some (query, key) pairs are cut by the causal diagonal or the key length."""
    if CAUSAL:
        end = tl.minimum(start_m + BLOCK_M, key_len)
        full_end = tl.minimum(start_m + 1, key_len) // BLOCK_N * BLOCK_N
    else:
        end = key_len
        full_end = key_len // BLOCK_N * BLOCK_N
    return full_end, end


@triton.jit
def _tile(offs_rows, rows_ok, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Element offsets (rows, BLOCK_D) of a tile of a contiguous (.., T, hs) tensor, and its mask: the
    rows asked for and, when the tile is wider than the head size, only the real columns."""
    offs_d = tl.arange(0, BLOCK_D)
    mask = rows_ok[:, None]
    if BLOCK_D != HEAD_DIM:
        mask = mask & (offs_d < HEAD_DIM)[None, :]
    return offs_rows[:, None] * HEAD_DIM + offs_d[None, :], mask


@triton.jit
def _fwd_key_loop(acc, l_i, m_i, q, K, V, offs_m, lo, hi, key_len, qk_scale,
                  BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                  MASKED: tl.constexpr, PRECISION: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_ok = offs_n < key_len
        kv_offs, kv_mask = _tile(offs_n, key_ok, HEAD_DIM, BLOCK_D)
        k = tl.load(K + kv_offs, mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        if MASKED:
            keep = key_ok[None, :]
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= offs_n[None, :])
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])  # (BLOCK_M, BLOCK_N)
        alpha = tl.math.exp2(m_i - m_new)  # rescales what earlier tiles accumulated
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + kv_offs, mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)  # (BLOCK_M, BLOCK_D)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _query_tile_start(BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    """First query of this program's tile. Causal tiles further down cost more (they see more keys), so
    they are handed out first: the last wave of programs on the GPU is then the cheap tiles."""
    tile = tl.program_id(0)
    if CAUSAL:
        tile = tl.num_programs(0) - 1 - tile
    return tile * BLOCK_M


@triton.autotune(configs=_configs((128, 64, 8, 3), (128, 64, 4, 3), (128, 64, 8, 4), (64, 64, 4, 4),
                                  (128, 128, 8, 2), (64, 32, 4, 2)),
                 key=["HEAD_DIM", "CAUSAL"])
@triton.jit
def _attn_fwd(Q, K, V, O, LSE, LENGTHS, qk_scale, NH, T,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: BLOCK_M queries of one (batch, head). Writes O (BLOCK_M, hs) and LSE (BLOCK_M,)."""
    start_m = _query_tile_start(BLOCK_M, CAUSAL)
    bh = tl.program_id(1)
    key_len = tl.load(LENGTHS + bh // NH)
    base = bh.to(tl.int64) * T * HEAD_DIM
    offs_m = start_m + tl.arange(0, BLOCK_M)
    row_ok = offs_m < T
    q_offs, q_mask = _tile(offs_m, row_ok, HEAD_DIM, BLOCK_D)
    q = tl.load(Q + base + q_offs, mask=q_mask, other=0.0)  # (BLOCK_M, BLOCK_D)
    # A finite start for the running max: a tile whose scores are all masked (-inf) then rescales by
    # exp2(0) = 1 instead of exp2(-inf - -inf) = NaN.
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    full_end, end = _key_range(start_m, key_len, BLOCK_M, BLOCK_N, CAUSAL)
    acc, l_i, m_i = _fwd_key_loop(acc, l_i, m_i, q, K + base, V + base, offs_m, 0, full_end, key_len,
                                  qk_scale, BLOCK_N, HEAD_DIM, BLOCK_D, CAUSAL, False, PRECISION)
    acc, l_i, m_i = _fwd_key_loop(acc, l_i, m_i, q, K + base, V + base, offs_m, full_end, end, key_len,
                                  qk_scale, BLOCK_N, HEAD_DIM, BLOCK_D, CAUSAL, True, PRECISION)
    has_keys = l_i > 0.0
    l_safe = tl.where(has_keys, l_i, 1.0)
    tl.store(O + base + q_offs, (acc / l_safe[:, None]).to(O.dtype.element_ty), mask=q_mask)
    lse = tl.where(has_keys, m_i + tl.math.log2(l_safe), float("inf"))
    tl.store(LSE + bh.to(tl.int64) * T + offs_m, lse, mask=row_ok)


@triton.jit
def _attn_bwd_delta(O, DO, DELTA, T, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O): (BLOCK_M,) per program, fp32."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < T
    offs, mask = _tile(offs_m, row_ok, HEAD_DIM, BLOCK_D)
    base = tl.program_id(1).to(tl.int64) * T * HEAD_DIM
    o = tl.load(O + base + offs, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + base + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + tl.program_id(1).to(tl.int64) * T + offs_m, tl.sum(o * do, 1), mask=row_ok)


@triton.jit
def _bwd_query_loop(dk, dv, k, v, Q, DO, LSE, DELTA, offs_n, lo, hi, T, qk_scale,
                    BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    MASKED: tl.constexpr, PRECISION: tl.constexpr):
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < T
        q_offs, q_mask = _tile(offs_m, row_ok, HEAD_DIM, BLOCK_D)
        q = tl.load(Q + q_offs, mask=q_mask, other=0.0)  # (BLOCK_M, BLOCK_D)
        # Rows past T load lse = +inf, so their probabilities below are exactly 0.
        lse = tl.load(LSE + offs_m, mask=row_ok, other=float("inf"))
        p_t = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
                           - lse[None, :])  # (BLOCK_N, BLOCK_M)
        if MASKED:
            p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
        do = tl.load(DO + q_offs, mask=q_mask, other=0.0)  # (BLOCK_M, BLOCK_D)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)  # (BLOCK_N, BLOCK_D)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # (BLOCK_N, BLOCK_M)
        delta = tl.load(DELTA + offs_m, mask=row_ok, other=0.0)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)  # (BLOCK_N, BLOCK_D)
    return dk, dv


@triton.autotune(configs=_configs((32, 128, 4, 3), (32, 128, 8, 3), (64, 128, 8, 2), (32, 64, 4, 3),
                                  (64, 64, 4, 3)),
                 key=["HEAD_DIM", "CAUSAL"])
@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, LENGTHS, qk_scale, sm_scale, NH, T,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                   PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: BLOCK_N keys of one (batch, head). Writes dK and dV (BLOCK_N, hs)."""
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    key_len = tl.load(LENGTHS + bh // NH)
    base = bh.to(tl.int64) * T * HEAD_DIM
    offs_n = start_n + tl.arange(0, BLOCK_N)
    key_ok = offs_n < key_len
    kv_offs, kv_mask = _tile(offs_n, key_ok, HEAD_DIM, BLOCK_D)
    k = tl.load(K + base + kv_offs, mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
    v = tl.load(V + base + kv_offs, mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lse_row, delta_row = LSE + bh.to(tl.int64) * T, DELTA + bh.to(tl.int64) * T
    if start_n < key_len:  # a tile of padding keys has zero gradient: skip the work
        lo = 0
        if CAUSAL:  # queries before start_n cannot see these keys; the first tiles straddle the diagonal
            lo = start_n // BLOCK_M * BLOCK_M
            diag_end = (start_n + BLOCK_N + BLOCK_M - 1) // BLOCK_M * BLOCK_M
            dk, dv = _bwd_query_loop(dk, dv, k, v, Q + base, DO + base, lse_row, delta_row, offs_n, lo,
                                     diag_end, T, qk_scale, BLOCK_M, HEAD_DIM, BLOCK_D, True, PRECISION)
            lo = diag_end
        dk, dv = _bwd_query_loop(dk, dv, k, v, Q + base, DO + base, lse_row, delta_row, offs_n, lo, T,
                                 T, qk_scale, BLOCK_M, HEAD_DIM, BLOCK_D, False, PRECISION)
    # Padding keys inside the last tile were not masked in the loops (they only touch their own dK, dV
    # rows), so their gradient is zeroed here.
    dk = tl.where(key_ok[:, None], dk * sm_scale, 0.0)
    dv = tl.where(key_ok[:, None], dv, 0.0)
    out_offs, out_mask = _tile(offs_n, offs_n < T, HEAD_DIM, BLOCK_D)
    tl.store(DK + base + out_offs, dk.to(DK.dtype.element_ty), mask=out_mask)
    tl.store(DV + base + out_offs, dv.to(DV.dtype.element_ty), mask=out_mask)


@triton.jit
def _bwd_key_loop(dq, q, do, lse, delta, K, V, offs_m, lo, hi, key_len, qk_scale,
                  BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                  MASKED: tl.constexpr, PRECISION: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_ok = offs_n < key_len
        kv_offs, kv_mask = _tile(offs_n, key_ok, HEAD_DIM, BLOCK_D)
        k = tl.load(K + kv_offs, mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
        v = tl.load(V + kv_offs, mask=kv_mask, other=0.0)
        p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
                         - lse[:, None])  # (BLOCK_M, BLOCK_N)
        if MASKED:
            keep = key_ok[None, :]
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= offs_n[None, :])
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)  # (BLOCK_M, BLOCK_D)
    return dq


@triton.autotune(configs=_configs((128, 32, 4, 3), (128, 32, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3),
                                  (64, 32, 4, 3)),
                 key=["HEAD_DIM", "CAUSAL"])
@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, LENGTHS, qk_scale, sm_scale, NH, T,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: BLOCK_M queries of one (batch, head). Writes dQ (BLOCK_M, hs)."""
    start_m = _query_tile_start(BLOCK_M, CAUSAL)
    bh = tl.program_id(1)
    key_len = tl.load(LENGTHS + bh // NH)
    base = bh.to(tl.int64) * T * HEAD_DIM
    offs_m = start_m + tl.arange(0, BLOCK_M)
    row_ok = offs_m < T
    q_offs, q_mask = _tile(offs_m, row_ok, HEAD_DIM, BLOCK_D)
    q = tl.load(Q + base + q_offs, mask=q_mask, other=0.0)  # (BLOCK_M, BLOCK_D)
    do = tl.load(DO + base + q_offs, mask=q_mask, other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * T + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + bh.to(tl.int64) * T + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    full_end, end = _key_range(start_m, key_len, BLOCK_M, BLOCK_N, CAUSAL)
    dq = _bwd_key_loop(dq, q, do, lse, delta, K + base, V + base, offs_m, 0, full_end, key_len, qk_scale,
                       BLOCK_N, HEAD_DIM, BLOCK_D, CAUSAL, False, PRECISION)
    dq = _bwd_key_loop(dq, q, do, lse, delta, K + base, V + base, offs_m, full_end, end, key_len,
                       qk_scale, BLOCK_N, HEAD_DIM, BLOCK_D, CAUSAL, True, PRECISION)
    tl.store(DQ + base + q_offs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_mask)


def _tile_width(hs: int) -> int:
    """BLOCK_D: the head size rounded up to a power of two, at least 16 (the smallest tl.dot)."""
    return max(16, triton.next_power_of_2(hs))


class FlashAttention(torch.autograd.Function):
    """Autograd around the kernels. Saves q, k, v, the output and the lse (B, nh, T) for backward."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                key_lengths: torch.Tensor) -> torch.Tensor:
        B, nh, T, hs = q.shape
        o = torch.empty_like(q)
        lse = torch.empty((B, nh, T), device=q.device, dtype=torch.float32)
        precision = "ieee" if q.dtype == torch.float32 else "tf32"  # fp32 inputs: no TF32 rounding
        sm_scale = 1.0 / math.sqrt(hs)
        _attn_fwd[lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * nh)](
            q, k, v, o, lse, key_lengths, sm_scale * LOG2_E, nh, T,
            HEAD_DIM=hs, BLOCK_D=_tile_width(hs), CAUSAL=causal, PRECISION=precision)
        ctx.save_for_backward(q, k, v, o, lse, key_lengths)
        ctx.causal, ctx.precision, ctx.sm_scale = causal, precision, sm_scale
        return o

    @staticmethod
    def backward(ctx, do: torch.Tensor):
        q, k, v, o, lse, key_lengths = ctx.saved_tensors
        B, nh, T, hs = q.shape
        do = do.contiguous()
        delta = torch.empty_like(lse)
        delta_block = 16 if INTERPRET else 64
        _attn_bwd_delta[(triton.cdiv(T, delta_block), B * nh)](o, do, delta, T, HEAD_DIM=hs,
                                                                BLOCK_D=_tile_width(hs), BLOCK_M=delta_block)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        args = (ctx.sm_scale * LOG2_E, ctx.sm_scale, nh, T)
        flags = dict(HEAD_DIM=hs, BLOCK_D=_tile_width(hs), CAUSAL=ctx.causal, PRECISION=ctx.precision)
        _attn_bwd_dkdv[lambda meta: (triton.cdiv(T, meta["BLOCK_N"]), B * nh)](
            q, k, v, do, lse, delta, dk, dv, key_lengths, *args, **flags)
        _attn_bwd_dq[lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * nh)](
            q, k, v, do, lse, delta, dq, key_lengths, *args, **flags)
        return dq, dk, dv, None, None


def triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                     key_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(hs)) v. q, k, v: (B, nh, T, hs) -> (B, nh, T, hs), differentiable in q, k, v.

    causal: query i sees keys 0 .. i. key_lengths: (B,) number of real keys per batch row; keys at or
    beyond it are padding, and a row with no keys returns zeros. hs: any size up to MAX_HEAD_SIZE.
    """
    B, nh, T, hs = q.shape
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share one shape (B, nh, T, hs); got {q.shape}, {k.shape}, {v.shape}")
    if not 1 <= hs <= MAX_HEAD_SIZE:
        raise ValueError(f"head size {hs} not supported: at most {MAX_HEAD_SIZE}")
    if not q.dtype == k.dtype == v.dtype or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q, k, v must share one dtype among fp16, bf16, fp32; got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}")
    if key_lengths is None:
        lengths = torch.full((B,), T, device=q.device, dtype=torch.int32)
    else:
        lengths = key_lengths.to(device=q.device, dtype=torch.int32).clamp(0, T)
    return FlashAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), causal, lengths)
