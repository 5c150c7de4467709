"""`search.sampler: auto` (evomerge/auto.py): the gradient arm, successive halving over technique arms, each with
its own TPE; deterministic for a seed, resumable, one budget shared by every worker."""

from __future__ import annotations

import numpy as np
import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from modelfactory import make_search_fixture

pytestmark = pytest.mark.usefixtures("one_thread")


def _trial(number: int, method: str, value: float | None, **attrs) -> optuna.trial.FrozenTrial:
    trial = create_trial(state=TrialState.COMPLETE if value is not None else TrialState.RUNNING, value=value,
                         params={"x": 0.5}, distributions={"x": FloatDistribution(0, 1)},
                         user_attrs={"method": method, **attrs})
    trial.number = number
    return trial


class _Space:
    """What AutoSampler.arm reads of a SearchSpace."""

    def __init__(self, methods):
        self.methods = list(methods)

    def method_of(self, params, attrs=None):
        return attrs["method"]


def _sampler(methods, n_trials=40):
    from evomerge.auto import AutoSampler

    return AutoSampler(_Space(methods), seed=0, n_trials=n_trials)


def test_successive_halving_shares_each_round_then_keeps_the_better_half():
    """Budget 40, 4 baselines: 36 trials in rounds of 36/3 = 12 (three techniques: ceil(log2 3) + 1 rounds).
    Round 1: 4 trials per technique (12/3); the arm with the fewest trials samples next, ties in config order.
    Then the two techniques with the best trials (baselines included) go on, 6 more each; then the best alone."""
    from evomerge.auto import ROUNDS_ATTR

    methods = ["a", "b", "c"]
    study = optuna.create_study(direction="maximize")
    study.set_user_attr("budget", 40)
    sampler = _sampler(methods)
    baselines = [_trial(0, "a", 0.1), _trial(1, "b", 0.2), _trial(2, "c", 0.9), _trial(3, "a", 0.0)]
    assert sampler.arm(study, baselines, baselines=4) == "a"
    trials = baselines + [_trial(4, "a", 0.3)]
    assert sampler.arm(study, trials, baselines=4) == "b"
    trials += [_trial(5, "b", 0.3), _trial(6, "c", 0.1)]
    assert sampler.arm(study, trials, baselines=4) == "a"
    # every technique at 4: the round ends; c (0.9, a baseline) and b (0.5) beat a (0.4)
    n = 7
    for method, values in (("a", [0.4] * 3), ("b", [0.5] * 3), ("c", [0.1] * 3)):
        for v in values:
            trials.append(_trial(n, method, v))
            n += 1
    assert sampler.arm(study, trials, baselines=4) == "b"
    assert study.user_attrs[ROUNDS_ATTR] == [["a", "b", "c"], ["b", "c"]]
    for method in ("b", "c") * 6:
        trials.append(_trial(n, method, 0.95 if method == "b" else 0.2))
        n += 1
    assert sampler.arm(study, trials, baselines=4) == "b"       # b's 0.95 beats c's 0.9
    assert study.user_attrs[ROUNDS_ATTR][-1] == ["b"]
    assert sampler.current_round(study, trials, baselines=4) == (["b"], {"a": 4, "b": 10, "c": 10})
    # a decision once stored is read back, not remade: another worker sees the same rounds
    other = _sampler(methods)
    assert other.arm(study, trials + [_trial(n, "c", 1.0)], baselines=4) == "b"


def test_the_gradient_arms_trials_and_running_ones_count_as_they_should():
    """Gradient trials are the gradient arm's, not task_arithmetic's share; a running trial holds its arm's place."""
    methods = ["task_arithmetic", "ties"]
    study = optuna.create_study(direction="maximize")
    study.set_user_attr("budget", 30)
    sampler = _sampler(methods, n_trials=30)
    trials = [_trial(0, "task_arithmetic", 0.1), _trial(1, "ties", 0.1)]
    trials += [_trial(2 + i, "task_arithmetic", 0.5, gradient_steps=4 * (i + 1)) for i in range(6)]
    assert sampler.arm(study, trials, baselines=2) == "task_arithmetic"   # 0 trials of its own yet
    trials.append(_trial(8, "task_arithmetic", None))                      # running
    assert sampler.arm(study, trials, baselines=2) == "ties"


