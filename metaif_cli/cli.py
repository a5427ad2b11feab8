"""The ``metaif`` command: ``metaif <command> [hydra overrides]``.

Each command is its own Hydra app with its own root config in ``conf/`` (STYLE,
lightning-hydra-template: Hydra stays in this layer). A :class:`MetaifError` or a
Hydra composition error is printed as one line without a traceback (exit status 2).
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from pathlib import Path
from typing import Callable

from metaif_cli.errors import MetaifError

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("metaif_cli.commands.train", "meta-train MAML, ANIL or iMAML on a fixed, seeded task pool"),
    "score": ("metaif_cli.commands.score", "task- and instance-influence scores of a trained run"),
    "prune-and-retrain": ("metaif_cli.commands.prune_and_retrain",
                          "remove the most harmful data, retrain or edit, compare methods; leave-one-out checks"),
}

HINTS = {"model/maml": "meta=maml", "model/anil": "meta=anil", "model/imaml": "meta=imaml"}


def short_hash(text: str) -> str:
    """Eight hex digits naming a run directory after its overrides."""
    return hashlib.sha1(str(text).encode()).hexdigest()[:8]


def register_resolvers() -> None:
    """OmegaConf resolvers used in ``hydra.run.dir``."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("metaif_hash"):
        OmegaConf.register_new_resolver("metaif_hash", short_hash)
    if not OmegaConf.has_resolver("metaif_basename"):
        OmegaConf.register_new_resolver("metaif_basename", lambda p: Path(str(p)).name or "run")


def _usage() -> str:
    lines = ["usage: metaif <command> [hydra overrides] [--help] [--cfg job] [-m]", "", "commands:"]
    lines += [f"  {name:<19} {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "Run 'metaif <command> --help' for a command's config groups and options."]
    return "\n".join(lines)


def _user_error(exc: BaseException) -> MetaifError | None:
    """The :class:`MetaifError` behind ``exc`` (OmegaConf wraps errors of ``__post_init__``)."""
    seen = exc
    while seen is not None:
        if isinstance(seen, MetaifError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def run_hydra_app(task_fn: Callable, config_name: str, command: str) -> None:
    """Run ``task_fn(cfg)`` as a Hydra app over ``conf/<config_name>.yaml``.

    A user error inside the app prints one line and exits with status 2 (``SystemExit``
    passes through Hydra's own error reporting, which would print a traceback).
    """
    import functools

    import hydra

    from metaif_cli.config import register_configs

    register_configs()
    register_resolvers()

    @functools.wraps(task_fn)
    def guarded(cfg):
        try:
            return task_fn(cfg)
        except Exception as exc:
            err = _user_error(exc)
            if err is None:
                raise
            print(f"metaif {command}: error: {_one_line(err)}", file=sys.stderr)
            sys.exit(2)

    hydra.main(version_base="1.3", config_path=CONF_DIR, config_name=config_name)(guarded)()


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()).split(" Config search path")[0]
    cause = exc.__cause__
    if cause is not None and not isinstance(exc, MetaifError):
        text += ": " + " ".join(str(cause).split()).split(" full_key:")[0]
    for key, hint in HINTS.items():
        if f"'{key}'" in text:
            text += f" (did you mean {hint}? model= picks the network: mlp or cnn4)"
    return text


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``metaif`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"metaif: unknown command {command!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    import importlib

    module = importlib.import_module(COMMANDS[command][0])
    logging.captureWarnings(True)
    sys.argv = [f"metaif {command}", *rest]
    # Let Hydra raise its composition errors instead of printing them over several lines.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        module.main()
    except MetaifError as exc:
        print(f"metaif {command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except (HydraException, OmegaConfBaseException) as exc:
        print(f"metaif {command}: error: {_one_line(_user_error(exc) or exc)}", file=sys.stderr)
        return 2
    except SystemExit as exc:
        return int(exc.code or 0) if isinstance(exc.code, int) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
