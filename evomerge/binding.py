"""Where each checkpoint tensor lives in the loaded model, so that a merge writes straight into it.

Most checkpoint tensors are model parameters of the same name. transformers 5 converts some
checkpoints as it loads them, though: a mixture of experts stored one tensor per expert
(`experts.3.w1.weight`) becomes one stacked parameter (`experts.gate_up_proj`), and names
change. Such a checkpoint tensor is a slice of a parameter, not a parameter of its own; a
merge written to a tensor of its own would leave the model scoring the base's experts.

The slices are found once, by running transformers' own reverse conversion (the one
`save_pretrained` uses) on index tensors: each checkpoint tensor comes back as the positions
of its entries in the model's parameters. Where those positions are a contiguous block, the
merge writes into that block; otherwise it writes a tensor of its own that is copied into
the parameter after each candidate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import InputError


@dataclass
class Copy:
    """A merged tensor of its own and where the model keeps its entries: a strided view, or positions."""

    merged: torch.Tensor
    target: torch.Tensor
    positions: torch.Tensor | None = None     # flat positions in `target` (a parameter's flat data)

    def apply(self) -> None:
        """Copy the merged entries into the model (converted to its dtype where it scores in another)."""
        if self.positions is None:
            self.target.copy_(self.merged)
        else:
            self.target[self.positions] = self.merged.reshape(-1).to(self.target.dtype)


def direct_parameters(model, names: list[str]) -> dict[str, torch.Tensor]:
    """The model's parameter (or buffer) data of each checkpoint name that is one, under that name or with
    the model's base prefix added or removed."""
    targets = dict(model.state_dict(keep_vars=True))
    prefix = getattr(model, "base_model_prefix", "")
    found = {}
    for name in names:
        for alias in (name, f"{prefix}.{name}", name.removeprefix(f"{prefix}.")):
            if alias in targets:
                found[name] = targets[alias].data
                break
    return found


def converted_slices(model, shapes: dict[str, torch.Size], taken: list[torch.Tensor]) -> dict[str, Copy | torch.Tensor]:
    """For checkpoint tensors that are no parameter of the model: where transformers put their entries.

    A contiguous block of one parameter comes back as a view to write into; anything else as a
    `Copy`. Parameters already written whole (`taken`) are not probed. A checkpoint tensor that
    lands nowhere is one the model does not load (a tied head, old GPT-2 attention masks, old
    rotary frequencies), as long as every parameter is written whole; where one is not, the
    model would score part of the base, so that is refused (InputError).
    """
    if not shapes:
        return {}
    taken_ptrs = {t.data_ptr() for t in taken}
    free = {n: p.data for n, p in model.state_dict(keep_vars=True).items()
            if p.dtype.is_floating_point and p.data.data_ptr() not in taken_ptrs}
    placed: dict[str, Copy | torch.Tensor] = {}
    written: dict[str, int] = {}
    for name, param in free.items():      # one parameter at a time: a probe the size of one parameter
        index_dtype = torch.int32 if param.numel() < 2**31 else torch.int64
        probe = torch.arange(param.numel(), dtype=index_dtype).reshape(param.shape)
        for key, index in _revert(model, {name: probe}).items():
            if key in shapes and key not in placed and tuple(index.shape) == tuple(shapes[key]) \
                    and index.dtype == index_dtype:
                placed[key] = _slice(param, index.to(torch.int64))
                written[name] = written.get(name, 0) + index.numel()
    partial = [n for n, p in free.items() if 0 < written.get(n, 0) < p.numel()]
    unplaced = [n for n in shapes if n not in placed]
    if partial or (unplaced and len(written) < len(free)):
        missing = (partial or [n for n in free if n not in written])[0]
        raise InputError(f"the model's parameter '{missing}' is not made whole of checkpoint tensors that "
                         f"evomerge can place (transformers converts this checkpoint as it loads it; unplaced: "
                         f"'{unplaced[0] if unplaced else '-'}')",
                         fix="please report the architecture: merged in place, this model would ignore "
                             "part of the merge")
    return placed


def _slice(target: torch.Tensor, local: torch.Tensor) -> Copy | torch.Tensor:
    """The entries of `target` at flat positions `local`: a view where they are a strided block of it
    (contiguous: written into directly), else positions to copy to."""
    if not target.is_contiguous():
        raise InputError("a parameter that transformers converted is not contiguous in the model",
                         fix="please report the architecture")
    flat = target.view(-1)
    offset = int(local.reshape(-1)[0])
    strides = []
    for dim in range(local.dim()):
        step = [0] * local.dim()
        step[dim] = 1 if local.shape[dim] > 1 else 0
        strides.append(int(local[tuple(step)]) - offset if local.shape[dim] > 1 else 1)
    expected = torch.full((), offset, dtype=torch.int64)
    for dim, (size, stride) in enumerate(zip(local.shape, strides)):
        shape = [1] * local.dim()
        shape[dim] = size
        expected = expected + torch.arange(size, dtype=torch.int64).reshape(shape) * stride
    if min(strides, default=1) >= 0 and torch.equal(expected.expand(local.shape), local):
        view = flat.as_strided(tuple(local.shape), tuple(strides), flat.storage_offset() + offset)
        return view if view.is_contiguous() else Copy(torch.empty_like(view, memory_format=torch.contiguous_format),
                                                      view)
    merged = torch.empty(tuple(local.shape), dtype=target.dtype, device=target.device)
    return Copy(merged, flat, local.reshape(-1).to(target.device))


def _revert(model, probe: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' reverse conversion (model names -> checkpoint names) of `probe`; names kept where
    this transformers has none."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return dict(probe)
    try:
        return revert_weight_conversion(model, probe)
    except Exception:   # a conversion that cannot run on this probe: nothing placed, said by the caller
        return {}
