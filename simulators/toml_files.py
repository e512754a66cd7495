"""Writing config files for the simulators' scenarios, the tests and the benchmarks.

tomllib only reads TOML; these few lines write the flat tables the agent's config uses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):  # an inline table, e.g. hq.signing = {keys = {S001 = "..."}}
        return "{" + ", ".join(f"{toml_value(str(k))} = {toml_value(x)}" for k, x in v.items()) + "}"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_toml(path: Path, tables: dict[str, dict[str, Any]]) -> Path:
    """Write {"table.sub": {key: value}} as TOML tables, in order."""
    lines: list[str] = []
    for table, keys in tables.items():
        lines.append(f"[{table}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in keys.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path
