"""`adrank <command> [--section.field value ...]`: the command-line entry point.

Flags are the config's fields (`--training.epochs 2`, `--home /data/adrank`); `adrank <command> --help`
lists them all. Env vars (ADRANK_...) apply underneath.

Each command imports what it needs when it runs: a lookup (`--help`, `rankings`) never loads torch,
transformers, MLflow or Prefect (benchmarks/cli_latency.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

from tasks.config import Settings, cli_overrides, load_settings

COMMANDS = {
    "demo": "generate sample logs if none exist, retrain, rerank, and print where the results are",
    "sample-data": "(re)generate the synthetic sample logs into data.logs",
    "retrain": "run the retrain flow: build pairs, fine-tune, evaluate, register, promote",
    "rerank": "run the rerank flow: score active users x ads with the champion, write ad_rankings",
    "monitor": "run the monitor flow: ranked days with impressions -> model_daily_metrics, input_drift, alerts",
    "models": "registered versions: aliases, trained window, test metrics, promotion decision and gates",
    "rankings": "a user's published top ads (latest date, or --date), as published now or --as-of a time or version",
    "explain": "why an ad scores what it does for a user: texts, output-layer terms, each history title left out",
    "unpublish": "undo a date's latest publish of ad_rankings: restore the one before it (or remove the date)",
    "views": "(re)create warehouse.duckdb's analyst views over the published Delta tables",
    "config": "print the resolved config as JSON",
    "promote": "make a registered version the champion (logged on the version)",
    "rollback": "give the champion alias back to the previous champion",
    "stack": "a local Prefect server, MLflow server, work pools, deployments and workers (README)",
}
# each command's own arguments (before or among the --section.field config flags)
ARGUMENTS = {
    "demo": "[--full]",
    "promote": "<version>",
    "rankings": "--user <id> [--date YYYY-MM-DD] [--as-of <ISO time or table version>]",
    "unpublish": "--date YYYY-MM-DD",
    "explain": "--user <id> --ad <id> [--date YYYY-MM-DD]",
    "stack": "up|down|status",
}
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2  # scripts can rely on these: ok, a run failed, bad usage or config
SAMPLE_QUERY = "select user_id, rank, ad_id, round(pctr, 4) as pctr from latest_ad_rankings order by user_id, rank"
# `adrank demo`'s own scale: every stage runs for real on the sample market, in about 2 minutes on 2 CPU cores.
# `adrank demo --full` runs the configured scale instead; flags override either.
DEMO_SCALE = {
    "sample": {"users": 150},  # 15% of the sample market's users (~12k impressions), when the demo writes it
    "training": {"epochs": 1, "sample_pairs": 800, "learning_rate": 2e-4},  # validated once, after the epoch
    "stage1": {"distill_users": 60},
    "ranking": {"candidates_k": 6, "top_n": 6},
}


class UsageError(ValueError):
    """The command line is not one adrank understands."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        usage = "\n".join(f"  {name:<12} {text}" for name, text in COMMANDS.items())
        print(f"usage: adrank <command> [--section.field value ...]\n\ncommands:\n{usage}")
        print("\nexit codes: 0 ok, 1 a run or registry change failed, 2 bad usage or config")
        return EXIT_OK if not argv or argv[0] in ("-h", "--help") else EXIT_USAGE
    command, flags = argv[0], argv[1:]
    if "-h" in flags or "--help" in flags:
        return print_help(command)
    try:
        args, flags = command_arguments(command, flags)
    except UsageError as error:
        print(f"adrank {command}: {error}\nusage: {usage_line(command)}", file=sys.stderr)
        return EXIT_USAGE
    # the temporary Prefect server would try (and, offline, fail noisily) to send usage statistics
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # it starts in ~25 s on an idle 2-core machine, past Prefect's 20 s default, and slower on a busy one
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    try:
        overrides = cli_overrides(flags)
        if command == "demo" and not args.get("full"):
            overrides = merge(DEMO_SCALE, overrides)
        if args.get("date"):
            overrides = merge(overrides, {"ranking": {"run_date": args["date"]}})
        settings = load_settings(overrides)
    except (ValueError, SystemExit) as error:  # a ValidationError; a secret flag; argparse exits on an unknown flag
        print(f"adrank {command}: invalid config: {error}", file=sys.stderr)
        return EXIT_USAGE
    if command == "stack":
        from tasks.stack import run_stack

        return run_stack(args["action"], settings)
    try:
        return run_command(command, settings, overrides, args)
    except Exception as error:  # noqa: BLE001 - only run_failures() are reported; the rest re-raised below
        if not isinstance(error, run_failures()):
            raise
        from tasks.logs import LogContractError

        if isinstance(error, LogContractError):
            print(f"adrank: the logs break the contract (docs/data.md): {error}", file=sys.stderr)
        else:
            print(f"adrank {command}: {error}", file=sys.stderr)
    return EXIT_FAILED


