"""Byte counts as people write them: '12GB' in, '1.25 GiB' out."""

from __future__ import annotations

import re

GIB = 2**30
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 2**10,
    "kib": 2**10,
    "mb": 2**20,
    "mib": 2**20,
    "gb": 2**30,
    "gib": 2**30,
    "tb": 2**40,
    "tib": 2**40,
}


def parse_bytes(text) -> int:
    """'12GB', '12 GiB', '11.5G', '24000MiB' or a plain byte count. GB and GiB both mean 2**30 bytes: GPU
    memory comes in binary units (a '12 GB' card has 12288 MiB)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return int(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if unit is not None and unit in ("g", "m", "k", "t"):
        unit += "b"
    if not match or unit not in _UNITS:
        raise ValueError(f"gpu memory must look like '12GB', '12GiB', '24000MiB' or a byte count, got {text!r}")
    return int(float(match.group(1)) * _UNITS[unit])


def format_gib(n: float, unit: bool = True) -> str:
    """Bytes as GiB with two decimals: "1.25 GiB", or "1.25" in tables whose header names the unit."""
    return f"{n / GIB:.2f}" + (" GiB" if unit else "")
