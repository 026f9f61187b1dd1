"""The `moeyard` command: one entry for the operator actions; each subcommand lives in the
package that owns it and is imported only when used."""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, function taking argv, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("trainer.train", "main", "run training in this process (or under torchrun)"),
    "prepare": ("dataloader.prepare", "main", "tokenize text into Parquet shards + manifest"),
    "dashboard": ("ops.dashboard", "main", "provision Grafana, or serve the built-in ops page"),
    "report": ("ops.report", "main", "summarize a finished run: energy, MFU, plots as PNG"),
    "export": ("trainer.export", "main", "write a checkpoint as safetensors, or --format hf"),
    "submit": ("cluster.jobs", "submit", "submit a training job to a Ray cluster (ray job submit)"),
    "status": ("cluster.jobs", "status", "a Ray job's state, last step, loss and tokens/s"),
    "stop": ("cluster.jobs", "stop", "stop a Ray job"),
}

# Commands whose first argument is a preset (name in infra/runs/ or YAML path), and those
# whose first argument is a run directory: checked here (cluster/presets.py) so that a typo
# gets the list of presets or of runs, whichever command it was given to.
PRESET_ARG: set[str] = {"train", "submit"}
RUN_DIR_ARG: set[str] = {"report", "export"}


def check_first_arg(name: str, rest: list[str]) -> list[str]:
    """`rest` with a preset name resolved to its file; raises PresetError or RunDirError."""
    if not rest or rest[0].startswith("-"):
        return rest
    from cluster import presets

    if name in PRESET_ARG:
        return [str(presets.resolve_preset(rest[0])), *rest[1:]]
    if name in RUN_DIR_ARG:
        presets.check_run_dir(rest[0])
    return rest


def usage() -> str:
    lines = ["usage: moeyard COMMAND [args ...]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"moeyard: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    from cluster.presets import PresetError, RunDirError

    try:
        rest = check_first_arg(name, rest)
    except (PresetError, RunDirError) as e:
        print(f"moeyard {name}: {e}", file=sys.stderr)
        return 2
    return int(getattr(importlib.import_module(module), func)(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
