"""Print pip requirements pinning the store's dependencies to the lowest releases pyproject allows.

CI installs them (``pip install $(python3 devtools/lowest_pins.py)``) and runs the
store's tests on them: each lower bound in pyproject.toml is one that was tested.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

#: The extras whose dependencies are the store's own (the test and bench extras are not).
EXTRAS = ("postgres", "async")


def lowest_pins(pyproject: Path) -> list[str]:
    """``name[extras]==lowest`` for each dependency of the package and of :data:`EXTRAS`."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    requirements = list(project["dependencies"])
    for extra in EXTRAS:
        requirements += project["optional-dependencies"][extra]
    pins: dict[str, str] = {}
    for requirement in requirements:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*>=\s*([^,;\s]+).*", requirement)
        if match is None:
            if requirement.startswith(project["name"]):
                continue  # (the package itself, named for its extras)
            raise SystemExit(f"no lower bound written `name>=version` in {requirement!r}")
        name, extras, lowest = match.groups()
        key = name.lower()
        if key in pins and not pins[key].endswith(f"=={lowest}"):
            raise SystemExit(f"{name} has two lower bounds in pyproject: write one")
        if key not in pins or extras:  # (with its extras, if one names them)
            pins[key] = f"{name}{extras or ''}=={lowest}"
    return sorted(pins.values())


if __name__ == "__main__":
    print(" ".join(lowest_pins(Path(__file__).resolve().parent.parent / "pyproject.toml")))
