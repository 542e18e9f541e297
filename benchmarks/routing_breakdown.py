"""Where does a trained router lose routing IoU? Held-out IoU of a ``diasr train`` run, broken down by subject group.

Groups come from the ``meta`` that ``diasr make-synthetic`` writes per subject: how many subjects the clip has, whether
another subject of the clip has the same colour, the subject's pattern, and its size (terciles of ground-truth tokens).
For each group: IoU, and where the subject's own tokens went (routed to null, routed to another subject).

    PYTHONPATH=src python benchmarks/routing_breakdown.py --config examples/configs/synthetic_tiny.yaml \\
        --run runs/synthetic_tiny [--data runs/synthetic_test]

The run is evaluated exactly as ``diasr train`` evaluates it (``DiasRTrainer.evaluate``: same noise, σ and vote).
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from collections.abc import Callable
from statistics import mean
from typing import Any

from diasr_diffusers.training import DiasRTrainer, TrainConfig


def _groups(subjects: list[dict[str, Any]]) -> list[tuple[str, Callable[[dict[str, Any]], bool]]]:
    sizes = sorted(s["tokens"] for s in subjects)
    small, large = sizes[len(sizes) // 3], sizes[2 * len(sizes) // 3]
    groups = [("all", lambda s: True)]
    groups += [(f"clips with {n} subject(s)", lambda s, n=n: s["num_subjects"] == n) for n in (1, 2, 3, 4)]
    groups += [
        ("colour shared with another subject", lambda s: s["shared_colour"]),
        ("colour unique in its clip", lambda s: not s["shared_colour"]),
        (f"small (<= {small} tokens)", lambda s: s["tokens"] <= small),
        (f"medium ({small + 1}-{large} tokens)", lambda s: small < s["tokens"] <= large),
        (f"large (> {large} tokens)", lambda s: s["tokens"] > large),
    ]
    patterns = sorted({s["pattern"] for s in subjects if s["pattern"]})
    groups += [(f"pattern {p}", lambda s, p=p: s["pattern"] == p) for p in patterns]
    return groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="the YAML the run was trained with")
    parser.add_argument("--run", required=True, help="the `diasr train` output dir (router/ + LoRA)")
    parser.add_argument("--data", default=None, help="held-out make-synthetic folder (default: the config's eval_data)")
    args = parser.parse_args()

    raw = dataclasses.asdict(TrainConfig.from_yaml(args.config)) | {"init_from": args.run}
    if args.data is not None:
        raw["eval_data"] = args.data
    if raw["eval_data"] is None:
        raise SystemExit("--data is required when the config has no `eval_data`")
    config = TrainConfig.from_dict(raw)
    with tempfile.TemporaryDirectory() as scratch:
        trainer = DiasRTrainer(config, scratch)
        trainer.setup()
        result = trainer.evaluate(details=True)

    subjects = []
    for s in result["subjects"]:
        metas = [subject.meta for subject in trainer.eval_set.records[s["index"]].subjects]
        colours = [m.get("color") for m in metas]
        own = metas[s["subject"]]
        predicted = s["predicted"]
        subjects.append(
            s | {
                "num_subjects": len(metas),
                "shared_colour": own.get("color") is not None and colours.count(own.get("color")) > 1,
                "pattern": own.get("pattern"),
                # A subject absent from the ground truth but predicted (IoU 0) has no own tokens to route.
                "to_null": predicted.get("-1", 0) / max(s["tokens"], 1),
                "to_other": sum(c for k, c in predicted.items() if k not in ("-1", str(s["subject"]))) / max(s["tokens"], 1),
            }
        )  # fmt: skip

    print(f"run {args.run}; held-out {config.manifest_path(config.eval_data)} ({result['num_eval_clips']} clips, σ {result['eval_sigmas']})")
    print("| subjects | scored (subject × σ) | routing IoU | own tokens routed to null | to another subject |")
    print("|---|---:|---:|---:|---:|")
    for name, keep in _groups(subjects):
        rows = [s for s in subjects if keep(s)]
        if rows:
            print(
                f"| {name} | {len(rows)} | {mean(r['iou'] for r in rows):.3f} | {mean(r['to_null'] for r in rows):.3f} "
                f"| {mean(r['to_other'] for r in rows):.3f} |"
            )


if __name__ == "__main__":
    main()