def run_failures() -> tuple[type[Exception], ...]:
    """The errors a command reports as one message and exit 1, imported only once something failed."""
    from mlflow.exceptions import MlflowException

    from tasks.logs import LogContractError
    from tasks.object_storage import LogSourceError
    from tasks.registry import PromotionError
    from tasks.warehouse_upgrade import WarehouseUpgradeError

    return (
        LogContractError,
        PromotionError,
        MlflowException,
        LookupError,
        LogSourceError,
        WarehouseUpgradeError,
        FileExistsError,
    )


def usage_line(command: str) -> str:
    return f"adrank {command} {ARGUMENTS.get(command, '')} [--section.field value ...]".replace("  ", " ")


def print_help(command: str) -> int:
    """The command's usage and meaning, then every config flag (they apply to every command)."""
    print(f"usage: {usage_line(command)}\n\n{COMMANDS[command]}\n\nconfig flags:")
    with contextlib.suppress(SystemExit):  # pydantic-settings prints the flags and exits
        cli_overrides(["--help"])
    return EXIT_OK


def command_arguments(command: str, flags: list[str]) -> tuple[dict[str, str | bool], list[str]]:
    """Split a command's own arguments (ARGUMENTS) from the config flags that follow or surround them."""
    args: dict[str, str | bool] = {}
    if command in ("promote", "stack"):
        from tasks.stack import ACTIONS

        if not flags or flags[0].startswith("-") or (command == "stack" and flags[0] not in ACTIONS):
            raise UsageError("missing or unknown argument")
        args["version" if command == "promote" else "action"], flags = flags[0], flags[1:]
    if command == "demo" and "--full" in flags:
        args["full"], flags = True, [flag for flag in flags if flag != "--full"]
    if command in ("rankings", "explain", "unpublish"):
        for name in ("user", "ad", "date", "as-of"):
            if f"--{name}" in flags:
                at = flags.index(f"--{name}")
                if at + 1 >= len(flags):
                    raise UsageError(f"--{name} needs a value")
                args[name], flags = flags[at + 1], flags[:at] + flags[at + 2 :]
        required = {"rankings": ("user",), "explain": ("user", "ad"), "unpublish": ("date",)}[command]
        if command == "rankings" and "ad" in args:
            raise UsageError("--ad is for adrank explain")
        if unknown := [name for name in args if f"--{name}" not in ARGUMENTS[command]]:
            raise UsageError(f"--{unknown[0]} is not an argument of adrank {command}")
        if missing := [name for name in required if name not in args]:
            raise UsageError(f"missing {', '.join('--' + m for m in missing)}")
        if "as-of" in args:
            args["as-of"] = parse_as_of(args["as-of"])
    return args, flags


def run_command(command: str, settings: Settings, overrides: dict, args: dict) -> int:
    """Flows get only the CLI's overrides as parameters; they read the rest from the environment."""
    if command in ("promote", "rollback"):
        from tasks import registry
    if command == "promote":
        registry.move_champion(settings, args["version"], reason="manual promotion (adrank promote)")
        registry.snapshot_model_versions(settings)  # the warehouse's model_versions follows the alias
    elif command == "rollback":
        registry.rollback_champion(settings)
        registry.snapshot_model_versions(settings)
    elif command == "config":
        print(json.dumps(settings.model_dump(mode="json"), indent=2))
    elif command == "views":
        return update_views(settings)
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
    elif command == "models":
        print_models(settings)
    elif command == "rankings":
        return print_rankings(settings, args["user"], args.get("as-of"))
    elif command == "unpublish":
        return unpublish_date(settings)
    elif command == "explain":
        print_explanation(settings, args["user"], args["ad"])
    else:
        run_demo(settings, overrides)
    return EXIT_OK


