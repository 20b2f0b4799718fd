"""What differs between distributions and releases, in one place.

A stage asks the profile (init system, kernel package, filesystem features, how modules
are loaded at boot, where the archive is) instead of testing suite names itself.
"""

from __future__ import annotations

import difflib
import glob
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from builder.core.errors import BakeError
from builder.recipe.schema import recipe_schema

# Every release's code name, oldest first; what a suite may be and what it is decided by
# where it falls in these lists.
UBUNTU_SUITES = (
    "warty", "hoary", "breezy", "dapper", "edgy", "feisty", "gutsy", "hardy",             # 4.10-8.04
    "intrepid", "jaunty", "karmic", "lucid", "maverick", "natty", "oneiric", "precise",    # 8.10-12.04
    "quantal", "raring", "saucy", "trusty", "utopic", "vivid", "wily", "xenial",           # 12.10-16.04
    "yakkety", "zesty", "artful", "bionic", "cosmic", "disco", "eoan", "focal",            # 16.10-20.04
    "groovy", "hirsute", "impish", "jammy", "kinetic", "lunar", "mantic", "noble",         # 20.10-24.04
    "oracular", "plucky", "questing",                                                      # 24.10-25.10
)
DEBIAN_SUITES = (
    "buzz", "rex", "bo", "hamm", "slink", "potato", "woody", "sarge", "etch", "lenny",     # 1.1-5
    "squeeze", "wheezy", "jessie", "stretch", "buster", "bullseye", "bookworm", "trixie",  # 6-13
    "forky",                                                                               # 14
)
# Names that are no one release: unstable's code name and the aliases that move on with
# each release. All of them are newer than every release bake refuses.
DEBIAN_ALIASES = ("sid", "stable", "testing", "unstable")
# sid never becomes a release: it has neither a security nor an updates suite.
DEBIAN_ROLLING = ("sid", "unstable")

# The oldest supported: Lucid is the historic target; Debian from jessie, its first
# release with systemd as the default init.
UBUNTU_FIRST = "lucid"
DEBIAN_FIRST = "jessie"
# Ubuntu ran upstart from 9.10 to 14.10; 15.04 (vivid) switched to systemd.
UBUNTU_FIRST_SYSTEMD = "vivid"
# Debian releases whose security suite is "<suite>/updates" rather than "<suite>-security".
DEBIAN_OLD_SECURITY = ("jessie", "stretch", "buster")


def suite_at_least(distro: str, suite: str, first: str) -> bool:
    """Whether `suite` of `distro` is `first` or a later release (Debian's moving
    names count as later than every code name)."""
    if distro == "debian":
        if suite in DEBIAN_ALIASES:
            return True
        return DEBIAN_SUITES.index(suite) >= DEBIAN_SUITES.index(first)
    return UBUNTU_SUITES.index(suite) >= UBUNTU_SUITES.index(first)


def distro_of_suite(suite: str) -> str | None:
    """"debian" or "ubuntu" for a suite name of either (no name is both), else None."""
    if suite in DEBIAN_SUITES or suite in DEBIAN_ALIASES:
        return "debian"
    return "ubuntu" if suite in UBUNTU_SUITES else None


def supported_suites(distro: str) -> tuple[str, ...]:
    """The suites of `distro` bake can build, oldest first (Debian's moving names last)."""
    if distro == "debian":
        return DEBIAN_SUITES[DEBIAN_SUITES.index(DEBIAN_FIRST):] + DEBIAN_ALIASES
    return UBUNTU_SUITES[UBUNTU_SUITES.index(UBUNTU_FIRST):]


# ext4 features Linux 2.6.32 and e2fsprogs 1.41 (Lucid) understand: no 64bit, no
# metadata_csum, no orphan_file; uninit_bg instead of metadata_csum's group checksums.
EXT4_LEGACY = ["has_journal", "ext_attr", "resize_inode", "dir_index", "filetype", "extent",
               "flex_bg", "sparse_super", "large_file", "huge_file", "uninit_bg", "dir_nlink", "extra_isize"]
EXT4_CURRENT = ["has_journal", "ext_attr", "resize_inode", "dir_index", "filetype", "extent",
                "64bit", "flex_bg", "sparse_super", "large_file", "huge_file", "dir_nlink",
                "extra_isize", "metadata_csum"]
EXT3 = ["has_journal", "ext_attr", "resize_inode", "dir_index", "filetype", "sparse_super", "large_file"]

DEB_ARCH = {"x86_64": "amd64", "i386": "i386"}

UBUNTU_KEYRING = "/usr/share/keyrings/ubuntu-archive-keyring.gpg"
UBUNTU_REMOVED_KEYRING = "/usr/share/keyrings/ubuntu-archive-removed-keys.gpg"


