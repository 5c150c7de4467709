"""Plots a person would rather look at than read: history, recipe profile, comparison."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..cheap import ESTIMATE_KEY
from ..plan import MergePlan
from ..sources import IO_GROUP


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    tmp = path.parent / f".{path.name}.partial.png"
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    tmp.replace(path)


def write_plots(session, rows: list[dict[str, Any]], recipe, run_dir: Path) -> list[str]:
    written = []
    for name, draw in (("history.png", _history), ("profile.png", _profile), ("comparison.png", _comparison),
                       ("methods.png", _methods)):
        plt = _pyplot()
        fig = draw(plt, session, rows, recipe)
        if fig is not None:
            _save(fig, run_dir / name)
            plt.close(fig)
            written.append(name)
    return written


def _history(plt, session, rows, recipe):
    trials = [t for t in session.study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if not trials:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    methods = sorted({session.space.method_of(t.params, t.user_attrs) for t in trials})
    colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
    cheap = getattr(session, "cheap", None)
    estimated = {t.number: t.user_attrs[ESTIMATE_KEY] for t in trials if ESTIMATE_KEY in t.user_attrs}
    full = {t.number: cheap.full_values(t) for t in trials} if cheap is not None else {}
    for m in methods:
        mine = [t for t in trials if session.space.method_of(t.params, t.user_attrs) == m]
        scored = [(t.number, t.values[0]) for t in mine if t.number not in estimated]
        guessed = [(t.number, t.values[0]) for t in mine if t.number in estimated]
        if scored:
            ax.scatter(*zip(*scored), s=14, alpha=0.7, color=colors[m], label=m)
        if guessed:     # an estimate from a subset of the rows (cheap evaluation): hollow
            ax.scatter(*zip(*guessed), s=14, alpha=0.7, facecolors="none", edgecolors=colors[m],
                       label=None if scored else m)
    if estimated:
        shown = next(iter(estimated.values()))
        ax.scatter([], [], s=14, facecolors="none", edgecolors="gray",
                   label=f"hollow: estimate from {shown['rows']} of {shown['of']} rows")
        finalists = [(t.number, full[t.number][0], t.values[0]) for t in trials
                     if t.number in estimated and full[t.number] is not None]
        for n, value, guess in finalists:
            ax.plot([n, n], [guess, value], color="black", lw=0.6)
        if finalists:
            ax.scatter([n for n, _, _ in finalists], [v for _, v, _ in finalists], marker="*", s=60,
                       color="black", label="finalist: full score", zorder=3)
    best, xs, ys = float("-inf"), [], []
    for t in sorted(trials, key=lambda t: t.number):    # a finalist counts at its full score
        best = max(best, full[t.number][0] if full.get(t.number) is not None else t.values[0])
        xs.append(t.number)
        ys.append(best)
    ax.step(xs, ys, where="post", color="black", lw=1.5, label="best so far")
    levels: dict[float, list[str]] = {}     # sources that score alike share one line and one label
    for r in rows:
        if r["kind"] == "source":
            levels.setdefault(round(r["search_mean"], 6), []).append(r["label"])
    for level, labels in levels.items():
        ax.axhline(level, ls=":", lw=1, color="gray")
        ax.annotate(", ".join(labels), (xs[-1], level), fontsize=7, color="gray", ha="right", va="bottom")
    ax.set_xlabel("trial")
    ax.set_ylabel("objective (search split)")
    ax.set_title(f"{session.config.name}: optimization history")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    return fig


def _profile(plt, session, rows, recipe):
    params = [p.name for p in recipe.spec.source_params if p.name in ("weight", "density")]
    if not params:
        return None
    layout = session.sources.layout
    plan = MergePlan.of(recipe, layout)
    groups: list[int | str] = list(range(recipe.layer_groups)) + [IO_GROUP]
    labels = [f"g{g}" if g != IO_GROUP else "io" for g in groups]
    kinds = ["attn", "mlp"] if recipe.filters.get("attn") or recipe.filters.get("mlp") else ["mlp"]
    # each point is the value of the first tensor of its group and kind (the embeddings' outside the blocks)
    first = {}
    for tensor, info in layout.tensors.items():
        first.setdefault((layout.group(tensor, recipe.layer_groups), info.kind), tensor)
    fig, axes = plt.subplots(1, len(params), figsize=(5 * len(params), 3.6), squeeze=False)
    for ax, name in zip(axes[0], params):
        for src in recipe.sources:
            for kind in kinds:
                tensors = [first.get((g, kind if g != IO_GROUP else "embed")) for g in groups]
                ys = [plan.value(t, src, name) if t is not None else float("nan") for t in tensors]
                style = "-o" if kind == "mlp" else "--s"
                tag = f"{Path(src).name}" + (f" ({kind})" if len(kinds) > 1 else "")
                ax.plot(labels, ys, style, label=tag)
        ax.set_title(f"{recipe.method}: {name} per layer group")
        ax.set_xlabel("layer group (io = embeddings, final norm, head)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return fig


def _comparison(plt, session, rows, recipe):
    tasks = session.config.objective_tasks
    if not rows:
        return None
    import numpy as np

    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows)), 4))
    width = 0.8 / (len(tasks) + 1)
    x = np.arange(len(rows))
    for i, task in enumerate(tasks + ["mean"]):
        key = "heldout_mean" if task == "mean" else f"heldout:{task}"
        vals = [r[key] for r in rows]
        ax.bar(x + i * width, vals, width, label=task, color="black" if task == "mean" else None)
    ax.set_xticks(x + width * len(tasks) / 2)
    ax.set_xticklabels([r["label"].replace(" = ", "\n= ") for r in rows], rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("held-out score")
    ax.set_ylim(0, 1.05 if max(r["heldout_mean"] for r in rows) <= 1 else None)
    ax.set_title("sources, untuned merges, one-knob sweeps and the best recipe (held-out)")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    return fig


def _methods(plt, session, rows, recipe):
    trials = [t for t in session.study.get_trials(deepcopy=False)
              if t.state.name == "COMPLETE" and "baseline" not in t.user_attrs]
    methods = sorted({session.space.method_of(t.params, t.user_attrs) for t in trials})
    if not methods:
        return None
    data = [[t.values[0] for t in trials if session.space.method_of(t.params, t.user_attrs) == m] for m in methods]
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(methods)), 3.8))
    ax.boxplot(data, showfliers=False)
    for i, ys in enumerate(data, start=1):
        ax.scatter([i] * len(ys), ys, s=10, alpha=0.5)
    ax.set_xticks(range(1, len(methods) + 1))
    ax.set_xticklabels([f"{m}\n(n={len(d)})" for m, d in zip(methods, data)], fontsize=8)
    ax.set_ylabel("objective (search split)")
    ax.set_title("searched trials by merge technique")
    ax.grid(axis="y", alpha=0.3)
    return fig
