"""Attention ops: subject-sparse bucketed attention, its backends and the FLOPs model."""

from .bucketed_attention import available_backends, bucketed_attention, register_backend, select_backend
from .flops import WAN_CONFIGS, WAN_TOKENS, WanConfig, attention_flops, equal_routing, wan_step_flops
from .lse import merge_attention_partials

__all__ = [
    "WAN_CONFIGS",
    "WAN_TOKENS",
    "WanConfig",
    "attention_flops",
    "available_backends",
    "bucketed_attention",
    "equal_routing",
    "merge_attention_partials",
    "register_backend",
    "select_backend",
    "wan_step_flops",
]
