"""SGEMM in OpenCL C: C = alpha * op(A) @ op(B) + beta * D + bias, batched, any sizes.

The idea (Volkov & Demmel 2008, https://doi.org/10.1109/SC.2008.5214359; the CLBlast tuner taught the
parameter names, https://arxiv.org/abs/1705.05249):
- A work-group owns a TS_M x TS_N tile of C. For each slice of TS_K columns of A (rows of B) it copies the
  two sub-tiles into local memory once, then every work-item reads them many times: global traffic falls
  by the tile size. Edges are padded with zeros while copying, so any M, N, K works.
- Register blocking: a work-item keeps an RM x (RN * VW) block of C in registers and, for each k, loads RM
  values of A and RN vectors of B to do RM * RN vector FMAs. Loads per FMA fall by the block size.
- op(A) = A^T and op(B) = B^T are build-time flags (TRANS_A, TRANS_B): only the copy into local memory
  changes, and it reads global memory along the contiguous axis in both cases.
- The same source serves GPUs and CPUs with different defines. On a GPU a 16x16 work-group computes a
  64x64 tile, one 4x4 block per work-item (the classic layout). On a CPU (PoCL) work-items are iterations
  of a loop that the compiler writes around the kernel, and any value that lives across a barrier is
  spilled to memory per work-item; so there a work-group is one work-item that walks its whole tile
  (up to 128 x 256) in 4 x 64 blocks of float16 vectors (AVX-512), and the local tiles double as the
  packed, aligned panels of a CPU BLAS. This takes PoCL from ~3 GFLOP/s (the GPU layout) to 30-60 GFLOP/s
  on two cores. (PoCL does not inline vload/fma builtins, so the kernel uses plain vector arithmetic.)
- Batches (attention's B * nh heads) are the third grid dimension, each with its own offset stride.
- A linear layer's forward with at most 4 rows (generation: one token per sequence) skips the tiles:
  `gemv_rows` reads each weight row once, which is all a matrix-vector product can do.

Layout: row-major. op(A) is M x K, op(B) is K x N, C and D are M x N with row stride ldc; bias is (N,).
"""
from __future__ import annotations

import functools

from minimm.opencl.runtime import Device

