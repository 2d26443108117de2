"""Every document the unit, the manifests and the README point an operator to exists,
and the unit's Documentation= is where the install puts the guide."""

from __future__ import annotations

import re
import sys

from tests.conftest import REPO

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def _pointed_docs() -> set[str]:
    out: set[str] = set()
    for path in [REPO / "README.md", *REPO.glob("systemd/*"), *REPO.glob("deploy/**/*.yaml")]:
        out |= set(re.findall(r"\b(docs/[a-z_-]+\.md)", path.read_text()))
    return out


def test_pointed_docs_exist() -> None:
    docs = _pointed_docs()
    assert "docs/operating.md" in docs
    missing = [d for d in docs if not (REPO / d).is_file()]
    assert missing == []


def test_unit_documentation_is_installed_there() -> None:
    unit = (REPO / "systemd" / "kvnode-agent.service").read_text()
    url = re.search(r"^Documentation=file://(\S+)$", unit, re.M)
    assert url is not None
    # The unit installs kvnode into a venv; its data files land under that prefix.
    prefix = re.search(r"(/\S+?)/share/doc/kvnode/operating\.md$", url.group(1))
    assert prefix is not None and f"venv {prefix.group(1)} " in unit  # the install it names
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    shipped = data["tool"]["setuptools"]["data-files"]["share/doc/kvnode"]
    assert "docs/operating.md" in shipped and all((REPO / f).is_file() for f in shipped)


def test_license_is_the_full_apache_text() -> None:
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and len(text.splitlines()) > 150
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["license"]
    assert meta == {"text": "Apache-2.0"}
