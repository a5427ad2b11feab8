"""The ``metaif`` command: ``metaif <command> [hydra overrides]`` (top layer; method §1-6
through the command packages).

Dispatches to the ``command.py`` module of each command package (``train/``, ``score/``,
``prune/``); each is its own Hydra app (:mod:`metaif_cli.hydra_app`). A
:class:`MetaifError` or a Hydra composition error is printed as one line without a
traceback (exit status 2).
"""

from __future__ import annotations

import logging
import os
import sys

from metaif_cli.errors import INTERRUPTED_EXIT, MetaifError, system_error
from metaif_cli.hydra_app import one_line, register_resolvers, register_schemas, user_error

__all__ = ["COMMANDS", "main", "register_configs", "register_resolvers"]

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("metaif_cli.train.command", "meta-train MAML, ANIL or iMAML on a fixed, seeded task pool"),
    "score": ("metaif_cli.score.command", "task- and instance-influence scores of a trained run"),
    "prune-and-retrain": ("metaif_cli.prune.command",
                          "remove the most harmful data, retrain or edit, compare methods; leave-one-out checks"),
    "import": ("metaif_cli.importer.command", "a run directory from weights meta-trained elsewhere (state_dict)"),
}


def register_configs() -> None:
    """Register every command's root schema in Hydra's ConfigStore (tests compose all configs)."""
    from metaif_cli.importer.command import SCHEMAS as IMPORT
    from metaif_cli.prune.command import SCHEMAS as PRUNE
    from metaif_cli.score.command import SCHEMAS as SCORE
    from metaif_cli.train.command import SCHEMAS as TRAIN

    register_schemas({**TRAIN, **SCORE, **PRUNE, **IMPORT})


def usage() -> str:
    """The text of ``metaif --help``."""
    lines = ["usage: metaif <command> [hydra overrides] [--help] [--cfg job] [-m]", "", "commands:"]
    lines += [f"  {name:<19} {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "Run 'metaif <command> --help' for a command's config groups and options."]
    return "\n".join(lines)


def expand_home(arg: str) -> str:
    """``run=~/base`` -> ``run=/home/me/base``: Hydra's override grammar refuses a value starting with
    ``~`` (and a quoted one reaches the command unexpanded). ``~key`` (delete a key) is left alone,
    as is a value that names no home (``~`` alone stays ``~`` only when there is no home)."""
    if "=" not in arg or arg.startswith(("-", "~")):
        return arg
    key, value = arg.split("=", 1)
    if not value.startswith("~"):
        return arg
    return f"{key}={','.join(os.path.expanduser(v) if v.startswith('~') else v for v in value.split(','))}"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``metaif`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"metaif: unknown command {command!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    import importlib

    module = importlib.import_module(COMMANDS[command][0])
    logging.captureWarnings(True)
    sys.argv = [f"metaif {command}", *(expand_home(a) for a in rest)]
    # Let Hydra raise its composition errors instead of printing them over several lines.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        module.main()
    except MetaifError as exc:
        print(f"metaif {command}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except (HydraException, OmegaConfBaseException) as exc:
        schema = next(iter(getattr(module, "SCHEMAS", {}).values()), None)
        config_name = command.replace("-", "_")
        print(f"metaif {command}: error: {one_line(user_error(exc) or exc, schema, config_name)}", file=sys.stderr)
        return 2
    except SystemExit as exc:
        return int(exc.code or 0) if isinstance(exc.code, int) else 1
    except KeyboardInterrupt:
        print(f"metaif {command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return INTERRUPTED_EXIT
    except Exception as exc:  # a fault of the system outside the command (Hydra creating the run directory)
        err = system_error(exc)
        if err is None:
            raise
        print(f"metaif {command}: error: {one_line(err)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

