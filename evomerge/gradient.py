"""Merge coefficients learned by gradient descent (AdaMerging, Yang et al. 2024) on the resident sources.

    search:
      sampler: adamerging      # gradient.lr, gradient.steps_per_trial, gradient.loss: see config.GradientOptions

The coefficients are task arithmetic's weights, one per source and layer group (and module kind, where
search.filters splits them): the very dimensions of the search space, so a learned candidate is a recipe
like any other. One step:

  1. the current coefficients are merged into the resident model in place, by the kernel, as any candidate;
  2. a forward and backward pass of that model over a batch of the search split's answers
     (`Evaluator.answers`) gives dL/dW for each merged tensor W = base + lambda * sum_i c_i * delta_i;
  3. dL/dc_i = lambda * sum, over the tensors that c_i scales, of <dL/dW, delta_i>, from the resident task
     vectors: no graph runs through the merge and no weight is copied;
  4. Adam moves the coefficients, kept inside their search ranges.

After every `steps_per_trial` steps the coefficients, on the space's grid, are queued as a trial and scored
on the search split like any candidate (search.py); the study's best trial is the one exported. The first
coefficients are those with the lowest loss among the study's task-arithmetic trials (its baselines) and
every weight 0.3 (the paper's start). The loss is the answers' mean token negative log-likelihood (`tokens`), or, without the
answers, the entropy of the next-token distribution where each answer begins (`entropy`, the paper's).
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import InputError
from .plan import MergePlan
from .space import SearchSpace

METHOD = "task_arithmetic"
START = 0.3                  # every weight, where the study has no task-arithmetic trial to start from
TOKENS_PER_PASS = 8192       # forward and backward passes over at most this many tokens at a time


class GradientMerge:
    """Adam over task arithmetic's per-source (per group, per kind) weights, on the resident model."""

    def __init__(self, space: SearchSpace, merger: Any, evaluator: Any, objective: dict[str, float], *,
                 seed: int, lr: float, batch: int, loss: str, file: str | None = None) -> None:
        if METHOD not in space.methods:
            raise InputError(f"adamerging learns {METHOD} weights, and search.methods has no {METHOD}",
                             file=file, field="search.methods", fix=f"add {METHOD} to search.methods")
        if merger.streaming:
            raise InputError("adamerging needs the sources resident, and they are streamed (memory_budget)",
                             file=file, field="memory_budget", fix="raise memory_budget, or use another sampler")
        self.space, self.merger, self.evaluator = space, merger, evaluator
        self.seed, self.lr, self.batch, self.loss = seed, lr, batch, loss
        self.dims = [d for d in space.dims[METHOD] if d.param.name == "weight"]
        self.fixed = {d.name: d for d in space.dims[METHOD] if d.param.name != "weight"}   # lambda: kept
        self.answers = evaluator.answers("search", objective)
        self.model = merger.model
        self.tensors = self._tensors()
        self.values: torch.Tensor | None = None     # the coefficients, continuous (the trials: on the grid)
        self.shared: dict[str, float] = {}
        self.steps = 0
        self._adam: torch.optim.Adam | None = None
        self._last_loss: float | None = None   # the loss before the last step, on the whole of the answers

    def _tensors(self) -> list[tuple[str, torch.Tensor, list[int]]]:
        """(checkpoint name, the model parameter it is, the index of each source's coefficient): found by
        decoding a recipe whose every weight is its own dimension's number, so the recipe's own rules (filters,
        io, groups) say which coefficient scales which tensor."""
        from .binding import direct_parameters

        layout = self.space.layout
        params = {d.name: float(i) for i, d in enumerate(self.dims)} | {n: float(d.param.default)
                                                                         for n, d in self.fixed.items()}
        if len(self.space.methods) > 1:
            params["method"] = METHOD
        probe = MergePlan.of(self.space.decode(params, method=METHOD), layout)
        names = [n for n in layout.tensors if n not in self.merger.unmerged]
        direct = direct_parameters(self.model, names)
        by_data = {p.data_ptr(): p for p in self.model.parameters()}
        out = []
        for name in names:
            param = by_data.get(direct[name].data_ptr()) if name in direct else None
            if param is None:
                raise InputError(f"tensor '{name}' is not one parameter of the loaded model (a converted "
                                 "checkpoint), which adamerging needs", field="search.sampler",
                                 fix="use another sampler for this architecture")
            index = [round(v) for v in probe.slot(name).values["weight"]]
            out.append((name, param, index))
        return out

    # -- the coefficients ------------------------------------------------------------
    def start(self, trials: list[Any]) -> Any | None:
        """Begin where the loss is lowest, on the first batch: at one of `trials` (task-arithmetic trials; their
        weights, their lambda kept) or at every weight START with lambda 1 (the paper's start). The loss tells
        starts apart where every score ties (all 0 on a hard task), and a start on the wrong side of a ridge
        does not recover (on zoo 3, weights all 1 climbed to 1.5 and stayed at 0). Returns the trial chosen,
        or None for START."""
        starts: list[tuple[Any | None, dict[str, Any]]] = [(t, dict(t.params)) for t in trials] + [(None, {})]
        best: tuple[float, Any | None, torch.Tensor, dict[str, float]] | None = None
        for trial, params in starts:
            values = torch.tensor([float(params.get(d.name, START)) for d in self.dims], dtype=torch.float64)
            shared = {n: float(params.get(n, d.param.default)) for n, d in self.fixed.items()}
            loss = self.loss_at(values, shared)
            if best is None or loss < best[0]:
                best = (loss, trial, values, shared)
        _, trial, self.values, self.shared = best
        self._adam = torch.optim.Adam([torch.nn.Parameter(self.values.clone())], lr=self.lr)
        return trial

    def loss_at(self, values: torch.Tensor, shared: dict[str, float]) -> float:
        """The loss on this step's batch at coefficients `values` (lambda and the like: `shared`), no gradient."""
        self.shared, kept = shared, self.shared
        try:
            self.merger.materialize(self.space.decode(self.params(values), method=METHOD))
        finally:
            self.shared = kept
        with torch.no_grad():
            return sum(self._loss(piece).item() for piece in _passes(self._batch()))

    def params(self, values: torch.Tensor | None = None) -> dict[str, Any]:
        """Coefficients (the current ones by default) as a trial's parameters, on the space's grid."""
        values = self.values if values is None else values
        out: dict[str, Any] = {"method": METHOD} if len(self.space.methods) > 1 else {}
        out |= {n: self.fixed[n].snap(v) for n, v in self.shared.items()}
        out |= {d.name: d.snap(float(v)) for d, v in zip(self.dims, values)}
        return out

    def advance(self, steps: int) -> float:
        """`steps` Adam steps; the mean loss over them."""
        assert self._adam is not None, "start() first"
        weight = self._adam.param_groups[0]["params"][0]
        low = torch.tensor([d.low for d in self.dims], dtype=torch.float64)
        high = torch.tensor([d.high for d in self.dims], dtype=torch.float64)
        total = 0.0
        for _ in range(steps):
            loss, grad = self.gradient(weight.detach())
            self._adapt(loss)
            weight.grad = grad
            self._adam.step()
            with torch.no_grad():
                weight.copy_(torch.minimum(torch.maximum(weight, low), high))
            self.values = weight.detach().clone()
            self.steps += 1
            total += loss
        return total / max(steps, 1)

    def _adapt(self, loss: float) -> None:
        """A step that raised the loss was too long: halve the step size (down to a sixteenth of `lr`). Only where
        every step sees all the answers (a batch as large as the search split): the loss of one batch against
        another's says nothing."""
        if len(self.answers) > self.batch:
            return
        group = self._adam.param_groups[0]
        if self._last_loss is not None and loss > self._last_loss:
            group["lr"] = max(self.lr / 16, group["lr"] / 2)
        self._last_loss = loss

    # -- one gradient ----------------------------------------------------------------
    def gradient(self, values: torch.Tensor) -> tuple[float, torch.Tensor]:
        """(loss, dL/dc) on this step's batch, at the grid point nearest `values`: the model the gradient is
        taken on is a candidate like any other (a recipe rounds its weights to the grid)."""
        self.merger.materialize(self.space.decode(self.params(values), method=METHOD))
        rows = self._batch()
        params = [p for _, p, _ in self.tensors]
        for p in params:
            p.grad = None
        saved = [p.requires_grad for p in params]
        loss = 0.0
        try:
            for p in params:
                p.requires_grad_(True)
            with torch.enable_grad():
                for piece in _passes(rows):
                    value = self._loss(piece)
                    value.backward()
                    loss += value.item()
            grad = torch.zeros(len(self.dims), dtype=torch.float64)
            scale = self.shared.get(f"{METHOD}.lambda", 1.0)
            with torch.no_grad():
                for name, param, index in self.tensors:
                    if param.grad is None:
                        continue
                    ctx = self.merger.contexts[name]
                    for i, dim in enumerate(index):
                        grad[dim] += scale * ctx.inner(i, param.grad)
        finally:
            for p, flag in zip(params, saved):
                p.grad = None
                p.requires_grad_(flag)
        return loss, grad

    def _batch(self) -> list[tuple[str, float, list[int], int]]:
        """This step's answers: all of them, or the next `batch` of a sequence of seeded shuffles of them (one per
        pass over the data), so a run of one seed sees the same batches."""
        n = len(self.answers)
        if n <= self.batch:
            return self.answers
        picked: list[int] = []
        position = self.steps * self.batch
        while len(picked) < self.batch:
            epoch, offset = divmod(position, n)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch)).tolist()
            take = order[offset:offset + self.batch - len(picked)]
            picked += take
            position += len(take)
        return [self.answers[i] for i in picked]

    def _loss(self, rows: list[tuple[str, float, list[int], int]]) -> torch.Tensor:
        """The weighted mean over `rows` of each row's loss (per-row weights: the task's objective weight over
        the task's rows in the whole batch, set by _passes)."""
        device = next(self.model.parameters()).device
        width = max(len(tokens) for _, _, tokens, _ in rows)
        pad = self.evaluator.codec.pad_id
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (_, _, tokens, _) in enumerate(rows):
            ids[r, :len(tokens)] = torch.tensor(tokens)
            mask[r, :len(tokens)] = 1
        ids, mask = ids.to(device), mask.to(device)
        hidden = self.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        head = self.model.get_output_embeddings()
        total = hidden.new_zeros((), dtype=torch.float32)
        for r, (_, weight, tokens, n) in enumerate(rows):
            end = len(tokens) - 1
            if self.loss == "entropy":   # where the answer begins: from the prompt alone, no label read
                logp = torch.log_softmax(head(hidden[r, end - n:end - n + 1]).float(), dim=-1)
                value = -(logp.exp() * logp).sum(-1).mean()
            else:
                logp = torch.log_softmax(head(hidden[r, end - n:end]).float(), dim=-1)
                value = -logp.gather(-1, ids[r, end - n + 1:end + 1, None]).mean()
            total = total + weight * value
        return total


def _passes(rows: list[tuple[str, float, list[int], int]]) -> list[list[tuple[str, float, list[int], int]]]:
    """The batch in pieces of at most TOKENS_PER_PASS tokens, its weights made those of a weighted mean of the
    tasks' mean losses: each row's weight is its task's objective weight over the task's rows in the batch,
    over the sum of the tasks' weights."""
    per_task: dict[str, int] = {}
    for name, _, _, _ in rows:
        per_task[name] = per_task.get(name, 0) + 1
    norm = sum({name: w for name, w, _, _ in rows}.values())
    weighted = sorted(((name, w / per_task[name] / norm, tokens, n) for name, w, tokens, n in rows),
                      key=lambda r: len(r[2]))
    pieces: list[list] = [[]]
    for row in weighted:
        if pieces[-1] and (len(pieces[-1]) + 1) * len(row[2]) > TOKENS_PER_PASS:
            pieces.append([])
        pieces[-1].append(row)
    return pieces
