"""Task files without a model: schema, rows, splits, subsamples, datasets, extract rules, and every bad
input as one InputError line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from evomerge.errors import InputError
from evomerge.evaluate import load_tasks
from evomerge.evaluate import extract as ex

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def gen_rows(n: int) -> list[dict]:
    return [{"prompt": f"inc {i % 10} =", "target": f"{(i + 1) % 10}", "id": i} for i in range(n)]


def choice_rows(n: int) -> list[dict]:
    return [{"prompt": f"q{i}", "choices": [" a", " b", " c"], "answer": i % 3} for i in range(n)]


@pytest.fixture
def task_dir(tmp_path: Path) -> Path:
    write_jsonl(tmp_path / "data/inc.search.jsonl", gen_rows(30))
    write_jsonl(tmp_path / "data/inc.heldout.jsonl", gen_rows(20))
    write_jsonl(tmp_path / "data/pick.jsonl", choice_rows(41))
    write_jsonl(tmp_path / "data/text.jsonl", [{"text": f"inc {i} = {i + 1}"} for i in range(10)])
    return tmp_path


def write_tasks(directory: Path, text: str) -> Path:
    path = directory / "tasks.yaml"
    path.write_text(text)
    return path


GOOD = """
tasks:
  - name: inc
    type: generate
    data: {search: data/inc.search.jsonl, heldout: data/inc.heldout.jsonl}
    max_new_tokens: 4
    stop: ["\\n"]
    extract: {regex: "(\\\\d+)"}
  - name: pick
    type: choice
    data: data/pick.jsonl
    heldout_fraction: 0.25
    metric: acc_norm
  - name: text
    type: perplexity
    data: data/text.jsonl
    limit: 3
"""


def test_load_good_file(task_dir: Path) -> None:
    suite = load_tasks(write_tasks(task_dir, GOOD))
    assert suite.names == ["inc", "pick", "text"]
    assert [suite.primary_metric(n) for n in suite.names] == ["exact_match", "acc_norm", "neg_log_ppl"]
    assert len(suite.rows("inc", "search")) == 30 and len(suite.rows("inc", "heldout")) == 20
    search, heldout = suite.rows("pick", "search"), suite.rows("pick", "heldout")
    assert (len(search), len(heldout)) == (31, 10)
    assert not set(r.prompt for r in search) & set(r.prompt for r in heldout)
    assert len(suite.rows("text", "search")) == 3 and len(suite.rows("text", "heldout")) == 3
    assert suite.rows("inc", "search")[0].target == "1"


def test_split_and_limit_are_seeded_and_stable(task_dir: Path) -> None:
    path = write_tasks(task_dir, GOOD)
    a, b = load_tasks(path, seed=1), load_tasks(path, seed=1)
    assert a.rows("pick", "heldout") == b.rows("pick", "heldout")
    assert a.rows("text", "search") == b.rows("text", "search")
    # the rows for limit 3 are among those for limit 4 (nested), and other seeds draw other rows
    more = load_tasks(write_tasks(task_dir, GOOD.replace("limit: 3", "limit: 4")), seed=1)
    assert set(a.rows("text", "search")) < set(more.rows("text", "search"))
    others = [load_tasks(path, seed=s).rows("text", "search") for s in range(2, 6)]
    assert any(o != a.rows("text", "search") for o in others)
    # the search/heldout split itself does not move with the study seed
    assert all(load_tasks(path, seed=s).rows("pick", "heldout") == a.rows("pick", "heldout") for s in range(3))


def test_dataset_source_saved_on_disk(tmp_path: Path) -> None:
    import datasets

    rows = {"question": [f"inc {i} =" for i in range(12)], "meta": [{"answer": str(i + 1)} for i in range(12)]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows),
                          "test": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "ds"))
    path = write_tasks(tmp_path, """
tasks:
  - name: inc
    type: generate
    dataset: {path: ds, split: {search: train, heldout: test}, columns: {prompt: question, target: meta.answer}}
