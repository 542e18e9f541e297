"""The Hub-model curation stages with tiny random versions of the exact `transformers` classes, saved to a folder
and loaded back with `from_pretrained` (the loading and pre/post-processing a GPU user runs)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("scenedetect", reason="the curate extra (scenedetect-headless) is not installed")

from diasr_diffusers.data import validate_manifest  # noqa: E402
from diasr_diffusers.data.curate import CaptionsFile, CurateOptions, MetadataFilter, Stages, Thresholds, curate  # noqa: E402
from diasr_diffusers.data.curate.hub import (  # noqa: E402
    ClipAesthetic,
    GroundingDinoGrounder,
    ImageClassifierWatermark,
    laion_aesthetic_mlp,
)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> tuple[Path, Path]:
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModelWithProjection

    root = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=16)  # fmt: skip
    CLIPVisionModelWithProjection(config).save_pretrained(root / "clip")
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(root / "clip")
    head = laion_aesthetic_mlp(16)
    with torch.no_grad():
        head.layers[-1].bias.fill_(5.0)  # centre the random scores around 5, like real aesthetic scores
    save_file(head.state_dict(), root / "mlp.safetensors")
    return root / "clip", root / "mlp.safetensors"


def test_clip_aesthetic_matches_a_manual_forward(tiny_clip):
    from safetensors.torch import load_file
    from transformers import CLIPImageProcessorPil, CLIPVisionModelWithProjection

    clip, mlp = tiny_clip
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (40, 50, 3), dtype=np.uint8), np.full((30, 30, 3), 200, np.uint8)]
    scores = ClipAesthetic(clip=str(clip), mlp=str(mlp)).score(images)
    model = CLIPVisionModelWithProjection.from_pretrained(clip).eval()
    pixels = CLIPImageProcessorPil.from_pretrained(clip)(images=images, return_tensors="pt")["pixel_values"]
    head = laion_aesthetic_mlp(16).eval()
    head.load_state_dict(load_file(mlp))
    with torch.no_grad():
        emb = model(pixel_values=pixels).image_embeds
        expected = head(emb / emb.norm(dim=-1, keepdim=True)).squeeze(-1)
    assert np.allclose(scores, expected.numpy(), atol=1e-5) and scores[0] != scores[1]
    with pytest.raises(ValueError, match="`mlp`"):
        ClipAesthetic(clip=str(clip)).score(images)


def test_watermark_classifier_reads_its_label(tmp_path):
    from transformers import CLIPImageProcessorPil, ViTConfig, ViTForImageClassification

    config = ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=32,
                       patch_size=8, id2label={0: "watermark", 1: "clear"}, label2id={"watermark": 0, "clear": 1})  # fmt: skip
    ViTForImageClassification(config).save_pretrained(tmp_path / "wm")
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path / "wm")
    probs = ImageClassifierWatermark(model=str(tmp_path / "wm")).score([np.zeros((32, 32, 3), np.uint8)] * 2)
    assert len(probs) == 2 and all(0 < p < 1 for p in probs)
    with pytest.raises(ValueError, match="no label 'logo'"):
        ImageClassifierWatermark(model=str(tmp_path / "wm"), label="logo").score([np.zeros((32, 32, 3), np.uint8)])


@pytest.fixture(scope="module")
def tiny_grounding_dino(tmp_path_factory) -> Path:
    from transformers import (
        BertConfig,
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessorPil,
        GroundingDinoProcessor,
        SwinConfig,
    )

    root = tmp_path_factory.mktemp("gdino")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "a", "red", "box", "blue", "ball", "the"]
    (root / "vocab.txt").write_text("\n".join(words) + "\n")
    torch.manual_seed(0)
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4,
                                   image_size=64, out_features=["stage2", "stage3", "stage4"]),
        text_config=BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64),
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=10, num_feature_levels=3, encoder_n_points=2,
        decoder_n_points=2, max_text_len=32, use_timm_backbone=False, use_pretrained_backbone=False,
    )  # fmt: skip
    GroundingDinoForObjectDetection(config).save_pretrained(root / "model")
    processor = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 96}),
        tokenizer=BertTokenizer(str(root / "vocab.txt")),
    )
    processor.save_pretrained(root / "model")
    return root / "model"


def test_grounding_dino_boxes_in_frame_pixels(tiny_grounding_dino):
    frame = np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)
    grounder = GroundingDinoGrounder(model=str(tiny_grounding_dino), box_threshold=0.0, text_threshold=0.0)
    found = grounder.ground(frame, ["a red box", "the blue ball"])
    assert len(found) == 2 and any(f is not None for f in found)
    for f in found:
        if f is not None:
            (x1, y1, x2, y2), score = f
            assert -1 <= x1 < x2 <= 97 and -1 <= y1 < y2 <= 65 and 0 <= score <= 1
    strict = GroundingDinoGrounder(model=str(tiny_grounding_dino), box_threshold=1.01, text_threshold=1.01)
    assert strict.ground(frame, ["a red box"]) == [None]  # nothing clears an impossible threshold


def test_pipeline_end_to_end_with_tiny_hub_models(tmp_path, tiny_clip, tiny_grounding_dino):
    from diasr_diffusers.data._io import write_video

    rng = np.random.default_rng(0)
    video = np.repeat(rng.integers(60, 120, (1, 64, 96, 3), dtype=np.uint8), 16, 0)
    for t in range(16):
        video[t, 16:48, 10 + 2 * t : 50 + 2 * t] = (220, 40, 40)
        video[t, 16:48:4, 10 + 2 * t : 50 + 2 * t] = (250, 250, 0)
    (tmp_path / "src").mkdir()
    write_video(tmp_path / "src" / "clip.mp4", video, fps=8)
    (tmp_path / "captions.json").write_text(json.dumps(
        [{"video": "clip.mp4", "caption": "A red box slides past the blue ball.", "subjects": ["a red box"]}]))  # fmt: skip
    clip, mlp = tiny_clip
    stages = Stages(
        captioner=CaptionsFile(tmp_path / "captions.json"), ocr=None, faces=None,
        aesthetic=ClipAesthetic(clip=str(clip), mlp=str(mlp)),
        grounder=GroundingDinoGrounder(model=str(tiny_grounding_dino), box_threshold=0.0, text_threshold=0.0),
    )  # fmt: skip
    options = CurateOptions(metadata=MetadataFilter(min_short_side=32, min_seconds=1.0),
                            thresholds=Thresholds(min_aesthetic=0.0, min_subject_aesthetic=0.0, min_mask_fraction=0.0))  # fmt: skip
    report = curate([tmp_path / "src"], tmp_path / "ds", stages=stages, options=options, progress=False)
    assert report["kept"] == 1, report["clips_detail"]
    (record,) = [json.loads(line) for line in (tmp_path / "ds" / "manifest.jsonl").read_text().splitlines()]
    assert record["meta"]["stages"]["grounder"] == "grounding-dino" and np.isfinite(record["meta"]["aesthetic"])
    sub = record["subjects"][0]["meta"]
    assert sub["box_source"] == "grounding-dino" and np.isfinite(sub["aes_score"])
    assert validate_manifest(tmp_path / "ds").ok
    # Every score and the thresholds it met are in meta, so a stricter threshold can be re-applied without models.
    assert record["meta"]["thresholds"]["min_aesthetic"] == 0.0 and "aesthetic" in record["meta"]["timing_s"]


def _tiny_sam2_video_config():
    from transformers import Sam2HieraDetConfig, Sam2VideoConfig, Sam2VisionConfig

    # Smallest sizes that run: the memory encoder's 64 output channels and hidden sizes >= 128 are hard-coded
    # assumptions of the video model (DATA_PIPELINE.md §3.3).
    backbone = Sam2HieraDetConfig(hidden_size=8, image_size=[128, 128], blocks_per_stage=[1, 1, 2, 1],
                                  embed_dim_per_stage=[8, 16, 32, 64], num_attention_heads_per_stage=[1] * 4,
                                  window_size_per_stage=[4] * 4, global_attention_blocks=[3],
                                  window_positional_embedding_background_size=[4, 4])  # fmt: skip
    vision = Sam2VisionConfig(backbone_config=backbone, backbone_channel_list=[64, 32, 16, 8],
                              backbone_feature_sizes=[[32, 32], [16, 16], [8, 8]], fpn_hidden_size=128)  # fmt: skip
    return Sam2VideoConfig(
        vision_config=vision,
        prompt_encoder_config={"hidden_size": 128, "image_size": 128, "patch_size": 16, "mask_input_channels": 16},
        mask_decoder_config={"hidden_size": 128, "mlp_dim": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                             "iou_head_hidden_dim": 32},
        image_size=128, num_maskmem=2, memory_attention_hidden_size=128, memory_attention_num_layers=1,
        memory_attention_num_attention_heads=1, memory_attention_feed_forward_hidden_size=64,
        memory_attention_rope_feat_sizes=[8, 8], memory_encoder_hidden_size=128, memory_encoder_output_channels=64,
        mask_downsampler_embed_dim=128, memory_fuser_embed_dim=128, memory_fuser_intermediate_dim=256,
    )  # fmt: skip


def test_sam2_video_segmenter_tracks_every_frame(tmp_path):
    from transformers import Sam2VideoModel

    from diasr_diffusers.data.curate.hub import Sam2VideoSegmenter

    torch.manual_seed(0)
    Sam2VideoModel(_tiny_sam2_video_config()).save_pretrained(tmp_path / "sam2")
    frames = np.random.default_rng(0).integers(0, 255, (2, 48, 80, 3), dtype=np.uint8)
    segmenter = Sam2VideoSegmenter(model=str(tmp_path / "sam2"))
    masks, scores = segmenter.segment(frames, [(4, 4, 30, 40), (40, 10, 78, 46)])
    assert masks.shape == (2, 2, 48, 80) and masks.dtype == bool and len(scores) == 2
    # The prompt reaches the model: another box gives another frame-0 mask.
    other, _ = segmenter.segment(frames, [(50, 20, 60, 30), (40, 10, 78, 46)])
    assert not np.array_equal(masks[0, 0], other[0, 0]) and np.array_equal(masks[1, 0], other[1, 0])


def test_cli_loads_hub_stages_from_folders(tmp_path, tiny_clip, tiny_grounding_dino, capsys):
    from diasr_diffusers.cli import main
    from diasr_diffusers.data._io import write_video

    rng = np.random.default_rng(1)
    video = np.repeat(rng.integers(60, 120, (1, 64, 96, 3), dtype=np.uint8), 16, 0)
    for t in range(16):
        video[t, 16:48, 10 + 2 * t : 50 + 2 * t] = (220, 40, 40)
        video[t, 16:48:4, 10 + 2 * t : 50 + 2 * t] = (250, 250, 0)
    write_video(tmp_path / "clip.mp4", video, fps=8)
    (tmp_path / "captions.json").write_text(json.dumps(
        [{"video": "clip.mp4", "caption": "A red box slides past the blue ball.", "subjects": ["a red box"]}]))  # fmt: skip
    clip, mlp = tiny_clip
    args = ["curate", str(tmp_path / "clip.mp4"), "--out", str(tmp_path / "ds"), "--captions",
            str(tmp_path / "captions.json"), "--no-ocr", "--no-faces", "--min-short-side", "32", "--min-seconds", "1",
            "--quiet", "--models", f"grounding={tiny_grounding_dino}", "--models", f"clip={clip}",
            "--models", f"aesthetic={mlp}"]  # fmt: skip
    assert main(args) == 0
    capsys.readouterr()
    report = json.loads((tmp_path / "ds" / "report.json").read_text())
    assert report["stages"]["grounder"] == "grounding-dino" and report["stages"]["aesthetic"] == "clip-laion-aesthetic"
    # The tiny model's random aesthetic (about 5) decides against the real threshold 4.75; either way it is recorded.
    (clip_result,) = [json.loads(p.read_text()) for p in (tmp_path / "ds" / ".curate" / "clips").glob("*.json")]
    assert np.isfinite(clip_result["meta"]["aesthetic"])
    assert main([*args[:-2], "--models", "captioner=x"]) == 2
    assert "--models" in capsys.readouterr().err
