"""Every figure block in docs/benchmarks.md and README.md is what its script renders from the JSON it wrote:
rendered again here and compared, so a table edited by hand, or a JSON rerun without its table, fails."""

import json
from pathlib import Path

import pytest

from benchmarks import affinity_lever, cli_latency, match_levers, monitor, quality, sample_ceiling, scoring, views
from benchmarks.docs_blocks import DOC, read_block

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "benchmarks"
# block name -> (the document, the JSON, the script's renderer)
BLOCKS = {
    "quality-ml100k-quick": (DOC, "quality-ml100k-quick.json", quality.section),
    "quality-sample-quick": (DOC, "quality-sample-quick.json", quality.section),
    "quality-headline": (REPO / "README.md", "quality-ml100k-quick.json", quality.headline),
    "quality-sample-headline": (REPO / "README.md", "quality-sample-quick.json", quality.headline),
    "levers-ml100k-quick": (DOC, "levers-ml100k-quick.json", quality.levers_section),
    # the same script at 00bcca2 (the output layer on all of validation), kept beside the older levers
    "levers-ml100k-quick-full-validation": (
        DOC,
        "levers-ml100k-quick-full-validation.json",
        quality.levers_section,
    ),
    # the same script at 284dd98, on the sample market before its interests were in products (a9a59b9)
    "levers-sample-quick-topic-market": (DOC, "levers-sample-quick-topic-market.json", quality.levers_section),
    # the affinity term as built (e9bfa12), against the default: one run each market
    "levers-sample-quick": (DOC, "levers-sample-quick.json", quality.levers_section),
    "levers-ml100k-affinity-quick": (DOC, "levers-ml100k-affinity-quick.json", quality.levers_section),
    "match-levers-sample": (DOC, "match-levers-sample.json", match_levers.markdown),
    "match-levers-ml100k": (DOC, "match-levers-ml100k.json", match_levers.markdown),
    "match-levers-sample-cold-fit": (DOC, "match-levers-sample-cold-fit.json", match_levers.markdown),
    "ceiling-sample-quick": (DOC, "ceiling-sample-quick.json", sample_ceiling.markdown),
    "affinity-lever-sample": (DOC, "affinity-lever-sample.json", affinity_lever.markdown),
    "affinity-lever-ml100k": (DOC, "affinity-lever-ml100k.json", affinity_lever.markdown),
    "scoring": (DOC, "scoring.json", scoring.markdown),
    "monitor": (DOC, "monitor.json", monitor.markdown),
    "views": (DOC, "views.json", views.markdown),
    "cli-latency": (DOC, "cli-latency.json", cli_latency.markdown),
}


@pytest.mark.parametrize("name", BLOCKS)
def test_the_block_is_its_json_rendered(name):
    doc, source, render = BLOCKS[name]
    block = read_block(doc, name)
    assert block is not None, f"{doc.name} has no {name} block"
    assert block == render(json.loads((RESULTS / source).read_text())), f"{doc.name}: {name} differs from {source}"


def test_every_block_in_the_docs_is_checked():
    markers = {line.split()[1].removesuffix(":start") for line in DOC.read_text().splitlines() if ":start -->" in line}
    assert markers <= set(BLOCKS), markers - set(BLOCKS)
