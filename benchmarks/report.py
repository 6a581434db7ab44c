"""Output of the benchmark scripts: a JSON document printed and, if asked, written to a file."""

from __future__ import annotations

import json
from typing import Any


def write_json(result: dict[str, Any], out: str | None) -> None:
    """Prints ``result`` as indented JSON and writes the same text to ``out`` (if given)."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
