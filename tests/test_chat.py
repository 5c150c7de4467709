"""Chat templates in tasks (`chat_template: true`, `system_prompt`): the strings and scores of lm-eval 0.4 run
with apply_chat_template=True (and system_instruction), on a real chat model, with the fast paths on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from evomerge.evaluate import Evaluator, load_tasks
from evomerge.evaluate.codec import Codec
from evomerge.evaluate.lm_eval_backend import task_yaml

SYSTEM = "You answer with one word."
QUESTIONS = [("What is the capital of France?", "The capital of France is Paris"), ("What color is the sky on a clear day?", "Blue"),
             ("What is 2 + 2? Answer with a number.", "4"), ("What is the opposite of hot?", "The opposite of hot is cold"),
             ("Which animal says meow?", "Cat"), ("What is the first month of the year?", "January"),
             ("How many legs does a spider have? Answer with a number.", "A spider has 8 legs"),
             ("What do bees make?", "Honey")]
CHOICES = [("Is the sun hot?", ["Yes", "No"], 0), ("Which one is a fruit?", ["Apple", "Chair", "River"], 0),
           ("Which number is larger?", ["3", "30"], 1), ("What do cows drink?", ["Water", "Milk"], 0),
           ("Which is a color?", ["Seven", "Green"], 1)]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _lm_eval(model, tokenizer, custom: Path, task: str, *, system: str | None) -> tuple[dict, list]:
    """lm-eval's own run of a custom task with the chat template: its logged samples by document, and its requests."""
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    loaded = TaskManager(include_path=str(custom), include_defaults=False).load([task])
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8)
    out = evaluate(lm=lm, task_dict=loaded, bootstrap_iters=0, log_samples=True, apply_chat_template=True,
                   system_instruction=system)
    samples = {s["doc_id"]: s for s in out["samples"][task]}
    return samples, loaded["tasks"][task].instances


@pytest.mark.slow
def test_chat_tasks_score_as_lm_eval_with_apply_chat_template(smol: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smol, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(smol)
    gen = _write(tmp_path / "gen.jsonl", [{"prompt": q, "target": a} for q, a in QUESTIONS])
    pick = _write(tmp_path / "pick.jsonl", [{"prompt": q, "choices": c, "answer": a} for q, c, a in CHOICES])
    (tmp_path / "tasks.yaml").write_text(
        "tasks:\n"
        f"  - {{name: gen, type: generate, data: {{search: gen.jsonl, heldout: gen.jsonl}}, max_new_tokens: 6,"
        f" chat_template: true, system_prompt: {SYSTEM!r}}}\n"
        "  - {name: pick, type: choice, data: {search: pick.jsonl, heldout: pick.jsonl}, chat_template: true}\n")
    suite = load_tasks(tmp_path / "tasks.yaml")
    evaluator = Evaluator(suite, model, tokenizer, batch_size=8)
    ours = evaluator.evaluate("heldout")
    slow = Evaluator(suite.with_options("gen", fast_path=False), model, tokenizer, batch_size=8).evaluate("heldout")

    custom = tmp_path / "custom"
    custom.mkdir()
    for name, data in (("gen", gen), ("pick", pick)):
        (custom / f"lme_{name}.yaml").write_text(yaml.safe_dump(task_yaml(suite.spec(name), data, task=f"lme_{name}")))
    theirs_gen, requests = _lm_eval(model, tokenizer, custom, "lme_gen", system=SYSTEM)
    theirs_pick, choice_requests = _lm_eval(model, tokenizer, custom, "lme_pick", system=None)

    codec = Codec(tokenizer, model)                                 # the strings: lm-eval's, request by request
    prompts = codec.chat([q for q, _ in QUESTIONS], system=SYSTEM)
    assert prompts[0].startswith("<|im_start|>system\n" + SYSTEM) and prompts[0].endswith("<|im_start|>assistant\n")
    assert {i.doc_id: i.arguments[0] for i in requests} == dict(enumerate(prompts))
    assert {(i.doc_id, i.arguments[0]) for i in choice_requests} == set(enumerate(codec.chat([q for q, _, _ in CHOICES])))
    assert [e.prompt for e in evaluator._examples[("gen", "heldout")]] == prompts

    outputs = [theirs_gen[i]["filtered_resps"][0] for i in range(len(QUESTIONS))]
    assert ours.examples["gen"]["exact_match"] == [theirs_gen[i]["exact_match"] for i in range(len(QUESTIONS))]
    assert all(o is None or o == t for o, t in zip(ours.outputs["gen"], outputs)), (ours.outputs["gen"], outputs)
    assert slow.outputs["gen"] == outputs and slow.examples["gen"] == ours.examples["gen"]   # fast path = decoding
    assert 0 < ours.tasks["gen"]["exact_match"] < 1     # hits (proven by the fast path) and misses
    assert evaluator.stats["target"] > 0
    for metric in ("acc", "acc_norm"):
        assert ours.examples["pick"][metric] == [theirs_pick[i][metric] for i in range(len(CHOICES))], metric


def test_codec_encodes_a_rendered_template_as_lm_eval_does_when_the_tokenizer_adds_bos(tmp_path: Path) -> None:
    """A template that writes BOS itself (Llama 3's) on a tokenizer that adds BOS: lm-eval adds no second one."""
    from lm_eval.models.huggingface import HFLM
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from modelfactory import tiny_config

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for ch in "abcdefghijklmnopqrstuvwxyz :?\n":
        vocab[ch] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("<s>|."), behavior="isolated")
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>")
    tokenizer.chat_template = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant:{% endif %}")
    model = AutoModelForCausalLM.from_config(tiny_config("llama", vocab=len(vocab)))
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=2)
    codec = Codec(tokenizer, model)
    rendered = codec.chat(["is it hot?", "who are you?"], system="be brief")
    assert rendered[0] == "<s>system: be brief\nuser: is it hot?\nassistant:"
    texts = rendered + ["plain text"]
    assert codec.encode(texts) == [lm.tok_encode(t) for t in texts]
    assert codec.encode(texts)[0].count(1) == 1 and codec.encode(texts)[2][0] == 1    # one BOS each
    pairs = codec.pairs([rendered[0], rendered[0], "plain"], [" yes", " no", " text"])
    assert pairs == [tuple(lm._encode_pair(c, k)) for c, k in [(rendered[0], " yes"), (rendered[0], " no"),
                                                                ("plain", " text")]]


@pytest.mark.parametrize("task, expect", [
    ("chat_template: true", "tasks.pick.chat_template: task 'pick' renders its prompts with the model's chat "
                            "template, and the model's tokenizer has none"),
    ("system_prompt: be brief", "system_prompt needs chat_template: true"),
])
@pytest.mark.slow
def test_chat_options_that_cannot_work_exit_2_before_any_weights_load(tmp_path: Path, task: str, expect: str) -> None:
    from modelfactory import make_search_fixture

    config = make_search_fixture(tmp_path / "fam", n_trials=2)          # its tokenizer has no chat template
    tasks = tmp_path / "fam" / "tasks.yaml"
    tasks.write_text(tasks.read_text().replace(" metric: acc}", f" metric: acc, {task}}}"))
    for command in (["validate", str(config)], ["search", str(config), "--out", str(tmp_path / "run")]):
        done = subprocess.run([sys.executable, "-m", "evomerge", *command], capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, done.stderr
        err = done.stderr.strip().splitlines()
        assert len(err) == 1 and expect in err[0] and str(tasks) in err[0], err
    assert not (tmp_path / "run").exists()
