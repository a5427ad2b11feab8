"""Hydra glue used only by the ``command.py`` modules: run a command as a Hydra app, typed configs
out of Hydra, the run directory, quiet third-party loggers (no method section: plumbing).

Each command is its own Hydra app with its own root config in ``conf/`` (STYLE,
lightning-hydra-template: Hydra stays in the command layer). A :class:`MetaifError` or a
Hydra composition error is printed as one line without a traceback (exit status 2); an
unknown setting or group name is answered with the closest known one ("did you mean"),
and one added with ``+`` is refused like any other. In a sweep (``-m``), a job refused by
its checks is reported in one line and the sweep goes on with the others: every valid job
runs, and the sweep ends with exit status 2 naming how many were refused.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
import sys
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig, OmegaConf

from metaif_cli.errors import INTERRUPTED_EXIT, MetaifError, system_error
from metaif_cli.hydra_rundir import HYDRA_SUBDIR, remove_if_only_hydra
from metaif_cli.settings_names import closest, known_setting

def conf_dir() -> str:
    """The Hydra config folder: ``metaif_cli/conf`` in an installed wheel, else the checkout's ``conf/``.

    The configs live in ``conf/`` at the top of the repository; the wheel ships them as the
    package ``metaif_cli.conf`` (``setup.py``), so a non-editable install finds them too.
    Each command has its own folder there, ``conf/<command>/``, with its root config and
    only the config groups that apply to it (``metaif score --help`` lists score's groups;
    ``experiment=`` names a preset of the command it is given to).
    """
    packaged = Path(__file__).resolve().parent / "conf"
    if (packaged / "train" / "train.yaml").is_file():
        return str(packaged)
    return str(Path(__file__).resolve().parent.parent / "conf")


CONF_DIR = conf_dir()

HINTS = {"model/maml": "meta=maml", "model/anil": "meta=anil", "model/imaml": "meta=imaml"}


def short_hash(text: str) -> str:
    """Eight hex digits naming a run directory after its overrides."""
    return hashlib.sha1(str(text).encode()).hexdigest()[:8]


DISPLAY_KEYS = ("progress", "overwrite", "plots", "launcher", "n_jobs", "retrain.batch", "score.progress", "logger", "logger.log_dir")


def sweep_hash(argv: list[str]) -> str:
    """Eight hex digits naming a sweep folder after its command-line overrides (``hydra.sweep.dir``).

    Display options and Hydra's own settings are left out and the order does not matter,
    so rerunning a sweep finds its folder and each job its run directory (each job's
    subfolder is named after that job's overrides): a rerun of a sweep resumes it.
    """
    keep = sorted(a for a in argv if "=" in a and not a.startswith("-")
                  and a.split("=", 1)[0].lstrip("+~") not in DISPLAY_KEYS and not a.lstrip("+~").startswith("hydra"))
    return short_hash(",".join(keep))


def register_resolvers() -> None:
    """OmegaConf resolvers used in ``hydra.run.dir`` and ``hydra.sweep.dir``."""
    name = sweep_hash(sys.argv[1:])
    OmegaConf.register_new_resolver("metaif_sweep", lambda: name, replace=True)
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


def config_groups(config_name: str) -> list[str]:
    """The config groups of a command (the folders of ``conf/<command>/``)."""
    folder = Path(command_conf_dir(config_name))
    return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


def did_you_mean(key: str, schema: type | None, config_name: str | None) -> str:
    """`` (did you mean dataset=?)`` for a mistyped setting or group name of a command, else ``""``."""
    return closest(key, schema, config_groups(config_name) if config_name else [])


_OVERRIDE_RE = re.compile(r"Could not (?:override|append to config)[^']*'([^']+)'")


def one_line(exc: BaseException, schema: type | None = None, config_name: str | None = None) -> str:
    """The message of ``exc`` on one line, without Hydra's search path, with a hint for common slips.

    ``schema``/``config_name``: the command's root dataclass and config, to name the closest
    setting or group to a mistyped one.
    """
    text = " ".join(str(exc).split()).split(" Config search path")[0]
    cause = exc.__cause__
    if cause is not None and not isinstance(exc, MetaifError):
        text += ": " + " ".join(str(cause).split()).split(" full_key:")[0]
    match = _OVERRIDE_RE.search(text)
    if match and re.search(r"Key '[^']+' not in", text) and (schema is not None or config_name is not None):
        key = match.group(1)  # Hydra would suggest "append with +key": an unknown name is a typo far more often
        return (f"unknown setting or config group {key!r}{did_you_mean(key, schema, config_name)}; "
                f"'--help' lists the groups and '--cfg job' the settings")
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

    schema = next(iter(schemas.values()))
    refused: list[str] = []

    @functools.wraps(task_fn)
    def guarded(cfg):
        global _TASK_CFG
        _TASK_CFG = cfg
        try:
            check_added_keys(schema, config_name)
            with redirect_logging():  # log lines above the bars, never on a bar's line
                return task_fn(cfg)
        except KeyboardInterrupt:  # what was written is complete (atomic writes): a rerun resumes
            print(f"metaif {command}: interrupted; rerun the same command to resume", file=sys.stderr)
            sys.exit(INTERRUPTED_EXIT)
        except Exception as exc:
            err = user_error(exc) or system_error(exc)
            if err is None:
                raise
            sweep = _sweep_job()
            where = f" (job {sweep})" if sweep is not None else ""
            print(f"metaif {command}: error{where}: {one_line(err)}", file=sys.stderr)
            remove_if_only_hydra()
            if sweep is None:
                sys.exit(2)
            refused.append(sweep)  # a sweep runs its other jobs; the exit status says some were refused

    hydra.main(version_base="1.3", config_path=command_conf_dir(config_name), config_name=config_name)(guarded)()
    if refused:
        print(f"metaif {command}: error: {len(refused)} job(s) of the sweep refused: {'; '.join(refused)}; "
              "fix them and rerun the sweep (finished jobs are reused)", file=sys.stderr)
        sys.exit(2)


def _sweep_job() -> str | None:
    """This job's overrides when it is one job of a sweep (``-m``), else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    return f"#{hydra_cfg.job.num}: {' '.join(hydra_cfg.overrides.task)}"


def check_added_keys(schema: type, config_name: str) -> None:
    """Refuse a setting added with ``+``/``++`` that the command does not have (``+optim.stepz=5``):
    Hydra adds it, and the command would run without it."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    groups = set(config_groups(config_name))
    for text in HydraConfig.get().overrides.task:
        if not text.startswith("+") or "=" not in text:
            continue
        key = text.lstrip("+").split("=", 1)[0].split("@", 1)[0]
        if key.startswith("hydra") or key.split("/", 1)[0] in groups or known_setting(schema, key):
            continue
        raise MetaifError(f"unknown setting {key!r} (added with +){did_you_mean(key, schema, config_name)}; "
                          "'--cfg job' lists the settings")


SHARED_CONF = {"import": "train"}  # metaif import takes a run's settings: train's groups


def command_conf_dir(config_name: str) -> str:
    """``conf/<config_name>/``: a command's root config and its own config groups."""
    return str(Path(CONF_DIR) / SHARED_CONF.get(config_name, config_name))


_TASK_CFG: DictConfig | None = None  # the config of the Hydra job running now


def save_hydra_config() -> None:
    """Write Hydra's ``.hydra/`` (``config.yaml``, ``hydra.yaml``, ``overrides.yaml``) into the run dir.

    The root configs set ``hydra.output_subdir: null`` so that Hydra does not write these
    before the command has checked its settings: a refused command must not overwrite the
    record of the run already in that directory. Each command calls this once its checks
    passed, right before its first write. No-op outside Hydra or when the user set
    ``hydra.output_subdir`` (Hydra then wrote them itself).
    """
    from hydra.core.hydra_config import HydraConfig

    from metaif_cli.io import write_text

    if _TASK_CFG is None or not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.output_subdir is not None:
        return
    folder = output_dir() / HYDRA_SUBDIR
    write_text(OmegaConf.to_yaml(_TASK_CFG), folder / "config.yaml")
    write_text(OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra_cfg})), folder / "hydra.yaml")
    write_text(OmegaConf.to_yaml(hydra_cfg.overrides.task), folder / "overrides.yaml")


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
