"""What would fail halfway through a build is refused by `bake validate` first: one
error line naming the file, the line, the key path, what was expected and what was found."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from builder.recipe.recipe import load_recipe
from builder.recipe.schema import recipe_schema
from builder.verify.checks import BUILTIN
from conftest import BAKE, REPO

HEAD = "name: demo\nrelease: debian/bookworm\n"


def validate(tmp_path: Path, text: str) -> tuple[int, str, str]:
    """Run the real `bake validate` on a recipe file with `text` beside a file to copy."""
    (tmp_path / "motd").write_text("hello\n")
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(text)
    env = {k: v for k, v in os.environ.items() if k not in ("BAKE_ELEMENTS_PATH", "BAKE_MIRROR")}
    r = subprocess.run([BAKE, "validate", str(recipe)], capture_output=True, text=True, env=env)
    return r.returncode, r.stdout, r.stderr


def refused(tmp_path: Path, text: str) -> str:
    """The one error line `bake validate` prints for a recipe it refuses, without the
    recipe's path."""
    rc, out, err = validate(tmp_path, text)
    assert rc == 3, out  # recipe invalid
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    prefix = f"bake: error: {tmp_path / 'recipe.yml'}:"
    assert lines[0].startswith(prefix), lines[0]
    return lines[0][len(prefix):]


def accepted(tmp_path: Path, text: str) -> None:
    rc, out, err = validate(tmp_path, text)
    assert rc == 0, err
    assert ": ok (" in out


# --- files[].dest ---------------------------------------------------------------------

def test_a_dest_outside_the_image_is_refused(tmp_path):
    assert refused(tmp_path, HEAD + "files: [{source: motd, dest: /../../../etc/escaped}]\n") == (
        "3: files[0].dest: expected a path that stays inside the image (no '..' component), "
        'found "/../../../etc/escaped" (a string)')


@pytest.mark.parametrize("dest", ["/etc/..", "/srv/app/../../../root/.ssh/authorized_keys", "/..", "/etc/../motd"])
def test_any_dot_dot_component_in_a_dest_is_refused(tmp_path, dest):
    text = HEAD + f"files:\n  - source: motd\n    dest: {dest}\n"
    assert refused(tmp_path, text) == (
        f"5: files[0].dest: expected a path that stays inside the image (no '..' component), found \"{dest}\" (a string)")


@pytest.mark.parametrize("dest", ["/etc/motd", "/etc//motd", "/etc/./motd", "/srv/a..b/..c", "/srv/.../x"])
def test_a_dest_inside_the_image_is_accepted_however_it_is_spelled(tmp_path, dest):
    accepted(tmp_path, HEAD + f"files:\n  - source: motd\n    dest: {dest}\n")


def test_a_relative_dest_is_still_refused_as_not_absolute(tmp_path):
    assert refused(tmp_path, HEAD + "files: [{source: motd, dest: ../etc/motd}]\n").startswith(
        "3: files[0].dest: expected an absolute path in the image, found")


# --- size -------------------------------------------------------------------------------

@pytest.mark.parametrize("size", ["0M", "1M", "127M", "0.1G", "0G"])
def test_a_size_too_small_for_any_image_is_refused(tmp_path, size):
    assert refused(tmp_path, HEAD + f"size: {size}\n") == (
        f'3: size: expected a size of at least 128M, found "{size}" (a string)')


@pytest.mark.parametrize("size", ["auto", "128M", "0.5G", "2G", "1536M"])
def test_sizes_that_can_hold_an_image_are_accepted(tmp_path, size):
    accepted(tmp_path, HEAD + f"size: {size}\n")


# --- users --------------------------------------------------------------------------------

def test_a_user_listed_twice_is_refused_where_it_is_repeated(tmp_path):
    text = HEAD + "users:\n  - name: admin\n    sudo: true\n  - name: ops\n  - name: admin\n"
    assert refused(tmp_path, text) == "7: users[2].name: user 'admin' is already listed at users[0]"


@pytest.mark.parametrize("name", ["root", "daemon", "nobody", "www-data", "_apt"])
def test_a_user_every_image_already_has_is_refused(tmp_path, name):
    message = refused(tmp_path, HEAD + f"users:\n  - name: {name}\n")
    assert message.startswith("4: users[0].name: expected a new account, not one every image already has (root, ")
    assert message.endswith(f'found "{name}" (a string)')