SOURCE = r"""
#define CAT2(a, b) a##b
#define CAT(a, b) CAT2(a, b)
#if VW == 1
#define floatV float
#else
#define floatV CAT(float, VW)
#endif
#define SUB_M (TS_M / WG_M)   /* rows of C per work-item */
#define SUB_N (TS_N / WG_N)   /* columns of C per work-item */
#define NV (SUB_N / VW)       /* vectors of C per work-item row */

#if TRANS_A   /* A is stored K x M; keep the local tile k-major so the copy reads along m */
#define A_AT(m, k) A[(k) * lda + (m)]
#define AS(m, k) As[(k) * (TS_M + PAD) + (m)]
#else
#define A_AT(m, k) A[(m) * lda + (k)]
#define AS(m, k) As[(m) * (TS_K + PAD) + (k)]
#endif
#if TRANS_B   /* B is stored N x K */
#define B_AT(k, n) B[(n) * ldb + (k)]
#else
#define B_AT(k, n) B[(k) * ldb + (n)]
#endif

__kernel __attribute__((reqd_work_group_size(WG_N, WG_M, 1)))
void sgemm(const int M, const int N, const int K, const float alpha, const float beta,
           __global const float* restrict A, const int offA, const int lda, const int strideA,
           __global const float* restrict B, const int offB, const int ldb, const int strideB,
           __global float* C, const int offC, const int ldc, const int strideC,
           __global const float* D, __global const float* bias)
{
    __local float As[(TS_M + PAD) * (TS_K + PAD)];
    __local floatV Bv[TS_K * TS_N / VW];  /* declared as vectors so that vector reads are aligned */
    __local float* Bs = (__local float*)Bv;
    const int tn = get_local_id(0), tm = get_local_id(1);
    const int row0 = get_group_id(1) * TS_M, col0 = get_group_id(0) * TS_N;
    const int batch = get_group_id(2);
    A += offA + batch * strideA;
    B += offB + batch * strideB;
    C += offC + batch * strideC;
    if (D) D += offC + batch * strideC;

    /* work-item's rows: i * WG_M + tm; its vectors of columns: (j * WG_N + tn) * VW. Interleaving the
       work-items this way keeps a GPU's local-memory reads free of bank conflicts. */
    float acc[SUB_M][SUB_N];
    for (int i = 0; i < SUB_M; i++)
        for (int j = 0; j < SUB_N; j++) acc[i][j] = 0.0f;

    for (int k0 = 0; k0 < K; k0 += TS_K) {
        const bool inside_a = row0 + TS_M <= M && k0 + TS_K <= K;  /* no bounds checks needed */
        const bool inside_b = col0 + TS_N <= N && k0 + TS_K <= K;
        /* copy the tiles, walking global memory along its contiguous axis in the inner loop */
#if TRANS_A
        for (int kk = tm; kk < TS_K; kk += WG_M)
            for (int mm = tn; mm < TS_M; mm += WG_N) {
#else
        for (int mm = tm; mm < TS_M; mm += WG_M)
            for (int kk = tn; kk < TS_K; kk += WG_N) {
#endif
                const int m = row0 + mm, k = k0 + kk;
                AS(mm, kk) = (inside_a || (m < M && k < K)) ? A_AT(m, k) : 0.0f;
            }
#if TRANS_B && BLOCKED_TRANSPOSE
        /* a CPU transposes 16 columns at a time, k outer and n inner: the 16 rows of B being read stay
           in cache, and the writes are contiguous (twice as fast as a row at a time) */
        for (int n0 = 0; n0 < TS_N; n0 += 16)
            for (int kk = tm; kk < TS_K; kk += WG_M)
                for (int nn = n0 + tn; nn < n0 + 16; nn += WG_N) {
#elif TRANS_B
        for (int nn = tm; nn < TS_N; nn += WG_M)
            for (int kk = tn; kk < TS_K; kk += WG_N) {
#else
        for (int kk = tm; kk < TS_K; kk += WG_M)
            for (int nn = tn; nn < TS_N; nn += WG_N) {
#endif
                const int n = col0 + nn, k = k0 + kk;
                Bs[kk * TS_N + nn] = (inside_b || (n < N && k < K)) ? B_AT(k, n) : 0.0f;
            }
        barrier(CLK_LOCAL_MEM_FENCE);

        for (int bj = 0; bj < NV; bj += RN) {  /* a block's RN vectors of B stay in L1 over all bi */
            for (int bi = 0; bi < SUB_M; bi += RM) {
                floatV r[RM][RN];  /* the register block */
                _Pragma("unroll") for (int i = 0; i < RM; i++)
                    _Pragma("unroll") for (int j = 0; j < RN; j++) r[i][j] = (floatV)(0.0f);
                for (int kk = 0; kk < TS_K; kk++) {
                    floatV b[RN];
                    _Pragma("unroll") for (int j = 0; j < RN; j++)
                        b[j] = Bv[kk * (TS_N / VW) + (bj + j) * WG_N + tn];
                    _Pragma("unroll") for (int i = 0; i < RM; i++) {
                        const float a = AS((bi + i) * WG_M + tm, kk);
                        _Pragma("unroll") for (int j = 0; j < RN; j++) r[i][j] += a * b[j];
                    }
                }
                _Pragma("unroll") for (int i = 0; i < RM; i++)
                    _Pragma("unroll") for (int j = 0; j < RN; j++) {
#if VW == 1
                        acc[bi + i][bj + j] += r[i][j];
#else
                        *(floatV*)&acc[bi + i][(bj + j) * VW] += r[i][j];
#endif
                    }
            }
        }
        barrier(CLK_LOCAL_MEM_FENCE);
    }

    for (int i = 0; i < SUB_M; i++) {
        const int m = row0 + i * WG_M + tm;
        if (m >= M) break;
        for (int j = 0; j < SUB_N; j++) {
            const int n = col0 + ((j / VW) * WG_N + tn) * VW + j % VW;
            if (n >= N) continue;
            float value = alpha * acc[i][j];
            if (beta != 0.0f) value += beta * D[m * ldc + n];
            if (bias) value += bias[n];
            C[m * ldc + n] = value;
        }
    }
}

/* The same contract for a few rows of C with op(B) = B^T (a linear layer during generation): one
   work-item per column n reads its row of B once, along k, with no tiles to fill. */
__kernel void gemv_rows(const int M, const int N, const int K, const float alpha, const float beta,
                        __global const float* restrict A, const int offA, const int lda,
                        __global const float* restrict B, const int offB, const int ldb,
                        __global float* C, const int offC, const int ldc,
                        __global const float* D, __global const float* bias)
{
    const int n = get_global_id(0);
    if (n >= N) return;
    __global const float* b = B + offB + n * ldb;
    for (int m = 0; m < M; m++) {
        __global const float* a = A + offA + m * lda;
        float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;  /* four sums in flight, not one chain */
        int k = 0;
        for (; k + 4 <= K; k += 4) {
            s0 += a[k] * b[k];
            s1 += a[k + 1] * b[k + 1];
            s2 += a[k + 2] * b[k + 2];
            s3 += a[k + 3] * b[k + 3];
        }
        for (; k < K; k++) s0 += a[k] * b[k];
        float value = alpha * ((s0 + s1) + (s2 + s3));
        if (beta != 0.0f) value += beta * D[offC + m * ldc + n];
        if (bias) value += bias[n];
        C[offC + m * ldc + n] = value;
    }
}
"""