def test_an_arms_tpe_models_its_techniques_trials_with_part_credit_and_not_the_gradient_arms():
    """What a technique's TPE sees: that technique's trials but the gradient arm's, each complete one valued
    objective + SHAPE * part-credit objective (its `partial`); running trials, and trials from before part
    credit was recorded, as they are. The study itself keeps its values."""
    from evomerge.auto import SHAPE, _Modelled, is_gradient_trial

    study = optuna.create_study(direction="maximize")
    for trial in (_trial(0, "a", 0.3, partial=0.6), _trial(1, "b", 0.9, partial=0.9),
                  _trial(2, "a", 0.4, partial=0.5, gradient_steps=4), _trial(3, "a", 0.2),
                  _trial(4, "a", 0.1, partial=0.8), _trial(5, "a", None)):
        study.add_trial(trial)
    view = _Modelled(study, lambda t: t.user_attrs["method"] == "a" and not is_gradient_trial(t))
    seen = view.get_trials(deepcopy=False)
    assert [t.number for t in seen] == [0, 3, 4, 5]
    assert [t.values[0] if t.values else None for t in seen] == pytest.approx(
        [0.3 + SHAPE * 0.6, 0.2, 0.1 + SHAPE * 0.8, None])
    assert [t.number for t in view.get_trials(states=(TrialState.COMPLETE,))] == [0, 3, 4]
    assert [t.values[0] for t in study.get_trials() if t.values] == [0.3, 0.9, 0.4, 0.2, 0.1]


def test_gradient_verdict_stops_after_patience_without_progress():
    from evomerge.auto import LOSS_GAIN, PATIENCE, gradient_verdict

    def run(values_losses):
        return [_trial(i, "task_arithmetic", v, gradient_steps=i, gradient_loss=loss)
                for i, (v, loss) in enumerate(values_losses)]

    improving = run([(0.1 * i, 1.0 - 0.1 * i) for i in range(8)])
    assert gradient_verdict(improving, budget_left=50) is None
    flat = run([(0.5, 1.0)] + [(0.4, 1.0 * (1 - LOSS_GAIN / 2))] * PATIENCE)
    assert "in a row" in gradient_verdict(flat, budget_left=50)
    assert gradient_verdict(flat[:PATIENCE], budget_left=50) is None       # too early to tell
    # a falling loss alone keeps it going (the scores may jump late), and so does a better score alone
    falling = run([(0.5, 1.0)] + [(0.4, 1.0 * (1 - 3 * LOSS_GAIN) ** (i + 1)) for i in range(PATIENCE)])
    assert gradient_verdict(falling, budget_left=50) is None
    assert "share of the budget" in gradient_verdict(improving, budget_left=8)
    # below the best task_arithmetic baseline after PATIENCE + 1 trials: it stops, though its loss still falls
    assert "below the best task_arithmetic baseline (0.5000 < 0.5500)" in gradient_verdict(
        falling, budget_left=50, floor=0.55)
    assert gradient_verdict(falling[:PATIENCE], budget_left=50, floor=0.55) is None   # too early to tell
    assert gradient_verdict(falling, budget_left=50, floor=0.5) is None                # it reached the floor
    assert gradient_verdict(improving, budget_left=50, floor=0.6) is None              # it beat the floor


def _session(tmp_path, *, methods=("task_arithmetic", "ties"), n_trials=24, name="s.db"):
    from evomerge.config import load_config
    from evomerge.search import SearchSession

    config = load_config(make_search_fixture(tmp_path / "fam", n_trials=n_trials, sampler="auto", methods=methods))
    return SearchSession(config, storage_url=f"sqlite:///{tmp_path / name}", device="cpu", progress=False)


def _record(study):
    return [(t.number, t.state.name, t.params, t.values, t.user_attrs.get("method")) for t in study.get_trials()]


