"""The config files share their common settings from `train.config.base_config`."""

import ast
import pathlib

import pytest

from train.config import base_config, load_config

CONFIGS = sorted((pathlib.Path(__file__).parents[1] / "configs").glob("*.py"))


def default_assignments(path: pathlib.Path) -> dict[str, ast.expr]:
    """`config.a.b = value` statements of get_config before its first `if variant ...`."""
    function = next(
        node for node in ast.parse(path.read_text()).body if isinstance(node, ast.FunctionDef)
    )
    assigned = {}
    for statement in function.body:
        if isinstance(statement, ast.If):
            break
        if isinstance(statement, ast.Assign) and isinstance(statement.targets[0], ast.Attribute):
            assigned[ast.unparse(statement.targets[0])] = statement.value
    return assigned


def test_six_config_files():
    assert [path.stem for path in CONFIGS] == [
        "cnn", "lstm", "mlp", "seq2seq", "transformer", "transformer_classifier"
    ]  # fmt: skip


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.stem)
def test_a_config_sets_only_what_differs_from_the_shared_settings(path):
    base = base_config()
    repeated = []
    for target, value in default_assignments(path).items():
        field = target.removeprefix("config.")
        try:
            shared = base[field] if "." not in field else eval(f"base.{field}", {"base": base})
            literal = ast.literal_eval(value)
        except (KeyError, AttributeError, ValueError):
            continue  # a field of its own, or a value that is not a literal
        if literal == shared:
            repeated.append(target)
    assert repeated == []
    assert "base_config()" in path.read_text()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.stem)
def test_every_shared_setting_reaches_the_config(path):
    config = load_config(path)
    base = base_config()
    for section in ("data", "optimizer", "train"):
        assert set(base[section]) <= set(config[section])
    assert config.seed == 0
    assert config.train.mesh.data in (-1, 1)
