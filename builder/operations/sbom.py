"""The SBOM of a release: an SPDX 2.3 document (JSON) of an image's Debian packages, each
with its version, architecture, source package and a `pkg:deb` package URL."""

from __future__ import annotations

import re
import uuid
from importlib.metadata import PackageNotFoundError, version
from typing import Any
from urllib.parse import quote

from builder.core.record import Build


def _spdx_id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "-", text)


def purl(distro: str, pkg: dict[str, str]) -> str:
    """The package URL of a Debian package: pkg:deb/DISTRO/NAME@VERSION?arch=ARCH."""
    return (f"pkg:deb/{distro}/{quote(pkg['name'].lower(), safe='')}@{quote(pkg['version'], safe='')}"
            f"?arch={quote(pkg['arch'], safe='')}")


def sbom(build: Build, image_digest: str, created: str) -> dict[str, Any]:
    """An SPDX 2.3 document (JSON) of the image: the image itself as the package the
    document describes, containing every Debian package installed in it."""
    recipe = build.dir.parent.name
    release = str(build.data.get("release") or "debian/unknown")
    distro = release.split("/")[0] or "debian"
    image = {"SPDXID": "SPDXRef-Image", "name": recipe, "versionInfo": build.id,
             "downloadLocation": "NOASSERTION", "filesAnalyzed": False, "primaryPackagePurpose": "OPERATING-SYSTEM",
             "checksums": [{"algorithm": "SHA256", "checksumValue": image_digest}],
             "comment": (f"partition image of {release} ({build.data.get('arch', '?')}) "
                         f"baked by bake from recipe {recipe}")}
    packages, relationships, seen = [image], [], set()
    relationships.append({"spdxElementId": "SPDXRef-DOCUMENT", "relationshipType": "DESCRIBES",
                          "relatedSpdxElement": "SPDXRef-Image"})
    for pkg in build.data.get("packages") or []:
        spdx_id = base = f"SPDXRef-deb-{_spdx_id(pkg['name'])}-{_spdx_id(pkg['arch'])}"
        n = 1
        while spdx_id in seen:
            n += 1
            spdx_id = f"{base}-{n}"
        seen.add(spdx_id)
        entry: dict[str, Any] = {
            "SPDXID": spdx_id, "name": pkg["name"], "versionInfo": pkg["version"],
            "downloadLocation": "NOASSERTION", "filesAnalyzed": False,
            "externalRefs": [{"referenceCategory": "PACKAGE-MANAGER", "referenceType": "purl",
                              "referenceLocator": purl(distro, pkg)}]}
        if pkg.get("source"):
            entry["sourceInfo"] = (f"built from the {distro} source package {pkg['source']} "
                                   f"{pkg.get('source_version') or pkg['version']}")
        packages.append(entry)
        relationships.append({"spdxElementId": "SPDXRef-Image", "relationshipType": "CONTAINS",
                              "relatedSpdxElement": spdx_id})
    return {
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": f"{recipe}-{build.id}",
        # unique per release: releasing the same build again is another document
        "documentNamespace": (f"https://spdx.org/spdxdocs/bake/{quote(recipe, safe='')}/"
                              f"{quote(build.id, safe='')}/{uuid.uuid4()}"),
        "creationInfo": {"created": created, "creators": [f"Tool: bake-{_bake_version()}"]},
        "documentDescribes": ["SPDXRef-Image"],
        "packages": packages,
        "relationships": relationships,
    }


def _bake_version() -> str:
    try:
        return version("bake")
    except PackageNotFoundError:
        return "unknown"
