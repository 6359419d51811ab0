"""The README's Python examples run as written (the Colab notebooks: tests/test_notebooks.py)."""

import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parents[1]


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


def test_readme_python_examples_run(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    own_loop, own_model = python_blocks((REPO / "README.md").read_text())
    exec(compile(own_loop, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    last_loss = float(re.search(r"last loss ([0-9.e+-]+)", printed).group(1))
    assert 0.0 < last_loss < 10.0
    exec(compile(own_model, "README.md", "exec"), {})
    nnx_loss = float(re.search(r"nnx loss ([0-9.e+-]+)", capsys.readouterr().out).group(1))
    assert 1.5 < nnx_loss < 4.0  # about ln(10) at the first step
