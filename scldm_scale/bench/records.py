"""What every `scldm-scale bench ...` records about where it ran, and does with its records at the end."""

from __future__ import annotations

import datetime
import json
import os
import platform

from scldm_scale.outputs import claim_output, staged


def machine() -> dict:
    """Where and when a benchmark ran: platform, CPU count, 1-minute load average at the start, UTC date."""
    return {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def claim_records(json_path: str | None, overwrite: bool) -> None:
    """At a benchmark's start: refuse a --json that cannot be written, or that exists without --overwrite."""
    if json_path:
        claim_output(json_path, "the records file", "--json", overwrite, folder=False)


def write_records(records: list[dict], json_path: str | None) -> None:
    """Write the records as a JSON list when a path is given (whole or not at all), and say so."""
    if json_path:
        with staged(json_path) as target:
            target.write_text(json.dumps(records, indent=2) + "\n")
        print(f"\nwrote {len(records)} records to {json_path}")
