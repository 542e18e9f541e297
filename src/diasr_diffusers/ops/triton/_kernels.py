"""Triton kernels for subject-bucketed attention (forward, backward). Imported lazily: needs ``triton``.

Notation (all kernels): B batch, H heads, Lq queries, Lk keys laid out ``[shared | seg 0 | ... | seg N-1]``, D head
dim (padded to the power of two ``BLOCK_D``). Queries are visited in *bucket-sorted* order through an index array
``Order`` (B, Lq): position ``i`` of the sorted order is original query ``Order[b, i]`` with bucket ``QB[b, i]``
(non-decreasing in ``i``). Nothing is physically permuted: q/dO/O/LSE are gathered and scattered through ``Order``.

A query tile of ``BLOCK_M`` consecutive sorted queries therefore covers a run of buckets ``bmin..bmax``, whose private
segments are contiguous in the key layout; the host precomputes that key range ``[BlkLo, BlkHi)`` per tile. Every
query sees every shared key (no mask there except the tail), and inside ``[BlkLo, BlkHi)`` a key is visible iff its
segment id ``KSeg[j]`` equals the query's bucket: the mask only bites in the few tiles straddling two buckets.

Shared and segment keys go through one online softmax, so the result is exact without any LSE merge. Logits are
``z = scale * q.k (+ bias on own-segment keys)``; kernels work in base 2 (``z * log2(e)``) and store the natural LSE.
A row with no visible key gets ``out = 0`` and ``LSE = +inf`` so that the backward's ``exp(z - LSE)`` is 0 there.

``UPCAST``: load q/k/v/dO as fp32 and use fp32 dots. Needed under ``TRITON_INTERPRET=1`` (bf16 arithmetic and bf16
``tl.dot`` are wrong in the interpreter) and used for fp32 inputs, where ``IEEE`` also disables TF32.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E: tl.constexpr = 1.4426950408889634
LN2: tl.constexpr = 0.6931471805599453


@triton.jit
def _attend_range(
    acc, m_i, l_i, q, qb, bias2, K, V, KSeg, kv_base_k, kv_base_v, stride_kn, stride_vn, offs_d, d_valid,
    lo, hi, qk_scale,
    SEGMENT: tl.constexpr, MASK_N: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Online-softmax update of (acc, m_i, l_i) (M, D), (M,), (M,) with keys ``[lo, hi)``; q (M, D), qb (M,) buckets,
    bias2 (M,) = bias * log2(e). Shared keys (``SEGMENT=False``) are visible to all rows; segment keys only to the
    rows whose bucket is their segment id, and carry the row's bias. ``MASK_N=False``: ``[lo, hi)`` is made of
    whole tiles of shared keys, so no key mask at all (the bulk of the work)."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < hi
        kt_ptrs = K + kv_base_k + offs_n[None, :] * stride_kn + offs_d[:, None]  # (D, N)
        v_ptrs = V + kv_base_v + offs_n[:, None] * stride_vn + offs_d[None, :]  # (N, D)
        if MASK_N:
            kt = tl.load(kt_ptrs, mask=n_valid[None, :] & d_valid[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=n_valid[:, None] & d_valid[None, :], other=0.0)
        else:
            kt = tl.load(kt_ptrs, mask=d_valid[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=d_valid[None, :], other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
            v = v.to(tl.float32)
        if IEEE:
            s = tl.dot(q, kt, input_precision="ieee") * qk_scale
        else:
            s = tl.dot(q, kt) * qk_scale  # (M, N), log2 units
        if SEGMENT:
            kseg = tl.load(KSeg + offs_n, mask=n_valid, other=-3)
            if HAS_BIAS:
                s += bias2[:, None]
            s = tl.where(qb[:, None] == kseg[None, :], s, float("-inf"))
        elif MASK_N:
            s = tl.where(n_valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no visible key yet keeps m = -inf; shift by 0 there to avoid inf - inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _fwd_kernel(
    Q, K, V, Bias, Order, QB, KSeg, BlkLo, BlkHi, Out, LSE,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_om, stride_oh,
    stride_bb,
    H, Lq, shared, num_m_blocks, qk_scale, D,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, SHARED_DONE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid ``(cdiv(Lq, BLOCK_M), B * H)``. Q (B, Lq, H, D), K/V (B, Lk, H, D), Bias (B, Lq), Order/QB (B, Lq),
    KSeg (Lk,), BlkLo/BlkHi (B, num_m_blocks), Out (B, Lq, H, D), LSE (B, H, Lq) fp32.

    ``SHARED_DONE``: Out/LSE already hold attention over the shared keys alone (from a faster dense kernel); this
    kernel only continues with the segment keys, in place (each row is read and written by one program)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # int64: b * stride_b overflows int32 beyond 2**31 elements
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_valid = offs_m < Lq
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < D
    rows = tl.load(Order + b * Lq + offs_m, mask=m_valid, other=0)
    qb = tl.load(QB + b * Lq + offs_m, mask=m_valid, other=-2)  # -2 matches no key
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + offs_d[None, :],
                mask=m_valid[:, None] & d_valid[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    bias2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_BIAS:
        bias2 = tl.load(Bias + b * stride_bb + rows, mask=m_valid, other=0.0).to(tl.float32) * LOG2E

    kv_base_k = b * stride_kb + h * stride_kh
    kv_base_v = b * stride_vb + h * stride_vh
    out_ptrs = Out + b * stride_ob + h * stride_oh + rows[:, None] * stride_om + offs_d[None, :]
    if SHARED_DONE:
        # With m = the shared part's LSE (log2 units), l = 1 and acc = its output, the online-softmax invariant
        # (acc = sum_j 2^(s_j - m) v_j, l = sum_j 2^(s_j - m)) holds exactly; continue from there.
        m_i = tl.load(LSE + pid_bh * Lq + rows, mask=m_valid, other=float("-inf")) * LOG2E
        l_i = tl.where(m_i == float("-inf"), 0.0, 1.0)
        acc = tl.load(out_ptrs, mask=m_valid[:, None] & d_valid[None, :], other=0.0).to(tl.float32)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        # Shared keys: visible to every query of the tile; whole tiles unmasked, then the tail.
        shared_full = (shared // BLOCK_N) * BLOCK_N
        acc, m_i, l_i = _attend_range(acc, m_i, l_i, q, qb, bias2, K, V, KSeg, kv_base_k, kv_base_v,
                                      stride_kn, stride_vn, offs_d, d_valid, 0, shared_full, qk_scale,
                                      False, False, HAS_BIAS, UPCAST, IEEE, BLOCK_N)
        acc, m_i, l_i = _attend_range(acc, m_i, l_i, q, qb, bias2, K, V, KSeg, kv_base_k, kv_base_v,
                                      stride_kn, stride_vn, offs_d, d_valid, shared_full, shared, qk_scale,
                                      False, True, HAS_BIAS, UPCAST, IEEE, BLOCK_N)
    # Private segments of the tile's buckets (contiguous keys), masked by bucket.
    lo = tl.load(BlkLo + b * num_m_blocks + pid_m)
    hi = tl.load(BlkHi + b * num_m_blocks + pid_m)
    acc, m_i, l_i = _attend_range(acc, m_i, l_i, q, qb, bias2, K, V, KSeg, kv_base_k, kv_base_v,
                                  stride_kn, stride_vn, offs_d, d_valid, lo, hi, qk_scale,
                                  True, True, HAS_BIAS, UPCAST, IEEE, BLOCK_N)

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]  # acc is 0 on empty rows
    lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    tl.store(out_ptrs, out.to(Out.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])
    tl.store(LSE + pid_bh * Lq + rows, lse, mask=m_valid)


# ----------------------------------------------------------------------------------------------------------------
# Backward (FlashAttention-2 style recomputation from the merged O and LSE). With z the natural logits,
# P = exp(z - LSE), dP = dO V^T, Delta = rowsum(dO * O) and dZ = P * (dP - Delta):
#   dV = P^T dO,  dQ = scale * dZ K,  dK = scale * dZ^T Q,  dBias[i] = sum_j dZ[i, j] over i's own segment keys.
# dQ/dBias: one program per sorted query tile (keys as in the forward). dK/dV: one program per key tile, looping
# over the sorted query range that can see it; no atomics anywhere.
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _dq_range(
    dq, dbias, q, do, qb, bias2, lse2, delta,  # dq (M, D), dbias (M,) accumulators; lse2 = LSE * log2(e)
    K, V, KSeg, kv_base_k, kv_base_v, stride_kn, stride_vn, offs_d, d_valid, lo, hi, qk_scale,
    SEGMENT: tl.constexpr, MASK_N: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dQ / dBias contributions of keys ``[lo, hi)``; flags as in :func:`_attend_range`."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < hi
        kt_ptrs = K + kv_base_k + offs_n[None, :] * stride_kn + offs_d[:, None]  # (D, N)
        vt_ptrs = V + kv_base_v + offs_n[None, :] * stride_vn + offs_d[:, None]  # (D, N)
        if MASK_N:
            kt = tl.load(kt_ptrs, mask=n_valid[None, :] & d_valid[:, None], other=0.0)
            vt = tl.load(vt_ptrs, mask=n_valid[None, :] & d_valid[:, None], other=0.0)
        else:
            kt = tl.load(kt_ptrs, mask=d_valid[:, None], other=0.0)
            vt = tl.load(vt_ptrs, mask=d_valid[:, None], other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
            vt = vt.to(tl.float32)
        if IEEE:
            s = tl.dot(q, kt, input_precision="ieee") * qk_scale
            dp = tl.dot(do, vt, input_precision="ieee")
        else:
            s = tl.dot(q, kt) * qk_scale
            dp = tl.dot(do, vt)
        if SEGMENT:
            if HAS_BIAS:
                s += bias2[:, None]
        p = tl.math.exp2(s - lse2[:, None])  # padded rows and rows without keys have LSE = +inf, hence P = 0
        if SEGMENT:
            kseg = tl.load(KSeg + offs_n, mask=n_valid, other=-3)
            p = tl.where(qb[:, None] == kseg[None, :], p, 0.0)
        elif MASK_N:
            p = tl.where(n_valid[None, :], p, 0.0)
        ds = p * (dp - delta[:, None])  # (M, N), d loss / d natural logits
        if IEEE:
            dq += tl.dot(ds, tl.trans(kt), input_precision="ieee")
        else:
            dq += tl.dot(ds.to(kt.dtype), tl.trans(kt))
        if SEGMENT:
            dbias += tl.sum(ds, 1)
    return dq, dbias


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, Bias, Order, QB, KSeg, BlkLo, BlkHi, DO, LSE, Delta, DQ, DBias,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dom, stride_doh,
    stride_dqb, stride_dqm, stride_dqh,
    stride_bb,
    H, Lq, shared, num_m_blocks, qk_scale, sm_scale, D,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid ``(cdiv(Lq, BLOCK_M), B * H)``. DO/DQ (B, Lq, H, D); LSE/Delta (B, H, Lq) fp32; DBias (B, H, Lq) fp32
    (per head, summed over heads on the host). Other arguments as in :func:`_fwd_kernel`."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # int64: b * stride_b overflows int32 beyond 2**31 elements
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_valid = offs_m < Lq
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < D
    md_mask = m_valid[:, None] & d_valid[None, :]
    rows = tl.load(Order + b * Lq + offs_m, mask=m_valid, other=0)
    qb = tl.load(QB + b * Lq + offs_m, mask=m_valid, other=-2)
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + offs_d[None, :], mask=md_mask, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_dom + offs_d[None, :],
                 mask=md_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse2 = tl.load(LSE + pid_bh * Lq + rows, mask=m_valid, other=float("inf")) * LOG2E
    delta = tl.load(Delta + pid_bh * Lq + rows, mask=m_valid, other=0.0)
    bias2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_BIAS:
        bias2 = tl.load(Bias + b * stride_bb + rows, mask=m_valid, other=0.0).to(tl.float32) * LOG2E

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dbias = tl.zeros([BLOCK_M], dtype=tl.float32)
    kv_base_k = b * stride_kb + h * stride_kh
    kv_base_v = b * stride_vb + h * stride_vh
    shared_full = (shared // BLOCK_N) * BLOCK_N
    dq, dbias = _dq_range(dq, dbias, q, do, qb, bias2, lse2, delta, K, V, KSeg, kv_base_k, kv_base_v,
                          stride_kn, stride_vn, offs_d, d_valid, 0, shared_full, qk_scale,
                          False, False, HAS_BIAS, UPCAST, IEEE, BLOCK_N)
    dq, dbias = _dq_range(dq, dbias, q, do, qb, bias2, lse2, delta, K, V, KSeg, kv_base_k, kv_base_v,
                          stride_kn, stride_vn, offs_d, d_valid, shared_full, shared, qk_scale,
                          False, True, HAS_BIAS, UPCAST, IEEE, BLOCK_N)
    lo = tl.load(BlkLo + b * num_m_blocks + pid_m)
    hi = tl.load(BlkHi + b * num_m_blocks + pid_m)
    dq, dbias = _dq_range(dq, dbias, q, do, qb, bias2, lse2, delta, K, V, KSeg, kv_base_k, kv_base_v,
                          stride_kn, stride_vn, offs_d, d_valid, lo, hi, qk_scale,
                          True, True, HAS_BIAS, UPCAST, IEEE, BLOCK_N)
    dq *= sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + rows[:, None] * stride_dqm + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=md_mask)
    if HAS_BIAS:
        tl.store(DBias + pid_bh * Lq + rows, dbias, mask=m_valid)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, Bias, Order, QB, KSeg, QLo, QHi, DO, LSE, Delta, DK, DV,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dom, stride_doh,
    stride_dkb, stride_dkn, stride_dkh,
    stride_dvb, stride_dvn, stride_dvh,
    stride_bb,
    H, Lq, Lk, num_n_blocks, qk_scale, sm_scale, D,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid ``(cdiv(Lk, BLOCK_N), B * H)``. QLo/QHi (B, num_n_blocks): the sorted-query range ``[QLo, QHi)`` whose
    buckets can see some key of the tile (all queries for a tile holding shared keys). DK/DV (B, Lk, H, D)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # int64: b * stride_b overflows int32 beyond 2**31 elements
    h = pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = offs_n < Lk
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < D
    nd_mask = n_valid[:, None] & d_valid[None, :]
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :], mask=nd_mask, other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :], mask=nd_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    kseg = tl.load(KSeg + offs_n, mask=n_valid, other=-3)  # -3: padding keys, visible to nobody
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    qlo = tl.load(QLo + b * num_n_blocks + pid_n)
    qhi = tl.load(QHi + b * num_n_blocks + pid_n)
    for start_m in range(qlo, qhi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_valid = offs_m < qhi
        md_mask = m_valid[:, None] & d_valid[None, :]
        rows = tl.load(Order + b * Lq + offs_m, mask=m_valid, other=0)
        qb = tl.load(QB + b * Lq + offs_m, mask=m_valid, other=-2)
        q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + offs_d[None, :],
                    mask=md_mask, other=0.0)
        do = tl.load(DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_dom + offs_d[None, :],
                     mask=md_mask, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse2 = tl.load(LSE + pid_bh * Lq + rows, mask=m_valid, other=float("inf")) * LOG2E
        delta = tl.load(Delta + pid_bh * Lq + rows, mask=m_valid, other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale  # (M, N)
            dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k)) * qk_scale
            dp = tl.dot(do, tl.trans(v))
        own = (qb[:, None] == kseg[None, :]) & (kseg[None, :] >= 0)
        if HAS_BIAS:
            bias2 = tl.load(Bias + b * stride_bb + rows, mask=m_valid, other=0.0).to(tl.float32) * LOG2E
            s += tl.where(own, bias2[:, None], 0.0)
        visible = own | (kseg[None, :] == -1)  # padded rows have LSE = +inf, hence P = 0
        p = tl.where(visible, tl.math.exp2(s - lse2[:, None]), 0.0)
        ds = p * (dp - delta[:, None])
        if IEEE:
            dv += tl.dot(tl.trans(p), do, input_precision="ieee")
            dk += tl.dot(tl.trans(ds), q, input_precision="ieee")
        else:
            dv += tl.dot(tl.trans(p).to(do.dtype), do)
            dk += tl.dot(tl.trans(ds).to(q.dtype), q)
    dk *= sm_scale
    tl.store(DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=nd_mask)
    tl.store(DV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=nd_mask)
