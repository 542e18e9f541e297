"""``diasr train``: one DiasR training stage from a YAML config (single process, or under ``accelerate launch``)."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train the DiasR router / anchors + LoRA (stage align or route)")
    p.add_argument("--config", required=True, help="training YAML (see examples/configs/)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint-* in --output-dir")
    p.add_argument("--eval-data", default=None, help="held-out manifest for eval.json (overrides the config's)")
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from ..training import ConfigError, DiasRTrainer, TrainConfig

    try:
        config = TrainConfig.from_yaml(args.config)
        if args.eval_data is not None:
            if not TrainConfig.manifest_path(args.eval_data).is_file():
                raise ConfigError(f"--eval-data: no manifest at {TrainConfig.manifest_path(args.eval_data)}")
            config.eval_data = args.eval_data
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    result = DiasRTrainer(config, args.output_dir, resume=args.resume).train()
    if result:
        print(json.dumps(result, indent=2))
    return 0
