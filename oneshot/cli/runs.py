"""`oneshot prune`, `oneshot eval` and `oneshot recover`: the commands that are one run each. Their flags
come from the settings table (oneshot/spec.py); flags given on the command line override a `--config
RUN.yaml`'s values; `api.run` does the work and the table is printed."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UsageError
from ..settings import Spelling, add_arguments, apply_arguments, flatten, from_mapping
from ..spec import Recovery, RunSpec

SUMMARIES = {
    "prune": "prune a model and measure it",
    "eval": "measure a dense or saved pruned model (perplexity, zero-shot accuracy)",
    "recover": "fine-tune a saved pruned model with its zero pattern locked",
}


def add_run_parsers(commands) -> None:
    for command, handler in (("prune", prune_command), ("eval", eval_command), ("recover", recover_command)):
        p = commands.add_parser(command, help=SUMMARIES[command], description=SUMMARIES[command],
                                argument_default=argparse.SUPPRESS)
        if command == "prune":
            p.add_argument("--config", metavar="RUN.yaml",
                           help="read the run from a YAML file (the YAML keys below); flags override its values")
        if command == "eval":
            p.add_argument("--pruned", metavar="DIR", help="a directory written by `oneshot prune --save-model` "
                                                           "(the same as --model DIR)")
        add_arguments(p, command)
        p.set_defaults(handler=handler, command_name=command)


def _run(args, base: RunSpec, from_config: frozenset = frozenset()) -> int:
    from ..api import run

    command = args.command_name
    given = vars(args)
    spec = apply_arguments(given, base, command)
    flags = {key[len("setting:"):] for key in given if key.startswith("setting:")}
    record = run(spec, spelling=Spelling("flag", command, from_config=frozenset(from_config - flags)))
    print_table(record.to_dict())
    return 0


def prune_command(args) -> int:
    from ..yamlio import read_yaml

    base, from_config = RunSpec(), frozenset()
    if "config" in vars(args):
        path = Path(args.config).expanduser()
        data = read_yaml(path, "run config")
        base = from_mapping(data, f"run config {path}", relative_to=path.parent.resolve())
        from_config = frozenset(flatten(data, f"run config {path}"))  # messages name these by their keys
    return _run(args, base, from_config)


def recover_command(args) -> int:
    return _run(args, RunSpec(kind="recover", method="dense", recover=Recovery()))


def eval_command(args) -> int:
    given = vars(args)
    if "pruned" in given:
        if "setting:model" in given:
            raise UsageError("give --model or --pruned, not both")
        given["setting:model"] = args.pruned  # the model's own checks say what a directory lacks
    return _run(args, RunSpec(kind="eval", method="dense"))


def print_table(result: dict) -> None:
    sources = list(result["ppl"])
    zeroshot = result.get("zeroshot")
    header = ["method", "pattern", "sparsity"]
    row = [result["method"], result["pattern"], f"{result['sparsity_measured']:.4f}"]
    # Honest sparsity: over every block weight and over the whole model, beside the pruned layers'.
    for key, label in (("sparsity_block_weights", "block weights"), ("sparsity_model", "whole model")):
        if result.get(key) is not None:
            header.append(label)
            row.append(f"{result[key]:.4f}")
    header += [f"ppl {s}" for s in sources]
    row += [f"{result['ppl'][s]:.3f}" for s in sources]
    if zeroshot is not None:
        header.append("mean acc")
        row.append("-" if zeroshot["mean_acc"] is None else f"{zeroshot['mean_acc']:.4f}")
    if result.get("quantization"):
        header.append("quantised")
        row.append(f"int{result['quantization']['bits']} {result['quantization']['method']}")
    if result.get("saved_model"):
        header.append(f"{result['saved_model']['format']} MiB")
        row.append(f"{result['saved_model']['weights_bytes'] / 2**20:.1f}")
    if result["timings"].get("prune_s"):
        header.append("prune s")
        row.append(f"{result['timings']['prune_s']:.1f}")
    recovery = result.get("recovery")
    if recovery:  # the perplexity columns above are after recovery; before it, beside
        header += [f"before recovery {s}" for s in recovery["ppl_before"]] + ["recover s/step"]
        row += [f"{v:.3f}" for v in recovery["ppl_before"].values()] + [f"{recovery['seconds_per_step']:.2f}"]
    widths = [max(len(h), len(c)) for h, c in zip(header, row)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    if zeroshot is not None:
        from ..evaluate.zeroshot import format_table

        print()
        print("\n".join(format_table(zeroshot)))
