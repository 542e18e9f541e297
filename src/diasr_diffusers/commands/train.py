"""``diasr train``: one DiasR training stage from a YAML config (single process, or under ``accelerate launch``)."""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train the DiasR router / anchors + LoRA (stage align or route)")
    p.add_argument("--config", required=True, help="training YAML (see examples/configs/)")
    p.add_argument("--output-dir", required=True)
    p.add_argument(
        "--resume", action="store_true", help="continue from the newest complete checkpoint-* in --output-dir"
    )
    p.add_argument("--eval-data", default=None, help="held-out manifest for eval.json (overrides the config's)")
    p.set_defaults(func=run_train)


def _user_error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def run_train(args: argparse.Namespace) -> int:
    from ..training import ConfigError, TrainConfig

    overrides = {}
    if args.eval_data is not None:
        if not TrainConfig.manifest_path(args.eval_data).is_file():
            return _user_error(f"--eval-data: no manifest at {TrainConfig.manifest_path(args.eval_data)}")
        overrides["eval_data"] = args.eval_data  # before validation: the config's own eval_data need not exist
    try:
        config = TrainConfig.from_yaml(args.config, overrides=overrides)
    except ConfigError as e:
        return _user_error(str(e))
    trainer = config.family.trainer_class()(config, args.output_dir, resume=args.resume)
    try:
        # The output folder and the checkpoint to resume are checked at the start of setup, before any model loads.
        trainer.check_output_dir()
    except ValueError as e:
        return _user_error(str(e))
    from ..utils.output_paths import disk_full_message

    try:
        result = trainer.train()
    except OSError as e:  # no space left: one line; checkpoints and outputs are written atomically, none half-done
        message = disk_full_message(e)
        if message is None:
            raise
        return _user_error(f"--output-dir {args.output_dir}: {message}")
    if result:
        print(json.dumps(result, indent=2))
    return 0
