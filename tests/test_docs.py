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
