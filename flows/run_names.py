"""Flow-run names that say what ran and for which date ('rerank 2026-10-22 v3'), set once the flow knows them."""

from __future__ import annotations

from prefect import runtime
from prefect.client.orchestration import get_client


def name_run(name: str) -> None:
    """Rename the current flow run: Prefect names it at start, before the date is read from the logs."""
    if runtime.flow_run.id is None:  # called outside a flow run
        return
    with get_client(sync_client=True) as client:
        client.update_flow_run(runtime.flow_run.id, name=name)