@dataclass(frozen=True)
class Profile:
    """The facts of one distribution release that stages need."""

    distro: str
    suite: str
    # "systemd" or "upstart"; also where modules are loaded at boot from (modules-load.d
    # or /etc/modules), which the acpiphp element decides by BAKE_INIT_SYSTEM
    init_system: str
    legacy_kernel: bool         # 2.6-era kernel and e2fsprogs: conservative filesystem features
    keyrings: tuple[str, ...] = field(default=())

    def kernel_package(self, arch: str) -> str:
        """The virtual-machine kernel this release ships for `arch`."""
        if self.distro == "ubuntu":
            return "linux-image-virtual"
        if arch != "x86_64":
            return "linux-image-686-pae"
        # The cloud flavour (virtio and Xen drivers, no hardware ones) came with buster.
        return "linux-image-cloud-amd64" if suite_at_least("debian", self.suite, "buster") else "linux-image-amd64"

    def has_arch(self, arch: str) -> bool:
        """Whether the release ships a kernel for `arch`: Debian dropped i386 as a
        release architecture with trixie, Ubuntu with eoan (19.10)."""
        if arch == "x86_64":
            return True
        if self.distro == "debian":
            return not suite_at_least("debian", self.suite, "trixie")
        return not suite_at_least("ubuntu", self.suite, "eoan")

    def mkfs_features(self, filesystem: str) -> list[str]:
        """Filesystem features the target's kernel and e2fsck understand."""
        if filesystem == "ext3":
            return list(EXT3)
        return list(EXT4_LEGACY if self.legacy_kernel else EXT4_CURRENT)

    def inode_size(self) -> int:
        return 256

    def security_suite(self) -> str | None:
        """The suite security updates come in, or None where the release has none."""
        # testing has one (testing-security), though its fixes may come late; sid has none.
        if self.distro == "ubuntu":
            return f"{self.suite}-security"
        if self.suite in DEBIAN_ROLLING:
            return None
        if self.suite in DEBIAN_OLD_SECURITY:
            return f"{self.suite}/updates"
        return f"{self.suite}-security"

    def updates_suite(self) -> str | None:
        """The stable-updates style suite, or None where the release has none."""
        if self.distro == "debian" and self.suite in DEBIAN_ROLLING:
            return None
        return f"{self.suite}-updates"

    def apt_sources(self, mirror: str, security_mirror: str | None, components: list[str]) -> str:
        """The image's /etc/apt/sources.list."""
        comps = " ".join(components)
        lines = [f"deb {mirror} {self.suite} {comps}"]
        if self.updates_suite():
            lines.append(f"deb {mirror} {self.updates_suite()} {comps}")
        sec = self.security_suite()
        if security_mirror and sec:
            lines.append(f"deb {security_mirror} {sec} {comps}")
        return "\n".join(lines) + "\n"

    def debootstrap_keyring(self, environ: Mapping[str, str] | None = None) -> str:
        """The keyring debootstrap checks the archive's Release signature with:
        `BAKE_KEYRING`, else the first of the release's usual keyrings on this host.
        A BakeError when there is none: debootstrap would otherwise warn and install
        packages it cannot check (Debian 12 packages no Ubuntu keyring)."""
        environ = os.environ if environ is None else environ
        given = environ.get("BAKE_KEYRING", "").strip()
        if given:
            if not os.path.isfile(given):
                raise BakeError(f"BAKE_KEYRING={given}: no such file (a keyring of the archive's signing keys)")
            return given
        for k in self.keyrings:
            if os.path.exists(k):
                return k
        raise BakeError(f"no keyring to check the {self.distro} archive's signatures with: looked for "
                        f"{' and '.join(self.keyrings)}; install the distribution's archive keyring there "
                        f"or set BAKE_KEYRING to a keyring file holding the archive's signing keys")

    def debootstrap_script(self, scripts: str = "/usr/share/debootstrap/scripts") -> str | None:
        """The script to name when this host's debootstrap predates the suite (it knows
        releases up to its own): the one every Ubuntu suite since gutsy, or every Debian
        suite, links to. None when debootstrap has a script of the suite's name."""
        if os.path.exists(os.path.join(scripts, self.suite)):
            return None
        return "gutsy" if self.distro == "ubuntu" else "sid"


_NAME = {"debian": "Debian", "ubuntu": "Ubuntu"}
_A_NAME = {"debian": "a Debian", "ubuntu": "an Ubuntu"}


def _all_suites(distro: str) -> tuple[str, ...]:
    return DEBIAN_SUITES + DEBIAN_ALIASES if distro == "debian" else UBUNTU_SUITES


def check_suite(distro: str, suite: str) -> None:
    """Nothing if bake can build `distro`/`suite`; else a BakeError saying why: too old,
    a suite of the other distribution, or no such suite (with the nearest known name)."""
    release = f"release {distro}/{suite}"
    other = "ubuntu" if distro == "debian" else "debian"
    if suite in _all_suites(distro):
        if distro == "debian" and not suite_at_least(distro, suite, DEBIAN_FIRST):
            raise BakeError(f"{release}: Debian releases before jessie (no systemd) are not supported")
        if distro == "ubuntu" and not suite_at_least(distro, suite, UBUNTU_FIRST):
            raise BakeError(f"{release}: Ubuntu releases before lucid (10.04) are not supported")
        return
    if suite in _all_suites(other):
        raise BakeError(f"{release}: '{suite}' is {_A_NAME[other]} suite, not {_A_NAME[distro]} one "
                        f"(did you mean {other}/{suite}?)")
    known = supported_suites(distro)
    hint = difflib.get_close_matches(suite, known, n=1)
    raise BakeError(f"{release}: unknown {_NAME[distro]} suite '{suite}' "
                    + (f"(did you mean '{hint[0]}'?)" if hint else f"(known: {', '.join(known)})"))


