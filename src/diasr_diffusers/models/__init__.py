"""Models: the Ingredients transformer (ConsisID / CogVideoX with a multi-identity router)."""

from .transformer_ingredients import IngredientsTransformer3DModel, IngredientsTransformerOutput

__all__ = ["IngredientsTransformer3DModel", "IngredientsTransformerOutput"]
