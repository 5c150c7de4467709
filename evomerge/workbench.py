"""What stays resident across studies: the sources on the device (kernel/), the stacks of blocks, the tasks."""

from __future__ import annotations

import functools
from typing import Any

from .config import SearchConfig, tasks_path
from .errors import InputError


class Workbench:
    """What stays resident across studies: the sources on the device, the tokenized tasks."""

    def __init__(self, config: SearchConfig, *, device: str | None, progress: bool = True) -> None:
        from .propose import SamplerProcess, samples_ahead

        # started first, so that it is ready (its imports done) when the sources have loaded
        self._sampler_process = SamplerProcess() if samples_ahead(config) else None
        try:
            self._load(config, device=device, progress=progress)
        except BaseException:   # bad input, most often: exit at once, the sampler process has no work yet
            if self._sampler_process is not None:
                self._sampler_process.close(wait=False)
            raise

    def _load(self, config: SearchConfig, *, device: str | None, progress: bool) -> None:
        from .evaluate import Evaluator, load_tasks
        from .kernel import ResidentMerger
        from .sources import open_sources

        if config.threads is not None:
            import torch

            torch.set_num_threads(config.threads)
        self.sources = open_sources(config.base, config.sources, relative_to=config.relative_to, vocab=config.vocab,
                                    file=str(config.path) if config.path else None, needs_base=config.needs_base)
        self.suite = load_tasks(tasks_path(config), seed=config.search.seed)
        lm_eval = [t for t in config.objectives[0] if t in self.suite.names and self.suite.spec(t).type == "lm_eval"]
        self.gradient_rows = not lm_eval    # adamerging's loss reads the rows of the tasks the objective weights
        if config.search.sampler == "adamerging":
            if lm_eval:
                raise InputError(f"adamerging learns from the rows of the objective's tasks, and '{lm_eval[0]}' is "
                                 "an lm_eval task", file=config.path, field="search.sampler",
                                 fix="weight choice, generate or perplexity tasks, or use another sampler")
        stacking = config.search.space != "ps"
        merges = config.search.space != "dfs"
        adapter = next((f.spec for f in self.sources.sources if f.is_adapter), None)
        if stacking and adapter is not None:
            raise InputError(f"search.space {config.search.space} stacks models' blocks, and '{adapter}' is a LoRA "
                             "adapter", file=config.path, field="search.space",
                             fix="use space: ps with adapters, or merge the adapter into its base first")
        try:
            self.merger = ResidentMerger(self.sources, device=device, dtype=config.dtype, seed=config.search.seed,
                                         methods=config.search.methods if merges else [], progress=progress,
                                         memory_budget=config.memory_budget, build_model=merges,
                                         trust_remote_code=config.trust_remote_code)
        except InputError as err:   # a config value the kernel refuses (memory_budget, device): name the file
            raise err.at(file=err.file or (str(config.path) if config.path else None)) from None
        self.stack = self._stack(config, merged=self.merger.model if merges else None) if stacking else None
        self.tokenizer = self.sources.tokenizer(trust_remote_code=config.trust_remote_code)   # a union's, if one
        scored = self.stack.model if self.stack is not None else self.merger.model
        self.evaluator = Evaluator(self.suite, scored, self.tokenizer, seed=config.search.seed, limit=config.limit)

    def _stack(self, config: SearchConfig, *, merged: Any):
        """The data-flow space's resident models: the base (whose embeddings, norm and head a stack keeps, and
        whose block list it replaces), every source, and the parameter-space merge's model (`merged`), each
        loaded once; a stack references their blocks (stack.py)."""
        from .recipe import MERGED
        from .stack import ResidentStack

        models = {folder.spec: self.merger.load_model(folder.path) for folder in self.sources.models}
        if merged is not None:
            models[MERGED] = merged
        return ResidentStack(models, base=self.sources.base.spec, layout=self.sources.layout)

    def materialize(self, recipe: Any) -> None:
        """A candidate into the scored model: its parameter-space merge in place, then its stack of blocks."""
        if recipe.merges:
            self.merger.materialize(recipe)
        if self.stack is not None:
            self.stack.apply(recipe.layers)

    @functools.cached_property
    def fingerprints(self) -> dict[str, str]:
        """A content fingerprint of every model (spec -> hash): once, for every study run on this workbench."""
        return {folder.spec: folder.fingerprint() for folder in self.sources.models}

    def sampler_process(self):
        """The process that samples trials ahead (propose.py), started on first use, shared by every study here."""
        from .propose import SamplerProcess

        if self._sampler_process is None:
            self._sampler_process = SamplerProcess()
        return self._sampler_process

    def close(self) -> None:
        if self._sampler_process is not None:
            self._sampler_process.close()
            self._sampler_process = None
        self.merger.close()
