"""The recipe reference is generated from the schema, so it cannot drift from it."""

from pathlib import Path

from builder.recipe.schemadoc import markdown

REPO = Path(__file__).resolve().parent.parent


def test_recipe_reference_matches_the_schema():
    doc = (REPO / "docs" / "recipe-reference.md").read_text()
    assert doc == markdown(), "docs/recipe-reference.md is stale: run `bake schema --markdown > docs/recipe-reference.md`"


def test_every_schema_key_is_in_the_reference():
    import json
    schema = json.loads((REPO / "builder" / "schema" / "recipe.schema.json").read_text())
    doc = (REPO / "docs" / "recipe-reference.md").read_text()
    for key in schema["properties"]:
        assert f"| `{key}` |" in doc


def test_the_readme_names_every_scrub_operation_in_order():
    import re
    from builder.customize.scrub import NAMES
    readme = (REPO / "README.md").read_text()
    start = readme.index("by named operations:")
    listed = re.findall(r"`([a-z-]+)`", readme[start:readme.index("(each explained", start)])
    assert listed == list(NAMES)
