"""The family registry is the one list of families: no family name is spelled outside its own module.

Reads the package's source with ``ast`` (docstrings and comments may name families; code may not) and
checks the lists that used to be written by hand are now derived from the registry.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from vrp.ingest.models import loading, registry
from vrp.ingest.models.tiny import build_tiny

PACKAGE = Path(registry.__file__).resolve().parents[2]


def _family_words() -> dict[str, Path]:
    """Every family name, model type and tiny variant -> the module that may spell it."""
    words: dict[str, Path] = {}
    for fam in registry.families():
        home = Path(sys.modules[fam.adapter.__module__].__file__ or "").resolve()
        for word in (fam.name, *fam.spec.model_types, *fam.tiny):
            words[word] = home
    return words


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def _sources() -> list[tuple[Path, str]]:
    return [(path, path.read_text(encoding="utf-8")) for path in sorted(PACKAGE.rglob("*.py"))]


def _leaks(words: dict[str, Path], sources: list[tuple[Path, str]]) -> list[str]:
    """``file:line: 'word'`` for each non-docstring string constant that is a family word away from home."""
    found = []
    for path, text in sources:
        tree = ast.parse(text)
        skip = _docstrings(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Constant) or not isinstance(node.value, str) or id(node) in skip:
                continue
            home = words.get(node.value)
            if home is not None and home != path.resolve():
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {node.value!r}")
    return found


def test_no_family_name_is_written_outside_its_own_module() -> None:
    words = _family_words()
    assert {"llava", "paligemma", "qwen2vl", "qwen2_vl", "qwen2_5vl"} <= set(words)
    assert _leaks(words, _sources()) == []


def test_the_leak_check_fails_on_a_leak() -> None:
    """A planted ``family == "qwen2vl"`` in another module is reported; in its own module it is not."""
    words = _family_words()
    planted = '"""Docstrings may say qwen2vl."""\nLEAK = family == "qwen2vl"\n'
    loading_py = PACKAGE / "ingest" / "models" / "loading.py"
    assert _leaks(words, [(loading_py, planted)]) == ["vrp/ingest/models/loading.py:2: 'qwen2vl'"]
    assert _leaks(words, [(words["qwen2vl"], planted)]) == []


def test_derived_lists_follow_the_registry() -> None:
    names = [fam.name for fam in registry.families()]
    assert len(set(names)) == len(names)
    model_types = [t for fam in registry.families() for t in fam.spec.model_types]
    assert len(set(model_types)) == len(model_types)  # a checkpoint maps to exactly one family
    for fam in registry.families():
        assert next(iter(fam.tiny)) == fam.name  # the first tiny variant is named after the family
        for model_type in fam.spec.model_types:
            assert registry.family_of_model_type(model_type) is fam
            assert loading.adapter_class(model_type) is fam.adapter
        for short, hub in fam.names.items():
            assert loading.REGISTRY[short] == hub
    assert {name for name in loading.REGISTRY if name.startswith("toy-")} == {
        registry.toy_name(name) for name in registry.toy_families()
    }


def test_unknown_names_get_a_one_line_answer(tmp_path) -> None:
    with pytest.raises(ValueError, match="model_type 'bert' is not a supported VLM family"):
        registry.family_of_model_type("bert")
    with pytest.raises(ValueError, match="unknown family 'gpt'; choose one of llava, "):
        build_tiny("gpt", tmp_path)


def test_toy_family_choice_comes_from_the_registry() -> None:
    from vrp.cli import main

    result = CliRunner().invoke(main, ["toy", "train", "--help"])
    assert result.exit_code == 0
    assert "[" + "|".join(registry.toy_families()) + "]" in result.output
    result = CliRunner().invoke(main, ["toy", "train", "--family", "nope", "--out", "x"])
    assert result.exit_code == 2 and "'nope' is not one of" in result.output
