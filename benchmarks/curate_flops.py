"""FLOPs per clip of the Hub-model curation stages, counted with torch's FlopCounterMode on full-size configs with
random weights (one CPU forward each), and the clips/minute they imply on a GPU at an assumed utilisation.

    PYTHONPATH=src python benchmarks/curate_flops.py
"""

from __future__ import annotations

import json

import torch
from torch.utils.flop_counter import FlopCounterMode

# Dense bf16 peak of an H100 SXM (989 TFLOP/s) and the fraction of it such inference typically reaches.
GPU_PEAK = 989e12
UTILISATION = 0.3


def count(fn) -> float:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def clip_l14() -> float:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=224, patch_size=14, projection_dim=768)  # fmt: skip
    with torch.device("cpu"):
        model = CLIPVisionModelWithProjection(config)
        x = torch.zeros(1, 3, 224, 224)
    return count(lambda: model(pixel_values=x))


def grounding_dino_tiny() -> float:
    from transformers import GroundingDinoConfig, GroundingDinoForObjectDetection

    with torch.device("cpu"):
        model = GroundingDinoForObjectDetection(GroundingDinoConfig(use_timm_backbone=False,
                                                                    use_pretrained_backbone=False))  # fmt: skip
        pixels = torch.zeros(1, 3, 800, 1333)
        ids = torch.zeros(1, 32, dtype=torch.long)
    return count(lambda: model(pixel_values=pixels, input_ids=ids, attention_mask=torch.ones_like(ids)))


def sam2_hiera_l_frame() -> float:
    """The SAM 2.1 Hiera-L image encoder on one 1024^2 frame (``sam2.1_hiera_l.yaml``'s trunk: embed 144, stages
    2/6/36/4, global attention at blocks 23/33/43, windows 8/4/16/8); the per-frame memory attention and mask decoder
    add a few percent and are not counted."""
    from transformers import Sam2HieraDetConfig, Sam2VisionConfig, Sam2VisionModel

    backbone = Sam2HieraDetConfig(hidden_size=144, num_attention_heads=2, blocks_per_stage=[2, 6, 36, 4],
                                  embed_dim_per_stage=[144, 288, 576, 1152], num_attention_heads_per_stage=[2, 4, 8, 16],
                                  window_size_per_stage=[8, 4, 16, 8], global_attention_blocks=[23, 33, 43],
                                  window_positional_embedding_background_size=[7, 7], image_size=[1024, 1024])  # fmt: skip
    model = Sam2VisionModel(Sam2VisionConfig(backbone_config=backbone, backbone_channel_list=[1152, 576, 288, 144]))
    x = torch.zeros(1, 3, 1024, 1024)
    return count(lambda: model(pixel_values=x))


def main() -> None:
    per_image = {"clip_l14_224": clip_l14(), "grounding_dino_swin_t_800x1333": grounding_dino_tiny()}
    per_image["sam2.1_hiera_l_frame_1024"] = sam2_hiera_l_frame()
    # Qwen2.5-VL-7B: analytical (too large to instantiate on this 24 GiB CPU box).
    # Qwen2.5-VL-7B on 16 frames (OpenS2V: min_pixels 16*28*28 at fps 1; ~ 256 visual tokens a frame after merging at
    # 448^2) + a 512-token answer: 2 * params * tokens.
    per_image["qwen2.5_vl_7b_16_frames_512_tokens"] = 2 * 7.6e9 * (16 * 256 + 200 + 512)
    # One clip: aesthetic on 3 frames + subjects, GroundingDINO on 1 frame, SAM2 on 81 frames, caption once.
    per_clip = {
        "aesthetic (3 frames + 3 subjects)": 6 * per_image["clip_l14_224"],
        "grounding (1 frame)": per_image["grounding_dino_swin_t_800x1333"],
        "segmentation (81 frames)": 81 * per_image["sam2.1_hiera_l_frame_1024"],
        "caption (16 frames)": per_image["qwen2.5_vl_7b_16_frames_512_tokens"],
    }
    rate = GPU_PEAK * UTILISATION
    table = {k: {"tflops": round(v / 1e12, 3), "clips_per_minute_per_gpu": round(60 * rate / v, 1)} for k, v in per_clip.items()}
    total = sum(per_clip.values())
    table["all model stages"] = {"tflops": round(total / 1e12, 3), "clips_per_minute_per_gpu": round(60 * rate / total, 1)}
    print(json.dumps({"per_image_flops": per_image, "per_clip": table, "gpu_peak": GPU_PEAK, "utilisation": UTILISATION},
                     indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
