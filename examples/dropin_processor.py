"""Subject-sparse attention in your own sampling loop, on a stock Diffusers Wan transformer.

Runs offline on the toy model; replace `tiny_wan_components()` with `WanPipeline.from_pretrained(...)` components.
"""

import torch

from diasr_diffusers import set_subject_sparse_attn_processor
from diasr_diffusers.utils.tiny import tiny_wan_components

transformer = tiny_wan_components()["transformer"]
state = set_subject_sparse_attn_processor(transformer)  # one processor per layer, all sharing `state`

video = torch.randn(1, 16, 3, 4, 4)  # (B, C, latent frames, h, w)
refs = torch.randn(1, 16, 2, 4, 4)  # two subjects, one reference latent frame each
text = torch.randn(1, 512, transformer.config.text_dim)
t = torch.tensor([500])
tokens_per_frame = 4 * 4 // 4  # (h / 2) * (w / 2) with Wan's 1x2x2 patches

with torch.no_grad(), state.activate(ref_lengths=[tokens_per_frame, tokens_per_frame], mode="similarity"):
    pred = transformer(torch.cat([video, refs], dim=2), t, text, return_dict=False)[0][:, :, :3]
    print("noise prediction", tuple(pred.shape), "routing of layer 0:", state.buckets[0].view(3, 2, 2).tolist())
