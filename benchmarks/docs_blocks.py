"""The figures of docs/benchmarks.md: each block between `<!-- name:start -->` and `<!-- name:end -->` is
rendered by a benchmark script from the JSON it wrote, never typed by hand. tests/test_docs_figures.py
renders every block again from its JSON and compares. Also what every such JSON records of its run: the
command and the hardware.
"""

from __future__ import annotations

import platform
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "benchmarks.md"


def read_block(doc: Path, name: str) -> str | None:
    """The text between name's markers (None if the doc has no such block)."""
    found = re.search(_pattern(name), doc.read_text(), flags=re.S) if doc.exists() else None
    return found.group(1) if found else None


def write_block(doc: Path, name: str, body: str, heading: str) -> None:
    """Replace name's block with body (a new section under heading if the doc has none yet)."""
    block = f"<!-- {name}:start -->\n{body}<!-- {name}:end -->"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    if re.search(_pattern(name), text, flags=re.S):
        text = re.sub(_pattern(name), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + f"\n\n## {heading}\n\n{block}\n"
    doc.write_text(text)


def _pattern(name: str) -> str:
    return f"{re.escape(f'<!-- {name}:start -->')}\\n(.*?){re.escape(f'<!-- {name}:end -->')}"


def command_line() -> str:
    """How this benchmark was run, as a reader would type it."""
    return "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])


def hardware() -> str:
    """The machine a figure was measured on: architecture, torch's threads, the GPU if any."""
    import torch  # here: only the scripts that record a run pay for it

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {torch.get_num_threads()} threads, {gpu}"
