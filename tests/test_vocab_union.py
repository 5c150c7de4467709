"""`vocab: union` (SPEC, Sources): the union vocabulary of mergekit 0.1.5's `tokenizer_source: union`.

Against mergekit itself: the same merged tokenizer (files and token -> id) and the same embedding and
head rows, on the real SmolLM2 checkpoint with a source that added two special tokens, and on tiny
models where several sources added tokens (rows copied from the one model that has a token, from the
base, or averaged). The search builds its resident model with the union vocabulary once and scores it;
bad input exits 2 with one line before any weight loads.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

from modelfactory import cut_smol_family, make_family, make_search_fixture, save_tokenizer  # noqa: E402

from evomerge.errors import InputError  # noqa: E402
from evomerge.sources import open_sources  # noqa: E402

TOOL_TOKENS = ["<tool_call>", "</tool_call>"]


def add_tokens(folder: Path, tokens: list[str], *, special: bool = True, rows: int | None = None,
               seed: int = 0) -> list[int]:
    """Add `tokens` to the folder's tokenizer (saved with save_pretrained) and, where `rows` is given, grow its
    embedding (and an untied head) to that many rows with new rows of its own; returns the tokens' ids."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if special:
        tokenizer.add_special_tokens({"additional_special_tokens": tokens})
    else:
        tokenizer.add_tokens(tokens)
    tokenizer.save_pretrained(str(folder))
    if rows is not None:
        tensors = load_file(str(folder / "model.safetensors"))
        gen = torch.Generator().manual_seed(seed)
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            if name in tensors:
                old = tensors[name]
                new = (torch.randn(rows - old.shape[0], old.shape[1], generator=gen) * 0.05).to(old.dtype)
                tensors[name] = torch.cat([old, new])
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        config = json.loads((folder / "config.json").read_text())
        config["vocab_size"] = rows
        (folder / "config.json").write_text(json.dumps(config))
    return tokenizer.convert_tokens_to_ids(tokens)


def run_mergekit(config: dict, out: Path) -> dict[str, torch.Tensor]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(MergeConfiguration.model_validate(config), str(out),
              options=MergeOptions(write_model_card=False, quiet=True, device="cpu"))
    return load_file(str(out / "model.safetensors"))


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe))
    return path


# ------------------------------------------------------------------------------------------------
# The real checkpoint: SmolLM2 (tied embeddings, a 49k BPE vocabulary), a source with two tool tokens


@pytest.fixture(scope="module")
def smol_union(smol, tmp_path_factory):
    """SmolLM2's first 2 blocks (the tied embedding whole) as a bf16 base; `tools`, a fine-tune that added two
    special tokens (the tokenizer saved with save_pretrained, two new embedding rows); `plain`, a fine-tune."""
    folders = cut_smol_family(smol, tmp_path_factory.mktemp("smol-union"), ["base", "tools", "plain"], tokenizer=True)
    vocab_size = json.loads((smol / "config.json").read_text())["vocab_size"]
    ids = add_tokens(folders["tools"], TOOL_TOKENS, rows=vocab_size + 2)
    assert ids == [vocab_size, vocab_size + 1]
    return folders


