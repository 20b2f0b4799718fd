"""A release is a suite bake knows: an unknown name, a suite of the other distribution
and a release too old to build are each refused with a message that says which; the
archive a build reads must be a URL; a plan names only the suites the release has."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from builder.recipe.distro import UBUNTU_SUITES, profile_for, supported_suites
from builder.core.errors import BakeError
from builder.pipeline.plan import make_plan
from builder.recipe.recipe import load_recipe
from conftest import BAKE

DEBIAN_KNOWN = "jessie, stretch, buster, bullseye, bookworm, trixie, forky, sid, stable, testing, unstable"


def bake(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("BAKE_ELEMENTS_PATH", "BAKE_MIRROR")}
    return subprocess.run([BAKE, *argv], capture_output=True, text=True, env={**base, **(env or {})})


def recipe(tmp_path: Path, release: str, extra: str = "") -> Path:
    f = tmp_path / "recipe.yml"
    f.write_text(f"name: demo\nrelease: {release}\n{extra}")
    return f


def release_error(tmp_path: Path, release: str) -> str:
    f = recipe(tmp_path, release)
    r = bake("validate", str(f))
    assert r.returncode == 3 and r.stdout == ""
    prefix = f"bake: error: {f}:2: release: "
    line = r.stderr.strip()
    assert "\n" not in line and line.startswith(prefix), r.stderr
    return line[len(prefix):]


def test_an_unknown_debian_suite_is_refused_naming_the_known_ones(tmp_path):
    assert release_error(tmp_path, "debian/nosuchsuite") == f"unknown Debian suite 'nosuchsuite' (known: {DEBIAN_KNOWN})"


def test_an_unknown_ubuntu_suite_is_refused_naming_the_known_ones(tmp_path):
    message = release_error(tmp_path, "ubuntu/nosuchsuite")
    assert message.startswith("unknown Ubuntu suite 'nosuchsuite' (known: lucid, maverick, natty, ")
    assert message.endswith(", jammy, kinetic, lunar, mantic, noble, oracular, plucky, questing)")


def test_a_misspelt_suite_gets_the_nearest_name(tmp_path):
    assert release_error(tmp_path, "debian/bokworm") == "unknown Debian suite 'bokworm' (did you mean 'bookworm'?)"
    assert release_error(tmp_path, "ubuntu/jamy") == "unknown Ubuntu suite 'jamy' (did you mean 'jammy'?)"


def test_a_suite_of_the_other_distribution_is_refused_with_the_right_release(tmp_path):
    assert release_error(tmp_path, "ubuntu/bookworm") == (
        "'bookworm' is a Debian suite, not an Ubuntu one (did you mean debian/bookworm?)")
    assert release_error(tmp_path, "debian/jammy") == (
        "'jammy' is an Ubuntu suite, not a Debian one (did you mean ubuntu/jammy?)")


@pytest.mark.parametrize("suite", ["wheezy", "squeeze", "etch", "buzz"])
def test_an_old_debian_release_is_refused_as_too_old(tmp_path, suite):
    assert release_error(tmp_path, f"debian/{suite}") == "Debian releases before jessie (no systemd) are not supported"


@pytest.mark.parametrize("suite", ["karmic", "hardy", "warty"])
def test_an_ubuntu_release_before_lucid_is_refused_as_too_old(tmp_path, suite):
    assert release_error(tmp_path, f"ubuntu/{suite}") == "Ubuntu releases before lucid (10.04) are not supported"


def test_every_supported_release_validates(tmp_path):
    files = []
    for distro in ("debian", "ubuntu"):
        for suite in supported_suites(distro):
            d = tmp_path / f"{distro}-{suite}"
            d.mkdir()
            files.append(str(recipe(d, f"{distro}/{suite}")))
    r = bake("validate", *files)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count(": ok (") == len(files) == 11 + 32


def test_ubuntu_releases_are_listed_in_order_from_warty_to_questing():
    assert len(UBUNTU_SUITES) == 43  # 4.10 to 25.10, two a year from 5.04 on, with 6.06 in place of 6.04
    assert UBUNTU_SUITES[0] == "warty" and UBUNTU_SUITES[-1] == "questing"
    assert UBUNTU_SUITES.index("lucid") < UBUNTU_SUITES.index("precise") < UBUNTU_SUITES.index("trusty") \
        < UBUNTU_SUITES.index("xenial") < UBUNTU_SUITES.index("jammy") < UBUNTU_SUITES.index("noble")


def test_ubuntu_runs_upstart_up_to_utopic_and_systemd_from_vivid_on():
    for suite in supported_suites("ubuntu"):
        want = "upstart" if UBUNTU_SUITES.index(suite) < UBUNTU_SUITES.index("vivid") else "systemd"
        assert profile_for(f"ubuntu/{suite}").init_system == want, suite


def test_debian_before_buster_gets_the_generic_kernel_as_it_has_no_cloud_flavour():
    assert profile_for("debian/jessie").kernel_package("x86_64") == "linux-image-amd64"
    assert profile_for("debian/stretch").kernel_package("x86_64") == "linux-image-amd64"
    assert profile_for("debian/buster").kernel_package("x86_64") == "linux-image-cloud-amd64"
    assert profile_for("debian/testing").kernel_package("x86_64") == "linux-image-cloud-amd64"


def test_profile_for_an_unknown_release_is_a_bake_error():
    with pytest.raises(BakeError, match="unknown Ubuntu suite 'nosuchsuite'"):
        profile_for("ubuntu/nosuchsuite")


# --- security and updates suites in the plan --------------------------------------------

@pytest.mark.parametrize("suite", ["sid", "unstable"])
def test_sid_gets_no_security_mirror_and_no_security_or_updates_suite(tmp_path, monkeypatch, suite):
    monkeypatch.delenv("BAKE_MIRROR", raising=False)
    plan = make_plan(load_recipe(recipe(tmp_path, f"debian/{suite}", "mirror: http://mirror.test/debian\n")),
                     tmp_path / "output")
    assert plan.security_mirror is None
    assert plan.apt_sources == f"deb http://mirror.test/debian {suite} main\n"
    assert "mirror   http://mirror.test/debian\n" in plan.render()


def test_testing_keeps_its_security_suite(tmp_path, monkeypatch):
    monkeypatch.delenv("BAKE_MIRROR", raising=False)
    plan = make_plan(load_recipe(recipe(tmp_path, "debian/testing", "mirror: http://mirror.test/debian\n")),
                     tmp_path / "output")
    assert plan.security_mirror == "http://mirror.test/debian-security"
    assert "deb http://mirror.test/debian-security testing-security main" in plan.apt_sources.splitlines()


def test_the_plan_of_sid_shows_no_security_mirror(tmp_path):
    f = recipe(tmp_path, "debian/sid", "mirror: http://mirror.test/debian\n")
    r = bake("plan", str(f), "--output", str(tmp_path / "output"))
    assert r.returncode == 0, r.stderr
    assert "mirror   http://mirror.test/debian\n" in r.stdout


# --- mirrors --------------------------------------------------------------------------

def test_bake_mirror_that_is_not_a_url_is_refused_before_anything_runs(tmp_path):
    f = recipe(tmp_path, "debian/bookworm", "mirror: http://mirror.test/debian\n")
    r = bake("plan", str(f), "--output", str(tmp_path / "output"), env={"BAKE_MIRROR": "notaurl"})
    assert r.returncode == 1
    assert r.stdout == ""
    assert r.stderr.strip() == 'bake: error: BAKE_MIRROR: expected an http://, https:// or file:// URL, found "notaurl"'
    assert not (tmp_path / "output").exists()


@pytest.mark.parametrize("mirror", ["notaurl", "http://", "ftp://ftp.test/debian", "http://mirror.test/deb ian"])
def test_a_recipe_mirror_that_is_not_an_archive_url_is_refused(tmp_path, mirror):
    f = recipe(tmp_path, "debian/bookworm", f"mirror: '{mirror}'\n")
    r = bake("validate", str(f))
    assert r.returncode == 3
    assert r.stderr.strip() == (
        f'bake: error: {f}:3: mirror: expected an http://, https:// or file:// URL, found "{mirror}" (a string)')


@pytest.mark.parametrize("mirror", ["http://deb.debian.org/debian", "https://mirror.test:8443/debian/", "file:///srv/mirror"])
def test_archive_urls_are_accepted_as_mirrors(tmp_path, mirror):
    r = bake("validate", str(recipe(tmp_path, "debian/bookworm", f"mirror: {mirror}\n")))
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("release, ok", [
    ("debian/bookworm", True), ("debian/trixie", False), ("debian/stable", False), ("debian/sid", False),
    ("ubuntu/lucid", True), ("ubuntu/bionic", True), ("ubuntu/eoan", False), ("ubuntu/noble", False),
])
def test_i386_is_refused_where_the_release_has_no_i386_kernel(tmp_path, release, ok):
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"name: r\nrelease: {release}\narch: i386\n")
    proc = subprocess.run([BAKE, "validate", str(recipe)], capture_output=True, text=True)
    if ok:
        assert proc.returncode == 0, proc.stderr
    else:
        assert proc.returncode == 3
        assert f"{recipe}:3: arch: {release} has no i386 kernel; use x86_64" in proc.stderr