def test_auto_is_the_default_and_runs_gradient_then_technique_arms(tmp_path):
    """With task_arithmetic searched: the baselines, then the gradient arm's trials (queued, steps rising) until
    it stops for the reason stored on the study, then the technique arms; same seed, same study; each
    technique's first trials lie around its own best."""
    from evomerge.auto import GRADIENT_ATTR, PATIENCE, ROUNDS_ATTR, WARM, WARM_SPREAD, is_gradient_trial
    from evomerge.config import SearchSection
    from evomerge.samplers import BASELINES_ATTR

    assert SearchSection().sampler == "auto"
    runs = []
    for i, ahead in enumerate((True, False)):
        with _session(tmp_path, name=f"{i}.db") as session:
            session.run(24, ahead=ahead)
            study, space = session.study, session.space
            runs.append(_record(study))
    assert runs[0] == runs[1]                               # sampled ahead or inline: the same study
    trials = study.get_trials()
    count = study.user_attrs[BASELINES_ATTR]
    assert all("baseline" in t.user_attrs for t in trials[:count])
    gradient = [t for t in trials if is_gradient_trial(t)]
    record = study.user_attrs[GRADIENT_ATTR]
    assert record["state"] == "stopped" and record["trials"] == len(gradient) > 0
    assert [t.number for t in gradient] == list(range(count, count + len(gradient)))   # right after the baselines
    assert [t.user_attrs["gradient_steps"] for t in gradient] == [4 * (i + 1) for i in range(len(gradient))]
    floor = max(t.values[0] for t in trials[:count] if space.method_of(t.params, t.user_attrs) == "task_arithmetic")
    trailed = max(t.values[0] for t in gradient) < floor     # then it stops at PATIENCE + 1 trials, saying why
    assert ("below the best task_arithmetic baseline" in record["why"]) == trailed
    assert not trailed or len(gradient) == PATIENCE + 1
    arms = trials[count + len(gradient):]
    assert len(arms) > 0 and all(t.state.name == "COMPLETE" for t in trials)
    assert {t.user_attrs["method"] for t in arms} <= {"task_arithmetic", "ties"}
    assert study.user_attrs.get(ROUNDS_ATTR, [["task_arithmetic", "ties"]])[0] == ["task_arithmetic", "ties"]
    for method in ("task_arithmetic", "ties"):    # the first WARM of each arm: around its best, LAG 1 hidden
        for t in [t for t in arms if t.user_attrs["method"] == method][:WARM]:
            assert t.params == pytest.approx(_around_best(trials, t, space, spread=WARM_SPREAD))


def _around_best(trials, trial, space, *, spread):
    """The parameters a step of `spread` around the best trial of `trial`'s technique that its sampler saw
    (LAG 1: the trials numbered before trial.number - 1) gives, for the trial's seeded generator."""
    method = space.method_of(trial.params, trial.user_attrs)
    seen = [s for s in trials if s.number < trial.number - 1 and s.state.name == "COMPLETE"
            and space.method_of(s.params, s.user_attrs) == method]
    best = max(seen, key=lambda s: (s.values[0], -s.number))
    expected = space.around(best.params, best.user_attrs, spread=spread, rng=np.random.default_rng([0, trial.number]))
    expected.pop("method", None)
    return expected


def test_an_arm_alone_in_its_round_alternates_its_tpe_and_steps_around_its_best(tmp_path):
    """One technique searched, so its arm is alone from the start: after its WARM trials, every LOCAL_EVERY-th of
    its trials (counted among those its sampler saw) is a step of LOCAL_SPREAD around its best, the others its
    TPE's."""
    from evomerge.auto import LOCAL_EVERY, LOCAL_SPREAD, WARM, WARM_SPREAD
    from evomerge.samplers import BASELINES_ATTR

    with _session(tmp_path, methods=("ties",), n_trials=20) as session:
        session.run(20)
        study, space = session.study, session.space
    trials = study.get_trials()
    count = study.user_attrs[BASELINES_ATTR]
    kinds = []
    for t in trials[count:]:
        spent = max(0, t.number - 1 - count)         # the arm's trials its sampler saw (no gradient arm: no TA)
        if spent < WARM:
            assert t.params == pytest.approx(_around_best(trials, t, space, spread=WARM_SPREAD))
        elif spent % LOCAL_EVERY == 0:
            assert t.params == pytest.approx(_around_best(trials, t, space, spread=LOCAL_SPREAD))
            kinds.append("step")
        else:
            assert t.params != pytest.approx(_around_best(trials, t, space, spread=LOCAL_SPREAD))
            kinds.append("tpe")
    assert kinds.count("step") >= 3 and kinds.count("tpe") >= 3


