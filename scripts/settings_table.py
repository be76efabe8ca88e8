"""Print the README's settings table from the settings model, so the docs cannot drift from the code.

`python scripts/settings_table.py` prints it; `--check README.md` exits 1 if the README's copy differs.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hydrabrain.shared.config import settings_reference

BEGIN = "<!-- settings:begin -->"
END = "<!-- settings:end -->"


def table() -> str:
    lines = ["| setting | variable | default | what it does |", "|---|---|---|---|"]
    for setting, env, default, description in settings_reference():
        shown = "user data dir (`~/.local/share/hydrabrain` on Linux)" if setting == "home" else f"`{default}`"
        lines.append(f"| `{setting}` | `{env}` | {shown} | {description} |")
    return "\n".join(lines)


def block() -> str:
    return f"{BEGIN}\n{table()}\n{END}"


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--check":
        text = Path(sys.argv[2]).read_text(encoding="utf-8")
        start, end = text.find(BEGIN), text.find(END)
        current = text[start : end + len(END)] if start >= 0 and end >= 0 else ""
        if current != block():
            print("README settings table is out of date: run `python scripts/settings_table.py --write README.md`", file=sys.stderr)
            sys.exit(1)
    elif len(sys.argv) == 3 and sys.argv[1] == "--write":
        path = Path(sys.argv[2])
        text = path.read_text(encoding="utf-8")
        start, end = text.find(BEGIN), text.find(END)
        path.write_text(text[:start] + block() + text[end + len(END):], encoding="utf-8")
    else:
        print(table())
