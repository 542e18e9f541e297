"""Ingredients' multi-identity router (``MultiIPRouter`` in the released code), for N identities and any batch.

At each routed layer of an Ingredients transformer, every video token ``h`` is scored against every identity ``n``:
``logit[n] = <to_q(LN(h)), to_kv(id_merge(LN(F_n)))>`` with ``F_n`` the identity's Q-Former tokens and ``id_merge``
a ``Linear(num_tokens -> 1)`` that pools them into one vector (the paper's ``W_aggr``). The logits are a raw dot
product (no ``1/sqrt(d)``), as released. The parameter names are the released ones, so ``router.{i}.*`` tensors of
``feizhengcong/Ingredients`` load unchanged.

Released limits lifted here: the released module takes a Python list of per-sample identity tensors and scores
only the samples that have one (in practice batch element 0, with exactly 2 faces); this one takes a
``(B or 1, N, Q, D)`` tensor and scores every batch element against its own identities.
"""

from __future__ import annotations

import torch
import torch.nn as nn

ROUTING_STYLES = ("soft", "hard")


class IngredientsIDRouter(nn.Module):
    r"""Per-token identity logits from video hidden states and per-identity face tokens.

    Args:
        dim: width of the video hidden states (CogVideoX-5B: 3072).
        id_dim: width of the identity tokens (the local facial extractor's output, 2048 as released).
        id_length: number of identity tokens per identity (the Q-Former's queries, 32 as released).
        inner_dim: width of the scoring space (2048 as released, where it is hard-coded).

    Example:
        ```py
        >>> router = IngredientsIDRouter(dim=24, id_dim=16, id_length=4, inner_dim=8)
        >>> logits = router(torch.randn(2, 3, 4, 16), torch.randn(2, 10, 24))  # 3 identities, batch 2
        >>> logits.shape
        torch.Size([2, 10, 3])
        ```
    """

    def __init__(self, dim: int = 3072, id_dim: int = 2048, id_length: int = 32, inner_dim: int = 2048):
        super().__init__()
        self.norm1 = nn.LayerNorm(id_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.id_merge = nn.Linear(id_length, 1, bias=False)
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(id_dim, inner_dim, bias=False)

    def forward(self, face_embeds: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, L, N)``.

        Args:
            face_embeds: ``(B, N, Q, D)`` (or ``(1, N, Q, D)``, shared by the batch) identity tokens.
            hidden_states: ``(B, L, C)`` video tokens.
        """
        ids = self.norm1(face_embeds)
        ids = self.id_merge(ids.transpose(-2, -1)).squeeze(-1)  # (B, N, D): the Q tokens pooled into one
        keys = self.to_kv(ids)  # (B, N, inner)
        query = self.to_q(self.norm2(hidden_states))  # (B, L, inner)
        return query @ keys.transpose(-2, -1)


def routing_weights(logits: torch.Tensor, routing: str) -> torch.Tensor:
    """Mixing weights ``(B, L, N)`` from router logits.

    ``"soft"``: softmax over identities, computed in float32 and cast back (as released). ``"hard"``: the paper's
    top-1 (one-hot of the argmax), so each token gets exactly one identity's feature.
    """
    if routing == "soft":
        return torch.softmax(logits.float(), dim=-1).to(logits.dtype)
    if routing == "hard":
        return nn.functional.one_hot(logits.argmax(dim=-1), logits.shape[-1]).to(logits.dtype)
    raise ValueError(f"`routing` must be one of {ROUTING_STYLES}, got {routing!r}")


def majority_identity(layer_logits: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The identity each token is routed to by most layers: ``(B, L)`` int64 from per-layer ``(B, L, N)`` logits
    (ties go to the lower index). Each layer votes with its argmax, as hard routing would route the token."""
    if not layer_logits:
        raise ValueError("`layer_logits` is empty: the model has no routed layer")
    num_ids = layer_logits[0].shape[-1]
    votes = sum(nn.functional.one_hot(lg.argmax(dim=-1), num_ids) for lg in layer_logits)
    return votes.argmax(dim=-1)