@pytest.mark.slow
def test_union_matches_mergekit_on_a_real_checkpoint(smol_union, tmp_path):
    """The merged tokenizer's files and vocabulary, config.json and every tensor entry are mergekit's: bit for
    bit, since the rows are laid out by the same rule and merged by the same float32 operations in the same
    order, rounded to bfloat16 once. The exported folder loads and gives the resident model's logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.build import merger_for
    from evomerge.export import merge_to_folder

    base, tools, plain = smol_union["base"], smol_union["tools"], smol_union["plain"]
    recipe = write_recipe(tmp_path / "recipe.yaml", {
        "evomerge_recipe": 1, "method": "task_arithmetic", "base": str(base), "sources": [str(tools), str(plain)],
        "vocab": "union", "lambda": 0.9, "parameters": {"tools": {"weight": 0.7}, "plain": {"weight": 0.5}}})
    ours = merge_to_folder(recipe, tmp_path / "ours")
    config = yaml.safe_load((ours / "mergekit.yaml").read_text())
    assert config["tokenizer_source"] == "union"
    theirs = tmp_path / "mergekit"
    their_tensors = run_mergekit(config, theirs)

    ours_tok, their_tok = AutoTokenizer.from_pretrained(str(ours)), AutoTokenizer.from_pretrained(str(theirs))
    assert ours_tok.get_vocab() == their_tok.get_vocab()
    assert ours_tok.convert_tokens_to_ids(TOOL_TOKENS) == [49152, 49153]
    for file in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (ours / file).read_bytes() == (theirs / file).read_bytes(), file
    assert json.loads((ours / "config.json").read_text()) == json.loads((theirs / "config.json").read_text())
    assert json.loads((ours / "config.json").read_text())["vocab_size"] == 49154

    our_tensors = load_file(str(ours / "model.safetensors"))
    assert set(our_tensors) == set(their_tensors)
    for name, tensor in our_tensors.items():
        assert tensor.dtype == their_tensors[name].dtype == torch.bfloat16, name
        assert torch.equal(tensor, their_tensors[name]), name
    # the tool tokens keep the tools model's rows (every task vector is zero there); the rest is a merge
    embed = our_tensors["model.embed_tokens.weight"]
    assert embed.shape == (49154, 576)
    assert torch.equal(embed[49152:], load_file(str(tools / "model.safetensors"))["model.embed_tokens.weight"][49152:])
    assert not torch.equal(embed[:49152], load_file(str(base / "model.safetensors"))["model.embed_tokens.weight"])

    with merger_for(recipe) as merger:
        model = merger.model
        assert model.get_input_embeddings().weight.shape[0] == 49154
        assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
        exported = AutoModelForCausalLM.from_pretrained(str(ours), dtype=merger.score_dtype).eval()
        ids = ours_tok("<tool_call>get_weather()</tool_call> It is sunny.", return_tensors="pt").input_ids
        assert ids[0, 0] == 49152
        with torch.inference_mode():
            assert torch.equal(model(ids).logits, exported(ids).logits)


# ------------------------------------------------------------------------------------------------
# Tiny models: tokens that one, two or all sources added


@pytest.fixture()
def tiny_union(tmp_path):
    """A bf16 family (48 embedding rows, a 40-token tokenizer): s0 added <a> <b>, s1 added <b> <c> (ids 40, 41,
    inside their 48 rows), s2 added nothing."""
    base, sources = make_family(tmp_path / "fam", k=3, layers=2, vocab=48, dtype=torch.bfloat16)
    save_tokenizer([base, *sources])
    add_tokens(sources[0], ["<a>", "<b>"])
    add_tokens(sources[1], ["<b>", "<c>"])
    return base, sources


def test_rows_of_tokens_some_models_lack(tiny_union):
    """A token one model has: its row for every model; one several sources have but the base lacks: their
    float32 mean; the union drops the rows past the anchor's tokenizer (48 rows, 40 tokens), as mergekit does."""
    base, sources = tiny_union
    opened = open_sources(str(base), [str(s) for s in sources], vocab="union")
    vocab = opened.union.tokenizer.get_vocab()
    assert opened.vocab_size == 43 and [vocab[t] for t in ("<a>", "<b>", "<c>")] == [40, 41, 42]
    assert opened.layout.tensors["model.embed_tokens.weight"].shape == (43, 32)
    raw = {i: load_file(str(m.path / "model.safetensors"))["lm_head.weight"] for i, m in enumerate(opened.models)}
    read = {i: opened.read(m, "lm_head.weight") for i, m in enumerate(opened.models)}
    for i in read:
        assert read[i].shape == (43, 32)
        assert torch.equal(read[i][:40].float(), raw[i][:40].float())        # every model has the first 40
    mean_b = (torch.zeros(32) + raw[1][41].float() + raw[2][40].float()) / 2
    for i in (0, 3):        # the base and s2 lack all three
        assert torch.equal(read[i][40].float(), raw[1][40].float())            # <a>: s0's row
        assert torch.equal(read[i][41], mean_b)                                # <b>: the mean of s0's and s1's
        assert torch.equal(read[i][42].float(), raw[2][41].float())            # <c>: s1's row
    assert torch.equal(read[1][42].float(), raw[2][41].float()) and torch.equal(read[2][40].float(), raw[1][40].float())