def test_names_that_only_begin_like_a_system_account_are_accepted(tmp_path):
    accepted(tmp_path, HEAD + "users:\n  - name: rooter\n  - name: binder\n  - name: admin\n")


# --- duplicate keys --------------------------------------------------------------------

def test_a_top_level_key_given_twice_is_refused_at_its_second_line(tmp_path):
    text = HEAD + "packages: [less]\narch: x86_64\npackages: [rsync]\n"
    assert refused(tmp_path, text) == "5: packages: key 'packages' is given twice (first at line 3)"


def test_a_nested_key_given_twice_is_refused_with_its_key_path(tmp_path):
    text = HEAD + "users:\n  - name: admin\n    sudo: true\n    sudo: false\n"
    assert refused(tmp_path, text) == "6: users[0].sudo: key 'sudo' is given twice (first at line 5)"


def test_a_key_given_twice_in_an_element_with_mapping_is_refused(tmp_path):
    text = HEAD + "elements:\n  - name: sync-agent\n    with: {label: a, interval: 5, label: b}\n"
    assert refused(tmp_path, text) == "5: elements[0].with.label: key 'label' is given twice (first at line 5)"


# --- verify.skip -------------------------------------------------------------------------

def test_an_unknown_check_in_verify_skip_is_refused_with_the_known_ones(tmp_path):
    assert refused(tmp_path, HEAD + "verify:\n  skip: [metadata, bootz]\n") == (
        "4: verify.skip[1]: expected one of boots, metadata, user-data, acpiphp, volume-hotplug, hygiene, "
        "sync-agent, found \"bootz\" (a string) (did you mean 'boots'?)")


def test_every_built_in_check_can_be_skipped(tmp_path):
    accepted(tmp_path, HEAD + f"verify:\n  skip: [{', '.join(BUILTIN)}]\n")


def test_the_schema_knows_exactly_the_built_in_checks():
    # The recipe loader does not import the verification machinery (QEMU and all), so the
    # schema lists the names; this keeps the two lists one.
    assert recipe_schema()["properties"]["verify"]["properties"]["skip"]["items"]["enum"] == list(BUILTIN)


# --- YAML syntax errors point where the problem starts --------------------------------

def test_an_unclosed_bracket_is_reported_on_its_own_line(tmp_path):
    text = "".join(f"# comment {i}\n" for i in range(1, 11)) + (
        "name: demo\nrelease: debian/bookworm\npackages: [oops\nusers:\n  - name: admin\narch: x86_64\n")
    assert refused(tmp_path, text) == (
        "13: not valid YAML: while parsing a flow sequence, expected ',' or ']', but got ':'")


def test_an_unclosed_quote_on_line_1_is_reported_on_line_1(tmp_path):
    assert refused(tmp_path, 'name: "demo\nrelease: debian/bookworm\n') == (
        "1: not valid YAML: while scanning a quoted scalar, found unexpected end of stream")


def test_an_unclosed_brace_is_reported_on_its_own_line(tmp_path):
    text = HEAD + "kernel: {package: linux-image-amd64\nsize: auto\n"
    assert refused(tmp_path, text).startswith("3: not valid YAML: while parsing a flow mapping")


def test_a_line_without_a_colon_is_reported_on_that_line(tmp_path):
    assert refused(tmp_path, "name: demo\noops\nrelease: debian/bookworm\n") == (
        "2: not valid YAML: while scanning a simple key, could not find expected ':'")


def test_a_badly_indented_key_is_reported_on_its_line_not_where_the_mapping_began(tmp_path):
    text = HEAD + "users:\n  - name: admin\n sudo: true\n"
    assert refused(tmp_path, text).startswith("5: not valid YAML: while parsing a block mapping")


# --- the documented element form --------------------------------------------------------

def test_the_element_form_the_elements_readme_shows_is_accepted(tmp_path):
    readme = (REPO / "builder" / "elements" / "README.md").read_text()
    m = re.search(r"^    elements:\n(?:^      .*\n)+", readme, re.M)
    assert m, "elements/README.md shows no `elements:` example"
    snippet = "\n".join(line[4:] for line in m.group(0).splitlines()) + "\n"
    assert "- name: sync-agent" in snippet
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(HEAD + snippet)
    r = load_recipe(recipe)
    assert {u.name: u.params for u in r.elements}["sync-agent"]["label"] == "rootsync"
