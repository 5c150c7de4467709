"""LoRA adapters over the zoo's base, one per skill, in PEFT's on-disk format (a LoraHub-style library).

Each adapter is plain LoRA: the base frozen, and on the attention (q, k, v, o) and MLP (gate, up, down)
projections of every block a trainable pair ``A`` (r x in, seeded like PEFT's default: uniform in
``+-1/sqrt(in)``) and ``B`` (out x r, zero), so a projection computes ``W x + (alpha / r) B A x``. A
compatible skill's adapter learns the instruction format and its skill together from the base (FormatBatches:
its own symbols rewritten, every other alphabet echoed, on inputs that mix them), so no adapter alone does the
composed task ``inc_rot``, while a weighted sum of the inc and rot adapters can: what a LoraHub search looks
for. The conflicting pair's adapters learn their skill in the named format, part of each batch replaying the
other skills (as their experts do).

``write_adapters`` writes ``OUT/<skill>/adapter_config.json`` and ``adapter_model.safetensors``, loadable with
``peft.PeftModel.from_pretrained(base, OUT/<skill>)`` (peft is not imported here). Same seed, same bytes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from .sizes import ZooSize
from .skills import COMPATIBLE, SKILLS, Skill
from .train import Batches, Encoder, FormatBatches, schedule, with_replay
from .version import derive_seed

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM

LORA_FOLDER = "lora"   # inside the zoo
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
BASE_NAME = "zoo/base"   # the base as a config names it (evomerge resolves zoo/NAME inside the zoo)
PEFT_PREFIX = "base_model.model."   # PeftModel(LoraModel(LlamaForCausalLM)): the key of a base module's name


class Lora:
    """LoRA factors on every target projection of a model, applied through forward hooks (weights untouched)."""

    def __init__(self, model: LlamaForCausalLM, *, rank: int, alpha: int, gen: torch.Generator) -> None:
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.modules = {name: module for name, module in model.named_modules()
                        if name.split(".")[-1] in TARGET_MODULES and isinstance(module, torch.nn.Linear)}
        self.factors: dict[str, tuple[torch.nn.Parameter, torch.nn.Parameter]] = {}
        for name, module in sorted(self.modules.items()):
            bound = 1.0 / math.sqrt(module.in_features)
            a = (torch.rand(rank, module.in_features, generator=gen) * 2 - 1) * bound
            self.factors[name] = (torch.nn.Parameter(a), torch.nn.Parameter(torch.zeros(module.out_features, rank)))

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for name in sorted(self.factors) for p in self.factors[name]]

    def attach(self) -> list:
        """Hook every target module; returns the handles (``handle.remove()`` detaches)."""
        handles = []
        for name, module in self.modules.items():
            a, b = self.factors[name]
            handles.append(module.register_forward_hook(
                lambda _mod, args, out, a=a, b=b: out + self.scale * torch.nn.functional.linear(
                    torch.nn.functional.linear(args[0], a), b)))
        return handles

    def tensors(self) -> dict[str, torch.Tensor]:
        """PEFT's keys: ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight``, float32."""
        out = {}
        for name in sorted(self.factors):
            a, b = self.factors[name]
            out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.detach().to(torch.float32).contiguous().clone()
            out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.detach().to(torch.float32).contiguous().clone()
        return out


def train_adapter(base: LlamaForCausalLM, draw: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]],
                  *, rank: int, alpha: int, steps: int, lr: float, gen: torch.Generator) -> tuple[Lora, float]:
    """AdamW on the factors only, the base frozen (and left as it was); returns the adapter and the final loss."""
    lora = Lora(base, rank=rank, alpha=alpha, gen=gen)
    params = lora.parameters()
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    frozen = [p for p in base.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    handles = lora.attach()
    loss = float("nan")
    try:
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = lr * schedule(step, steps, warmup=10)
            ids, labels = draw(gen)
            out = base(input_ids=ids, labels=labels).loss
            out.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss = float(out.detach())
    finally:
        for handle in handles:
            handle.remove()
        for p in frozen:
            p.requires_grad_(True)
    return lora, loss


def adapter_config(lora: Lora) -> dict:
    """adapter_config.json: what ``peft.LoraConfig`` reads (plain LoRA, no dropout, no bias, no DoRA)."""
    return {
        "alpha_pattern": {},
        "base_model_name_or_path": BASE_NAME,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": lora.alpha,
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": lora.rank,
        "rank_pattern": {},
        "revision": None,
        "target_modules": sorted(TARGET_MODULES),
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": False,
    }


def save_adapter(lora: Lora, folder: Path) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps(adapter_config(lora), indent=2, sort_keys=True) + "\n",
                                      encoding="utf-8")
    save_file(lora.tensors(), str(folder / WEIGHTS_FILE), metadata={"format": "pt"})


def skill_draw(skill: Skill, encoder: Encoder, batches: dict[str, Batches], size: ZooSize, *,
               held: torch.Tensor, alphabets: int) -> Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]:
    """A skill's training batches: the instruction format for a compatible skill (its symbols rewritten, the
    others echoed); for a conflicting one the named format, `size.replay` of each batch replaying another skill."""
    if skill.group == COMPATIBLE:
        own = FormatBatches(encoder, skill, length=size.length, alphabets=alphabets, held_out=held)
        return lambda gen: own.draw(size.batch, gen=gen)
    return with_replay(batches[skill.name], [batches[s.name] for s in SKILLS if s is not skill], size)


def write_adapters(out: Path, base: LlamaForCausalLM, encoder: Encoder, batches: dict[str, Batches],
                   size: ZooSize, *, held: torch.Tensor, alphabets: int, seed: int,
                   log: Callable[[str], None]) -> None:
    """One adapter per skill under ``out/<skill>/``."""
    for skill in SKILLS:
        gen = torch.Generator().manual_seed(derive_seed(seed, "lora", skill.name))
        compatible = skill.group == COMPATIBLE
        steps = size.lora_steps if compatible else size.lora_conflicting_steps
        draw = skill_draw(skill, encoder, batches, size, held=held, alphabets=alphabets)
        lora, loss = train_adapter(base, draw, rank=size.lora_rank, alpha=size.lora_alpha, steps=steps,
                                   lr=size.lora_lr, gen=gen)
        save_adapter(lora, out / skill.name)
        log(f"lora/{skill.name}: rank {size.lora_rank}, {steps} steps, final loss {loss:.3f}")


def manifest_entry(size: ZooSize) -> dict:
    """zoo.json's ``lora``: where the adapters are and how they were made."""
    return {
        "folder": LORA_FOLDER,
        "format": "peft",
        "base": "base",
        "rank": size.lora_rank,
        "alpha": size.lora_alpha,
        "target_modules": sorted(TARGET_MODULES),
        "adapters": {skill.name: {"folder": f"{LORA_FOLDER}/{skill.name}", "task": skill.name, "group": skill.group}
                     for skill in SKILLS},
    }