def update_views(settings: Settings) -> int:
    from tasks.warehouse import ensure_views, of
    from tasks.warehouse_upgrade import upgrade_layout

    upgrade_layout(of(settings))
    if not ensure_views(of(settings)):
        print(f"adrank views: {settings.warehouse} is held by another process; close it and rerun", file=sys.stderr)
        return EXIT_FAILED
    print(f"the views of {settings.warehouse} read every published table")
    return EXIT_OK


def unpublish_date(settings: Settings) -> int:
    from tasks.table_history import unpublish
    from tasks.warehouse import of, published_partitions

    run_date = settings.ranking.run_date
    version = unpublish(of(settings), "ad_rankings", run_date.isoformat())
    if run_date.isoformat() in published_partitions(of(settings), "ad_rankings"):
        print(f"ad_rankings {run_date}: its publish before the latest is back (ad_rankings version {version})")
    else:
        print(f"ad_rankings {run_date}: removed, it had no earlier publish (ad_rankings version {version})")
    return EXIT_OK


def parse_as_of(text: str):
    """--as-of: a table version (an integer) or an ISO time (UTC unless it names its zone)."""
    from datetime import UTC, datetime

    if text.isdigit():
        return int(text)
    try:
        when = datetime.fromisoformat(text)
    except ValueError as error:
        raise UsageError(f"--as-of {text!r}: give a version number or an ISO time, e.g. 2026-01-02T06:00") from error
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def print_models(settings: Settings) -> None:
    import polars as pl

    from tasks import registry

    versions = registry.model_versions(settings)
    if versions.is_empty():
        print(f"no registered versions of {settings.tracking.registered_model} at {settings.tracking.mlflow_uri}")
        return
    shown = versions.select(
        "model_version",
        pl.col("aliases").list.join(","),
        pl.col("data_until_at").dt.date().alias("data_until"),
        *[pl.col(c).round(4) for c in ("test_auc", "test_logloss", "test_ece", "cold_start_auc")],
        "is_promoted",
        pl.col("created_at").dt.strftime("%Y-%m-%d %H:%M"),
    )
    with pl.Config(tbl_rows=-1, tbl_cols=-1, tbl_width_chars=200, tbl_hide_dataframe_shape=True):
        print(shown)
    gates = registry.version_gates(settings)
    for version in versions["model_version"]:
        marks = ", ".join(f"{g['name']} {'ok' if g['passed'] else 'FAILED'}" for g in gates.get(version, []))
        failed = "; ".join(g["detail"] for g in gates.get(version, []) if not g["passed"])
        print(f"version {version} gates: {marks or 'not recorded'}" + (f" ({failed})" if failed else ""))
    print(f"champion history (oldest first): {' -> '.join(registry.champion_history(settings)) or 'none'}")


def print_rankings(settings: Settings, user_id: str, as_of=None) -> int:
    import polars as pl

    from tasks.publish import user_rankings
    from tasks.warehouse import of

    salt = settings.ranking.user_id_salt
    ranked = user_rankings(
        of(settings), user_id, settings.ranking.run_date, salt and salt.get_secret_value(), as_of=as_of
    )
    if ranked.is_empty():
        when = settings.ranking.run_date or "any date"
        print(f"adrank rankings: no published ranking for user {user_id!r} on {when}", file=sys.stderr)
        return EXIT_FAILED
    with pl.Config(tbl_rows=-1, tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True):
        print(f"user {user_id}, run_date {ranked['run_date'][0]}, model version {ranked['model_version'][0]}")
        print(ranked.select("rank", "ad_id", "pctr", "ecpm"))
    return EXIT_OK


def print_explanation(settings: Settings, user_id: str, ad_id: str) -> None:
    from tasks import registry
    from tasks.explain import explain_pair, to_text
    from tasks.publish import ranked_by
    from tasks.score import RankingModel
    from tasks.warehouse import of

    # a published date is explained with the version that ranked it, whatever the champion is now
    run_date, name = settings.ranking.run_date, settings.tracking.registered_model
    version = ranked_by(of(settings), run_date, name) if run_date else None
    which = f"the version that ranked {run_date}" if version else f"the current {registry.CHAMPION}"
    version = version or registry.current_champion(settings)
    if version is None:
        raise LookupError(f"no '{registry.CHAMPION}' model in {name}: run retrain first")
    model = RankingModel.from_pyfunc(registry.load_version(settings, version))
    settings = registry.served_settings(settings, version)
    print(to_text(explain_pair(settings, model, user_id, ad_id), user_id, ad_id, f"{version} ({which})"))


