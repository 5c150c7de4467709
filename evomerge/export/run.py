"""Export a run: the best trial re-scored on held-out data beside every baseline, then
`best/`, `recipe.yaml`, `mergekit.yaml`, `summary.md`, `trials.csv` and plots.

Every file is written atomically; `best/` is materialized by the same resident
kernel that scored it, from the trial's stored parameters.
"""

from __future__ import annotations

import contextlib
import csv
import io
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..storage import GRADIENT_KEY, safe_url
from . import atomic_write_text, export_model, mergekit_yaml

HELDOUT_ATTR = "heldout:"


@dataclass
class RunResult:
    """What a search (or an export) leaves: its folder, its study, and the exported best."""

    run_dir: Path
    study_name: str
    storage: str
    best_trial: int | None = None
    best_recipe: Any = None
    summary: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def export_lock(run_dir: Path):
    """One export at a time into a run folder (workers sharing a machine may finish together)."""
    import fcntl

    with open(run_dir / ".export.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def export_run(session, run_dir: Path, *, result, trial: int | None = None):
    """Everything a person needs from a finished (or running) study."""
    study = session.study
    session.rescore_finalists()     # cheap evaluation: the best estimates scored in full before one is picked
    frozen = _pick_trial(session, trial)
    rows = scored_rows(session, frozen, label="best" if trial is None else "exported")
    scored = session.recipe_of(frozen)
    recipe = scored.relocated(run_dir)
    best_row = next(r for r in rows if r["number"] == frozen.number)
    recipe = recipe.with_provenance(
        sources_sha256={f.spec: f.sha256() for f in session.sources.models},
        study=study.study_name, trial=frozen.number,
        score={"search": best_row["search_mean"], "heldout": best_row["heldout_mean"]},
    )
    if scored.layers:      # a stack: its tensors under the stack's names, the scored model's weights (stack.py)
        from ..build import stack_for

        merger = stack_for(scored, device=session.merger.device)
    else:
        merger = session.merger
        merger.materialize(scored)
    export_model(merger, recipe, run_dir / "best", force=True, card_extra=summary_table(rows, session))
    atomic_write_text(run_dir / "recipe.yaml", recipe.to_yaml())
    from .adapter import adapter_refusal, write_adapter

    if adapter_refusal(recipe, session.sources) is None:     # a linear merge of adapters: also one adapter
        write_adapter(recipe, session.sources, run_dir / "best_adapter", force=True)
    else:       # none for this recipe: an earlier export's would describe another one
        shutil.rmtree(run_dir / "best_adapter", ignore_errors=True)
    text = mergekit_yaml(recipe, session.sources)
    if text is not None:
        atomic_write_text(run_dir / "mergekit.yaml", text)
    else:
        (run_dir / "mergekit.yaml").unlink(missing_ok=True)
    atomic_write_text(run_dir / "trials.csv", trials_csv(session))
    from .plots import write_plots

    plots = write_plots(session, rows, recipe, run_dir)
    best = session.best_trial() if trial is not None else frozen
    kept = skills_kept(session, rows, best_row)
    atomic_write_text(run_dir / "summary.md", summary_markdown(session, rows, frozen, recipe, plots, kept, given=trial,
                                                               best_number=best.number if best else None))
    result.best_trial = frozen.number
    result.best_recipe = recipe
    result.summary = {"rows": rows, "best": best_row, "kept": kept}
    return result


def _pick_trial(session, number: int | None):
    from optuna.trial import TrialState

    if number is None:
        best = session.best_trial()
        if best is None:
            raise InputError("the study has no completed trial yet", field="trial")
        return best
    for t in session.study.get_trials(deepcopy=False):
        if t.number == number:
            if t.state != TrialState.COMPLETE:
                raise InputError(f"trial {number} is {t.state.name.lower()}, not complete", field="--trial")
            return t
    raise InputError(f"no trial {number} in the study", field="--trial")


def heldout_scores(session, frozen) -> dict[str, dict[str, float]]:
    """Held-out task scores of a trial, computed once per study and kept in the storage."""
    key = f"{HELDOUT_ATTR}{frozen.number}"
    cached = session.study.user_attrs.get(key)
    if cached is not None:
        return cached
    session.bench.materialize(session.recipe_of(frozen))
    scores = session.evaluator.evaluate("heldout").tasks
    session.study.set_user_attr(key, scores)
    return scores


def scored_rows(session, best, *, label: str = "best") -> list[dict[str, Any]]:
    """The best (or exported) trial and every completed baseline, on both splits."""
    from optuna.trial import TrialState

    picked = [t for t in session.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
              if "baseline" in t.user_attrs and not t.user_attrs["baseline"].startswith("sweep:")]
    picked += sorted(sweep_picks(session).values(), key=lambda t: t.number)
    if best.number not in {t.number for t in picked}:
        picked.append(best)
    suite = session.suite
    rows = []
    for t in picked:
        search = session.cheap.full_scores(t) if session.cheap is not None else t.user_attrs.get("scores", {})
        heldout = heldout_scores(session, t)
        name = t.user_attrs.get("baseline") or f"{label} (trial {t.number})"
        if t.number == best.number and "baseline" in t.user_attrs:
            name += f" = {label} (trial {t.number})"
        row = {"label": name, "number": t.number, "method": session.space.method_of(t.params, t.user_attrs),
               "kind": name.split(":")[0] if "baseline" in t.user_attrs else "best"}
        for task in suite.names:
            metric = suite.primary_metric(task)
            row[f"search:{task}"] = search.get(task, {}).get(metric, float("nan"))
            row[f"heldout:{task}"] = heldout.get(task, {}).get(metric, float("nan"))
        for split in ("search", "heldout"):
            row[f"{split}_objectives"] = objective_values(session, {t: row[f"{split}:{t}"] for t in suite.names})
            row[f"{split}_mean"] = sum(row[f"{split}_objectives"]) / len(row[f"{split}_objectives"])
        rows.append(row)
    order = {"start": 0, "source": 1, "default": 2, "sweep": 3, "best": 4}
    rows.sort(key=lambda r: (order.get(r["kind"], 4), r["label"]))
    return rows


def sweep_picks(session) -> dict[str, Any]:
    """Of each technique's one-knob sweep, the point a user would keep: the complete trial best on the search
    split (the mean of its objectives; the earlier on a tie)."""
    from optuna.trial import TrialState

    picks: dict[str, Any] = {}
    for t in session.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if str(t.user_attrs.get("baseline", "")).startswith("sweep:"):
            method = session.space.method_of(t.params, t.user_attrs)
            if method not in picks or sum(t.values) > sum(picks[method].values):
                picks[method] = t
    return picks


def objective_values(session, scores: dict[str, float]) -> list[float]:
    """Each objective's value for these task scores, as the search computes it: the weighted mean of the
    tasks' primary metrics, a lower-is-better one negated."""
    from ..evaluate.result import objective_value

    minimized = session.evaluator.lower_is_better()
    return [objective_value(scores, objective, minimized) for objective in session.config.objectives]


def summary_table(rows: list[dict[str, Any]], session) -> str:
    tasks = session.config.objective_tasks
    head = ["model", "method"] + [f"{t} (search)" for t in tasks] + [f"{t} (held-out)" for t in tasks] + \
        ["mean (search)", "mean (held-out)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["label"], r["method"]] + [f"{r[f'search:{t}']:.3f}" for t in tasks] + \
            [f"{r[f'heldout:{t}']:.3f}" for t in tasks] + [f"{r['search_mean']:.3f}", f"**{r['heldout_mean']:.3f}**"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def best_sources(session, rows: list[dict[str, Any]]) -> dict[str, float]:
    """Per objective task, the best held-out score of any source alone (an lm-eval perplexity's is its least);
    empty without sources."""
    lower = session.evaluator.lower_is_better()
    sources = [r for r in rows if r["kind"] == "source"]
    if not sources:
        return {}
    return {t: (min if t in lower else max)(r[f"heldout:{t}"] for r in sources) for t in session.config.objective_tasks}


def skills_kept(session, rows: list[dict[str, Any]], row: dict[str, Any]) -> dict[str, float]:
    """The experts' skills a model keeps: per objective task, its held-out score over the best source's, on the
    tasks where higher is better and some source scores above 0."""
    lower = session.evaluator.lower_is_better()
    return {t: row[f"heldout:{t}"] / b for t, b in best_sources(session, rows).items() if t not in lower and b > 0}


def summary_markdown(session, rows, best, recipe, plots: list[str], kept: dict[str, float], *,
                     given: int | None = None, best_number: int | None = None) -> str:
    import torch

    config = session.config
    counts = session.counts()
    trials = session.study.get_trials(deepcopy=False)
    seconds = [t.user_attrs.get("seconds", {}) for t in trials if t.state.name == "COMPLETE"]
    per_trial = sorted(s.get("total", 0.0) for s in seconds)
    median = per_trial[len(per_trial) // 2] if per_trial else float("nan")
    merge = sum(s.get("merge", 0.0) for s in seconds)
    evaluation = sum(s.get("eval", 0.0) for s in seconds)
    total = sum(s.get("total", 0.0) for s in seconds)
    best_row = next(r for r in rows if r["number"] == best.number)
    sources = [r for r in rows if r["kind"] == "source"]
    defaults = [r for r in rows if r["kind"] == "default"]
    sweeps = [r for r in rows if r["kind"] == "sweep"]
    starts = [r for r in rows if r["kind"] == "start"]
    several = len(config.objectives) > 1
    lines = [f"# evomerge run `{config.name}`", ""]
    scores = (f"**{recipe.method}**, held-out mean **{best_row['heldout_mean']:.4f}** "
              f"(search {best_row['search_mean']:.4f})")
    if given is not None:
        head = f"Exported: trial {given}, {scores}, asked for with `--trial`; the best is trial {best_number}."
    elif several:
        head = (f"Best: trial {best.number}, {scores}; means of the {len(config.objectives)} objectives. Of the "
                "Pareto front, the trial with the best mean on the search split.")
    else:
        head = f"Best: trial {best.number}, {scores}."
    lines += [head, ""]
    for start in starts:       # the user's own recipes (search.start): what the search has to beat first
        margin = best_row["heldout_mean"] - start["heldout_mean"]
        lines.append(f"- Your recipe {start['label'].removeprefix('start:')}: held-out {start['heldout_mean']:.4f} "
                     f"(search {start['search_mean']:.4f}); the search's margin over it: **{margin:+.4f}** held-out.")
    if sources:
        oracle = best_sources(session, rows)
        oracle_mean = sum(objective_values(session, oracle)) / len(config.objectives)
        lines.append(f"- Per task, the best single source reaches a held-out mean of {oracle_mean:.4f}; "
                     f"the best recipe reaches {100 * best_row['heldout_mean'] / oracle_mean:.1f} % of it "
                     "with one model." if oracle_mean > 0 else "")
        if kept:
            lines.append("- Each task's best source, kept by the best recipe (held-out, recipe ÷ source, on the "
                         "tasks a source scores on): " + ", ".join(f"{t} {v:.2f}" for t, v in kept.items())
                         + f"; mean **{sum(kept.values()) / len(kept):.3f}**.")
        best_source = max(sources, key=lambda r: r["heldout_mean"])
        lines.append(f"- Best source alone: {best_source['label']} at {best_source['heldout_mean']:.4f}.")
    if defaults:
        best_default = max(defaults, key=lambda r: r["heldout_mean"])
        lines.append(f"- Best untuned merge: {best_default['label']} at {best_default['heldout_mean']:.4f}.")
    if sweeps:      # the cheap tuned baseline, picked as a user would pick it: on the search split
        sweep = max(sweeps, key=lambda r: (r["search_mean"], -r["number"]))
        margin = best_row["heldout_mean"] - sweep["heldout_mean"]
        lines.append(f"- Best one-knob sweep (chosen on the search split): {sweep['label']} at "
                     f"{sweep['heldout_mean']:.4f}; the search's margin over it: **{margin:+.4f}** held-out.")
    lines += ["", "## Held-out and search scores", "", summary_table(rows, session), ""]
    if several:
        lines += pareto_table(session, best.number)
    if session.cheap is not None:
        lines += session.cheap.report()
    lines += ["## The run", "",
              f"- trials: {counts.get('COMPLETE', 0)} complete, {counts.get('PRUNED', 0)} pruned, "
              f"{counts.get('FAIL', 0)} failed (budget {session.study_budget})",
              f"- sampler `{config.search.sampler}`, pruner `{config.search.pruner}`, seed {config.search.seed}, "
              + (f"methods {', '.join(config.search.methods)}, layer groups {config.search.layer_groups}"
                 if config.search.space != "dfs" else "")
              + (f", filters {', '.join(config.search.filters)}" if config.search.filters else "")
              + (f"{', ' if config.search.space != 'dfs' else ''}space {config.search.space}: "
                 f"{len(session.space.slots)} candidate blocks ({config.search.dfs.repeats} passes), at most "
                 f"{session.space.max_layers} in a stack" if config.search.space != "ps" else ""),
              f"- time in trials: {total:.1f} s (merge {merge:.1f} s, evaluation {evaluation:.1f} s, "
              f"other {max(total - merge - evaluation, 0):.1f} s); median {median:.2f} s per trial",
              *_gradient_line(trials),
              *_auto_lines(session, trials),
              f"- device: {session.merger.device} ({_device_name(session.merger.device)}), torch {torch.__version__}, "
              f"{platform.machine()} {platform.system()}",
              f"- written {time.strftime('%Y-%m-%d %H:%M:%S')}; storage `{safe_url(session.storage_url)}`",
              "- rebuild the best model bit for bit: `evomerge merge recipe.yaml -o OUT`", ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(lines)


def pareto_table(session, exported: int) -> list[str]:
    """The Pareto front of several objectives, on the search split; any of them: `evomerge export --trial N`."""
    names = [" + ".join(f"{w:g}·{t}" if w != 1 else t for t, w in o.items()) for o in session.config.objectives]
    lines = ["## Pareto front (search split)", "",
             "No trial of the front is better on every objective; export another with `evomerge export RUN_DIR "
             "--trial N`.", "", "| trial | method | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 2)]
    for t in session.pareto_front():
        mark = " (exported)" if t.number == exported else ""
        lines.append(f"| {t.number}{mark} | {session.space.method_of(t.params, t.user_attrs)} | "
                     + " | ".join(f"{v:.4f}" for v in t.values) + " |")
    return lines + [""]


def trials_csv(session) -> str:
    trials = session.study.get_trials(deepcopy=False)
    param_names = sorted({k for t in trials for k in t.params} - {"method"})   # the method has its own column
    tasks = session.suite.names
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    n_obj = len(session.config.objectives)
    values = ["value"] if n_obj == 1 else [f"value_{i}" for i in range(n_obj)]
    cheap = session.cheap     # cheap evaluation: the rows each trial scored, and the full score where known
    full = (["rows_scored"] + ([f"{v}_full" for v in values])) if cheap is not None else []
    writer.writerow(["number", "state", "method", "baseline", *values, *[f"score:{t}" for t in tasks],
                     *full, "seconds_merge", "seconds_eval", "seconds_total", "error", *param_names])
    for t in trials:
        scores = t.user_attrs.get("scores", {})
        secs = t.user_attrs.get("seconds", {})
        vals = list(t.values) if t.values else [""] * n_obj
        extra = []
        if cheap is not None:
            known = cheap.full_values(t) if t.state.name == "COMPLETE" else None
            estimate = t.user_attrs.get("estimate")
            extra = [estimate["rows"] if estimate else ("all" if t.state.name == "COMPLETE" else ""),
                     *(known if known is not None else [""] * n_obj)]
        writer.writerow([t.number, t.state.name, session.space.method_of(t.params, t.user_attrs),
                         t.user_attrs.get("baseline", ""), *vals,
                         *[scores.get(task, {}).get(session.suite.primary_metric(task), "") for task in tasks],
                         *extra, _fmt(secs.get("merge")), _fmt(secs.get("eval")), _fmt(secs.get("total")),
                         t.user_attrs.get("error", ""), *[t.params.get(p, "") for p in param_names]])
    return buf.getvalue()


def _gradient_line(trials) -> list[str]:
    """adamerging: the gradient steps between the trials, and their time (not in the trials' own)."""
    learned = [t.user_attrs for t in trials if GRADIENT_KEY in t.user_attrs]
    if not learned:
        return []
    steps = max(a[GRADIENT_KEY] for a in learned)
    seconds = sum(a.get("gradient_seconds", 0.0) for a in learned)
    return [f"- gradient steps (adamerging): {steps}, {seconds:.1f} s between the trials; the last loss "
            f"{learned[-1]['gradient_loss']:.4f}"]


def _auto_lines(session, trials) -> list[str]:
    """auto (auto.py): what its gradient arm did and why it stopped, and the technique arms' rounds."""
    from ..auto import GRADIENT_ATTR, ROUNDS_ATTR, is_gradient_trial

    attrs = session.study.user_attrs
    if session.config.search.sampler != "auto" or (GRADIENT_ATTR not in attrs and ROUNDS_ATTR not in attrs
                                                   and len(session.space.methods) == 1):
        return []
    lines = []
    record = attrs.get(GRADIENT_ATTR)
    if record is not None:
        done = [t for t in trials if is_gradient_trial(t) and t.state.name == "COMPLETE"]
        best = max((t.values[0] for t in done), default=None)
        if record["state"] == "off":
            lines.append(f"- auto: no gradient arm ({record['why']})")
        else:
            stopped = (f"stopped: {record['why']}" if record["state"] == "stopped" else "still running")
            lines.append(f"- auto: the gradient arm ran {len(done)} trials (best search objective "
                         f"{'—' if best is None else f'{best:.4f}'}), then {stopped}")
    rounds = attrs.get(ROUNDS_ATTR, [session.space.methods])
    counts = {m: sum(1 for t in trials if "baseline" not in t.user_attrs and not is_gradient_trial(t)
                     and session.space.method_of(t.params, t.user_attrs) == m) for m in session.space.methods}
    lines.append("- auto: technique arms by successive halving, rounds " + " → ".join(
        "{" + ", ".join(r) + "}" for r in rounds) + "; trials per arm: "
        + ", ".join(f"{m} {n}" for m, n in counts.items()))
    return lines


def _fmt(x: float | None) -> str:
    return "" if x is None else f"{x:.4f}"


def _device_name(device) -> str:
    if device.type == "cuda":
        import torch

        return torch.cuda.get_device_name(device)
    return platform.processor() or "cpu"