@pytest.mark.parametrize("method", ["task_arithmetic", "linear"])
def test_rows_match_mergekit_token_by_token(tiny_union, tmp_path, method):
    """Several sources bring tokens: mergekit orders them through a Python set, so no mergekit.yaml is
    written, but run by hand it gives every token the same merged row, token by token. (The mean row of <b>
    is float32 there and here, not rounded to bfloat16.)"""
    from transformers import AutoTokenizer

    from evomerge.export import merge_to_folder

    base, sources = tiny_union
    recipe = {"evomerge_recipe": 1, "method": method, "sources": [str(s) for s in sources], "vocab": "union",
              "parameters": {"s0": {"weight": 0.6}, "s1": {"weight": 0.3}, "s2": {"weight": 0.4}}}
    if method == "task_arithmetic":
        recipe["base"] = str(base)
    ours = merge_to_folder(write_recipe(tmp_path / "recipe.yaml", recipe), tmp_path / "ours")
    assert not (ours / "mergekit.yaml").exists()
    config = {"merge_method": method, "models": [{"model": s, "parameters": {"weight": w}} for s, w in
                                                 zip(recipe["sources"], (0.6, 0.3, 0.4))],
              "parameters": {"normalize": method == "linear"}, "dtype": "float32", "out_dtype": "bfloat16",
              "tokenizer_source": "union"}
    if method == "task_arithmetic":
        config["base_model"] = str(base)
    theirs = run_mergekit(config, tmp_path / "mergekit")
    mine = load_file(str(ours / "model.safetensors"))
    our_vocab = AutoTokenizer.from_pretrained(str(ours)).get_vocab()
    their_vocab = AutoTokenizer.from_pretrained(str(tmp_path / "mergekit")).get_vocab()
    assert set(our_vocab) == set(their_vocab) and len(our_vocab) == 43
    order = sorted(our_vocab, key=our_vocab.get)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        permuted = theirs[name][[their_vocab[t] for t in order]]
        assert torch.equal(mine[name], permuted), name
    rest = set(mine) - {"model.embed_tokens.weight", "lm_head.weight"}
    assert all(torch.equal(mine[n], theirs[n]) for n in rest)


def mergekit_union(base: Path | None, sources: list[Path]):
    """mergekit's own BuildTokenizer result for these models: (token -> id, {model path: {union id: own id}})."""
    from mergekit.common import ModelReference
    from mergekit.tokenizer.build import build_tokenizer

    refs = [ModelReference.parse(str(m)) for m in ([base] if base else []) + list(sources)]
    info = build_tokenizer(base_model=refs[0] if base else None, referenced_models=refs, tokenizer_source="union",
                           trust_remote_code=False, add_tokens=())
    return info.tokenizer.get_vocab(), {ref.model.path: perm for ref, perm in info.permutations.items()}


def assert_same_union(opened, base: Path | None, sources: list[Path]) -> None:
    """The same tokens, and for each model the same own id of each token; the same ids too where mergekit's
    own runs agree on them (UnionVocab.same_in_mergekit)."""
    theirs, permutations = mergekit_union(base, sources)
    ours = opened.union.tokenizer.get_vocab()
    assert set(ours) == set(theirs) and opened.union.size == len(theirs)
    if opened.union.same_in_mergekit:
        assert ours == theirs
    for i, model in enumerate(opened.models):
        rows = opened.union.rows[i].tolist()
        perm = permutations[str(model.path)]
        assert {t: rows[u] for t, u in ours.items()} == {t: perm[u] for t, u in theirs.items()}, model.spec


