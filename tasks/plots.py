"""The evaluation as pictures, logged on each retrain run (tasks/registry.py: log_evaluation).

Figures are built with matplotlib's object API (no pyplot state), so they render headless on any worker.
"""

from __future__ import annotations

import numpy as np
import polars as pl
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from tasks.evaluate import FINE_TUNED, Evaluation
from tasks.metrics import ECE_BINS

FIGURE_SIZE = (6.0, 4.5)  # inches; 100 dpi PNGs in the MLflow UI


def evaluation_figures(evaluation: Evaluation, valid_pctr: np.ndarray | None) -> dict[str, Figure]:
    """Artifact name -> figure: ROC curves and reliability diagram on test, pCTR per split, the metrics table."""
    return {
        "roc_curve.png": roc_figure(evaluation),
        "reliability_diagram.png": reliability_figure(evaluation),
        "pctr_histogram.png": pctr_histogram(evaluation, valid_pctr),
        "metrics_table.png": table_figure(evaluation.table),
    }


def roc_figure(evaluation: Evaluation) -> Figure:
    figure = Figure(figsize=FIGURE_SIZE)
    axes = figure.subplots()
    labels = evaluation.test["is_clicked"].cast(pl.Int8).to_numpy()
    overall = evaluation.table.filter(pl.col("slice") == "overall")
    for model, auc in overall.select("model", "auc").iter_rows():
        false_positive, true_positive, _ = roc_curve(labels, evaluation.predictions[model])
        axes.plot(false_positive, true_positive, label=f"{model} (AUC {auc:.3f})")
    axes.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    axes.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC, test split")
    axes.legend(loc="lower right", fontsize="small")
    return figure


def reliability_figure(evaluation: Evaluation) -> Figure:
    """Mean pCTR against the observed CTR in equal-mass bins: on the diagonal is calibrated."""
    figure = Figure(figsize=FIGURE_SIZE)
    axes = figure.subplots()
    labels = evaluation.test["is_clicked"].cast(pl.Float64).to_numpy()
    for model in (FINE_TUNED, "popularity"):
        pctr = evaluation.predictions[model]
        bins = np.array_split(np.argsort(pctr, kind="stable"), min(ECE_BINS, len(pctr)))
        predicted = [pctr[b].mean() for b in bins if len(b)]
        observed = [labels[b].mean() for b in bins if len(b)]
        axes.plot(predicted, observed, marker="o", label=model)
    top = max(float(labels.mean()) * 3, 0.05)
    axes.plot([0, top], [0, top], color="grey", linestyle=":", linewidth=1)
    axes.set(xlabel="mean pCTR (equal-mass bins)", ylabel="observed CTR", title="Reliability, test split")
    axes.legend(loc="upper left", fontsize="small")
    return figure


def pctr_histogram(evaluation: Evaluation, valid_pctr: np.ndarray | None) -> Figure:
    figure = Figure(figsize=FIGURE_SIZE)
    axes = figure.subplots()
    splits = {"train (sample)": evaluation.train_pctr, "valid": valid_pctr, "test": evaluation.predictions[FINE_TUNED]}
    for split, pctr in splits.items():
        if pctr is not None and len(pctr):
            axes.hist(pctr, bins=30, histtype="step", density=True, label=f"{split} ({len(pctr)} pairs)")
    axes.set(xlabel="pCTR (fine-tuned, served)", ylabel="density", title="pCTR per split")
    axes.legend(fontsize="small")
    return figure


def table_figure(table: pl.DataFrame) -> Figure:
    shown = table.select("model", "slice", "pairs", "clicks", "auc", "gauc", "logloss", "ece")
    cells = [[f"{v:.4f}" if isinstance(v, float) else str(v) for v in row] for row in shown.iter_rows()]
    figure = Figure(figsize=(9.0, 0.4 + 0.3 * len(cells)))
    axes = figure.subplots()
    axes.axis("off")
    axes.table(cellText=cells, colLabels=shown.columns, loc="center").auto_set_font_size(True)
    return figure
