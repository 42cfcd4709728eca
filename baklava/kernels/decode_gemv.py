"""Skinny matmuls of the one-token decode step, with the RMSNorm before and the residual add after
folded in (Triton).

At decode time a projection multiplies a few rows (the batch) by a large weight: the time is the
weight's bytes, and what a launch adds around them (the norm before it, the SiLU or the residual
add after it: a launch each, a few microseconds with the gaps between them) is pure overhead. One
kernel family covers the four projections of a decoder layer::

    x ─┬─ sum of squares (partials, from the kernel that wrote x) ─┐
       └──────────────────────────────────────────────────────────┴─▶ RMSNorm(x) @ W^T (+ b)
                                                                      [+ SiLU(gate) * up]
    a @ W^T + residual ─▶ y, y's partial sums of squares (one row per program)

* a *norm prologue* normalises each ``BLOCK_K`` slice of ``x`` as it is loaded, with the row's
  ``rsqrt(mean(x^2) + eps)`` from partial sums of squares that the kernel which wrote ``x`` left
  behind (summed in a fixed order: the result does not depend on scheduling);
* an *epilogue* adds the bias, or the residual (``y = residual + round(a @ W^T)``, rounded as
  eager PyTorch rounds), writing the partial sums of squares of ``y`` for the next norm, or, for
  the concatenated ``[gate; up]`` weight, writes ``SiLU(x Wg^T) * (x Wu^T)``.

Each program owns ``BLOCK_N`` output columns for ``BLOCK_M`` rows and streams its weight rows once
(``tl.dot`` on 16-row tiles: the batch is padded to 16 in registers, not in memory). Measured on an
H100 at batch 8 on Llama-3-8B shapes, this beat cuBLAS plus the separate launches on every
projection (BENCHMARKS.md, decode step).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from baklava.kernels.launch import dependent_launch

PLAIN, RESIDUAL, SILU_GATE = 0, 1, 2  # epilogues
_PLAIN, _RESIDUAL, _SILU_GATE = tl.constexpr(PLAIN), tl.constexpr(RESIDUAL), tl.constexpr(SILU_GATE)


@triton.jit
def _gemv_kernel(
    X, W, BIAS, NORM_W, SS_IN, R, Y, SS_OUT,
    M, N, K, n_ss, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SS_PAD: tl.constexpr,
    NORM: tl.constexpr, EPI: tl.constexpr, HAS_BIAS: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)  # row blocks first: programs launched together share a weight tile
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    if PDL:  # launched before the previous kernel ended: wait for it before touching memory
        tl.extra.cuda.gdc_wait()
    if NORM:  # the row's RMS from the writer's partial sums of squares [n_ss, M], in a fixed order
        s = tl.arange(0, SS_PAD)
        part = tl.load(
            SS_IN + s[:, None] * M + rm[None, :], mask=(s < n_ss)[:, None] & m_ok[None, :], other=0.0
        )
        inv = tl.rsqrt(tl.sum(part, 0) / K + eps)  # [BLOCK_M]
    w_rows = W + rn[:, None].to(tl.int64) * K
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        x = tl.load(X + rm[:, None] * K + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if NORM:  # transformers' RMSNorm: normalise in float32, cast, then scale by the weight
            normed = (x.to(tl.float32) * inv[:, None]).to(x.dtype)
            nw = tl.load(NORM_W + kk, mask=k_ok, other=0.0)
            x = (nw[None, :].to(tl.float32) * normed.to(tl.float32)).to(x.dtype)
        w_ok = n_ok[:, None] & k_ok[None, :]
        w = tl.load(w_rows + kk[None, :], mask=w_ok, other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        if EPI == _SILU_GATE:  # the up rows sit N rows below the gate rows
            u = tl.load(w_rows + N * K + kk[None, :], mask=w_ok, other=0.0)
            acc_up = tl.dot(x, tl.trans(u), acc_up, input_precision="ieee")
    out_ok = m_ok[:, None] & n_ok[None, :]
    out = rm[:, None] * N + rn[None, :]
    dtype = Y.dtype.element_ty
    if EPI == _PLAIN:
        if HAS_BIAS:
            acc += tl.load(BIAS + rn, mask=n_ok, other=0.0)[None, :].to(tl.float32)
        tl.store(Y + out, acc.to(dtype), mask=out_ok)
    elif EPI == _RESIDUAL:  # eager: the projection rounds, then the residual add rounds
        res = tl.load(R + out, mask=out_ok, other=0.0)
        y = (res.to(tl.float32) + acc.to(dtype).to(tl.float32)).to(dtype)
        tl.store(Y + out, y, mask=out_ok)
        yf = tl.where(out_ok, y.to(tl.float32), 0.0)
        tl.store(SS_OUT + pid_n * M + rm, tl.sum(yf * yf, 1), mask=m_ok)
    else:  # eager: gate and up round, SiLU rounds, the product rounds
        g = acc.to(dtype).to(tl.float32)
        act = (g * tl.sigmoid(g)).to(dtype)
        tl.store(Y + out, (act.to(tl.float32) * acc_up.to(dtype).to(tl.float32)).to(dtype), mask=out_ok)


@triton.jit
def _sum_squares_kernel(X, SS, n, BLOCK: tl.constexpr, PDL: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    if PDL:
        tl.extra.cuda.gdc_wait()
    x = tl.load(X + row * n + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(SS + row, tl.sum(x * x, 0))


def _blocks(rows: int, cols: int, inner: int, prologue: bool) -> tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, BLOCK_K, num_stages)`` for ``rows x inner @ inner x cols``.

    From sweeps on the H100 at batch 8 (BENCHMARKS.md). With a norm prologue (the q/k/v and the
    gate/up projections) 64 columns, 256-wide K slices and 3 stages: the normalising arithmetic
    on each loaded slice stalls a deeper pipeline of narrower slices (33 us against 22 us for the
    q/k/v projection). Without (o and down): 32 columns, 128-wide slices (256 for rows of 8k and
    more), 5 stages. Fewer stages for larger batches (shared memory).
    """
    block_m = 16 if rows <= 16 else 32 if rows <= 32 else 64
    narrow = max(16, triton.next_power_of_2(inner))
    if prologue:
        block_n = 64 if cols >= 4096 else 32 if cols >= 1024 else 16
        return block_m, block_n, min(256, narrow), 3 if block_m == 16 else 2
    block_n = 32 if cols >= 2048 else 16
    return block_m, block_n, min(256 if inner >= 8192 else 128, narrow), 5 if block_m == 16 else 3


