"""What every `scldm-scale bench ...` does with its records at the end."""

from __future__ import annotations

import json
from pathlib import Path


def write_records(records: list[dict], json_path: str | None) -> None:
    """Write the records as a JSON list when a path is given, and say so."""
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(records, indent=2) + "\n")
        print(f"\nwrote {len(records)} records to {json_path}")
