"""Versions for `make test-latest`: `newest` prints the newest transformers release the package registry
serves (pre-releases excluded), `locked` the one requirements/lock.txt pins."""
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


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "newest"
    if what not in ("newest", "locked"):
        sys.exit("usage: release_train.py newest|locked")
    print(newest() if what == "newest" else locked())