@pytest.mark.slow
def test_auto_resumes_a_stopped_study_to_the_same_trials(tmp_path):
    """Stopped after 12 trials and resumed by a new session (a new process's sampler), the study is the one an
    uninterrupted run gives: the arms' generators are seeded per trial, their decisions stored on the study."""
    methods = ("ties", "dare_ties")          # no gradient arm: its Adam moments restart on resume, by design
    with _session(tmp_path, methods=methods, name="whole.db") as session:
        session.run(24)
        whole = _record(session.study)
    with _session(tmp_path, methods=methods, name="parts.db") as session:
        session.run(12)
    with _session(tmp_path, methods=methods, name="parts.db") as session:
        session.run(24)
        parts = _record(session.study)
    assert parts == whole
    assert len({str(p) for _, _, p, _, _ in whole}) == 24


@pytest.mark.slow
def test_auto_resumes_after_a_kill_mid_trial(tmp_path):
    """Ctrl-C during a gradient trial: that trial fails, a resumed search finishes the budget, and the gradient
    arm goes on from the study's best task-arithmetic trial."""
    from evomerge.auto import GRADIENT_ATTR, is_gradient_trial

    with _session(tmp_path) as session:
        evaluate, calls = session.evaluator.evaluate, []

        def interrupted(*args, **kwargs):
            calls.append(1)
            if len(calls) == session.study.user_attrs["baseline_count"] + 2:
                raise KeyboardInterrupt
            return evaluate(*args, **kwargs)

        session.evaluator.evaluate = interrupted
        with pytest.raises(KeyboardInterrupt):
            session.run(24)
        failed = [t for t in session.study.get_trials() if t.state.name == "FAIL"]
        assert len(failed) == 1 and is_gradient_trial(failed[0])
        assert session.study.user_attrs[GRADIENT_ATTR]["state"] == "running"
    with _session(tmp_path) as session:
        session.run(24)
        trials = session.study.get_trials()
        assert session.study.user_attrs[GRADIENT_ATTR]["state"] == "stopped"
    assert sum(t.state.name == "COMPLETE" for t in trials) == 24
    assert [t.number for t in trials if t.state.name == "FAIL"] == [failed[0].number]
    assert "RUNNING" not in {t.state.name for t in trials} and "WAITING" not in {t.state.name for t in trials}


@pytest.mark.slow     # a whole search
def test_auto_without_task_arithmetic_or_with_several_objectives(tmp_path):
    """No task_arithmetic: no gradient arm (no record of one). Several objectives: auto is TPE (its arms rank by
    one score), and the config accepts it."""
    from evomerge.auto import GRADIENT_ATTR, AutoSampler
    from evomerge.config import load_config
    from evomerge.samplers import make_sampler

    with _session(tmp_path, methods=("ties",), n_trials=10) as session:
        session.run(10)
        assert GRADIENT_ATTR not in session.study.user_attrs
        assert sum(t.state.name == "COMPLETE" for t in session.study.get_trials()) == 10
        assert isinstance(session.sampler.inner, AutoSampler)
    path = make_search_fixture(tmp_path / "two", sampler="auto")
    path.write_text(path.read_text().replace("objective: {ppl: 1.0, pick: 1.0}", "objective: [{ppl: 1.0}, {pick: 1.0}]"))
    config = load_config(path)
    from evomerge.sources import open_sources
    from evomerge.space import SearchSpace

    sources = open_sources(config.base, config.sources, relative_to=config.relative_to)
    sampler = make_sampler(config, SearchSpace(config, sources.sources, sources.layout))
    assert len(config.objectives) == 2 and isinstance(sampler.inner, optuna.samplers.TPESampler)