GEMV_MAX_ROWS = 4  # up to this many rows of C, a linear layer's forward uses gemv_rows


@functools.lru_cache(maxsize=None)
def tile_config(device: Device, M: int, N: int) -> dict[str, int]:
    """Build-time tile sizes for this device and an M x N result (see the module docstring)."""
    if not device.is_cpu:
        return dict(TS_M=64, TS_N=64, TS_K=16, WG_M=16, WG_N=16, RM=4, RN=4, VW=1, PAD=1, BLOCKED_TRANSPOSE=0)
    vw = 16 if device.vector_width >= 16 else 8  # AVX-512 or AVX2 registers
    cpu = dict(TS_K=64, WG_M=1, WG_N=1, RN=4, VW=vw, PAD=0, BLOCKED_TRANSPOSE=1)
    if M <= 4:  # one row per sequence (generation): a tall tile would compute 64 rows to keep 1
        rows = 1 if M == 1 else 2 if M == 2 else 4
        return dict(TS_M=rows, TS_N=8 * vw, RM=rows, **cpu)
    # Bigger tiles copy less per multiply-add (the copy into local memory is scalar work), but leave
    # fewer work-groups and more padding on small problems.
    big = M >= 512 and N >= 512
    return dict(TS_M=128 if big else 64, TS_N=(16 if big else 8) * vw, RM=4, **cpu)


def sgemm(device: Device, M: int, N: int, K: int, A, B, C, *, trans_a: bool = False, trans_b: bool = False,
          alpha: float = 1.0, beta: float = 0.0, D=None, bias=None, lda: int | None = None,
          ldb: int | None = None, ldc: int | None = None, offsets: tuple[int, int, int] = (0, 0, 0),
          batch: int = 1, strides: tuple[int, int, int] = (0, 0, 0)) -> None:
    """C = alpha * op(A) @ op(B) + beta * D + bias on `batch` independent problems.

    A, B, C, D, bias: device buffers of float32. op(A): (M, K), op(B): (K, N), C and D: (M, N).
    lda, ldb, ldc: row strides in elements (default: packed). offsets: first element of A, B, C (and D);
    strides: elements between consecutive batches of A, B, C (and D). D defaults to C (accumulate).
    """
    if M <= 0 or N <= 0:
        return
    lda = lda if lda is not None else (M if trans_a else K)
    ldb = ldb if ldb is not None else (K if trans_b else N)
    ldc = ldc if ldc is not None else N
    if beta != 0.0 and D is None:
        D = C
    if M <= GEMV_MAX_ROWS and trans_b and not trans_a and batch == 1:
        device.launch(device.kernel(SOURCE, "gemv_rows", **tile_config(device, 1, 1)), (N,), (64,),
                      M, N, K, alpha, beta, A, offsets[0], lda, B, offsets[1], ldb, C, offsets[2], ldc, D, bias)
        return
    config = tile_config(device, min(M, 512), min(N, 512))  # the choice only looks below 512
    kernel = device.kernel(SOURCE, "sgemm", TRANS_A=int(trans_a), TRANS_B=int(trans_b), **config)
    groups_n = -(-N // config["TS_N"])
    groups_m = -(-M // config["TS_M"])
    device.launch(kernel, (groups_n * config["WG_N"], groups_m * config["WG_M"], batch),
                  (config["WG_N"], config["WG_M"], 1),
                  M, N, K, alpha, beta, A, offsets[0], lda, strides[0], B, offsets[1], ldb, strides[1],
                  C, offsets[2], ldc, strides[2], D, bias)
