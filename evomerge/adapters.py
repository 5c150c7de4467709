"""PEFT LoRA adapters as sources: their task vectors are scaling · B · A, zero where they do not reach.

An adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) is opened
like a model folder, through its JSON and its safetensors header only, and checked
against the base before a weight loads: a plain low-rank LoRA (no DoRA, no other
PEFT kind, no trained biases or saved modules), trained on this base, whose
factors fit the base's tensors. Its factors then give, per target tensor,

    δ = s · B · A            s = lora_alpha / r   (lora_alpha / √r with use_rslora)

transposed where the adapter says ``fan_in_fan_out`` (GPT-2's Conv1D) and for an
embedding (PEFT's ``lora_embedding_A/B``), as peft's ``merge_and_unload`` adds it
(METHODS.md, "Task vectors from LoRA adapters").
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from .errors import InputError
from .checkpoint import ModelFolder, header_of

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."               # PEFT's wrapper around the model's own module names
_FACTOR = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
                     r"(?:\.(?P<adapter>[\w-]+))?(?:\.weight)?$")
_DORA = ("lora_magnitude_vector",)
_OTHER_KINDS = ("use_dora", "DoRA"), ("lora_bias", "a trained bias on the LoRA B factor")


def is_adapter(path: Path) -> bool:
    return (path / CONFIG).is_file()


@dataclass(frozen=True)
class Factor:
    """One target tensor's low-rank task vector: δ = scaling · B · A, or its transpose."""

    a: str              # the A factor's name in the adapter file (r × in; r × num_embeddings for an embedding)
    b: str              # the B factor's (out × r; dim × r)
    rank: int
    scaling: float
    transpose: bool     # δ = (s · B · A)ᵀ: fan_in_fan_out, or an embedding


