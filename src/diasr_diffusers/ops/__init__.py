"""Attention ops: subject-sparse bucketed attention and its backends."""

from .bucketed_attention import available_backends, bucketed_attention, register_backend, select_backend

__all__ = ["available_backends", "bucketed_attention", "register_backend", "select_backend"]