def test_union_tokenizer_of_tiny_models_matches_mergekit(tiny_union, tmp_path):
    """Two sources bring added tokens (mergekit orders them by a set: compared token by token); then one
    source whose own vocabulary has an ordinary token the base lacks (the same ids as mergekit's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    base, sources = tiny_union
    opened = open_sources(str(base), [str(s) for s in sources], vocab="union")
    assert not opened.union.same_in_mergekit
    assert_same_union(opened, base, sources)

    vocab = json.loads((sources[2] / "tokenizer.json").read_text())["model"]["vocab"]
    wider = Tokenizer(models.WordLevel({**vocab, "@": len(vocab)}, unk_token="<unk>"))
    wider.pre_tokenizer = pre_tokenizers.Whitespace()
    for file in sources[2].glob("tokenizer*"):
        file.unlink()
    PreTrainedTokenizerFast(tokenizer_object=wider, eos_token="<eos>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(str(sources[2]))
    opened = open_sources(str(base), [str(sources[2])], vocab="union")
    assert opened.union.same_in_mergekit and opened.union.tokenizer.get_vocab()["@"] == 40
    assert_same_union(opened, base, [sources[2]])


@pytest.mark.slow
def test_union_tokenizer_of_a_base_listing_tokens_it_has_no_rows_for(smol_union, tmp_path):
    """The base's tokenizer has the two tool tokens but its embedding no rows for them: they are stripped from
    it (mergekit's get_stripped_tokenizer, a BPE tokenizer's JSON edited) and come back from the source."""
    stale = tmp_path / "stale"
    stale.mkdir()
    for file in smol_union["tools"].glob("tokenizer*"):
        shutil.copyfile(file, stale / file.name)
    for file in ("config.json", "model.safetensors"):
        (stale / file).symlink_to(smol_union["base"] / file)
    sources = [smol_union["tools"], smol_union["plain"]]
    opened = open_sources(str(stale), [str(s) for s in sources], vocab="union")
    assert opened.vocab_size == 49154 and [f.donors for f in opened.union.fills] == [(1,), (1,)]
    assert_same_union(opened, stale, sources)


def test_opening_a_union_reads_no_weights(tiny_union, monkeypatch):
    import safetensors

    def forbidden(*args, **kwargs):
        raise AssertionError("tensor data read while opening sources")

    base, sources = tiny_union
    monkeypatch.setattr(safetensors, "safe_open", forbidden)
    opened = open_sources(str(base), [str(s) for s in sources], vocab="union")
    assert opened.union.size == 43


def test_identical_tokenizers_leave_the_model_as_it_is(tmp_path):
    """Sources without added tokens: the union is the anchor's tokenizer and no row moves (no resize where the
    anchor's rows are a token each)."""
    base, sources = make_family(tmp_path / "fam", k=2, layers=2, vocab=40)
    save_tokenizer([base, *sources])
    opened = open_sources(str(base), [str(s) for s in sources], vocab="union")
    assert opened.vocab_size is None and opened.union.fills == []
    tensor = opened.read(opened.sources[1], "lm_head.weight")
    assert torch.equal(tensor, load_file(str(sources[1] / "model.safetensors"))["lm_head.weight"])


# ------------------------------------------------------------------------------------------------
# The search: one resident model with the union's rows