""")
    suite = load_tasks(path)
    assert suite.rows("inc", "heldout")[3].prompt == "inc 3 =" and suite.rows("inc", "heldout")[3].target == "4"
    with pytest.raises(InputError, match=r"column 'questoin' not in .*did you mean 'question'"):
        load_tasks(write_tasks(tmp_path, path.read_text().replace("prompt: question", "prompt: questoin")))


def one_line(err: InputError) -> str:
    text = str(err)
    assert "\n" not in text
    return text


BAD_CASES = {
    "malformed jsonl line": (lambda d: write_jsonl(d / "data/pick.jsonl", choice_rows(3) + ['{"prompt": "x",']),
                             GOOD, r"pick\.jsonl:4: not valid JSON"),
    "answer out of range": (lambda d: write_jsonl(d / "data/pick.jsonl", choice_rows(2) + [
        {"prompt": "x", "choices": ["a", "b"], "answer": 2}]), GOOD, r"pick\.jsonl:3: answer: answer index 2 is out of range"),
    "missing field": (lambda d: write_jsonl(d / "data/inc.heldout.jsonl", [{"prompt": "x", "taget": "y"}]), GOOD,
                      r"inc\.heldout\.jsonl:1: target: missing 'target' \(did you mean 'taget'\?\)"),
    "missing split file": (lambda d: (d / "data/inc.heldout.jsonl").unlink(), GOOD,
                           r"tasks\.inc\.data\.heldout: data file not found: 'data/inc\.heldout\.jsonl'"),
    "unknown task type": (None, GOOD.replace("type: generate", "type: generat"),
                          r"tasks\.inc\.type: unknown task type 'generat' \(did you mean 'generate'\?\)"),
    "unknown key": (None, GOOD.replace("max_new_tokens", "max_new_token"),
                    r"tasks\.inc\.max_new_token: unknown key .*did you mean 'max_new_tokens'"),
    "unknown top-level key": (None, GOOD + "objective: {inc: 1}\n", r"objective: unknown key 'objective'"),
    "metric of another type": (None, GOOD.replace("metric: acc_norm", "metric: exact_match"),
                               r"tasks\.pick\.metric: Input should be 'acc' or 'acc_norm'"),
    "bad regex": (None, GOOD.replace('"(\\\\d+)"', '"(\\\\d+"'), r"tasks\.inc\.extract\.regex.*not a valid regular"),
    "out of range field": (None, GOOD.replace("max_new_tokens: 4", "max_new_tokens: 0"),
                           r"tasks\.inc\.max_new_tokens: Input should be greater than or equal to 1"),
    "two sources": (None, GOOD.replace("limit: 3", "limit: 3\n    dataset: {path: x}"),
                    r"tasks\.text: give exactly one of 'data'"),
    "duplicate names": (None, GOOD.replace("name: text", "name: inc"), r"tasks: task name 'inc' is used twice"),
    "duplicate yaml key": (None, GOOD.replace("limit: 3", "limit: 3\n    limit: 4"), r"duplicate key 'limit'"),
    "empty file": (lambda d: (d / "data/text.jsonl").write_text("\n"), GOOD, r"text\.jsonl: no rows"),
    "missing include_path": (None, GOOD + "  - {name: arc, type: lm_eval, task: x, include_path: nowhere}\n",
                             r"tasks\.arc\.include_path: include_path not found"),
    "misspelt choices key": (lambda d: write_jsonl(d / "data/pick.jsonl", [{"prompt": "q", "choice": ["a", "b"],
                                                                            "answer": 0}]),
                             GOOD, r"pick\.jsonl:1: choices: missing 'choices' \(did you mean 'choice'\?\)"),
    "unknown extract rule": (None, GOOD.replace('extract: {regex: "(\\\\d+)"}', "extract: lastnum"),
                             r"tasks\.inc\.extract: .*'last_number' \(or a regex: \{regex:"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_is_one_line(task_dir: Path, case: str) -> None:
    mutate, text, pattern = BAD_CASES[case]
    if mutate:
        mutate(task_dir)
    with pytest.raises(InputError) as info:
        load_tasks(write_tasks(task_dir, text))
    assert str(task_dir / "tasks.yaml") in one_line(info.value) or ".jsonl" in str(info.value)
    assert __import__("re").search(pattern, str(info.value)), str(info.value)


@pytest.mark.slow
def test_unknown_lm_eval_task_suggests(task_dir: Path) -> None:
    with pytest.raises(InputError) as info:
        load_tasks(write_tasks(task_dir, GOOD + "  - {name: arc, type: lm_eval, task: arc_esay}\n"))
    assert "unknown lm-eval task 'arc_esay' (did you mean 'arc_easy'?)" in one_line(info.value)


@pytest.mark.parametrize("rule, text, expected", [
    ("strip", "  4 8 3 \n", "4 8 3"),
    ("first_line", "\n  4 8\n3", "4 8"),
    ("last_number", "so 12 then -1,234.5 done", "-1234.5"),
    ("last_number", "none here", None),
    ({"regex": r"answer: (\w+)"}, "the answer: yes.", "yes"),
    ({"regex": r"\d+"}, "a 42 b 7", "42"),
    ({"regex": r"\d+"}, "nothing", None),
    ({"regex": r"(\d+)|([a-z]+)"}, "it is blue", "it"),  # the first group that matched, as lm-eval's filter
])
def test_extract_rules(rule, text: str, expected: str | None) -> None:
    assert ex.extractor(rule)(text) == expected


def test_last_number_target_with_separators() -> None:
    rule = ex.extractor("last_number")
    assert ex.exact_match(rule, " 1,234", "1,234") == ex.exact_match(rule, " 1,234", "1234") == 1.0
    assert ex.exact_match(rule, "1234", "x 1,234") == 0.0  # only a target that is a number is read as one


def test_tasks_over_the_same_rows_split_them_alike(task_dir: Path) -> None:
    """A choice and a generate version of the same questions, or a renamed task: the same held-out rows,
    so that no task's held-out rows are another's search rows."""
    questions = [f"q{i}" for i in range(41)]
    write_jsonl(task_dir / "data/ask.jsonl", [{"prompt": q, "target": "a"} for q in questions])
    suite = load_tasks(write_tasks(task_dir, """
tasks:
  - {name: pick, type: choice, data: data/pick.jsonl}
  - {name: ask, type: generate, data: data/ask.jsonl, max_new_tokens: 2}
  - {name: renamed, type: choice, data: data/pick.jsonl}
"""))
    prompts = {name: {split: [r.prompt for r in suite.rows(name, split)] for split in ("search", "heldout")}
               for name in suite.names}
    assert prompts["pick"] == prompts["ask"] == prompts["renamed"]
    assert set(prompts["pick"]["heldout"]).isdisjoint(prompts["ask"]["search"])
    assert len(prompts["pick"]["heldout"]) == round(41 * 0.5)
