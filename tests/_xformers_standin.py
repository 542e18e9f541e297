"""A CPU stand-in for the parts of ``xformers.ops.fmha`` the xFormers backend calls, for tests without a GPU.

xFormers has no CPU attention kernel. The stand-in computes exactly what its kernels compute, in fp64:
``softmax(scale * Q K^T + materialised bias) V`` and the log-sum-exp, and for the backward the flash-attention
formulas from the given output and log-sum-exp (``P = exp(S - lse)``, ``dS = P (dP - rowsum(dO * O))``), so a backend
that passes the wrong ``out``/``lse`` to the backward gets wrong gradients here too. It returns the log-sum-exp in
either layout xFormers' ops use for variable-length masks: ``"packed"`` ``(1, H, M)`` (FA2/FA3) or ``"padded"``
``(blocks, H, max_seqlen)`` per block (cutlass), with NaN in the padding so that reading it shows.

The mask classes are xFormers' own (``xformers.ops.fmha.attn_bias``) when it is installed, else ``LocalAttnBias``: a
reimplementation of the few members the backend and ``materialize`` use (``_SeqLenInfo`` with ``seqstart``,
``max_seqlen``, ``min_seqlen``, ``seqstart_py``, ``from_seqlens``; ``BlockDiagonalMask.materialize``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

import torch


@dataclass
class _SeqLenInfo:
    seqstart: torch.Tensor
    max_seqlen: int
    min_seqlen: int
    seqstart_py: list

    @classmethod
    def from_seqlens(cls, seqlens, *, device=None):
        starts = [0]
        for n in seqlens:
            starts.append(starts[-1] + n)
        return cls(torch.tensor(starts, dtype=torch.int32, device=device), max(seqlens), min(seqlens), starts)

    def intervals(self):
        return zip(self.seqstart_py, self.seqstart_py[1:])


@dataclass
class BlockDiagonalMask:
    q_seqinfo: _SeqLenInfo
    k_seqinfo: _SeqLenInfo

    def materialize(self, shape, dtype=torch.float32, device="cpu"):
        assert shape[-1] == self.k_seqinfo.seqstart_py[-1] and shape[-2] == self.q_seqinfo.seqstart_py[-1]
        mask = torch.full(shape[-2:], -math.inf, dtype=dtype, device=device)
        for (q0, q1), (k0, k1) in zip(self.q_seqinfo.intervals(), self.k_seqinfo.intervals()):
            mask[q0:q1, k0:k1] = 0
        return mask


LocalAttnBias = SimpleNamespace(_SeqLenInfo=_SeqLenInfo, BlockDiagonalMask=BlockDiagonalMask)


def real_attn_bias():
    """``xformers.ops.fmha.attn_bias`` or ``None`` when xFormers is not installed."""
    try:
        from xformers.ops.fmha import attn_bias
    except Exception:
        return None
    return attn_bias


class StandInFmha:
    """Duck-types ``xformers.ops.fmha`` for the backend: ``attn_bias``, the forward with LSE and the backward."""

    def __init__(self, attn_bias, lse_layout: str = "packed"):
        assert lse_layout in ("packed", "padded")
        self.attn_bias, self.lse_layout = attn_bias, lse_layout
        self.calls: list[str] = []

    # -- helpers -------------------------------------------------------------------------------------------------
    def _bias(self, attn_bias, m: int, n: int) -> torch.Tensor:
        if attn_bias is None:
            return torch.zeros(m, n, dtype=torch.float64)
        return attn_bias.materialize((m, n), dtype=torch.float64)

    def _scores(self, q, k, attn_bias, scale):
        """(B, H, M, N) fp64 logits, bias included."""
        b, m = q.shape[:2]
        s = torch.einsum("bmhd,bnhd->bhmn", q.double(), k.double()) * scale
        if attn_bias is not None:
            assert b == 1, "variable-length masks take one packed sequence"
        return s + self._bias(attn_bias, m, k.shape[1])

    def _row_blocks(self, attn_bias, m: int):
        """Block index and position in block of each packed query row."""
        starts = list(attn_bias.q_seqinfo.seqstart_py)
        block = torch.zeros(m, dtype=torch.long)
        for i, (s0, s1) in enumerate(zip(starts, starts[1:])):
            block[s0:s1] = i
        pos = torch.arange(m) - torch.tensor(starts[:-1], dtype=torch.long)[block]
        return block, pos, len(starts) - 1

    def _to_layout(self, lse, attn_bias):
        """lse (B, H, M) -> the layout the op would return."""
        b, h, m = lse.shape
        if self.lse_layout == "packed":
            return lse
        if attn_bias is None:  # cutlass pads the dense LSE to a multiple of 32 queries
            out = torch.full((b, h, -(-m // 32) * 32), float("nan"), dtype=lse.dtype)
            out[:, :, :m] = lse
            return out
        block, pos, blocks = self._row_blocks(attn_bias, m)
        out = torch.full((blocks, h, attn_bias.q_seqinfo.max_seqlen), float("nan"), dtype=lse.dtype)
        out.permute(0, 2, 1)[block, pos] = lse[0].transpose(0, 1)
        return out

    def _from_layout(self, lse, attn_bias, b: int, m: int):
        """The inverse: (B, H, M) fp64; checks the layout is the one the forward returned."""
        if self.lse_layout == "packed" or attn_bias is None:
            assert lse.shape[0] == b and lse.shape[-1] >= m, f"backward got lse of shape {tuple(lse.shape)}"
            return lse[:, :, :m].double()
        block, pos, blocks = self._row_blocks(attn_bias, m)
        assert lse.shape[0] == blocks and lse.shape[-1] >= attn_bias.q_seqinfo.max_seqlen, tuple(lse.shape)
        return lse.permute(0, 2, 1)[block, pos].transpose(0, 1)[None].double()

    # -- the two calls the backend makes --------------------------------------------------------------------------
    def memory_efficient_attention_forward_requires_grad(self, query, key, value, attn_bias=None, p=0.0, scale=None):
        self.calls.append("forward" if attn_bias is None else "forward_varlen")
        s = self._scores(query, key, attn_bias, scale)
        lse = torch.logsumexp(s, dim=-1)  # (B, H, M)
        out = torch.einsum("bhmn,bnhd->bmhd", torch.softmax(s, dim=-1), value.double())
        # The kernels' LSE is fp32; in fp64 (tests only, no real kernel has it) keep fp64 so comparisons can be exact.
        lse = lse.to(torch.promote_types(query.dtype, torch.float32))
        return out.to(query.dtype), self._to_layout(lse, attn_bias)

    def memory_efficient_attention_backward(self, grad, output, lse, query, key, value, attn_bias=None, p=0.0,
                                            scale=None):  # fmt: skip
        self.calls.append("backward" if attn_bias is None else "backward_varlen")
        b, m = query.shape[:2]
        s = self._scores(query, key, attn_bias, scale)
        p_ = torch.exp(s - self._from_layout(lse, attn_bias, b, m)[..., None])  # (B, H, M, N)
        g, o = grad.double(), output.double()
        dv = torch.einsum("bhmn,bmhd->bnhd", p_, g)
        dp = torch.einsum("bmhd,bnhd->bhmn", g, value.double())
        delta = (g * o).sum(-1).transpose(1, 2)[..., None]  # (B, H, M, 1)
        ds = p_ * (dp - delta)
        dq = torch.einsum("bhmn,bnhd->bmhd", ds, key.double()) * scale
        dk = torch.einsum("bhmn,bmhd->bnhd", ds, query.double()) * scale
        return dq.to(query.dtype), dk.to(key.dtype), dv.to(value.dtype)