def profile_for(release: str) -> Profile:
    """The profile of `distro/suite`; a BakeError for a release bake does not know."""
    distro, _, suite = release.partition("/")
    if distro not in ("ubuntu", "debian"):
        raise BakeError(f"release {release}: unknown distribution '{distro}' (ubuntu or debian)")
    check_suite(distro, suite)
    if distro == "ubuntu":
        upstart = not suite_at_least("ubuntu", suite, UBUNTU_FIRST_SYSTEMD)
        legacy = suite in ("lucid", "maverick")
        # Releases up to precise were signed with the 2004 archive key, which Ubuntu's
        # keyring package has since moved to its removed-keys file; quantal on, with the
        # 2012 key (or later) only, which that file does not hold.
        keyrings = ((UBUNTU_KEYRING,) if suite_at_least("ubuntu", suite, "quantal")
                    else (UBUNTU_REMOVED_KEYRING, UBUNTU_KEYRING))
        return Profile("ubuntu", suite, "upstart" if upstart else "systemd", legacy, keyrings)
    return Profile("debian", suite, "systemd", False,
                   ("/usr/share/keyrings/debian-archive-keyring.gpg",))


# --- the build host's own apt sources -------------------------------------------------

@dataclass
class AptSource:
    uri: str
    suites: list[str]


def host_apt_sources(root: str = "/") -> list[AptSource]:
    """'deb' entries of the host's apt configuration (deb822 .sources and one-line .list)."""
    out: list[AptSource] = []
    base = Path(root) / "etc/apt"
    for f in sorted(glob.glob(str(base / "sources.list.d/*.sources"))):
        for stanza in re.split(r"\n\s*\n", Path(f).read_text()):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line or line[0].isspace():
                    continue
                k, _, v = line.partition(":")
                fields[k.strip().lower()] = v.strip()
            if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes").lower() == "no":
                continue
            for uri in fields.get("uris", "").split():
                out.append(AptSource(uri.rstrip("/"), fields.get("suites", "").split()))
    lists = [str(base / "sources.list")] + sorted(glob.glob(str(base / "sources.list.d/*.list")))
    for f in lists:
        if not os.path.isfile(f):
            continue
        for line in Path(f).read_text().splitlines():
            line = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
            if len(line) >= 3 and line[0] == "deb":
                out.append(AptSource(line[1].rstrip("/"), [line[2]]))
    return out


def host_distro(root: str = "/") -> str:
    try:
        text = (Path(root) / "etc/os-release").read_text()
    except OSError:
        return ""
    m = re.search(r"^ID=\"?([a-z]+)", text, re.M)
    return m.group(1) if m else ""


def default_mirrors(distro: str, root: str = "/") -> tuple[str | None, str | None]:
    """(main, security) archive URIs of the host's apt configuration for `distro`, when
    the host runs that distribution; (None, None) otherwise."""
    if host_distro(root) != distro:
        return None, None
    main = security = None
    for src in host_apt_sources(root):
        is_security = any(s.endswith("-security") or s.endswith("/updates") for s in src.suites)
        if is_security and security is None:
            security = src.uri
        elif not is_security and main is None:
            main = src.uri
    return main, security


def check_mirror_url(value: str, origin: str) -> None:
    """A BakeError naming `origin` unless `value` is an archive URL by the same rule the
    recipe schema applies to `mirror:`."""
    rule = recipe_schema()["properties"]["mirror"]
    if not re.search(rule["pattern"], value):
        raise BakeError(f"{origin}: expected {rule['x-expected']}, found {json.dumps(value)}")


def resolve_mirrors(distro: str, recipe_mirror: str | None, recipe_security: str | None,
                    security_given: bool, root: str = "/", *, use_env: bool = True) -> tuple[str, str | None]:
    """The archive to use: BAKE_MIRROR (unless not `use_env`: the image's own sources
    never name it), else the recipe's, else the host's own source.

    The security archive: the recipe's (null means none), else the host's, else the main
    mirror's sibling `<mirror>-security` (how Debian mirrors lay it out)."""
    env = os.environ.get("BAKE_MIRROR") if use_env else None
    if env:
        check_mirror_url(env, "BAKE_MIRROR")
    host_main, host_security = default_mirrors(distro, root)
    main = env or recipe_mirror or host_main
    if not main:
        raise BakeError(
            f"no {distro} mirror: this host's apt configuration has no {distro} source; "
            "set `mirror:` in the recipe or BAKE_MIRROR")
    main = main.rstrip("/")
    if security_given:
        return main, recipe_security.rstrip("/") if recipe_security else None
    if env or recipe_mirror or not host_security:
        # Ubuntu serves -security suites from the main archive; Debian from a sibling.
        return main, main if distro == "ubuntu" else main + "-security"
    return main, host_security