def merge(base: dict, top: dict) -> dict:
    """Nested dicts: top's values over base's."""
    merged = dict(base)
    for key, value in top.items():
        merged[key] = merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


def write_sample_logs(settings: Settings) -> None:
    from tasks.object_storage import LogSourceError, is_s3_url
    from tasks.sample_data import generate_sample_logs

    if is_s3_url(settings.data.logs):  # adrank reads object storage, never writes it
        raise LogSourceError(f"{settings.data.logs}: sample-data writes a local folder; upload it yourself")

    counts = generate_sample_logs(settings.sample, Path(settings.data.logs), settings.home / "sample_logs")
    print(f"sample logs written to {settings.data.logs}: {counts}")


def run_demo(settings: Settings, overrides: dict) -> None:
    import duckdb

    from flows.rerank import rerank
    from flows.retrain import retrain
    from tasks.object_storage import is_s3_url

    server = os.environ.get("PREFECT_API_URL") or "a temporary Prefect server (it starts in up to ~25 s)"
    print(f"adrank demo: sample market -> retrain -> rerank, on {server}", flush=True)
    if not is_s3_url(settings.data.logs) and not Path(settings.data.logs).exists():
        write_sample_logs(settings)
    trained = retrain(overrides)
    ranked = rerank(overrides=overrides)
    with duckdb.connect(str(settings.warehouse), read_only=True) as con:
        preview = con.sql(SAMPLE_QUERY).limit(6)
        preview_text, (user, _, ad, _) = str(preview), preview.fetchone()
    query_command = (
        f"python -c \"import duckdb; duckdb.connect('{settings.warehouse}', read_only=True)"
        f".sql('{SAMPLE_QUERY}').show()\""
    )
    print(
        f"""
adrank demo finished
  model        {settings.tracking.registered_model} version {trained["version"]}: {promotion_line(trained)}
  fine-tuning  {kept_step_line(trained["kept_step"])}
{test_lines(trained["evaluation"])}
  rankings     {ranked["rows"]} rows for {ranked["users"]} users x {ranked["ads"]} ads, run_date {ranked["run_date"]}, \
by version {ranked["model_version"]} (the champion)
  warehouse    {settings.warehouse}  (views ad_rankings, latest_ad_rankings, ad_daily_ctr, …; open read-only)
  MLflow       {settings.tracking.mlflow_uri}  (experiment '{settings.tracking.experiment}')
               mlflow ui --backend-store-uri {settings.tracking.mlflow_uri}
  query        {query_command}
{preview_text}
  next         adrank models   |   adrank rankings --user {user}   |   adrank explain --user {user} --ad {ad}
               (with ADRANK_HOME={settings.home})"""
    )


def promotion_line(trained: dict) -> str:
    """Promoted, or which gates held the version and why."""
    if trained["promoted"]:
        return "promoted to champion (every gate passed: adrank models lists them)"
    held = [gate for gate in trained["gates"] if not gate["passed"]]
    return "not promoted, held by " + "; ".join(f"the {g['name']} gate ({g['detail']})" for g in held)


def kept_step_line(kept_step: int) -> str:
    if kept_step == 0:
        return (
            "kept step 0: no trained step beat the untrained model on validation, so this version serves its output "
            "layer without the fine-tuned logit (the priors and the semantic match, if configured)"
        )
    return f"kept step {kept_step} (its served validation score beat step 0, the untrained model)"


def test_lines(rows: list[dict]) -> str:
    """The test split's AUC and gAUC per model, on the users rerank ranks and overall."""
    lines = []
    for slice_name, label in (("ranked_users", "test"), ("overall", "")):
        scores = [r for r in rows if r["slice"] == slice_name]
        if scores:
            figures = ", ".join(f"{r['model']} {r['auc']:.4f} / {r['gauc']:.4f}" for r in scores)
            name = slice_name.replace("_", " ")
            lines.append(f"  {label:<13}{name} ({scores[0]['pairs']} pairs), AUC / gAUC: {figures}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
