"""`adrank <command> [--section.field value ...]`: the command-line entry point.

Flags are the config's fields (`--training.epochs 2`, `--home /data/adrank`); `adrank <command> --help`
lists them all. Env vars (ADRANK_...) apply underneath.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from mlflow.exceptions import MlflowException
from pydantic import ValidationError

from tasks import registry
from tasks.config import Settings, cli_overrides, load_settings
from tasks.logs import LogContractError

COMMANDS = {
    "demo": "generate sample logs if none exist, retrain, rerank, and print where the results are",
    "sample-data": "(re)generate the synthetic sample logs into data.logs",
    "retrain": "run the retrain flow: build pairs, fine-tune, evaluate, register, promote",
    "rerank": "run the rerank flow: score active users x ads with the champion, write ad_rankings",
    "monitor": "run the monitor flow: ranked days with impressions -> model_daily_metrics, input_drift, alerts",
    "config": "print the resolved config as JSON",
    "promote": "adrank promote <version>: make a registered version the champion (logged on the version)",
    "rollback": "give the champion alias back to the previous champion",
}
SAMPLE_QUERY = "select user_id, rank, ad_id, round(pctr, 4) as pctr from latest_ad_rankings order by user_id, rank"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        usage = "\n".join(f"  {name:<12} {text}" for name, text in COMMANDS.items())
        print(f"usage: adrank <command> [--section.field value ...]\n\ncommands:\n{usage}")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    command, flags = argv[0], argv[1:]
    version = None
    if command == "promote":
        if not flags or flags[0].startswith("-"):
            print("usage: adrank promote <version> [--section.field value ...]", file=sys.stderr)
            return 2
        version, flags = flags[0], flags[1:]
    # the temporary Prefect server would try (and, offline, fail noisily) to send usage statistics
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # it starts in ~25 s on an idle 2-core machine, past Prefect's 20 s default, and slower on a busy one
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    try:
        overrides = cli_overrides(flags)
        settings = load_settings(overrides)
    except ValidationError as error:
        print(f"adrank: invalid config: {error}", file=sys.stderr)
        return 2
    try:
        run_command(command, settings, overrides, version)
    except LogContractError as error:
        print(f"adrank: the logs break the contract (docs/data.md): {error}", file=sys.stderr)
        return 1
    except (registry.PromotionError, MlflowException) as error:
        print(f"adrank {command}: {error}", file=sys.stderr)
        return 1
    return 0


def run_command(command: str, settings: Settings, overrides: dict, version: str | None = None) -> None:
    """Flows get only the CLI's overrides as parameters; they read the rest from the environment."""
    if command == "promote":
        registry.move_champion(settings, version, reason="manual promotion (adrank promote)")
    elif command == "rollback":
        registry.rollback_champion(settings)
    elif command == "config":
        print(json.dumps(settings.model_dump(mode="json"), indent=2))
    elif command == "sample-data":
        write_sample_logs(settings)
    elif command == "retrain":
        from flows.retrain import retrain

        print(json.dumps(retrain(overrides), indent=2, default=str))
    elif command == "rerank":
        from flows.rerank import rerank

        print(json.dumps(rerank(overrides=overrides), indent=2, default=str))
    elif command == "monitor":
        from flows.monitor import monitor

        # --ranking.run_date names the ranked day to (re)monitor
        state = monitor(run_date=settings.ranking.run_date, overrides=overrides, return_state=True)
        print(f"monitor run {state.name}: " + json.dumps(state.result(), indent=2, default=str))
    else:
        run_demo(settings, overrides)


def write_sample_logs(settings: Settings) -> None:
    from tasks.sample_data import generate_sample_logs

    counts = generate_sample_logs(settings.sample, Path(settings.data.logs))
    print(f"sample logs written to {settings.data.logs}: {counts}")


def run_demo(settings: Settings, overrides: dict) -> None:
    import duckdb

    from flows.rerank import rerank
    from flows.retrain import retrain

    if not Path(settings.data.logs).exists():
        write_sample_logs(settings)
    trained = retrain(overrides)
    ranked = rerank(overrides=overrides)
    with duckdb.connect(str(settings.warehouse), read_only=True) as con:
        preview = con.sql(SAMPLE_QUERY).limit(6)
        preview_text = str(preview)
    evaluation = {(r["model"], r["slice"]): r for r in trained["evaluation"]}
    query_command = (
        f"python -c \"import duckdb; duckdb.connect('{settings.warehouse}', read_only=True)"
        f".sql('{SAMPLE_QUERY}').show()\""
    )
    print(
        f"""
adrank demo finished
  model        {settings.tracking.registered_model} version {trained["version"]} \
({"promoted to champion" if trained["promoted"] else "not promoted"}: {trained["reason"]})
  test AUC     {", ".join(f"{m} {evaluation[(m, 'overall')]['auc']:.4f}" for m, _ in evaluation if _ == "overall")}
  rankings     {ranked["rows"]} rows for {ranked["users"]} users x {ranked["ads"]} ads, run_date {ranked["run_date"]}
  warehouse    {settings.warehouse}  (views ad_rankings, latest_ad_rankings; open it read-only)
  MLflow       {settings.tracking.mlflow_uri}  (experiment '{settings.tracking.experiment}')
               mlflow ui --backend-store-uri {settings.tracking.mlflow_uri}
  query        {query_command}
{preview_text}"""
    )


if __name__ == "__main__":
    raise SystemExit(main())
