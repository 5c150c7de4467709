"""AdaMerging (`search.sampler: adamerging`, evomerge/gradient.py): its gradient against autograd through the
merge formula, and the search it drives."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modelfactory import make_search_fixture


def _session(tmp_path: Path, **kwargs):
    from evomerge.config import load_config
    from evomerge.search import SearchSession

    config = load_config(make_search_fixture(tmp_path / "fam", **kwargs))
    return config, SearchSession(config, storage_url=f"sqlite:///{tmp_path / 's.db'}", device="cpu", progress=False)


def _dim(name: str, source: str, layers: int = 4, groups: int = 2) -> str:
    """The coefficient that scales `source`'s task vector in tensor `name`, from the name alone."""
    parts = name.split(".")
    if "layers" in parts:
        return f"task_arithmetic.{source}.weight.g{int(parts[parts.index('layers') + 1]) * groups // layers}"
    return f"task_arithmetic.{source}.weight.io"


@pytest.mark.parametrize("loss", ["tokens", "entropy"])
def test_the_gradient_is_autograd_through_base_plus_weighted_task_vectors(tmp_path, loss):
    """dL/dc from one backward pass and a dot product per tensor equals autograd through
    W = base + lambda * sum_i c_i (x_i - base), computed from the safetensors files, at the same coefficients."""
    from torch.func import functional_call

    from evomerge.gradient import GradientMerge

    config, session = _session(tmp_path, methods=("task_arithmetic",))
    with session:
        gm = GradientMerge(session.space, session.merger, session.evaluator, config.objectives[0], seed=0, lr=0.02,
                           batch=1000, loss=loss)
        gm.start([])
        names = [d.name for d in gm.dims]
        values = torch.linspace(0.2, 1.3, len(names), dtype=torch.float64)
        gm.shared = {"task_arithmetic.lambda": 0.9}
        found_loss, found = gm.gradient(values)

        root = tmp_path / "fam"
        base = load_file(root / "base" / "model.safetensors")
        sources = {f"s{i}": load_file(root / f"s{i}" / "model.safetensors") for i in range(2)}
        coef = values.clone().requires_grad_(True)
        params = {}
        for name, b in base.items():
            delta = sum(coef[names.index(_dim(name, s))] * (t[name].double() - b.double()) for s, t in sources.items())
            params[name] = (b.double() + 0.9 * delta).float()
        model = session.merger.model
        rows = session.evaluator.answers("search", config.objectives[0])
        per_task: dict[str, list[torch.Tensor]] = {}
        for task, _, tokens, n in rows:
            logits = functional_call(model, params, (torch.tensor([tokens]),)).logits[0].float()
            logp = torch.log_softmax(logits, -1)
            if loss == "entropy":
                first = logp[len(tokens) - n - 1]
                per_task.setdefault(task, []).append(-(first.exp() * first).sum())
            else:
                picked = logp[len(tokens) - n - 1:len(tokens) - 1].gather(-1, torch.tensor(tokens[-n:])[:, None])
                per_task.setdefault(task, []).append(-picked.mean())
        weights = config.objectives[0]
        expected_loss = sum(weights[t] * torch.stack(v).mean() for t, v in per_task.items()) / sum(weights.values())
        expected_loss.backward()
    assert found_loss == pytest.approx(expected_loss.item(), rel=1e-5)
    assert found.abs().max() > 1e-4         # a gradient to compare, not zeros
    assert torch.allclose(found, coef.grad, rtol=2e-3, atol=1e-6), (found, coef.grad)


def test_answers_are_the_right_choice_after_its_context(tmp_path):
    """The loss's rows: for a choice task, the context's tokens then the right choice's, n of them scored."""
    config, session = _session(tmp_path, methods=("task_arithmetic",))
    with session:
        evaluator = session.evaluator
        rows = [r for r in evaluator.answers("search", {"pick": 1.0})]
        examples = evaluator._examples[("pick", "search")]
        assert len(rows) == len(examples) == 12
        for (task, weight, tokens, n), ex in zip(rows, examples):
            assert task == "pick" and weight == 1.0
            assert tokens == ex.context + ex.continuations[ex.answer] and n == len(ex.continuations[ex.answer])


