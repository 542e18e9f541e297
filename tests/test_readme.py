"""The README's offline quick start runs as written."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_quick_start_runs(capsys):
    quick_start = next(b for b in _python_blocks() if "tiny_wan_components" in b)
    namespace: dict = {}
    exec(compile(quick_start, "README quick start", "exec"), namespace)  # noqa: S102 - the README's own example
    assert namespace["video"].shape == (9, 32, 32, 3)
    assert tuple(namespace["maps"].shape) == (3, 2, 2)
    assert "(9, 32, 32, 3)" in capsys.readouterr().out


def test_readme_setup_commands_match_ci():
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    test_cmd = 'pip install torch==2.13.0 -e ".[test]" && python -m pytest -q'
    assert test_cmd in text and test_cmd in ci
    assert "pip install torch==2.13.0 -e . && diasr demo --out demo_out" in text


def test_readme_cli_example_parses_and_names_its_model():
    from diasr_diffusers.cli import build_parser
    from diasr_diffusers.commands.generate import EXAMPLE_MODEL

    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    command = next(b for b in blocks if "diasr generate" in b).replace("\\\n", " ").splitlines()[0]
    args = build_parser().parse_args(shlex.split(command)[1:])
    # The example runs as printed given its model: a real Wan2.1 checkpoint (the toy model refuses these sizes,
    # tests/test_cli.py::test_readme_sizes_on_the_toy_model_are_refused_before_loading).
    assert args.model == EXAMPLE_MODEL and (args.height, args.width, args.frames) == (480, 832, 81)
    assert "training lands with issue 4" not in README.read_text()
