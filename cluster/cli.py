"""The `moeyard` command: one entry for the operator actions; each subcommand lives in the
package that owns it and is imported only when used."""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, function taking argv, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("trainer.train", "main", "run training in this process (or under torchrun)"),
    "prepare": ("dataloader.prepare", "main", "tokenize text into Parquet shards + manifest"),
}


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
    return int(getattr(importlib.import_module(module), func)(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
