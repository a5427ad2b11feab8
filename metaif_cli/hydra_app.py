"""Hydra glue used only by the ``command.py`` modules: run a command as a Hydra app, typed configs
out of Hydra, the run directory, quiet third-party loggers (no SPEC section: plumbing).

Each command is its own Hydra app with its own root config in ``conf/`` (STYLE,
lightning-hydra-template: Hydra stays in the command layer). A :class:`MetaifError` or a
Hydra composition error is printed as one line without a traceback (exit status 2).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import sys
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig, OmegaConf

from metaif_cli.errors import MetaifError

def conf_dir() -> str:
    """The Hydra config folder: ``metaif_cli/conf`` in an installed wheel, else the checkout's ``conf/``.

    The configs live in ``conf/`` at the top of the repository; the wheel ships them as the
    package ``metaif_cli.conf`` (``setup.py``), so a non-editable install finds them too.
    """
    packaged = Path(__file__).resolve().parent / "conf"
    if (packaged / "train.yaml").is_file():
        return str(packaged)
    return str(Path(__file__).resolve().parent.parent / "conf")


CONF_DIR = conf_dir()

HINTS = {"model/maml": "meta=maml", "model/anil": "meta=anil", "model/imaml": "meta=imaml"}


def short_hash(text: str) -> str:
    """Eight hex digits naming a run directory after its overrides."""
    return hashlib.sha1(str(text).encode()).hexdigest()[:8]


def register_resolvers() -> None:
    """OmegaConf resolvers used in ``hydra.run.dir``."""
    if not OmegaConf.has_resolver("metaif_hash"):
        OmegaConf.register_new_resolver("metaif_hash", short_hash)
    if not OmegaConf.has_resolver("metaif_basename"):
        OmegaConf.register_new_resolver("metaif_basename", lambda p: Path(str(p)).name or "run")


def register_schemas(schemas: dict[str, type]) -> None:
    """Store the root dataclasses (``name -> class``) in Hydra's ConfigStore."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for name, node in schemas.items():
        cs.store(name=name, node=node)


def user_error(exc: BaseException) -> MetaifError | None:
    """The :class:`MetaifError` behind ``exc`` (OmegaConf wraps errors of ``__post_init__``)."""
    seen = exc
    while seen is not None:
        if isinstance(seen, MetaifError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line, without Hydra's search path, with a hint for common slips."""
    text = " ".join(str(exc).split()).split(" Config search path")[0]
    cause = exc.__cause__
    if cause is not None and not isinstance(exc, MetaifError):
        text += ": " + " ".join(str(cause).split()).split(" full_key:")[0]
    for key, hint in HINTS.items():
        if f"'{key}'" in text:
            text += f" (did you mean {hint}? model= picks the network: mlp, cnn4 or custom)"
    return text


def run_hydra_app(task_fn: Callable, config_name: str, command: str, schemas: dict[str, type]) -> None:
    """Run ``task_fn(cfg)`` as a Hydra app over ``conf/<config_name>.yaml``.

    ``schemas`` are the dataclasses the YAML's ``defaults`` name (e.g. ``train_schema``).
    A user error inside the app prints one line and exits with status 2 (``SystemExit``
    passes through Hydra's own error reporting, which would print a traceback).
    """
    import hydra

    register_schemas(schemas)
    register_resolvers()

    from metaif_cli.progress import redirect_logging

    @functools.wraps(task_fn)
    def guarded(cfg):
        try:
            with redirect_logging():  # log lines above the bars, never on a bar's line
                return task_fn(cfg)
        except Exception as exc:
            err = user_error(exc)
            if err is None:
                raise
            print(f"metaif {command}: error: {one_line(err)}", file=sys.stderr)
            remove_if_only_hydra()
            sys.exit(2)

    hydra.main(version_base="1.3", config_path=CONF_DIR, config_name=config_name)(guarded)()


def remove_if_only_hydra() -> None:
    """After a refused command, delete its run directory when it holds nothing but Hydra's own files
    (``.hydra/``, the job log), so a bad input leaves nothing behind."""
    import shutil

    from hydra.core.hydra_config import HydraConfig

    try:
        run_dir = Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # no Hydra context: nothing was created
        return
    if not run_dir.is_dir() or Path.cwd().resolve().is_relative_to(run_dir.resolve()):
        return
    if all(p.name == ".hydra" or p.suffix == ".log" for p in run_dir.iterdir()):
        logging.shutdown()  # the job log is open
        shutil.rmtree(run_dir, ignore_errors=True)


def to_typed(cfg: DictConfig) -> object:
    """Resolve interpolations and build the dataclass tree (runs ``__post_init__`` checks)."""
    return OmegaConf.to_object(cfg)


def output_dir() -> Path:
    """This Hydra job's run directory."""
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def quiet_libraries() -> None:
    """Keep third-party loggers at WARNING so metaif's own INFO lines stay readable."""
    for name in ("matplotlib", "PIL", "fsspec"):
        logging.getLogger(name).setLevel(logging.WARNING)
