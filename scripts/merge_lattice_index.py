"""Merge per-lattice index files (from parallel lattice_generator runs) into lattice/index.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lattice_generator import read_index, update_index  # noqa: E402


def main(parts_dir: str, index: str) -> int:
    for part in sorted(Path(parts_dir).glob("*.json")):
        for row in read_index(part):
            update_index(Path(index), row)
    print(json.dumps([(r["name"], r["mse"]) for r in read_index(Path(index))]))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
