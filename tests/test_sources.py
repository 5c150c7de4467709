"""Sources: tensor names -> (layer, module kind), safetensors reading (single and sharded), and the
checks that run before any weight loads: pickle-only folders, shape and vocabulary mismatches."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from evomerge.errors import InputError
from evomerge.sources import IO_GROUP, classify, open_folder, open_sources

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

from modelfactory import make_family  # noqa: E402


# ------------------------------------------------------------------------------------------------
# Classification of names


@pytest.mark.parametrize("name, layer, kind", [
    ("transformer.h.3.attn.c_attn.weight", 3, "attn"),
    ("transformer.h.3.attn.c_proj.bias", 3, "attn"),
    ("transformer.h.11.mlp.c_proj.weight", 11, "mlp"),
    ("transformer.h.0.ln_1.weight", 0, "norm"),
    ("transformer.wte.weight", None, "embed"),
    ("transformer.wpe.weight", None, "embed"),
    ("transformer.ln_f.bias", None, "norm"),
    ("model.layers.10.mlp.down_proj.weight", 10, "mlp"),
    ("model.layers.7.self_attn.o_proj.weight", 7, "attn"),
    ("model.layers.0.post_attention_layernorm.weight", 0, "norm"),   # 'attention' inside a norm's name
    ("model.layers.1.self_attn.q_proj.bias", 1, "attn"),
    ("model.embed_tokens.weight", None, "embed"),
    ("model.norm.weight", None, "norm"),
    ("lm_head.weight", None, "head"),
    ("encoder.layer.2.attention.output.LayerNorm.weight", 2, "norm"),
    ("encoder.layer.2.attention.self.query.weight", 2, "attn"),
    ("encoder.layer.2.intermediate.dense.weight", 2, "mlp"),
    ("gpt_neox.layers.5.attention.query_key_value.weight", 5, "attn"),
    ("gpt_neox.embed_out.weight", None, "head"),
    ("blocks.4.ffn.w1.weight", 4, "mlp"),
    ("h.2.attn.qkv.weight", 2, "attn"),
    ("model.layers.12.block_sparse_moe.experts.3.w2.weight", 12, "mlp"),
    ("model.layers.12.block_sparse_moe.gate.weight", 12, "mlp"),            # Mixtral's router
    ("model.layers.3.mlp.gate.weight", 3, "mlp"),
    ("model.layer_norm.weight", None, "norm"),                    # 'layer_' is not a numbered block
    ("output.weight", None, "head"),
    ("tok_embeddings.weight", None, "embed"),
])
def test_classify_literal_names(name, layer, kind):
    assert classify(name) == (layer, kind)


EXPECTED_KINDS = {   # independent of the implementation: suffix pattern -> kind, per naming family
    "llama": [(r"^model\.layers\.(\d+)\.self_attn\.[qkvo]_proj\.weight$", "attn"),
              (r"^model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight$", "mlp"),
              (r"^model\.layers\.(\d+)\.(input|post_attention)_layernorm\.weight$", "norm"),
              (r"^model\.embed_tokens\.weight$", "embed"), (r"^model\.norm\.weight$", "norm"),
              (r"^lm_head\.weight$", "head")],
    "qwen2": [(r"^model\.layers\.(\d+)\.self_attn\.[qkvo]_proj\.(weight|bias)$", "attn"),
              (r"^model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight$", "mlp"),
              (r"^model\.layers\.(\d+)\.(input|post_attention)_layernorm\.weight$", "norm"),
              (r"^model\.embed_tokens\.weight$", "embed"), (r"^model\.norm\.weight$", "norm"),
              (r"^lm_head\.weight$", "head")],
    "gpt2": [(r"^transformer\.h\.(\d+)\.attn\.c_(attn|proj)\.(weight|bias)$", "attn"),
             (r"^transformer\.h\.(\d+)\.mlp\.c_(fc|proj)\.(weight|bias)$", "mlp"),
             (r"^transformer\.h\.(\d+)\.ln_[12]\.(weight|bias)$", "norm"),
             (r"^transformer\.w[tp]e\.weight$", "embed"), (r"^transformer\.ln_f\.(weight|bias)$", "norm")],
}


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {arch: make_family(root / arch, arch=arch, k=2, layers=4) for arch in ("llama", "qwen2", "gpt2")}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_layout_of_saved_models(families, arch):
    base, sources = families[arch]
    layout = open_sources(str(base), [str(s) for s in sources]).layout
    assert layout.num_layers == 4
    kinds = set()
    for name, info in layout.tensors.items():
        matches = [(re.match(pattern, name), kind) for pattern, kind in EXPECTED_KINDS[arch]]
        matches = [(m, kind) for m, kind in matches if m]
        assert len(matches) == 1, f"unexpected tensor {name}"
        match, kind = matches[0]
        expected_layer = int(match.group(1)) if match.re.groups and match.group(1).isdigit() else None
        assert (info.layer, info.kind) == (expected_layer, kind), name
        kinds.add(kind)
        # two contiguous groups over four layers: 0, 1 -> 0; 2, 3 -> 1; outside the blocks -> io
        expected_group = IO_GROUP if expected_layer is None else expected_layer // 2
        assert layout.group(name, 2) == expected_group
        assert layout.group(name, 4) == (IO_GROUP if expected_layer is None else expected_layer)
    assert kinds >= {"attn", "mlp", "norm", "embed"}


def test_more_layer_groups_than_layers_is_refused(families):
    base, sources = families["llama"]
    layout = open_sources(str(base), [str(s) for s in sources]).layout
    layout.check_groups(4)
    with pytest.raises(InputError, match="5 groups but the model has 4 layers"):
        layout.check_groups(5)


# ------------------------------------------------------------------------------------------------
# Reading safetensors


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_sharded_folder_reads_like_the_single_file(families, tmp_path):
    from transformers import AutoModelForCausalLM

    base, sources = families["llama"]
    model = AutoModelForCausalLM.from_pretrained(str(sources[0]))
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="20KB")
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(shards) > 2 and (sharded / "model.safetensors.index.json").is_file()
    folder = open_folder(str(sharded))
    single = load_file(str(sources[0] / "model.safetensors"))
    assert set(folder.files) == set(single)
    assert len(set(folder.files.values())) == len(shards)
    for name, tensor in single.items():
        assert torch.equal(folder.read(name), tensor), name
    # a sharded source sits beside single-file ones
    opened = open_sources(str(base), [str(sharded), str(sources[1])])
    assert set(opened.layout.tensors) == set(single)


def test_missing_shard_is_named(families, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(families["llama"][1][0]))
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="20KB")
    victim = sorted(sharded.glob("*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(InputError, match=re.escape(victim.name) + ".*missing"):
        open_folder(str(sharded))


def test_pickle_only_checkpoint_is_refused(families, tmp_path):
    base, _ = families["llama"]
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(base / "config.json", folder / "config.json")
    torch.save(load_file(str(base / "model.safetensors")), folder / "pytorch_model.bin")
    with pytest.raises(InputError) as err:
        open_folder(str(folder))
    line = err.value.line()
    assert "pickle-only" in line and "pytorch_model.bin" in line and "safetensors" in line
    assert "\n" not in line


def test_truncated_safetensors_is_an_input_error(families, tmp_path):
    folder = _copy(families["llama"][1][0], tmp_path / "truncated")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(InputError, match="truncated"):
        open_folder(str(folder))


def test_missing_source_folder_is_named(families, tmp_path):
    base, sources = families["llama"]
    with pytest.raises(InputError) as err:
        open_sources(str(base), [str(sources[0]), str(tmp_path / "nowhere")])
    assert "nowhere" in err.value.line() and "sources[1]" in err.value.line()


# ------------------------------------------------------------------------------------------------
# Mismatches between the models


def _edit(folder: Path, edit) -> None:
    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def test_shape_mismatch_names_tensor_model_and_shapes(families, tmp_path):
    base, sources = families["llama"]
    odd = _copy(sources[1], tmp_path / "odd")
    name = "model.layers.2.mlp.down_proj.weight"
    _edit(odd, lambda t: t.__setitem__(name, torch.zeros(32, 60)))
    with pytest.raises(InputError) as err:
        open_sources(str(base), [str(sources[0]), str(odd)])
    line = err.value.line()
    assert name in line and str(odd) in line and "[32, 60]" in line and "[32, 64]" in line
    assert "shape mismatch" in line


def test_missing_tensor_is_named(families, tmp_path):
    base, sources = families["llama"]
    odd = _copy(sources[1], tmp_path / "odd")
    name = "model.layers.3.self_attn.v_proj.weight"
    _edit(odd, lambda t: t.pop(name))
    with pytest.raises(InputError, match=re.escape(name) + ".*missing"):
        open_sources(str(base), [str(sources[0]), str(odd)])


@pytest.fixture()
def bigger_vocab(families, tmp_path):
    """Source 1 with 4 extra vocabulary rows in embed_tokens and lm_head."""
    _, sources = families["llama"]
    folder = _copy(sources[1], tmp_path / "bigger")

    def grow(tensors):
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            tensors[name] = torch.cat([tensors[name], torch.full((4, 32), 7.0)])

    _edit(folder, grow)
    return folder


def test_vocabulary_mismatch_is_an_error(families, bigger_vocab):
    base, sources = families["llama"]
    with pytest.raises(InputError) as err:
        open_sources(str(base), [str(sources[0]), str(bigger_vocab)])
    line = err.value.line()
    assert "vocabulary" in line and "[52, 32]" in line and "[48, 32]" in line and "vocab: base" in line
    assert "vocab: union" in line


@pytest.mark.parametrize("rows", [52, 40])
def test_vocab_base_keeps_the_base_vocabulary(families, tmp_path, rows):
    base, sources = families["llama"]
    folder = _copy(sources[1], tmp_path / f"vocab{rows}")
    original = load_file(str(sources[1] / "model.safetensors"))

    def resize(tensors):
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            t = tensors[name]
            tensors[name] = torch.cat([t, torch.full((rows - 48, 32), 7.0)]) if rows > 48 else t[:rows].clone()

    _edit(folder, resize)
    opened = open_sources(str(base), [str(sources[0]), str(folder)], vocab="base")
    assert opened.layout.tensors["model.embed_tokens.weight"].shape == (48, 32)
    base_tensors = load_file(str(base / "model.safetensors"))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        got = opened.read(opened.sources[1], name)
        assert got.shape == (48, 32)
        shared = min(rows, 48)
        assert torch.equal(got[:shared], original[name][:shared])    # the source's rows for shared ids
        assert torch.equal(got[shared:], base_tensors[name][shared:])  # the base's rows beyond them
    # mergekit refuses sources of different vocabularies: no mergekit.yaml then, one where they agree
    from evomerge.export import mergekit_yaml
    from evomerge.recipe import Recipe

    same = open_sources(str(base), [str(sources[0]), str(sources[1])], vocab="base")
    recipe = Recipe.from_dict({"method": "task_arithmetic", "base": str(base), "vocab": "base",
                               "sources": [str(sources[0]), str(folder)]})
    assert opened.resized and mergekit_yaml(recipe, opened) is None
    assert not same.resized and "task_arithmetic" in mergekit_yaml(recipe, same)
    # a non-vocabulary shape mismatch stays an error under vocab: base
    odd = _copy(sources[0], tmp_path / "odd")
    _edit(odd, lambda t: t.__setitem__("model.norm.weight", torch.ones(31)))
    with pytest.raises(InputError, match="shape mismatch"):
        open_sources(str(base), [str(odd), str(folder)], vocab="base")


def test_vocab_union_needs_a_row_per_token_and_every_tokenizer(families, bigger_vocab, tmp_path):
    """Under vocab: union the embedding and head may differ in rows; each model needs a row for every token of
    its vocab_size (config.json), and a tokenizer: the union is built from them (tests/test_vocab_union.py)."""
    base, sources = families["llama"]
    with pytest.raises(InputError) as err:      # 52 rows for a vocab_size of 48: fine, but no tokenizers
        open_sources(str(base), [str(sources[0]), str(bigger_vocab)], vocab="union")
    assert err.value.field == "base" and "no tokenizer files" in err.value.problem
    short = _copy(sources[1], tmp_path / "short")
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**config, "vocab_size": 60}))
    with pytest.raises(InputError) as err:
        open_sources(str(base), [str(sources[0]), str(short)], vocab="union")
    assert err.value.field == "sources[1]" and "tensor 'lm_head.weight' is [48, 32]" in err.value.problem
    assert "needs 60 rows" in err.value.problem
    gpt2_base, gpt2_sources = families["gpt2"]     # wte is per token; wpe (per position) is no vocabulary
    from modelfactory import save_tokenizer

    gpt2 = [_copy(f, tmp_path / "gpt2" / f.name) for f in (gpt2_base, *gpt2_sources)]
    save_tokenizer(gpt2)
    opened = open_sources(str(gpt2[0]), [str(f) for f in gpt2[1:]], vocab="union")
    assert opened.union_tensors == {"transformer.wte.weight"}


def test_opening_reads_headers_only(families, monkeypatch):
    import safetensors
    import safetensors.torch

    def forbidden(*args, **kwargs):
        raise AssertionError("tensor data read while opening sources")

    monkeypatch.setattr(safetensors, "safe_open", forbidden)
    monkeypatch.setattr(safetensors.torch, "load_file", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    base, sources = families["qwen2"]
    opened = open_sources(str(base), [str(s) for s in sources])
    assert opened.layout.numel > 0
    assert json.loads((base / "config.json").read_text())["num_hidden_layers"] == opened.layout.num_layers