@pytest.mark.slow
def test_an_adamerging_search_queues_each_step_as_a_trial_and_lowers_its_loss(tmp_path):
    """After the baselines, every trial is the coefficients after `steps_per_trial` more Adam steps, started from
    the best task-arithmetic baseline: its parameters on the grid, its loss falling (all rows in one batch here),
    and the study's best trial is what is exported."""
    n_trials = 16
    config, session = _session(tmp_path, methods=("task_arithmetic", "ties"), sampler="adamerging",
                               n_trials=n_trials, extra="")
    with session:
        session.run(n_trials)
        trials = session.study.get_trials()
        baselines = [t for t in trials if "baseline" in t.user_attrs]
        learned = [t for t in trials if "gradient_steps" in t.user_attrs]
        assert len(baselines) + len(learned) == n_trials and learned
        assert [t.user_attrs["gradient_steps"] for t in learned] == [4 * (i + 1) for i in range(len(learned))]
        assert all(t.params["method"] == "task_arithmetic" for t in learned)
        assert all(round(v, 2) == v for t in learned for v in t.params.values() if isinstance(v, float))
        begun = learned[0].user_attrs["gradient_start"]
        assert all(t.user_attrs["gradient_start"] == begun for t in learned)
        start = trials[begun] if begun != "start" else None
        first = learned[0].params
        moved = [abs(first[k] - (start.params[k] if start else 0.3)) for k in first if k.endswith(("g0", "g1", "io"))]
        lr = config.search.gradient.lr
        assert 0 < max(moved) <= 4 * lr + 0.01      # Adam moves each weight about lr a step at most (on a 0.01 grid)
        losses = [t.user_attrs["gradient_loss"] for t in learned]
        assert losses[-1] < losses[0]
        best = session.best_trial()
        assert best.value == max(t.value for t in trials if t.state.name == "COMPLETE")


@pytest.mark.parametrize("case", ["no task_arithmetic", "an lm_eval task"])
@pytest.mark.slow
def test_adamerging_on_what_it_cannot_learn_is_refused_before_any_weights_load(tmp_path, case):
    """Exit 2, one line naming search.sampler, nothing written: without task_arithmetic weights to learn, or
    with an objective task whose rows evomerge does not read (lm_eval)."""
    if case == "no task_arithmetic":
        config = make_search_fixture(tmp_path / "fam", methods=("ties",), sampler="adamerging")
        expect = "task_arithmetic"
    else:
        config = make_search_fixture(tmp_path / "fam", sampler="adamerging")
        tasks = tmp_path / "fam" / "tasks.yaml"
        tasks.write_text(tasks.read_text() + "  - {name: lme, type: lm_eval, task: arc_easy}\n")
        config.write_text(config.read_text().replace("objective: {ppl: 1.0, pick: 1.0}", "objective: {lme: 1.0}"))
        expect = "'lme' is an lm_eval task"
    result = subprocess.run([sys.executable, "-m", "evomerge", "search", str(config), "--out", str(tmp_path / "run")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and "search.sampler" in err[0] and expect in err[0], err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_compare_learns_task_arithmetic_by_gradient_and_samples_the_other_techniques(tmp_path):
    """compare with sampler adamerging: task_arithmetic's study is learned (its trials after the baselines carry
    gradient steps), ties' is sampled with tpe+cmaes, and the report says so."""
    import optuna

    from evomerge.compare import compare

    config = make_search_fixture(tmp_path / "fam", methods=("task_arithmetic", "ties"), sampler="adamerging")
    result = compare(config, seeds=1, budget=6, out=tmp_path / "cmp", progress=False)
    storage = f"sqlite:///{tmp_path / 'cmp' / 'compare.db'}"
    names = {s.study_name for s in optuna.get_all_study_summaries(storage)}
    learned = {name: [t for t in optuna.load_study(study_name=name, storage=storage).trials
                      if "gradient_steps" in t.user_attrs] for name in names}
    assert {name.split(".")[1] for name, trials in learned.items() if trials} == {"task_arithmetic"}
    assert "which learns task_arithmetic only: the other techniques with `tpe+cmaes`" in (
        result.out / "report.md").read_text()


def test_the_gradient_starts_at_the_candidate_of_lowest_loss(tmp_path):
    """Of the study's task-arithmetic trials and the paper's start (every weight 0.3), the one whose loss on
    the first batch is lowest: recomputed here with loss_at."""
    from evomerge.gradient import GradientMerge

    config, session = _session(tmp_path, methods=("task_arithmetic",), n_trials=6)
    with session:
        session.run(len(session.baselines()))          # the baselines alone
        trials = [t for t in session.study.get_trials() if t.state.name == "COMPLETE"]
        assert len(trials) >= 3
        gm = GradientMerge(session.space, session.merger, session.evaluator, config.objectives[0], seed=0, lr=0.05,
                           batch=1000, loss="tokens")
        losses = []
        for t in trials:
            values = torch.tensor([t.params[d.name] for d in gm.dims], dtype=torch.float64)
            losses.append(gm.loss_at(values, {"task_arithmetic.lambda": t.params["task_arithmetic.lambda"]}))
        paper = gm.loss_at(torch.full((len(gm.dims),), 0.3, dtype=torch.float64), {"task_arithmetic.lambda": 1.0})
        assert len(set(losses + [paper])) > 1                # starts the loss tells apart
        chosen = gm.start(trials)
        if paper < min(losses):
            assert chosen is None and torch.all(gm.values == 0.3)
        else:
            assert chosen is trials[losses.index(min(losses))]
            assert gm.values.tolist() == [chosen.params[d.name] for d in gm.dims]