@pytest.mark.slow     # a whole search
def test_search_builds_the_union_model_once_and_scores_it(tmp_path, monkeypatch):
    """A source added a token: the resident model is loaded once, resized once to the union (41 tokens), each
    trial written into it and scored; best/ carries the union tokenizer and re-scores to the recorded score."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

    import evomerge
    from evomerge.recipe import Recipe
    from evomerge.search import search

    config = make_search_fixture(tmp_path / "fam", n_trials=3, extra="vocab: union\n")
    add_tokens(tmp_path / "fam" / "s1", ["<tool>"])
    loads, resizes = [], []
    load, resize = AutoModelForCausalLM.from_pretrained, PreTrainedModel.resize_token_embeddings

    def counted_load(*args, **kwargs):
        loads.append(args)
        return load(*args, **kwargs)

    def counted_resize(self, *args, **kwargs):
        resizes.append(args[0] if args else kwargs["new_num_tokens"])
        return resize(self, *args, **kwargs)

    from evomerge.evaluate import Evaluator

    tokenizers = []
    evaluator_init = Evaluator.__init__

    def recorded(self, suite, model, tokenizer, **kwargs):
        tokenizers.append(tokenizer)
        evaluator_init(self, suite, model, tokenizer, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", counted_load)
    monkeypatch.setattr(PreTrainedModel, "resize_token_embeddings", counted_resize)
    monkeypatch.setattr(Evaluator, "__init__", recorded)
    result = search(config, out=tmp_path / "run", progress=False)
    monkeypatch.undo()
    assert len(loads) == 1 and resizes == [41]
    # the trials were scored with the union's tokenizer, which knows the added token, not the base's
    assert [t.convert_tokens_to_ids("<tool>") for t in tokenizers] == [40]

    best = result.run_dir / "best"
    recipe = Recipe.from_yaml(result.run_dir / "recipe.yaml")
    assert recipe.vocab == "union"
    tokenizer = AutoTokenizer.from_pretrained(str(best))
    assert tokenizer.convert_tokens_to_ids("<tool>") == 40
    assert json.loads((best / "config.json").read_text())["vocab_size"] == 41
    model = AutoModelForCausalLM.from_pretrained(str(best))
    assert model.get_input_embeddings().weight.shape == (41, 32)
    scores = evomerge.evaluate(model, tasks=tmp_path / "fam" / "tasks.yaml", tokenizer=tokenizer, split="heldout")
    assert scores.objective({"ppl": 1.0, "pick": 1.0}) == pytest.approx(recipe.provenance["score"]["heldout"],
                                                                       abs=1e-6)
    # in memory the merged model still names the base's folder, whose tokenizer lacks <tool>: refused, not guessed
    with pytest.raises(InputError, match="pass tokenizer="):
        evomerge.evaluate(evomerge.merge(recipe), tasks=tmp_path / "fam" / "tasks.yaml", split="heldout")
    assert evomerge.evaluate(model, tasks=tmp_path / "fam" / "tasks.yaml", split="heldout").objective(
        {"ppl": 1.0, "pick": 1.0}) == pytest.approx(recipe.provenance["score"]["heldout"], abs=1e-6)


# ------------------------------------------------------------------------------------------------
# Bad input: exit 2, one line naming file, field and fix, before any weight loads


def _cli(args: list[str], capsys) -> tuple[int, list[str]]:
    from evomerge.cli import main

    code = main(args)
    return code, capsys.readouterr().err.strip().splitlines()


def test_a_source_without_a_tokenizer_is_refused(tiny_union, tmp_path, capsys, monkeypatch):
    import safetensors

    base, sources = tiny_union
    for file in sources[2].glob("tokenizer*"):
        file.unlink()
    recipe = write_recipe(tmp_path / "recipe.yaml", {"method": "task_arithmetic", "base": str(base), "vocab": "union",
                                                     "sources": [str(s) for s in sources]})
    monkeypatch.setattr(safetensors, "safe_open", lambda *a, **k: pytest.fail("weights loaded"))
    code, err = _cli(["merge", str(recipe), "-o", str(tmp_path / "out")], capsys)
    assert code == 2 and len(err) == 1, err
    assert str(recipe) in err[0] and "sources[2]" in err[0] and "no tokenizer files" in err[0]
    assert "vocab: base" in err[0] and not (tmp_path / "out").exists()


def test_a_token_beyond_a_models_rows_is_refused(tiny_union, tmp_path, capsys):
    """s2's tokenizer has <z> at id 48, past its 48 rows; s1 has <z> inside its rows, so the union holds it:
    mergekit 0.1.5 fails on that union (a KeyError), evomerge names the model and the token."""
    base, sources = tiny_union
    add_tokens(sources[2], [f"<p{i}>" for i in range(8)] + ["<z>"])
    add_tokens(sources[1], ["<z>"])
    recipe = write_recipe(tmp_path / "recipe.yaml", {"method": "task_arithmetic", "base": str(base), "vocab": "union",
                                                     "sources": [str(s) for s in sources]})
    code, err = _cli(["merge", str(recipe), "-o", str(tmp_path / "out")], capsys)
    assert code == 2 and len(err) == 1, err
    assert str(recipe) in err[0] and "sources[2]" in err[0]
    assert "token '<z>' has id 48" in err[0] and "vocab_size is 48" in err[0]


def test_union_with_a_tokenizer_field_and_a_misspelt_policy_are_refused(tiny_union, tmp_path, capsys):
    base, sources = tiny_union
    recipe = {"method": "task_arithmetic", "base": str(base), "sources": [str(s) for s in sources]}
    for extra, expect in (({"vocab": "union", "tokenizer": str(base)}, "tokenizer: vocab: union ships"),
                          ({"vocab": "unoin"}, "vocab: unknown vocab policy 'unoin' ('error', 'base' or 'union')")):
        path = write_recipe(tmp_path / "recipe.yaml", {**recipe, **extra})
        code, err = _cli(["merge", str(path), "-o", str(tmp_path / "out")], capsys)
        assert code == 2 and len(err) == 1 and str(path) in err[0] and expect in err[0], err


def test_search_config_accepts_union_and_names_the_choices(tmp_path, capsys):
    config = make_search_fixture(tmp_path / "fam", n_trials=2, extra="vocab: union\n")
    from evomerge.config import load_config

    assert load_config(config).vocab == "union"
    config.write_text(config.read_text().replace("vocab: union", "vocab: unoin"))
    code, err = _cli(["search", str(config), "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and len(err) == 1 and str(config) in err[0] and "'error', 'base' or 'union'" in err[0], err
    with pytest.raises(InputError, match="no tokenizer files"):
        for file in (tmp_path / "fam" / "s0").glob("tokenizer*"):
            file.unlink()
        open_sources(str(tmp_path / "fam" / "base"), [str(tmp_path / "fam" / "s0")], vocab="union")
