"""Fused SparseGPT column block for CUDA (Triton): one launch per column block of a layer, no host syncs.

Within a block of B columns the OBS recursion couples columns but never rows: every output row's
updates depend only on that row. So each program owns a tile of rows, keeps the block [B, ROWS] in
registers, and walks its B columns sequentially: no per-column kernel launches, no host syncs.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _obs_block_kernel(
    W, U, Q, E, MASK, thresh_ptr,
    rows, width, ldu,
    B: tl.constexpr, ROWS: tl.constexpr, N: tl.constexpr, M: tl.constexpr, STRUCTURED: tl.constexpr,
):
    # W, Q, E, MASK: [width, rows] (our transposed layout, rows contiguous); U: the block's [B, B] corner.
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    c = tl.arange(0, B)
    valid = (c[:, None] < width) & (r[None, :] < rows)
    offs = c[:, None] * rows + r[None, :]
    tile = tl.load(W + offs, mask=valid, other=0.0)
    d = tl.load(U + c * ldu + c, mask=c < width, other=1.0)
    inv_d2 = 1.0 / (d * d)
    if STRUCTURED:
        pruned = tl.zeros([B, ROWS], dtype=tl.int1)
    else:
        thresh = tl.load(thresh_ptr)
        pruned = ((tile * tile * inv_d2[:, None]) <= thresh) & valid
    q_tile = tl.zeros([B, ROWS], dtype=tl.float32)
    e_tile = tl.zeros([B, ROWS], dtype=tl.float32)
    # Walk all B columns (B is a constexpr) and mask the ones past `width`: Triton's interpreter cannot
    # take a runtime argument as a loop bound, and a padded column changes nothing (its error is 0).
    for i in range(0, B):
        if STRUCTURED:
            if i % M == 0:
                scores = tile * tile * inv_d2[:, None]
                for j in tl.static_range(M):
                    s_j = tl.sum(tl.where(c[:, None] == i + j, scores, 0.0), axis=0)
                    rank = tl.zeros([ROWS], dtype=tl.int32)
                    for k in tl.static_range(M):
                        s_k = tl.sum(tl.where(c[:, None] == i + k, scores, 0.0), axis=0)
                        if k < j:
                            rank += (s_k <= s_j).to(tl.int32)
                        elif k > j:
                            rank += (s_k < s_j).to(tl.int32)
                    pruned = pruned | ((c[:, None] == i + j) & (rank < N)[None, :])
        here = c[:, None] == i
        w = tl.sum(tl.where(here, tile, 0.0), axis=0)
        m = tl.sum(tl.where(here & pruned, 1, 0), axis=0) > 0
        q = tl.where(m, 0.0, w)
        d_i = tl.load(U + i * ldu + i, mask=i < width, other=1.0)
        err = (w - q) / d_i
        u = tl.load(U + i * ldu + c, mask=(c >= i) & (c < width), other=0.0)
        tile = tile - u[:, None] * err[None, :]
        q_tile = tl.where(here, q[None, :], q_tile)
        e_tile = tl.where(here, err[None, :], e_tile)
    tl.store(Q + offs, q_tile, mask=valid)
    tl.store(E + offs, e_tile, mask=valid)
    tl.store(MASK + offs, pruned.to(tl.int8), mask=valid)


def obs_block(W1: torch.Tensor, U1: torch.Tensor, d: torch.Tensor, sparsity: float, n: int, m: int,
              rows_per_program: int = 16):
    """One column block, W1 [width, rows] fp32 (transposed layout): returns (Q1, Err1, mask1).

    Same contract as sparsegpt._obs_block_torch; m == 0 means unstructured at `sparsity`.
    """
    width, rows = W1.shape
    Q1 = torch.empty_like(W1)
    E1 = torch.empty_like(W1)
    mask1 = torch.empty(width, rows, dtype=torch.int8, device=W1.device)
    if m or sparsity == 0:
        thresh = torch.full((1,), -1.0, device=W1.device)  # nothing passes a negative threshold
    else:
        scores = (W1 ** 2 / d.reshape(-1, 1) ** 2).flatten()
        thresh = torch.kthvalue(scores, int(scores.numel() * sparsity) + 1).values.reshape(1)
    U1 = U1.contiguous()
    grid = (triton.cdiv(rows, rows_per_program),)
    _obs_block_kernel[grid](W1.contiguous(), U1, Q1, E1, mask1, thresh, rows, width, U1.stride(0),
                            B=triton.next_power_of_2(width), ROWS=rows_per_program, N=n, M=max(m, 1),
                            STRUCTURED=bool(m))
    return Q1, E1, mask1.bool()
