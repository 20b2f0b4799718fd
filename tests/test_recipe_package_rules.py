"""The built-in elements' package rules give every supported release the package names
it really has: module-init-tools or kmod, iproute or iproute2, a DHCP client where
ifupdown needs one, and never both names of one tool."""

from __future__ import annotations

import pytest

from builder import BUILTIN_ELEMENTS
from builder.recipe.distro import DEBIAN_ALIASES, DEBIAN_SUITES, UBUNTU_SUITES, profile_for, supported_suites
from builder.recipe.elements import load_element, package_applies
from builder.pipeline.plan import collect_packages
from builder.recipe.recipe import load_recipe
from builder.recipe.schemaerrors import RecipeError

RELEASES = [f"{d}/{s}" for d in ("debian", "ubuntu") for s in supported_suites(d)]
ELEMENTS = sorted(p for p in BUILTIN_ELEMENTS.iterdir() if (p / "package-installs.yaml").is_file())


def packages_of(release: str) -> set[str]:
    """What the built-in elements install on `release` (besides the kernel)."""
    prof = profile_for(release)
    out = set()
    for path in ELEMENTS:
        for pkg, rule in load_element(path).packages.items():
            if package_applies(rule, distro=prof.distro, suite=prof.suite, init=prof.init_system):
                out.add(pkg)
    return out


def test_every_suite_a_rule_names_is_one_bake_supports():
    known = set(supported_suites("debian")) | set(supported_suites("ubuntu"))
    for path in ELEMENTS:
        for pkg, rule in load_element(path).packages.items():
            for key in ("suite", "since", "until"):
                suites = (rule or {}).get(key) or []
                for suite in [suites] if isinstance(suites, str) else suites:
                    assert suite in known, f"{path.name}: {pkg}.{key}: unknown or unsupported suite {suite!r}"


def holds(rule, release):
    prof = profile_for(release)
    return package_applies(rule, distro=prof.distro, suite=prof.suite, init=prof.init_system)


def test_since_holds_from_the_named_release_of_each_distribution_on():
    rule = {"since": ["bookworm", "noble"]}
    assert [holds(rule, r) for r in ("debian/bullseye", "debian/bookworm", "debian/trixie", "debian/sid")] \
        == [False, True, True, True]
    assert [holds(rule, r) for r in ("ubuntu/jammy", "ubuntu/noble", "ubuntu/plucky")] == [False, True, True]


def test_until_holds_up_to_the_named_release_and_never_for_a_distribution_not_named():
    rule = {"until": "quantal"}
    assert [holds(rule, r) for r in ("ubuntu/lucid", "ubuntu/quantal", "ubuntu/raring")] == [True, True, False]
    assert not holds(rule, "debian/jessie") and not holds(rule, "debian/unstable")


def test_since_and_until_together_bound_a_range_and_combine_with_init():
    rule = {"init": "upstart", "since": "oneiric", "until": "trusty"}
    assert [holds(rule, f"ubuntu/{s}") for s in ("natty", "oneiric", "trusty", "utopic", "vivid")] \
        == [False, True, True, False, False]


@pytest.mark.parametrize("rules, said", [
    ("pkg:\n  since: bookwrm\n", "pkg.since: unknown suite 'bookwrm'"),
    ("pkg:\n  until: [buster, bullseye]\n", "pkg.until: two debian suites (buster, bullseye)"),
    ("pkg:\n  since: testing\n", "pkg.since: 'testing' moves from release to release"),
    ("pkg:\n  suite: [lucid, jammmy]\n", "pkg.suite: unknown suite 'jammmy'"),
])
def test_a_rule_naming_a_suite_wrongly_is_refused_at_its_line(tmp_path, rules, said):
    el = tmp_path / "myelement"
    el.mkdir()
    (el / "element.yaml").write_text("description: a test element\n")
    (el / "package-installs.yaml").write_text("other:\n" + rules)
    with pytest.raises(RecipeError) as e:
        load_element(el)
    assert said in str(e.value)
    assert str(e.value).startswith(f"{el / 'package-installs.yaml'}:3:")


@pytest.mark.parametrize("release", RELEASES)
def test_each_release_gets_one_name_for_each_tool(release):
    pkgs = packages_of(release)
    assert len(pkgs & {"kmod", "module-init-tools"}) == 1, sorted(pkgs)
    assert len(pkgs & {"iproute2", "iproute"}) == 1, sorted(pkgs)
    assert len(pkgs & {"dhcp3-client", "isc-dhcp-client"}) <= 1, sorted(pkgs)
    if profile_for(release).init_system == "upstart":
        assert {"ifupdown"} <= pkgs and pkgs & {"dhcp3-client", "isc-dhcp-client"}, sorted(pkgs)
    else:
        assert {"systemd-sysv"} <= pkgs and not pkgs & {"ifupdown", "dhcp3-client", "isc-dhcp-client"}, sorted(pkgs)


@pytest.mark.parametrize("old, new, first", [("module-init-tools", "kmod", "raring"),
                                              ("iproute", "iproute2", "trusty")])
def test_tools_have_their_old_name_on_ubuntu_before_the_rename_and_the_new_one_after_and_on_debian(old, new, first):
    for suite in supported_suites("ubuntu"):
        want = new if UBUNTU_SUITES.index(suite) >= UBUNTU_SUITES.index(first) else old
        assert want in packages_of(f"ubuntu/{suite}"), suite
    for suite in supported_suites("debian"):
        assert new in packages_of(f"debian/{suite}"), suite


def test_jammy_gets_kmod_and_iproute2_and_precise_gets_their_old_names():
    assert {"kmod", "iproute2"} <= packages_of("ubuntu/jammy")
    assert {"module-init-tools", "iproute", "isc-dhcp-client", "ifupdown"} <= packages_of("ubuntu/precise")


def test_resolved_is_its_own_package_only_from_bookworm_and_lunar_on():
    for release in RELEASES:
        distro, suite = release.split("/")
        if distro == "debian":
            own = suite in DEBIAN_ALIASES or DEBIAN_SUITES.index(suite) >= DEBIAN_SUITES.index("bookworm")
        else:
            own = UBUNTU_SUITES.index(suite) >= UBUNTU_SUITES.index("lunar")
        assert ("systemd-resolved" in packages_of(release)) == own, release


def test_zstd_comes_only_where_initramfs_tools_compresses_with_it():
    assert "zstd" in packages_of("debian/bookworm")
    assert "zstd" in packages_of("debian/testing")
    assert "zstd" not in packages_of("debian/bullseye")
    assert "zstd" not in packages_of("debian/jessie")  # jessie has no zstd package at all


def test_the_plan_of_a_jammy_recipe_lists_kmod_and_iproute2(tmp_path, monkeypatch):
    monkeypatch.delenv("BAKE_ELEMENTS_PATH", raising=False)
    f = tmp_path / "jammy.yml"
    f.write_text("name: jammy\nrelease: ubuntu/jammy\nmirror: http://archive.test/ubuntu\n")
    pkgs = dict(collect_packages(load_recipe(f)))
    assert pkgs["kmod"] == "element base" and pkgs["iproute2"] == "element base"
    assert "module-init-tools" not in pkgs and "iproute" not in pkgs
