"""Render an evaluation report (the dict `embedder.evaluate.evaluate_models` returns) as JSON, Markdown and a PNG plot.

The Markdown lists the models with their weight precision, then has one table per task: a row per metric, dimension
and output-embedding precision, a column per model, and a delta column for each model against the baseline (the first
model). The plot has one panel per task and metric: the metric against the dimension, one colour per model, one line
style per embedding precision (solid float32, dashed int8, dotted binary, dash-dot binary+rescore).
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from typing import Any

from apache_beam.io.filesystems import FileSystems

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
REPORT_PNG = "report.png"

_MISSING = "—"
#: int8 dashed with hollow markers, so it stays visible where it coincides with float32.
_LINE_STYLES = {"float32": ("-", "o", None), "int8": ("--", "s", "none"), "binary": (":", "^", "none"),
                "binary+rescore": ("-.", "v", "none")}


def _value(results: Mapping[tuple, float], task: str, model: str, dimension: int, precision: str,
           metric: str) -> float | None:
    return results.get((task, model, dimension, precision, metric))


def _index(report: Mapping[str, Any]) -> dict[tuple, float]:
    return {(row["task"], row["model"], row["dimension"], row["precision"], metric): value
            for row in report["results"] for metric, value in row["metrics"].items()}


def _deltas(report: Mapping[str, Any]) -> dict[tuple, Mapping[str, Any]]:
    return {(row["task"], row["model"], row["dimension"], row["precision"], metric): delta
            for row in report["results"] for metric, delta in row.get("delta", {}).items()}


def _delta_cell(delta: Mapping[str, Any] | None, value: float | None, baseline_value: float | None) -> str:
    """`+0.0123 [+0.0040, +0.0210]`, marked † when the interval does not separate the difference from zero. A report
    written before intervals were computed (version 1) has no `delta`: its plain difference is shown, marked so."""
    if delta is None:
        if value is None or baseline_value is None:
            return _MISSING
        return f"{value - baseline_value:+.4f} (no interval)"
    low, high = delta["ci95"]
    mark = "" if delta["separated"] else " †"
    return f"{delta['value']:+.4f} [{low:+.4f}, {high:+.4f}]{mark}"


def _task_heading(task: Mapping[str, Any]) -> str:
    if task["kind"] == "retrieval":
        detail = (f"{task['split']} split: {task['queries']:,} queries, {task['passages']:,} passages, "
                  f"{task['judgements']:,} judgements")
        if task.get("unknown_corpus_ids"):
            detail += f", {task['unknown_corpus_ids']:,} judged passages missing from the corpus"
    else:
        detail = f"{task['train']:,} train / {task['test']:,} test texts, {task['labels']} labels"
        if task["train"] < task["train_total"] or task["test"] < task["test_total"]:
            detail += f" (subsampled from {task['train_total']:,} / {task['test_total']:,}, seed {task['seed']})"
    return f"## {task['name']} — {task['kind']} ({detail})"


def render_markdown(report: Mapping[str, Any]) -> str:
    models = list(report["models"])
    baseline = report["baseline"]
    others = [name for name in models if name != baseline]
    results = _index(report)
    deltas = _deltas(report)
    lines = ["# Embedding evaluation", "", f"Created {report['created']}. Deltas are against **{baseline}**, each with "
             "its 95% paired-bootstrap interval over the queries (classification: test texts); † marks a difference "
             "the interval does not separate from zero.", "",
             "| model | model id | version | native dim | window (tokens) | weight precision |",
             "|---|---|---|---:|---:|---|"]
    lines += [f"| {name} | `{info['model_id']}` | `{info['model_version']}` | {info['native_dimension']} | "
              f"{info.get('max_seq_length') or _MISSING} | {info.get('weight_precision') or _MISSING} |"
              for name, info in report["models"].items()]
    lines += ["", "Weight precision is the model's (`embforge quantize`); the tables' embedding precision is that of "
              "the stored output vectors."]
    if "int8" in report["precisions"]:
        lines += ["", f"int8 embeddings: {report['int8_scheme']}."]
    if "binary" in report["precisions"]:
        lines += ["", f"binary embeddings: {report['binary_scheme']}."]
    header = ["metric", "dim", "embedding precision", *models, *(f"Δ {name}" for name in others)]
    for task in report["tasks"]:
        lines += ["", _task_heading(task), "", "| " + " | ".join(header) + " |",
                  "|---|---:|---|" + "---:|" * (len(models) + len(others))]
        for metric in task["metrics"]:
            for dimension in report["dims"]:
                for precision in report["precisions"]:
                    values = {name: _value(results, task["name"], name, dimension, precision, metric)
                              for name in models}
                    if all(value is None for value in values.values()):
                        continue
                    cells = [_MISSING if value is None else f"{value:.4f}" for value in values.values()]
                    cells += [_delta_cell(deltas.get((task["name"], name, dimension, precision, metric)),
                                          values[name], values[baseline]) for name in others]
                    lines.append(f"| {metric} | {dimension} | {precision} | " + " | ".join(cells) + " |")
    lines += ["", f"![metrics by dimension]({REPORT_PNG})", ""]
    if report.get("skipped"):
        lines += ["Skipped: " + "; ".join(f"{item['model']} on {item['task']} at {item['dimension']} ({item['reason']})"
                                          for item in report["skipped"]), ""]
    lines += ["Encoding: " + "; ".join(
        f"{name} {stats['texts_encoded']:,} texts in {stats['seconds']:.1f} s ({stats['cache_hits']} cache hits)"
        for name, stats in report["encoding"].items()) + f". Total {report['seconds']['total']:.1f} s.", ""]
    return "\n".join(lines)


def render_plot(report: Mapping[str, Any]) -> bytes:
    """PNG bytes. Uses the Agg canvas directly (no pyplot), so it never touches the process-wide backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    results = _index(report)
    tasks = report["tasks"]
    columns = max(len(task["metrics"]) for task in tasks)
    figure = Figure(figsize=(4.2 * columns, 3.3 * len(tasks)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(tasks), columns, squeeze=False)
    colours = {name: f"C{index}" for index, name in enumerate(report["models"])}
    for row, task in enumerate(tasks):
        for column in range(columns):
            axis = axes[row][column]
            if column >= len(task["metrics"]):
                axis.set_axis_off()
                continue
            metric = task["metrics"][column]
            for model in report["models"]:
                for precision in report["precisions"]:
                    points = [(dimension, value) for dimension in sorted(report["dims"])
                              if (value := _value(results, task["name"], model, dimension, precision, metric))
                              is not None]
                    if not points:
                        continue
                    style, marker, face = _LINE_STYLES[precision]
                    axis.plot(*zip(*points, strict=True), linestyle=style, marker=marker, markerfacecolor=face,
                              color=colours[model], label=f"{model} {precision}")
            # Matryoshka dimensions are usually powers of two: a log axis spaces them evenly.
            axis.set_xscale("log", base=2)
            axis.set_xticks(report["dims"], [str(dimension) for dimension in report["dims"]])
            axis.minorticks_off()
            axis.set_title(f"{task['name']}: {metric}")
            axis.set_xlabel("dimension")
            axis.grid(alpha=0.3)
            if row == 0 and column == 0:
                axis.legend(fontsize="small")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def _write(path: str, data: bytes) -> None:
    with FileSystems.create(path) as handle:
        handle.write(data)


def write_report(report: Mapping[str, Any], output_dir: str) -> dict[str, str]:
    """Write report.json, report.md and report.png under `output_dir` (any Beam filesystem); returns their paths."""
    if not FileSystems.exists(output_dir):
        FileSystems.mkdirs(output_dir)
    paths = {name: FileSystems.join(output_dir, name) for name in (REPORT_JSON, REPORT_MD, REPORT_PNG)}
    _write(paths[REPORT_JSON], (json.dumps(report, indent=2) + "\n").encode())
    _write(paths[REPORT_MD], render_markdown(report).encode())
    _write(paths[REPORT_PNG], render_plot(report))
    return paths
