"""The conclusion of ``metaif score`` in words (method §3: the sign convention; section 6: intervals).

Names the most harmful and most helpful tasks and, per role, instances, with their score and,
for an ensemble, the 95% Student-t interval of the mean over its members; counts the units whose
interval excludes zero ("distinguishable from zero"); on a pool with recorded corruption, says
how many of the most harmful units are corrupted. The text goes to ``summary.md`` and, shorter,
to the terminal.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

TOP = 5  # units named per list


def half_width(se: np.ndarray, members: int) -> np.ndarray:
    """95% Student-t half-width of a mean over ``members`` from its standard error ``se``."""
    return np.asarray(se, dtype=float) * float(stats.t.ppf(0.975, members - 1))


def distinguishable(values: np.ndarray, se: np.ndarray | None, members: int) -> np.ndarray | None:
    """Whether each value's 95% interval over ``members`` excludes zero (None without a spread)."""
    if se is None or members < 2:
        return None
    return np.abs(np.asarray(values, dtype=float)) > half_width(se, members)


def _name(row, unit: str) -> str:
    if unit == "task":
        name = f"task {int(row.task_id)}"
    else:
        name = f"{row.role} {int(row.task_id)}:{int(row.position)} (label {int(row.label)}, class {row['class']})"
    return name + (" [corrupted]" if bool(row.corrupted) else "")


def _value(row, column: str, se_column: str | None, members: int) -> str:
    text = f"{float(row[column]):+.3g}"
    if se_column is not None and members >= 2:
        text += f" +- {float(half_width(row[se_column], members)):.2g}"
    return text


def _lists(df: pd.DataFrame, unit: str, column: str, se_column: str | None, members: int, top: int,
           influence: bool) -> list[str]:
    ordered = df.sort_values(column, kind="stable")
    if influence:  # only negative scores are harmful, only positive ones helpful
        harmful, helpful = ordered[ordered[column] < 0].head(top), ordered[ordered[column] > 0].iloc[::-1].head(top)
    else:
        harmful, helpful = ordered.head(top), ordered.iloc[::-1].head(top)
    lines = []
    for word, rows in (("most harmful", harmful), ("most helpful", helpful)):
        items = [f"{_name(r, unit)} {_value(r, column, se_column, members)}" for _, r in rows.iterrows()]
        sign = "negative" if word == "most harmful" else "positive"
        lines.append(f"- {word}: " + ("; ".join(items) if items else f"none (no {unit} has a {sign} score)"))
    return lines


def _counts(df: pd.DataFrame, column: str, se_column: str | None, members: int, influence: bool) -> str:
    values = df[column].to_numpy(dtype=float)
    n = len(values)
    if not influence:
        return f"{n} scored"
    text = f"{n} scored: {int((values < 0).sum())} harmful (< 0), {int((values > 0).sum())} helpful (> 0)"
    sure = distinguishable(values, None if se_column is None else df[se_column].to_numpy(), members)
    if sure is None:
        return text + "; no interval (a single estimate), so none is known to differ from zero"
    return (text + f"; {int(sure.sum())} distinguishable from zero at 95% over the {members} members "
            f"({int((sure & (values < 0)).sum())} harmful, {int((sure & (values > 0)).sum())} helpful)")


def _corruption(df: pd.DataFrame, column: str, label: str, top: int) -> str | None:
    flags = df["corrupted"].to_numpy(dtype=bool)
    if not flags.any():
        return None
    k = max(top, min(len(df), int(flags.sum())))  # as many as are corrupted: perfect detection finds all
    found = int(df.sort_values(column, kind="stable").head(k)["corrupted"].astype(bool).sum())
    return (f"- recorded corruption: {found} of the {k} most harmful {label} are corrupted "
            f"({int(flags.sum())} of {len(df)} in the pool, {flags.mean():.0%}; a random order finds "
            f"{k * flags.mean():.1f})")


def by_label(df: pd.DataFrame, column: str) -> str | None:
    """One line: mean score per label with its 95% interval over the instances; when one label holds
    more than twice its share of the most helpful (top 20%, at most 100), a note saying so. None for
    fewer than two labels.

    A label is a position in the task's label order, not a class: tasks draw their classes in random
    order, so a label that stands out is a property of the model (its output head's rows are
    meta-learned and not interchangeable), not of the data.
    """
    from metaif_cli.reports.intervals import mean_ci95

    labels = sorted(df["label"].unique().tolist())
    if len(labels) < 2:
        return None
    parts = []
    for label in labels:
        mean, half = mean_ci95(df.loc[df["label"] == label, column].to_numpy(dtype=float))
        parts.append(f"{label}: {mean:+.2g} +- {half:.1g}")
    line = f"- mean by label (+- 95% interval over instances): {'; '.join(parts)}"
    k = min(100, len(df) // 5)
    if k >= 20:
        counts = df.sort_values(column, kind="stable").iloc[::-1].head(k)["label"].value_counts()
        label, count = int(counts.index[0]), int(counts.iloc[0])
        if count > 2 * k / len(labels):
            line += (f". Label {label} holds {count} of the {k} most helpful: labels are positions in the task's "
                     "label order, not classes, so this is the model's doing (its meta-learned output head treats "
                     "label positions differently), not the data's")
    return line


def score_summary(tasks_df: pd.DataFrame | None, inst_df: pd.DataFrame | None, column: str,
                  se_column: str | None, members: int, method: str, influence: bool,
                  top: int = TOP) -> list[str]:
    """Markdown lines of the conclusion.

    Args:
        tasks_df, inst_df: the score tables (``None`` when not computed).
        column: the score column; ``se_column`` its standard error over ``members`` (None: none).
        influence: the score is a predicted change of ``f`` (negative = harmful).
    """
    if se_column is not None and (members < 2 or not any(
            df is not None and se_column in df for df in (tasks_df, inst_df))):
        se_column = None
    if influence:
        what = (f"`{column}`: the predicted change of the meta-test loss f if the unit is removed "
                "(negative: removing it lowers the loss, so the unit is harmful)")
    else:
        what = f"`{column}`: lower is ranked more harmful (not a predicted change of f)"
    lines = [f"# metaif score: method={method}", "", what + "."]
    if se_column is not None:
        lines.append(f"Intervals: 95% Student-t over the {members} ensemble members (final point and checkpoints, "
                     f"or runs), from `{se_column}`.")
    elif influence:
        lines.append("No interval: this is a single estimate (an ensemble, e.g. ensemble.checkpoints=3, gives one).")
    lines.append("The CSVs list the most harmful first.")
    if tasks_df is not None:
        lines += ["", f"## Tasks ({_counts(tasks_df, column, se_column, members, influence)})"]
        lines += _lists(tasks_df, "task", column, se_column, members, top, influence)
        extra = _corruption(tasks_df, column, "tasks", top)
        lines += [extra] if extra else []
    if inst_df is not None:
        for role in ("support", "query"):
            df = inst_df[inst_df.role == role]
            if not len(df):
                continue
            lines += ["", f"## {role.capitalize()} instances ({_counts(df, column, se_column, members, influence)})"]
            lines += _lists(df, "instance", column, se_column, members, top, influence)
            labels = by_label(df, column) if influence else None
            lines += [labels] if labels else []
            extra = _corruption(df, column, f"{role} instances", top)
            lines += [extra] if extra else []
    return lines
