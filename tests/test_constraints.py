"""constraints.txt is the lock `make demo` and `make test` install from: exact pins only, every
dependency pyproject.toml names is pinned in it, and the suite runs with exactly those versions."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)$")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins() -> dict[str, str]:
    lines = (REPO / "constraints.txt").read_text(encoding="utf-8").splitlines()
    out = {}
    for line in lines:
        if not line.strip() or line.startswith("#"):
            continue
        match = PIN.match(line.strip())
        assert match, f"constraints.txt: {line!r} is not an exact pin NAME==VERSION"
        out[canonical(match[1])] = match[2]
    return out


def declared() -> set[str]:
    """Every distribution pyproject.toml names for what `make test` installs: the dependencies
    and the Makefile's EXTRAS (torch is left to TORCH; the GPU-only `vllm` extra is not here)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    line = re.search(r"^EXTRAS := (\S+)$", (REPO / "Makefile").read_text(), re.M)
    assert line, "the Makefile names the extras `make test` installs in EXTRAS"
    extras = line[1].split(",")
    optional = project["optional-dependencies"]
    requirements = [*project["dependencies"], *(r for extra in extras for r in optional[extra])]
    names = {canonical(re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0]) for r in requirements}
    return names - {"torch"}


def test_every_line_is_an_exact_pin_and_torch_and_selm_are_not_in_it():
    locked = pins()
    assert "torch" not in locked  # the Makefile's TORCH picks the build (CPU here, CUDA there)
    assert "selm" not in locked


def test_every_declared_dependency_is_pinned():
    assert sorted(declared() - set(pins())) == []


def test_the_suite_runs_with_the_locked_versions():
    """What is installed is what constraints.txt says (run `make test`, which installs it)."""
    differ = {}
    for name, want in pins().items():
        try:  # the first on sys.path, as import finds it (setuptools puts its own vendored
            have = metadata.version(name)  # packaging and typing_extensions on sys.path too)
        except metadata.PackageNotFoundError:
            continue
        if have != want:
            differ[name] = (want, have)
    assert differ == {}, (f"installed versions differ from constraints.txt (locked, installed): "
                          f"{differ}; `make test` installs the lock, `make lock` renews it")