def _launch(x, weight, y, *, epi, bias=None, norm=None, residual=None) -> torch.Tensor | None:
    """Run ``_gemv_kernel`` into ``y``; with the residual epilogue, returns the partial sums of
    squares it wrote (``[programs along N, B]``, sized by the same grid)."""
    rows, inner = x.shape
    cols = y.shape[1]
    assert x.is_contiguous() and weight.is_contiguous() and weight.shape[-1] == inner
    block_m, block_n, block_k, stages = _blocks(rows, cols, inner, norm is not None)
    if norm is not None:
        norm_weight, ss_in, eps = norm
        n_ss = ss_in.shape[0]
    else:
        norm_weight, ss_in, eps, n_ss = weight, weight, 0.0, 1
    grid = (triton.cdiv(rows, block_m), triton.cdiv(cols, block_n))
    ss_out = torch.empty(grid[1], rows, dtype=torch.float32, device=x.device) if epi == RESIDUAL else None
    pdl = dependent_launch(x.device)
    _gemv_kernel[grid](
        x, weight, bias if bias is not None else weight, norm_weight, ss_in,
        residual if residual is not None else y, y, ss_out if ss_out is not None else y,
        rows, cols, inner, n_ss, eps,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SS_PAD=max(2, triton.next_power_of_2(n_ss)),
        NORM=norm is not None, EPI=epi, HAS_BIAS=bias is not None, PDL=pdl,
        num_warps=4, num_stages=stages, launch_pdl=pdl,
    )  # fmt: skip
    return ss_out


def sum_squares(x: torch.Tensor) -> torch.Tensor:
    """``[1, B]`` float32 sums of squares of ``x [B, n]``'s rows (for a norm with no writer's partials)."""
    rows, n = x.shape
    ss = torch.empty(1, rows, dtype=torch.float32, device=x.device)
    pdl = dependent_launch(x.device)
    _sum_squares_kernel[(rows,)](x, ss, n, BLOCK=triton.next_power_of_2(n), PDL=pdl, launch_pdl=pdl)
    return ss


def norm_linear(x, ss, norm_weight, eps: float, weight, bias=None) -> torch.Tensor:
    """``RMSNorm(x) @ weight^T (+ bias)`` of ``x [B, K]``; ``ss [P, B]`` partial sums of ``x^2``."""
    y = x.new_empty(x.shape[0], weight.shape[0])
    _launch(x, weight, y, epi=PLAIN, bias=bias, norm=(norm_weight, ss, eps))
    return y


def norm_linear_silu(x, ss, norm_weight, eps: float, gate_up) -> torch.Tensor:
    """``SiLU(h Wg^T) * (h Wu^T)`` with ``h = RMSNorm(x)``, ``gate_up = [Wg; Wu] [2 I, K]``."""
    y = x.new_empty(x.shape[0], gate_up.shape[0] // 2)
    _launch(x, gate_up, y, epi=SILU_GATE, norm=(norm_weight, ss, eps))
    return y


def linear_residual(a, weight, residual) -> tuple[torch.Tensor, torch.Tensor]:
    """``(residual + a @ weight^T, its partial sums of squares [P, B])``; ``residual [B, N]``."""
    y = torch.empty_like(residual)
    return y, _launch(a, weight, y, epi=RESIDUAL, residual=residual.contiguous())
