"""`diasr train` with `model_family: ingredients`: stage `route` trains the Ingredients routers (routing
cross-entropy + v-prediction), refuses bad face features by field, and its outputs reload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from diasr_diffusers import IngredientsPipeline
from diasr_diffusers.cli import main
from diasr_diffusers.data import make_synthetic
from diasr_diffusers.training import TrainConfig
from diasr_diffusers.training.ingredients import IngredientsTrainer, load_trained_routers
from diasr_diffusers.utils.tiny_ingredients import TINY_INGREDIENTS_TRANSFORMER as TINY

TINY_MODEL = {"num_layers": 2, "cross_attn_interval": 1, "seed": 0}


def _faces(path: Path, seed: int, vit_dim: int = TINY["LFE_vit_dim"]) -> None:
    gen = torch.Generator().manual_seed(seed)
    tensors = {"id_cond": torch.randn(1, TINY["LFE_id_dim"], generator=gen)}
    for k in range(TINY["LFE_num_scale"]):
        tensors[f"id_vit_hidden.{k}"] = torch.randn(5, vit_dim, generator=gen)
    save_file(tensors, str(path))


def _dataset(out: Path, drop: bool = False, vit_dim: int = TINY["LFE_vit_dim"]) -> Path:
    make_synthetic(out, num_clips=3, seed=0, subjects=(2, 2), num_frames=5, height=64, width=96)
    (out / "faces").mkdir()
    lines = []
    for i, line in enumerate((out / "manifest.jsonl").read_text().splitlines()):
        rec = json.loads(line)
        for s, sub in enumerate(rec["subjects"]):
            if drop and i == 1 and s == 1:
                continue
            _faces(out / "faces" / f"{i}_{s}.safetensors", 10 * i + s, vit_dim)
            sub.setdefault("meta", {})["face_features"] = f"faces/{i}_{s}.safetensors"
        lines.append(json.dumps(rec))
    (out / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return _dataset(tmp_path_factory.mktemp("faces"))


def _config(data_dir: Path, **overrides) -> TrainConfig:
    cfg = {
        "stage": "route", "model_family": "ingredients", "train_data": str(data_dir), "tiny_model": TINY_MODEL,
        "height": 64, "width": 96, "num_frames": 5, "batch_size": 1, "max_steps": 2, "learning_rate": 3e-2,
        "max_sequence_length": 16, "checkpointing_steps": 100, "eval_fraction": 0.34,
        "eval_sigmas": [0.5], "lambda_route": 1.0,
    }  # fmt: skip
    cfg.update(overrides)
    return TrainConfig.from_dict(cfg)


def test_route_step_trains_only_the_routers_and_lowers_the_routing_loss(data_dir, tmp_path):
    cfg = _config(
        data_dir, max_steps=20, eval_fraction=0.0, learning_rate=1e-2, weight_decay=0.0,
        weighting_scheme="logit_normal", logit_mean=-0.4, logit_std=0.01,
    )  # fmt: skip
    trainer = IngredientsTrainer(cfg, tmp_path / "run")
    trainer.setup()
    trainer.train_set.dataset.ref_augment = None  # a fixed batch: the same first frame every step
    item = trainer.train_set[0]
    assert (item["token_labels"] >= 0).any() and (item["token_labels"] < 0).any()
    before = {k: v.clone() for k, v in trainer.transformer.state_dict().items()}

    def losses():
        enc, total = trainer._encode(item), 0.0
        for seed in range(3):  # a few fixed noises: one alone is a noisy measure
            noise = torch.randn(enc["x0"].shape, generator=torch.Generator().manual_seed(seed))
            with torch.no_grad():
                pred, target, logits, anchors, _ = trainer._forward(enc, torch.tensor(0.4), noise, trainer.model)
                assert len(logits) == 2 and logits[0].shape[-1] == 2  # 2 routed layers, 2 identities
                total += float(trainer._losses(enc, pred, target, logits, anchors)["route"]) / 3
        return total

    first = losses()
    trainer.train_set.dataset.records = trainer.train_set.dataset.records[:1] * 4  # a fixed batch
    trainer.train()
    after = losses()
    assert after < 0.95 * first, (first, after)  # measured 0.696 -> 0.621
    assert not cfg.train_lora  # the family's default: routers only
    changed = {k for k, v in trainer.transformer.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("router.") for k in changed), sorted(changed)[:4]
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 21)) and {"route", "diffusion", "routing_accuracy"} <= set(
        metrics[0]
    )
    route = [m["route"] for m in metrics]
    assert sum(route[-5:]) < sum(route[:5]), route


def test_outputs_reload(data_dir, tmp_path):
    out = tmp_path / "run"
    trainer = IngredientsTrainer(_config(data_dir), out)
    result = trainer.train()
    assert result["num_eval_clips"] == 1 and 0.0 <= result["routing_accuracy"] <= 1.0
    trained = {k: v for k, v in trainer.transformer.state_dict().items()}
    pipe = IngredientsPipeline.from_pretrained(out / "pipeline", transformer_subfolder="transformer")
    for k, v in pipe.transformer.state_dict().items():
        torch.testing.assert_close(v, trained[k], rtol=0, atol=0)
    # The router file holds the released key names and loads into a fresh (untrained) model.
    fresh = IngredientsPipeline(
        **__import__("diasr_diffusers.utils.tiny_ingredients", fromlist=["x"]).tiny_ingredients_components(
            seed=0, num_layers=2, cross_attn_interval=1
        )
    ).transformer
    assert not torch.equal(fresh.router[0].to_q.weight, trained["router.0.to_q.weight"])
    load_trained_routers(fresh, out / "router.safetensors")
    torch.testing.assert_close(fresh.router[0].to_q.weight, trained["router.0.to_q.weight"], rtol=0, atol=0)
    with pytest.raises(ValueError, match="does not fit"):
        load_trained_routers(
            pipe.transformer.__class__(**{**dict(pipe.transformer.config), "num_layers": 4}),
            out / "router.safetensors",
        )


@pytest.mark.parametrize(
    "kind, message",
    [
        ("missing", r"line 2: `subjects\[1\]\.meta\.face_features` is missing"),
        ("shape", r"`id_vit_hidden\.0` in .* must be float \(T, 16\), got \(5, 7\)"),
    ],
)
def test_bad_face_features_are_refused_by_field(tmp_path, kind, message):
    data = _dataset(tmp_path / "d", drop=kind == "missing", vit_dim=7 if kind == "shape" else TINY["LFE_vit_dim"])
    with pytest.raises(ValueError, match=message):
        IngredientsTrainer(_config(data), tmp_path / "o").setup()
    # `diasr train` builds the Ingredients trainer from the family: the same refusal.
    cfg = _config(data).to_dict()
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({k: v for k, v in cfg.items() if v is not None}))
    with pytest.raises(ValueError, match=message):
        main(["train", "--config", str(tmp_path / "c.yaml"), "--output-dir", str(tmp_path / "o2")])


@pytest.mark.parametrize(
    "change, message",
    [
        ({"stage": "align"}, "stage `route` only"),
        ({"router": {"router_dim": 8}}, "Ingredients trains the model's own"),
        ({"tiny_model": {"layers": 2}}, "unknown `tiny_model` key"),
        ({"train_lora": True, "lora_targets": ["nope"]}, "`lora_targets`"),
    ],
)
def test_bad_config(data_dir, change, message):
    from diasr_diffusers.training import ConfigError

    with pytest.raises(ConfigError, match=message):
        _config(data_dir, **change)


def test_resume_continues_exactly(data_dir, tmp_path):
    from safetensors.torch import load_file

    IngredientsTrainer(
        _config(data_dir, max_steps=3, checkpointing_steps=1, eval_fraction=0.0), tmp_path / "a"
    ).train()
    IngredientsTrainer(
        _config(data_dir, max_steps=2, checkpointing_steps=1, eval_fraction=0.0), tmp_path / "b"
    ).train()
    resumed = IngredientsTrainer(
        _config(data_dir, max_steps=3, checkpointing_steps=1, eval_fraction=0.0), tmp_path / "b", resume=True
    )
    resumed.train()
    assert resumed.start_step == 2
    a, b = load_file(str(tmp_path / "a" / "router.safetensors")), load_file(str(tmp_path / "b" / "router.safetensors"))
    assert a.keys() == b.keys() and all(k.startswith("router.") for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_subjects_without_features_need_the_face_models(tmp_path):
    """With a `model` folder, a subject without `face_features` falls back to the face models, whose absence is
    named before training starts."""
    from diasr_diffusers.utils.tiny_ingredients import tiny_ingredients_components

    IngredientsPipeline(**tiny_ingredients_components(num_layers=2, cross_attn_interval=1)).save_pretrained(
        tmp_path / "m"
    )
    data = _dataset(tmp_path / "d", drop=True)
    cfg = _config(data, tiny_model=None, model=str(tmp_path / "m"))
    with pytest.raises(
        (ImportError, FileNotFoundError),
        match=r"line 2: `subjects\[1\]\.meta\.face_features` is not given, so the face models are needed: .*(face_encoder|insightface)",
    ):
        IngredientsTrainer(cfg, tmp_path / "o").setup()
