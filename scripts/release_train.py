"""Versions for `make test-latest`: `newest` prints the newest transformers release the package registry
serves (pre-releases excluded), `locked` the one requirements/lock.txt pins, `unmet DIR` lists the requirements
of the transformers installed alone (--no-deps) in DIR that the venv does not satisfy."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

LOCK = Path(__file__).resolve().parent.parent / "requirements" / "lock.txt"


def newest(package: str = "transformers") -> str:
    out = subprocess.run([sys.executable, "-m", "pip", "index", "versions", package],
                         capture_output=True, text=True, check=False)
    m = re.search(rf"^{re.escape(package)} \(([^)]+)\)", out.stdout, re.M)
    if out.returncode != 0 or m is None:
        sys.exit(f"could not read the newest {package} release from the registry:\n{out.stdout}{out.stderr}")
    return m.group(1)


def locked(package: str = "transformers") -> str:
    for line in LOCK.read_text().splitlines():
        name, _, version = line.partition("==")
        if name.strip().lower().replace("_", "-") == package:
            return version.strip()
    sys.exit(f"{package} is not pinned in {LOCK}")


def unmet(folder: str) -> list[str]:
    """Requirements (not extras) of the transformers dist in `folder` that the running environment does not meet."""
    from importlib.metadata import PackageNotFoundError, distributions, version

    from packaging.requirements import Requirement

    dist = next(d for d in distributions(path=[folder]) if d.metadata["Name"].lower() == "transformers")
    out = []
    for line in dist.requires or []:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            have = version(req.name)
        except PackageNotFoundError:
            have = None
        if have is None or not req.specifier.contains(have, prereleases=True):
            out.append(f"{req} (have {have or 'none'})")
    return out


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "newest"
    if what == "unmet" and len(sys.argv) == 3:
        missing = unmet(sys.argv[2])
        print("  unmet requirements: " + (", ".join(missing) if missing else "none"))
    elif what in ("newest", "locked"):
        print(newest() if what == "newest" else locked())
    else:
        sys.exit("usage: release_train.py newest|locked|unmet DIR")
