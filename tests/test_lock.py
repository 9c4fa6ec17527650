"""The lock (requirements/lock.txt, what `make` and CI install) agrees with pyproject.toml's ranges and the Makefile."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LOCKED_EXTRAS = ("test", "bench")  # what `make lock` resolves (the Makefile's lock target)


def lock_entries() -> dict[str, list[Requirement]]:
    """Canonical name -> the lock's `name==version ; marker` lines for it (a universal lock may fork by marker)."""
    entries: dict[str, list[Requirement]] = {}
    for line in (ROOT / "requirements" / "lock.txt").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            req = Requirement(line)
            entries.setdefault(canonicalize_name(req.name), []).append(req)
    return entries


def project_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    for extra in LOCKED_EXTRAS:
        lines += project["optional-dependencies"][extra]
    return [Requirement(line) for line in lines]


def pinned_version(req: Requirement) -> str:
    (spec,) = req.specifier
    assert spec.operator == "==", f"lock line {req} is not a pin"
    return spec.version


def test_every_lock_line_is_a_pin():
    for reqs in lock_entries().values():
        for req in reqs:
            pinned_version(req)


def test_lock_satisfies_pyproject_ranges():
    entries = lock_entries()
    for req in project_requirements():
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # e.g. bitsandbytes on macOS: not for this platform
        locked = entries.get(canonicalize_name(req.name))
        assert locked, f"{req.name} ({req}) is missing from requirements/lock.txt: run make lock"
        for line in locked:
            version = pinned_version(line)
            assert req.specifier.contains(version, prereleases=True), \
                f"lock pins {req.name}=={version}, outside pyproject.toml's {req}: run make lock"


def test_makefile_installs_the_locked_torch():
    makefile = (ROOT / "Makefile").read_text()
    spec = re.search(r"^TORCH_SPEC \?= (\S+)$", makefile, re.M).group(1)
    (torch,) = lock_entries()["torch"]
    assert spec == f"torch=={pinned_version(torch)}"
    pins = (ROOT / "requirements" / "pins.txt").read_text()
    assert f"torch=={pinned_version(torch)}" in pins.split()