@dataclass
class AdapterFolder(ModelFolder):
    """A PEFT LoRA adapter folder; `factors` maps the base's tensor names to their factors (set by `bind`)."""

    factors: dict[str, Factor] = field(default_factory=dict)
    saved_base: dict[str, str] = field(default_factory=dict)   # base tensor -> its copy in the adapter file (PEFT
                                                               # saves a targeted embedding's base layer)

    @cached_property
    def config(self) -> dict:
        file = self.path / CONFIG
        try:
            config = json.loads(file.read_text())
        except json.JSONDecodeError as err:
            raise InputError(f"adapter_config.json is not valid JSON ({err.msg})", file=file) from None
        if not isinstance(config, dict):
            raise InputError("adapter_config.json is not a JSON object", file=file)
        return config

    @property
    def is_adapter(self) -> bool:
        return True

    @property
    def base_name(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    def has_tokenizer(self) -> bool:   # an adapter's tokenizer is its base's
        return False

    def low_rank(self, name: str, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(left, right) with δ = left @ right for tensor `name` (left scaled by s), or None where the adapter
        does not reach it."""
        factor = self.factors.get(name)
        if factor is None:
            return None
        a = self.read(factor.a, device=device).to(dtype)
        b = self.read(factor.b, device=device).to(dtype)
        if factor.transpose:      # (s B A)ᵀ = Aᵀ (s Bᵀ)
            return a.T.contiguous(), b.T.mul(factor.scaling).contiguous()
        return b.mul(factor.scaling), a

    def check_saved_base(self, name: str, base: torch.Tensor) -> None:
        """A base layer the adapter saved (a targeted embedding) must be the base's own: PEFT loads it over the
        base's, and a resized or retrained one is no low-rank task vector."""
        key = self.saved_base.get(name)
        if key is not None and base.dtype != torch.float32 and base.dtype != torch.float64:
            base = base.to(torch.float32)
        if key is not None and not torch.equal(self.read(key, device=base.device).to(base.dtype), base):
            raise InputError(f"adapter '{self.spec}' saves its own '{name}' ({key}), which differs from the base's "
                             "(a resized vocabulary or a trained embedding)", file=self.path / WEIGHTS,
                             fix="merge it into its base with peft (merge_and_unload) and list that model")

    def factor_bytes(self, dtype: torch.dtype = torch.float32) -> int:
        item = torch.empty((), dtype=dtype).element_size()
        total = 0
        for factor in self.factors.values():
            for key in (factor.a, factor.b):
                total += math.prod(self.header[key][0]) * item
        return total

    # -- checks, headers only --------------------------------------------------------
    def bind(self, base: ModelFolder, shapes: dict[str, tuple[int, ...]], *, file: str | None, field: str) -> None:
        """Check the adapter against the base (`shapes`: the base's tensor shapes) and map its factors onto the
        base's tensors; every refusal names the adapter, the entry and the fix."""
        where = self.path / CONFIG
        config = self.config
        kind = str(config.get("peft_type", "LORA")).upper()
        if kind != "LORA":
            raise InputError(f"adapter '{self.spec}' is a {kind} adapter; only plain LoRA (a low-rank B·A) can be "
                             "a source", file=where, field="peft_type",
                             fix="merge it into its base with peft (merge_and_unload) and list that model")
        for key, what in _OTHER_KINDS:
            if config.get(key):
                raise InputError(f"adapter '{self.spec}' uses {what}, whose task vector is not a plain low-rank "
                                 "product", file=where, field=key,
                                 fix="merge it into its base with peft (merge_and_unload) and list that model")
        if str(config.get("bias", "none")) != "none":
            raise InputError(f"adapter '{self.spec}' trains biases (bias: {config['bias']}), which are no low-rank "
                             "task vector", file=where, field="bias",
                             fix="merge it into its base with peft (merge_and_unload) and list that model")
        if config.get("layer_replication"):
            raise InputError(f"adapter '{self.spec}' replicates layers, so its model is not the base's",
                             file=where, field="layer_replication", fix="merge it with peft first")
        self._check_base(base, file=file, field=field)
        pairs: dict[str, dict[str, str]] = {}
        for key in self.header:
            module, _, rest = key.removeprefix(PREFIX).rpartition(".base_layer.")
            if module and rest == "weight" and f"{module}.weight" in shapes \
                    and tuple(self.header[key][0]) == tuple(shapes[f"{module}.weight"]):
                self.saved_base[f"{module}.weight"] = key      # must equal the base's: checked when read
                continue
            match = _FACTOR.match(key.removeprefix(PREFIX))
            if match is None:
                what = "DoRA's magnitude vector" if any(d in key for d in _DORA) else "not a LoRA factor"
                raise InputError(f"adapter '{self.spec}' holds tensor '{key}' ({what}: modules_to_save, a bias or "
                                 "another kind of adapter)", file=self.path / WEIGHTS, field=field,
                                 fix="only plain LoRA adapters can be sources: merge this one with peft first")
            pairs.setdefault(match["module"], {})[match["kind"][-1]] = key
            pairs[match["module"]]["embedding"] = "embedding" if "embedding" in match["kind"] else ""
        if not pairs:
            raise InputError(f"adapter '{self.spec}' holds no LoRA factors", file=self.path / WEIGHTS, field=field)
        factors = {}
        for module, pair in sorted(pairs.items()):
            factors[f"{module}.weight"] = self._factor(module, pair, shapes, field=field)
        self.factors = factors

    def _factor(self, module: str, pair: dict[str, str], shapes: dict[str, tuple[int, ...]], *,
                field: str) -> Factor:
        name = f"{module}.weight"
        where = self.path / WEIGHTS
        if "A" not in pair or "B" not in pair:
            raise InputError(f"adapter '{self.spec}' has lora_{'A' if 'A' not in pair else 'B'} missing for module "
                             f"'{module}'", file=where, field=field, fix="re-save the adapter with peft")
        if name not in shapes:
            raise InputError(f"adapter '{self.spec}' targets '{module}', which the base has no tensor '{name}' for",
                             file=where, field=field, fix="list the adapter with the base it was trained on")
        a_shape, b_shape = self.header[pair["A"]][0], self.header[pair["B"]][0]
        want = shapes[name]

        def fits(transpose: bool) -> bool:   # δ = s B A (out × in), or its transpose, has the base's shape
            if len(a_shape) != 2 or len(b_shape) != 2 or len(want) != 2 or a_shape[0] != b_shape[1]:
                return False
            return (b_shape[0], a_shape[1]) == (tuple(want)[::-1] if transpose else tuple(want))

        # an embedding's factors are stored transposed; so are a Conv1D's (GPT-2), which the config's
        # fan_in_fan_out says. peft ignores the flag on an ordinary Linear: where the shapes tell, they decide.
        transpose = bool(pair["embedding"]) or bool(self.config.get("fan_in_fan_out"))
        if not pair["embedding"] and not fits(transpose) and fits(not transpose):
            transpose = not transpose
        if not fits(transpose):
            raise InputError(f"adapter '{self.spec}': module '{module}' has A {list(a_shape)} and B {list(b_shape)}, "
                             f"which do not make the base's {list(want)}", file=where, field=field,
                             fix="list the adapter with the base it was trained on")
        rank = a_shape[0]
        alpha = float(_pattern(self.config.get("alpha_pattern"), module, self.config.get("lora_alpha", 8)))
        scaling = alpha / math.sqrt(rank) if self.config.get("use_rslora") else alpha / rank
        return Factor(a=pair["A"], b=pair["B"], rank=rank, scaling=scaling, transpose=transpose)

    def _check_base(self, base: ModelFolder, *, file: str | None, field: str) -> None:
        """The adapter's base_model_name_or_path must name the recipe's base: the same spelling, the same folder,
        or the same model name (a hub id's last part, a folder's name)."""
        named = self.base_name
        if not named:
            return      # not recorded: the shapes are all that can be checked
        if _same_model(named, base, relative_to=self.path):
            return
        raise InputError(f"adapter '{self.spec}' was trained on '{named}', not on the base '{base.spec}'",
                         file=self.path / CONFIG, field="base_model_name_or_path",
                         fix=f"list it with base: {named}, or correct base_model_name_or_path if it names the "
                             "same model")


def _pattern(patterns: dict | None, module: str, default):
    """peft's rank_pattern / alpha_pattern lookup: the first key that is the module's name or its tail."""
    for key, value in (patterns or {}).items():
        if module == key or re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


def _same_model(named: str, base: ModelFolder, *, relative_to: Path) -> bool:
    named = named.rstrip("/")
    if named in (base.spec.rstrip("/"), base.hub_id):
        return True
    for candidate in (Path(named), relative_to / named):
        try:
            if candidate.is_dir() and candidate.resolve() == base.path.resolve():
                return True
        except OSError:
            pass
    tail = named.partition("@")[0].rstrip("/").split("/")[-1]
    names = {base.short, base.path.name, (base.hub_id or "").split("/")[-1],
             str(base.config.get("_name_or_path", "")).rstrip("/").split("/")[-1]}
    return tail in names - {""}


def open_adapter(spec: str, path: Path, *, hub_id: str | None, field: str | None) -> AdapterFolder:
    """The adapter folder at `path` (found by `checkpoint.locate`), headers read, not yet bound to a base."""
    weights = path / WEIGHTS
    if not weights.is_file():
        others = [p.name for p in path.glob("adapter_model.*")]
        raise InputError(f"adapter '{spec}' has no {WEIGHTS}" + (f" (found {others[0]}: pickle)" if others else ""),
                         file=path, field=field, fix="save the adapter with safe_serialization=True")
    folder = AdapterFolder(spec=spec, path=path, hub_id=hub_id)
    folder.files = {name: weights for name in header_of(weights)}
    folder.config  # noqa: B018 - validates adapter_config.json
    return folder
