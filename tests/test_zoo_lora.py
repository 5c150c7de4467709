"""The zoo's LoRA adapters: PEFT's own format, loaded by peft, merging to base + (alpha / r) B A."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

PREFIX = "base_model.model."
pytestmark = pytest.mark.usefixtures("one_thread")


def _adapters(zoo: Path) -> dict[str, Path]:
    lora = json.loads((zoo / "zoo.json").read_text())["lora"]
    return {name: zoo / info["folder"] for name, info in lora["adapters"].items()}


def _base(zoo: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(zoo / "base").eval()


def test_one_adapter_per_skill_in_the_manifest(zoo: Path) -> None:
    manifest = json.loads((zoo / "zoo.json").read_text())
    assert set(_adapters(zoo)) == set(manifest["skills"])
    for folder in _adapters(zoo).values():
        assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_config_matches_the_tensors(zoo: Path) -> None:
    base = _base(zoo)
    linears = {name: m for name, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    for skill, folder in _adapters(zoo).items():
        config = json.loads((folder / "adapter_config.json").read_text())
        assert (config["peft_type"], config["task_type"], config["base_model_name_or_path"]) == \
            ("LORA", "CAUSAL_LM", "zoo/base")
        assert not config["use_rslora"] and not config["use_dora"] and config["bias"] == "none"
        tensors = load_file(folder / "adapter_model.safetensors")
        modules = {key[len(PREFIX):].rsplit(".lora_", 1)[0] for key in tensors}
        assert all(key.startswith(PREFIX) for key in tensors)
        # every target projection of every block, and nothing else
        want = {name for name in linears if name.split(".")[-1] in config["target_modules"]}
        assert modules == want and len(want) == 7 * base.config.num_hidden_layers, skill
        assert {name.split(".")[-1] for name in modules} == set(config["target_modules"])
        for name in modules:
            a, b = tensors[f"{PREFIX}{name}.lora_A.weight"], tensors[f"{PREFIX}{name}.lora_B.weight"]
            layer = linears[name]
            assert a.dtype == b.dtype == torch.float32
            assert a.shape == (config["r"], layer.in_features) and b.shape == (layer.out_features, config["r"])
        assert len(tensors) == 2 * len(modules)
        assert any(t.abs().max() > 0 for k, t in tensors.items() if "lora_B" in k), f"{skill}: B never trained"


def test_peft_loads_each_adapter_and_merges_to_base_plus_scaled_BA(zoo: Path) -> None:
    from peft import PeftModel

    reference = _base(zoo).state_dict()
    for skill, folder in _adapters(zoo).items():
        config = json.loads((folder / "adapter_config.json").read_text())
        tensors = load_file(folder / "adapter_model.safetensors")
        scale = config["lora_alpha"] / config["r"]
        model = PeftModel.from_pretrained(_base(zoo), folder)
        assert model.peft_config["default"].r == config["r"]
        merged = model.merge_and_unload().state_dict()
        assert set(merged) == set(reference)
        changed = 0
        for key, weight in merged.items():
            module = key.removesuffix(".weight")
            a = tensors.get(f"{PREFIX}{module}.lora_A.weight")
            if a is None:
                torch.testing.assert_close(weight, reference[key], rtol=0, atol=0)
                continue
            b = tensors[f"{PREFIX}{module}.lora_B.weight"]
            torch.testing.assert_close(weight, reference[key] + scale * (b @ a), msg=f"{skill}: {key}")
            changed += 1
        assert changed == len(tensors) // 2, skill
