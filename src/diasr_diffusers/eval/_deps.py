"""Optional dependencies of the evaluation subsystem, imported only when a metric needs them."""

from __future__ import annotations

import importlib
from types import ModuleType

# import name -> (pip name, what needs it)
_OPTIONAL = {
    "cv2": ("opencv-python-headless", "optical flow (MotionAmplitude, warp residual)"),
    "scipy": ("scipy", "one-to-one identity matching (Hungarian algorithm)"),
    "dlib": ("dlib-bin", "the offline dlib face embedder"),
    "matplotlib": ("matplotlib", "the per-category bar chart"),
    "insightface": ("insightface onnxruntime", "ArcFace / CurricularFace face embeddings"),
}


def require(module: str) -> ModuleType:
    """Import ``module`` or raise an ImportError that says which package to install and why.

    Example:
        >>> cv2 = require("cv2")  # doctest: +SKIP
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        pip_name, purpose = _OPTIONAL.get(module, (module, "this metric"))
        raise ImportError(
            f"`{module}` is needed for {purpose} but is not installed. Install it with "
            f"`pip install {pip_name}` or `pip install 'diasr-diffusers[eval]'`."
        ) from err
