"""A perplexity task has one definition: the pooled per-token log-likelihood is its value, the mean of its
per-example values, the centre of its ± se, and the mean of what the pruner is reported."""

from __future__ import annotations

import math
import os
import random
import statistics

import pytest
import torch

from evomerge.evaluate import Evaluator, load_tasks
from evomerge.evaluate.score import text_nll

from modelfactory import SYMBOLS, make_family, save_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

LENGTHS = [1, 2, 3, 5, 8, 13, 21, 34, 55, 63]  # words (one token each); the model's context is 64 tokens


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one intra-op thread (conftest)


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("ppl")
    base, _ = make_family(root, k=0, seed=1, scale=0.0)
    save_tokenizer([base])
    rng = random.Random(5)
    texts = [" ".join(rng.choice(SYMBOLS[:6] if n < 10 else SYMBOLS) for _ in range(n)) for n in LENGTHS]
    rng.shuffle(texts)
    (root / "text.jsonl").write_text("".join(f'{{"text": "{t}"}}\n' for t in texts))
    (root / "pick.jsonl").write_text('{"prompt": "a b =", "choices": ["c", "d e"], "answer": 0}\n' * 4)
    (root / "tasks.yaml").write_text(
        "tasks:\n"
        "  - {name: text, type: perplexity, data: {search: text.jsonl, heldout: text.jsonl}}\n"
        "  - {name: pick, type: choice, data: {search: pick.jsonl, heldout: pick.jsonl}}\n")
    return {"model": AutoModelForCausalLM.from_pretrained(base), "tokenizer": AutoTokenizer.from_pretrained(base),
            "suite": load_tasks(root / "tasks.yaml"), "texts": texts}


def reference(family: dict) -> tuple[list[float], list[int]]:
    """Each text's summed negative log-likelihood and scored tokens, from the model's own loss; the tokenizer
    has no BOS, so EOS leads and the first word is scored too."""
    tok, model = family["tokenizer"], family["model"]
    nll, counts = [], []
    for text in family["texts"]:
        ids = torch.tensor([[tok.eos_token_id] + tok(text)["input_ids"]])
        with torch.inference_mode():
            loss = model(input_ids=ids, labels=ids).loss.item()
        nll.append(loss * (ids.shape[1] - 1))
        counts.append(ids.shape[1] - 1)
    return nll, counts


def test_value_examples_stderr_and_reports_are_one_per_token_definition(family) -> None:
    nll, counts = reference(family)
    assert sorted(counts) == LENGTHS
    pooled = -sum(nll) / sum(counts)
    assert pooled != pytest.approx(statistics.fmean(-a / n for a, n in zip(nll, counts)), rel=1e-4)  # lengths matter

    reports: list[tuple[int, float]] = []
    with Evaluator(family["suite"], family["model"], family["tokenizer"], batch_size=3) as evaluator:
        result = evaluator.evaluate("search", report=lambda step, value: reports.append((step, value)),
                                    objective={"text": 1.0})
        examples = evaluator._examples[("text", "search")]
        with torch.inference_mode():  # the harness's token count per text is text_nll's
            for indices, batch in evaluator._chunk("search", [("text", i) for i in range(len(examples))]).work["text"]:
                assert text_nll(evaluator.runner, batch)[1] == [sum(len(s) for _, s in examples[i]) for i in indices]

    values = result.examples["text"]["neg_log_ppl"]
    mean_tokens = sum(counts) / len(counts)
    assert result.tasks["text"]["neg_log_ppl"] == pytest.approx(pooled, rel=1e-6)
    assert statistics.fmean(values) == pytest.approx(pooled, rel=1e-6)
    assert values == pytest.approx([-a / mean_tokens for a in nll], rel=1e-6)  # each text over the mean length
    # the pruner sees exactly these values, one per text (the choice task has no weight)
    assert [s for s, _ in reports] == list(range(len(values)))
    assert sorted(v for _, v in reports) == pytest.approx(sorted(values), rel=1e-12)
    assert statistics.fmean(v for _, v in reports) == pytest.approx(result.tasks["text"]["neg_log_ppl"], rel=1e-9)
    # the table's ± se is the standard error of those values
    se = statistics.stdev(values) / math.sqrt(len(values))
    assert result.stderr("text") == pytest.approx(se, rel=1e-9)
    row = next(line.split() for line in result.format_table().splitlines() if "neg_log_ppl*" in line)
    assert row[-3:-1] == [f"{result.tasks['text']['neg_log_ppl']:.4f}", f"{se:.4f}"]
