"""The README's Python examples run as written (the Colab notebooks: tests/test_notebooks.py)."""

import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parents[1]


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


def test_readme_own_loop_example_runs(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    (example,) = python_blocks((REPO / "README.md").read_text())
    exec(compile(example, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    last_loss = float(re.search(r"last loss ([0-9.e+-]+)", printed).group(1))
    assert 0.0 < last_loss < 10.0
