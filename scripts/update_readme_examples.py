"""Regenerate the README's example outputs from the real CLI: every line that is a backquoted
`vramplan ...` command, followed (after optional prose) by a plain ``` block, gets that block
replaced by the command's output at a fixed width.

    python scripts/update_readme_examples.py [--check]
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
COMMAND = re.compile(r"^`(vramplan [^`]+)`")
WIDTH = "110"


def run(cmd: str) -> str:
    args = shlex.split(cmd)[1:]
    env = {**os.environ, "COLUMNS": WIDTH, "NO_COLOR": "1", "TERM": "dumb"}
    p = subprocess.run([sys.executable, "-m", "vramplan.cli", *args], capture_output=True, text=True, env=env, check=True)
    return p.stdout.rstrip("\n")


def regenerate(text: str) -> str:
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        out.append(lines[i])
        m = COMMAND.match(lines[i])
        if m and not m.group(1).startswith(("vramplan plot", "vramplan profile", "vramplan validate CASES")):
            j = i + 1
            while j < len(lines) and lines[j] != "```" and not lines[j].startswith(("```", "#")) and j - i < 6:
                j += 1
            if j < len(lines) and lines[j] == "```":
                end = lines.index("```", j + 1)
                out.extend(lines[i + 1:j + 1])
                out.extend(run(m.group(1)).split("\n"))
                out.append("```")
                i = end + 1
                continue
        i += 1
    return "\n".join(out)


def main(argv: list[str]) -> int:
    text = README.read_text(encoding="utf-8")
    new = regenerate(text)
    if "--check" in argv:
        return 0 if new == text else 1
    README.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
