"""Triton kernels for subject-bucketed attention (forward, backward). Imported lazily: needs ``triton``.

Notation (all kernels): B batch, H heads, Lq queries, Lk keys laid out ``[shared | seg 0 | ... | seg N-1]``, D head
dim (padded to the power of two ``BLOCK_D``). Queries are visited in *bucket-sorted* order through an index array
``Order`` (B, Lq): position ``i`` of the sorted order is original query ``Order[b, i]`` with bucket ``QB[b, i]``
(non-decreasing in ``i``). Nothing is physically permuted: q/dO/O/LSE are gathered and scattered through ``Order``.

A query tile of ``BLOCK_M`` consecutive sorted queries therefore covers a run of buckets ``bmin..bmax``, whose private
segments are contiguous in the key layout; each program reads that key range from ``SegStart`` (N + 1,), the first key of
every segment (``SegStart[N] = Lk``), at the buckets of its first and last sorted query. Every query sees every shared
key (no mask there except the tail), and inside that range a key is visible iff its segment id ``KSeg[j]`` equals the
query's bucket: the mask only bites in the few tiles straddling two buckets. Tile sizes are free (autotuned): nothing
on the host depends on them.

Shared and segment keys go through one online softmax, so the result is exact without any LSE merge (``SKIP_SHARED``
runs the segment keys alone, for a split where a dense kernel does the shared keys and the two are merged through
their log-sum-exp). Any strides are read as given (the head dim included), so views are never copied. Logits are
``z = scale * q.k (+ bias on own-segment keys)``; kernels work in base 2 (``z * log2(e)``) and store the natural LSE.
A row with no visible key gets ``out = 0`` and ``LSE = +inf`` so that the backward's ``exp(z - LSE)`` is 0 there.

Non-finite values: in a tile straddling two segments, a query's masked-out probability (0) meets the other segment's
values in ``P @ V``, and ``0 * inf`` is NaN. Segment tiles therefore zero non-finite values before the dot and mark
the rows that do see one as NaN (a branch taken only when the tile holds one); the backward masks ``dS`` the same way.
A NaN/inf value thus reaches only the queries that see it, as in the other backends.

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
    acc, m_i, l_i, q, qb, bias2, K, V, KSeg, kv_base_k, kv_base_v, stride_kn, stride_kd, stride_vn, stride_vd,
    offs_d, d_valid, lo, hi, qk_scale,
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
        kt_ptrs = K + kv_base_k + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd  # (D, N)
        v_ptrs = V + kv_base_v + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd  # (N, D)
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
            own = qb[:, None] == kseg[None, :]
            if HAS_BIAS:
                s += bias2[:, None]
            s = tl.where(own, s, float("-inf"))
            bad = (v != v) | (tl.abs(v.to(tl.float32)) == float("inf"))  # (N, D) non-finite values
            num_bad = tl.sum(tl.sum(bad.to(tl.int32), 1), 0)
            v = tl.where(bad, 0.0, v).to(v.dtype)
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
        if SEGMENT:
            if num_bad > 0:  # which rows see a non-finite value (exact 0/1 counts in any dot precision)
                hit = tl.dot(own.to(tl.float32), bad.to(tl.float32), input_precision="ieee")
                acc = tl.where(hit > 0, float("nan"), acc)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _tile_key_range(QB, SegStart, b, pid_m, Lq, BLOCK_M: tl.constexpr):
    """Key range ``[lo, hi)`` of the segments of the buckets in sorted query tile ``pid_m`` (empty for null only)."""
    first = pid_m * BLOCK_M
    last = tl.minimum(first + BLOCK_M, Lq) - 1
    bmin = tl.load(QB + b * Lq + first)
    bmax = tl.load(QB + b * Lq + last)
    lo = tl.load(SegStart + tl.maximum(bmin, 0))
    hi = tl.load(SegStart + tl.maximum(bmax, 0) + 1)
    hi = tl.where(bmax < 0, lo, hi)
    return lo, hi


@triton.jit
def _fwd_kernel(
    Q, K, V, Bias, Order, QB, KSeg, SegStart, Out, LSE,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_ob, stride_om, stride_oh, stride_od,
    stride_bb,
    H, Lq, shared, qk_scale, D,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, SKIP_SHARED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid ``(cdiv(Lq, BLOCK_M), B * H)``. Q (B, Lq, H, D), K/V (B, Lk, H, D), Bias (B, Lq), Order/QB (B, Lq),
    KSeg (Lk,), SegStart (N + 1,), Out (B, Lq, H, D), LSE (B, H, Lq) fp32.

    ``SKIP_SHARED``: attend to the segment keys only (the shared part comes from a dense kernel, merged afterwards)."""
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
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=m_valid[:, None] & d_valid[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    bias2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_BIAS:
        bias2 = tl.load(Bias + b * stride_bb + rows, mask=m_valid, other=0.0).to(tl.float32) * LOG2E

    kv_base_k = b * stride_kb + h * stride_kh
    kv_base_v = b * stride_vb + h * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if not SKIP_SHARED:
        # Shared keys: visible to every query of the tile; whole tiles unmasked, then the tail.
        shared_full = (shared // BLOCK_N) * BLOCK_N
        acc, m_i, l_i = _attend_range(acc, m_i, l_i, q, qb, bias2, K, V, KSeg, kv_base_k, kv_base_v,
                                      stride_kn, stride_kd, stride_vn, stride_vd, offs_d, d_valid, 0, shared_full,
                                      qk_scale, False, False, HAS_BIAS, UPCAST, IEEE, BLOCK_N)
        acc, m_i, l_i = _attend_range(acc, m_i, l_i, q, qb, bias2, K, V, KSeg, kv_base_k, kv_base_v,
                                      stride_kn, stride_kd, stride_vn, stride_vd, offs_d, d_valid, shared_full, shared,
                                      qk_scale, False, True, HAS_BIAS, UPCAST, IEEE, BLOCK_N)
    # Private segments of the tile's buckets (contiguous keys), masked by bucket.
    lo, hi = _tile_key_range(QB, SegStart, b, pid_m, Lq, BLOCK_M)
    acc, m_i, l_i = _attend_range(acc, m_i, l_i, q, qb, bias2, K, V, KSeg, kv_base_k, kv_base_v,
                                  stride_kn, stride_kd, stride_vn, stride_vd, offs_d, d_valid, lo, hi, qk_scale,
                                  True, True, HAS_BIAS, UPCAST, IEEE, BLOCK_N)
    out_ptrs = Out + b * stride_ob + h * stride_oh + rows[:, None] * stride_om + offs_d[None, :] * stride_od

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
    K, V, KSeg, kv_base_k, kv_base_v, stride_kn, stride_kd, stride_vn, stride_vd, offs_d, d_valid, lo, hi, qk_scale,
    SEGMENT: tl.constexpr, MASK_N: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dQ / dBias contributions of keys ``[lo, hi)``; flags as in :func:`_attend_range`."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < hi
        kt_ptrs = K + kv_base_k + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd  # (D, N)
        vt_ptrs = V + kv_base_v + offs_n[None, :] * stride_vn + offs_d[:, None] * stride_vd  # (D, N)
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
        ds = p * (dp - delta[:, None])  # (M, N), d loss / d natural logits
        if SEGMENT:
            kseg = tl.load(KSeg + offs_n, mask=n_valid, other=-3)
            # A select, not P * mask: dP of another segment's non-finite value must not reach this row.
            ds = tl.where(qb[:, None] == kseg[None, :], ds, 0.0)
        elif MASK_N:
            ds = tl.where(n_valid[None, :], ds, 0.0)
        if IEEE:
            dq += tl.dot(ds, tl.trans(kt), input_precision="ieee")
        else:
            dq += tl.dot(ds.to(kt.dtype), tl.trans(kt))
        if SEGMENT:
            dbias += tl.sum(ds, 1)
    return dq, dbias


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, Bias, Order, QB, KSeg, SegStart, DO, LSE, Delta, DQ, DBias,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_dob, stride_dom, stride_doh, stride_dod,
    stride_dqb, stride_dqm, stride_dqh, stride_dqd,
    stride_bb,
    H, Lq, shared, qk_scale, sm_scale, D,
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
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=md_mask, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_dom + offs_d[None, :] * stride_dod,
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
                          stride_kn, stride_kd, stride_vn, stride_vd, offs_d, d_valid, 0, shared_full, qk_scale,
                          False, False, HAS_BIAS, UPCAST, IEEE, BLOCK_N)
    dq, dbias = _dq_range(dq, dbias, q, do, qb, bias2, lse2, delta, K, V, KSeg, kv_base_k, kv_base_v,
                          stride_kn, stride_kd, stride_vn, stride_vd, offs_d, d_valid, shared_full, shared, qk_scale,
                          False, True, HAS_BIAS, UPCAST, IEEE, BLOCK_N)
    lo, hi = _tile_key_range(QB, SegStart, b, pid_m, Lq, BLOCK_M)
    dq, dbias = _dq_range(dq, dbias, q, do, qb, bias2, lse2, delta, K, V, KSeg, kv_base_k, kv_base_v,
                          stride_kn, stride_kd, stride_vn, stride_vd, offs_d, d_valid, lo, hi, qk_scale,
                          True, True, HAS_BIAS, UPCAST, IEEE, BLOCK_N)
    dq *= sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + rows[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=md_mask)
    if HAS_BIAS:
        tl.store(DBias + pid_bh * Lq + rows, dbias, mask=m_valid)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, Bias, Order, QB, KSeg, QStart, DO, LSE, Delta, DK, DV,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_dob, stride_dom, stride_doh, stride_dod,
    stride_dkb, stride_dkn, stride_dkh, stride_dkd,
    stride_dvb, stride_dvn, stride_dvh, stride_dvd,
    stride_bb,
    H, Lq, Lk, num_buckets, qk_scale, sm_scale, D,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid ``(cdiv(Lk, BLOCK_N), B * H)``. QStart (B, num_buckets + 1): ``QStart[b, t]`` is the first sorted query of
    bucket ``>= t - 1`` (``QStart[b, num_buckets] = Lq``), so the queries that can see some key of the tile are a
    sorted range (all queries for a tile holding shared keys). DK/DV (B, Lk, H, D)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # int64: b * stride_b overflows int32 beyond 2**31 elements
    h = pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = offs_n < Lk
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < D
    nd_mask = n_valid[:, None] & d_valid[None, :]
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=nd_mask, other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=nd_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    kseg = tl.load(KSeg + offs_n, mask=n_valid, other=-3)  # -3: padding keys, visible to nobody
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    kmin = tl.load(KSeg + pid_n * BLOCK_N)
    kmax = tl.load(KSeg + tl.minimum(pid_n * BLOCK_N + BLOCK_N, Lk) - 1)
    qlo = tl.load(QStart + b * (num_buckets + 1) + tl.maximum(kmin, 0) + 1)
    qhi = tl.load(QStart + b * (num_buckets + 1) + tl.maximum(kmax, 0) + 2)
    qlo = tl.where(kmin < 0, 0, qlo)  # the tile holds shared keys: every query sees it
    qhi = tl.where(kmin < 0, Lq, qhi)
    for start_m in range(qlo, qhi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_valid = offs_m < qhi
        md_mask = m_valid[:, None] & d_valid[None, :]
        rows = tl.load(Order + b * Lq + offs_m, mask=m_valid, other=0)
        qb = tl.load(QB + b * Lq + offs_m, mask=m_valid, other=-2)
        q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                    mask=md_mask, other=0.0)
        do = tl.load(DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_dom + offs_d[None, :] * stride_dod,
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
        ds = tl.where(visible, p * (dp - delta[:, None]), 0.0)
        if IEEE:
            dv += tl.dot(tl.trans(p), do, input_precision="ieee")
            dk += tl.dot(tl.trans(ds), q, input_precision="ieee")
        else:
            dv += tl.dot(tl.trans(p).to(do.dtype), do)
            dk += tl.dot(tl.trans(ds).to(q.dtype), q)
    dk *= sm_scale
    tl.store(DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=nd_mask)
    tl.store(DV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=nd_mask)
