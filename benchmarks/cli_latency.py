"""How long a person waits for adrank's lookups: each command's wall time from the shell, median of --runs,
on a home the demo filled, and which heavy libraries it imported.

    python benchmarks/cli_latency.py            # runs `adrank demo` into --home first if it has no rankings

Bounds (issue 20): `--help`, `rankings --help` and `rankings --user` under 1.5 s, `models` under 4 s,
`explain` (loads the model) under 10 s, on an idle machine. Writes docs/benchmarks/cli-latency.json and its
block in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import duckdb

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.docs_blocks import DOC, command_line, hardware, write_block  # noqa: E402
from tasks.registry import git_commit  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "mlflow", "prefect", "sklearn", "matplotlib")
# (command, bound in seconds); <user> and <ad> are filled from the home's latest rankings
COMMANDS = (
    (("--help",), 1.5),
    (("rankings", "--help"), 1.5),
    (("rankings", "--user", "<user>"), 1.5),
    (("models",), 4.0),
    (("explain", "--user", "<user>", "--ad", "<ad>"), 10.0),
)
# runs one command in-process and prints the heavy libraries it imported (a separate run: not timed)
IMPORTS_PROBE = (
    "import json, sys, contextlib, io; from flows.cli import main\n"
    "with contextlib.redirect_stdout(io.StringIO()): main(sys.argv[1:])\n"
    "print(json.dumps([m for m in {heavy} if m in sys.modules]))"
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, default=Path("adrank_home/benchmarks/cli"), help="an adrank home")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per command (the median is reported)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks" / "cli-latency.json")
    return parser.parse_args()


def adrank(home: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ADRANK_HOME": str(home)}
    return subprocess.run(
        [str(Path(sys.executable).with_name("adrank")), *argv], env=env, capture_output=True, text=True
    )


def first_ranking(home: Path) -> tuple[str, str]:
    with duckdb.connect(str(home / "warehouse.duckdb"), read_only=True) as con:
        return con.execute("select user_id, ad_id from latest_ad_rankings order by user_id, rank limit 1").fetchone()


def measure(home: Path, argv: tuple[str, ...], runs: int) -> dict:
    seconds = []
    for _ in range(runs):
        started = time.perf_counter()
        done = adrank(home, *argv)
        seconds.append(time.perf_counter() - started)
        if done.returncode != 0:
            raise RuntimeError(f"adrank {' '.join(argv)} failed ({done.returncode}): {done.stderr[-2000:]}")
    probe = IMPORTS_PROBE.format(heavy=HEAVY)
    env = {**os.environ, "ADRANK_HOME": str(home)}
    imported = subprocess.run([sys.executable, "-c", probe, *argv], env=env, capture_output=True, text=True, cwd=REPO)
    return {
        "median_s": round(statistics.median(seconds), 2),
        "seconds": [round(s, 2) for s in seconds],
        "heavy_imports": json.loads(imported.stdout.splitlines()[-1]),
    }


def markdown(result: dict) -> str:
    lines = [
        f"Command: `{result['command']}` at commit `{result['git_commit'][:12]}` · {result['hardware']} · "
        f"{result['measured_on']} · median of {result['runs']} runs from the shell, on the demo's home",
        "",
        "| command | median | bound | within | heavy libraries imported |",
        "|---|---|---|---|---|",
    ]
    for row in result["commands"]:
        within = "yes" if row["median_s"] < row["bound_s"] else "**no**"
        imports = ", ".join(row["heavy_imports"]) or "none"
        lines.append(
            f"| `adrank {row['command']}` | {row['median_s']:.2f} s | {row['bound_s']:g} s | {within} | {imports} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    home = args.home.resolve()
    if not (home / "warehouse.duckdb").exists():
        print(f"no rankings under {home}: running adrank demo first", flush=True)
        demo = adrank(home, "demo")
        if demo.returncode != 0:
            raise RuntimeError(f"adrank demo failed: {demo.stderr[-2000:]}")
    user, ad = first_ranking(home)
    rows = []
    for argv, bound in COMMANDS:
        argv = tuple(user if a == "<user>" else ad if a == "<ad>" else a for a in argv)
        row = {"command": " ".join(argv), "bound_s": bound} | measure(home, argv, args.runs)
        print(json.dumps(row), flush=True)
        rows.append(row)
    result = {
        "commands": rows,
        "runs": args.runs,
        "command": command_line(),
        "git_commit": git_commit(),
        "hardware": hardware(),
        "measured_on": date.today().isoformat(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    write_block(DOC, "cli-latency", markdown(result), "Lookups: how long a person waits")
    print(markdown(result))


if __name__ == "__main__":
    main()
