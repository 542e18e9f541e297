"""Two-subject generation with Wan2.1-1.3B and DiasR routing (needs a GPU and the Wan2.1 download).

    python examples/generate_two_subjects.py --man man.png --woman woman.png --router path/to/router  # router optional
"""

import argparse

import torch
from diffusers.utils import export_to_video, load_image

from diasr_diffusers import DiasRPipeline
from diasr_diffusers.utils import overlay_routing_maps

parser = argparse.ArgumentParser()
parser.add_argument("--man", required=True)
parser.add_argument("--woman", required=True)
parser.add_argument("--router", default=None, help="a trained IDRouter folder or Hub id (optional)")
parser.add_argument("--model", default="Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
args = parser.parse_args()

pipe = DiasRPipeline.from_wan(args.model, id_router=args.router, dtype=torch.bfloat16).to("cuda")
out = pipe(
    prompt="An elderly couple sitting in the living room. The man in a light blue shirt holds a laptop, "
    "while the woman in a checkered blouse leans in closely.",
    subject_images=[load_image(args.man), load_image(args.woman)],
    subject_phrases=["the man", "the woman"],
    height=480,
    width=832,
    num_frames=81,
    guidance_scale=7.5,
    guidance_scale_ref=5.0,
    generator=torch.Generator("cpu").manual_seed(0),
    return_routing_maps=True,
)
export_to_video(out.frames[0], "couple.mp4", fps=16)
export_to_video(list(overlay_routing_maps(out.frames[0], out.routing_maps[0]) / 255.0), "couple_routing.mp4", fps=16)
