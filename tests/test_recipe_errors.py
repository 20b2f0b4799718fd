"""A bad recipe gets one clear error before anything is built: the file, the line, the
key path, what was expected and what was found.

Each file in tests/recipes/bad/ ends with the error it must produce:
    # expect-line: N            (or none)
    # expect-path: elements[2].with.interval
    # expect-error: expected a whole number, found "five" (a string)
    # expect-file: ...          (only when the error is in another file than the recipe)
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from builder import BUILTIN_ELEMENTS
from builder.recipe.recipe import load_recipe
from builder.recipe.schemaerrors import RecipeError

HERE = Path(__file__).parent
BAD = HERE / "recipes" / "bad"
TEST_ELEMENTS = HERE / "elements"
BAD_RECIPES = sorted(BAD.glob("*.yml"))
BAKE = str(Path(sys.executable).parent / "bake")


def expectations(path: Path) -> dict[str, str]:
    subst = {"{builtin}": str(BUILTIN_ELEMENTS), "{test_elements}": str(TEST_ELEMENTS), "{here}": str(BAD)}
    out = {}
    for m in re.finditer(r"^# expect-(\w+):[ ]?(.*)$", path.read_text(), re.M):
        value = m.group(2)
        for k, v in subst.items():
            value = value.replace(k, v)
        out[m.group(1)] = value
    return out


@pytest.fixture(autouse=True)
def test_elements(monkeypatch):
    monkeypatch.setenv("BAKE_ELEMENTS_PATH", str(TEST_ELEMENTS))


def test_the_corpus_is_large_enough():
    assert len(BAD_RECIPES) >= 30


@pytest.mark.parametrize("recipe", BAD_RECIPES, ids=[p.stem for p in BAD_RECIPES])
def test_bad_recipe_gets_exact_error(recipe: Path):
    want = expectations(recipe)
    assert {"line", "path", "error"} <= set(want), f"{recipe.name} does not say what error it expects"
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe)
    err = info.value
    assert err.detail == want["error"]
    assert err.keypath == want["path"]
    assert err.line == (None if want["line"] == "none" else int(want["line"]))
    assert err.file == want.get("file", str(recipe))
    # The one-line message a person reads carries all of it.
    where = f"{err.file}:{err.line}" if err.line else err.file
    assert str(err).startswith(where + ": ")
    assert want["error"] in str(err)


def test_cli_prints_one_error_and_builds_nothing(tmp_path):
    recipe = BAD / "24-element-param-type.yml"
    env = dict(os.environ, BAKE_ELEMENTS_PATH=str(TEST_ELEMENTS))
    r = subprocess.run([BAKE, "build", str(recipe), "--output", str(tmp_path)], capture_output=True, text=True, env=env)
    assert r.returncode == 3  # recipe invalid
    assert r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        f'bake: error: {recipe}:8: elements[2].with.interval: expected a whole number, found "five" (a string)'
    ]
    assert list(tmp_path.iterdir()) == []


def test_validate_checks_every_recipe_and_fails_on_the_bad_one(tmp_path):
    good = HERE.parent / "recipes" / "lucid-uec.yml"
    bad = BAD / "12-unknown-key-typo.yml"
    r = subprocess.run([BAKE, "validate", str(good), str(bad)], capture_output=True, text=True)
    assert r.returncode == 3
    assert f"{good}: ok" in r.stdout
    assert f"{bad}:3: pakages: unknown key 'pakages' (did you mean 'packages'?)" in r.stderr
