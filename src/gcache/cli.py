"""What every command (`gcache.train`, `gcache.evaluate`, `gcache.study`) does around its job.

- Before Hydra runs: `check_command_line` stops a command line that would put an API key into
  the config (Hydra writes every override to `.hydra/overrides.yaml` and `config.yaml`), and one
  that sets a key by its name before it moved into the `rollout` or `policy` group.
- Around the job (`run_job`): keys from `.env` and the environment, redacted from every log
  line; warnings through the log handlers; known-benign third-party output silenced
  (`quiet_third_party_output`); and one exit-code contract:

  | what happened | console | exit code |
  |---|---|---|
  | bad input: `ConfigError` (config values, data files, a missing model) or `ApiError` | `error: <message>` | 2 |
  | training stopped by a signal after saving a checkpoint (`Interrupted`) | how to resume | 128 + signal |
  | Ctrl-C outside training | `interrupted` | 130 |
  | anything else | the traceback | 1 |
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from hydra.errors import InstantiationException

from gcache.secrets import (
    KEY_SOURCES,
    env_secrets,
    install_secret_filter,
    load_dotenv,
    secret_overrides,
)

log = logging.getLogger(__name__)

CONF_DIR = str(Path(__file__).resolve().parent / "conf")  # packaged with gcache (package data)
EXIT_BAD_INPUT = 2

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad value in the composed config (or data, model, endpoint it names): the user's to fix."""


class Interrupted(Exception):
    """The job stopped on SIGINT / SIGTERM after saving what it had; the message says how to resume."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


@contextmanager
def config_errors() -> Iterator[None]:
    """Errors while reading the config, data, endpoint and model are the user's to fix: one line
    (`ConfigError`), no traceback. That includes a missing optional package (`datasets` for hub
    data). `ApiError`s already say what to check and keep their type."""
    from gcache.llm.api import ApiError

    try:
        yield
    except (ConfigError, ApiError):
        raise
    except (ValueError, TypeError, OSError, RuntimeError, ImportError, InstantiationException) as exc:
        cause = exc.__cause__ if isinstance(exc, InstantiationException) and exc.__cause__ else exc
        raise ConfigError(str(cause)) from exc


# Top-level keys that moved into a config group: an old command line is told the new name instead
# of Hydra's "Could not override" message.
MOVED_KEYS = {
    **{key: f"rollout.{key}" for key in ("latent_steps", "retention", "realign", "judger_cache", "max_new_tokens",
                                         "agent_max_new_tokens", "temperature")},
    **{key: f"policy.{key}" for key in ("graphs_per_question", "judger_edges", "fuser_trains_policy")},
}


def moved_overrides(argv: list[str]) -> list[tuple[str, str]]:
    """(old key, new key) for each override of `argv` that names a moved key."""
    keys = [arg.split("=", 1)[0].lstrip("+~") for arg in argv if "=" in arg and not arg.startswith("-")]
    return [(key, MOVED_KEYS[key]) for key in keys if key in MOVED_KEYS]


TRUE = ("true", "yes", "on", "1")


def holds_run(directory: Path) -> bool:
    """Whether a training run wrote into `directory`: its summary, a checkpoint or its history."""
    return ((directory / "summary.json").is_file() or (directory / "history.jsonl").is_file()
            or any((directory / "checkpoints").glob("*.ckpt")))


def run_directory_error(directory: Path, *, resume: bool, ckpt_path, overwrite: bool) -> str | None:
    """Why a training run may not start in `directory` (None when it may): a directory that holds a run
    is continued (`resume=true`, `ckpt_path=`) or, with `overwrite=true`, replaced; never mixed silently."""
    if resume or ckpt_path not in (None, "null") or overwrite or not holds_run(directory):
        return None
    return (f"{directory} holds a run already: continue it with resume=true, replace it with overwrite=true, "
            "or choose another hydra.run.dir")


def is_nonzero_rank() -> bool:
    """A DDP process other than rank 0 (Lightning relaunches the command for each rank)."""
    return any(os.environ.get(name, "0") not in ("", "0") for name in ("LOCAL_RANK", "NODE_RANK", "RANK"))


def check_run_directory(argv: list[str]) -> None:
    """`gcache.train`, before Hydra writes `.hydra/` into the run directory: `resume=true` on a finished
    run (summary.json) says so and exits 0 changing nothing; a new run into a directory (or sweep
    directory) that holds a run exits 2 unless it continues or overwrites it (`run_directory_error`)."""
    if is_nonzero_rank():
        return
    values = dict(arg.split("=", 1) for arg in argv if "=" in arg and not arg.startswith("-"))
    resume = values.get("resume", "false").lower() in TRUE
    overwrite = values.get("overwrite", "false").lower() in TRUE
    if "-m" in argv or "--multirun" in argv:
        sweep = values.get("hydra.sweep.dir")
        directories = sorted(p for p in Path(sweep).iterdir() if p.is_dir()) if sweep and Path(sweep).is_dir() else []
    else:
        directories = [Path(values["hydra.run.dir"])] if "hydra.run.dir" in values else []
    for directory in directories:
        if resume and len(directories) == 1 and (directory / "summary.json").is_file():
            print(f"the run in {directory} finished (summary.json): nothing to do", file=sys.stderr)
            sys.exit(0)
        if why := run_directory_error(directory, resume=resume, ckpt_path=values.get("ckpt_path"),
                                      overwrite=overwrite):
            print(f"error: {why}", file=sys.stderr)
            sys.exit(EXIT_BAD_INPUT)


# Keys that had another name in one command: one name per concept across train, evaluate and study.
# The old name keeps working, with a message naming the new one, until the next release.
RENAMED = {
    "train": {"compare": "methods", "mode.compare": "mode.methods"},
    "study": {"compare": "methods", "study.methods": "methods", "study.limit": "limit_test",
              "study.baseline_topology": "baseline_topology", "mode.compare": "mode.methods"},
    "evaluate": {"limit": "limit_test", "batch_size": "eval_batch_size", "mode.compare": "mode.methods"},
}


def renamed_overrides(argv: list[str], command: str) -> list[str]:
    """`argv` with each old key name of `command` (`RENAMED`) replaced by its new one, saying so on stderr."""
    out = []
    for arg in argv:
        if "=" in arg and not arg.startswith("-"):
            key, value = arg.split("=", 1)
            prefix = key[: len(key) - len(key.lstrip("+~"))]
            new = RENAMED[command].get(key[len(prefix):])
            if new:
                print(f"warning: {key[len(prefix):]}= is now {new}= in gcache.{command} (the old name goes in the "
                      "next release)", file=sys.stderr)
                arg = f"{prefix}{new}={value}"
        out.append(arg)
    return out


def unknown_keys(argv: list[str], config_name: str) -> str | None:
    """Why an override `key=value` of `argv` names no key of the command's config (None if all do),
    with the closest key: Hydra's own message ("To append to your config use +key=...") would lead to
    adding a key gcache does not read. Sweeps and group choices are composed with their first option."""
    import difflib

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    groups = {p.name for p in Path(CONF_DIR).iterdir() if p.is_dir()}
    plain = [arg for arg in argv if "=" in arg and not arg.startswith(("-", "+", "~"))]
    chosen = [f"{key}={value.split(',')[0]}" for key, value in (arg.split("=", 1) for arg in plain) if key in groups]
    keys = [arg.split("=", 1)[0] for arg in plain]
    keys = [key for key in keys if key not in groups and not key.startswith("hydra.") and key != "hydra"]
    if not keys:
        return None
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=chosen)
    except Exception:  # a bad group option: Hydra's own message lists the options
        return None
    for key in keys:
        if OmegaConf.select(cfg, key, default="<missing>", throw_on_missing=False) == "<missing>":
            known = [path for path, _ in leaves(OmegaConf.to_container(cfg, resolve=False))]
            close = difflib.get_close_matches(key, known, n=1)
            return f"{key}: no such key" + (f"; did you mean {close[0]}?" if close else "")
    return None


def leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every leaf of a nested dict (a config as a container), keys after `prefix`."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from leaves(value, f"{prefix}{key}.")
    else:
        yield prefix.rstrip("."), node


def check_command_line(argv: list[str], config_name: str | None = None) -> None:
    """Exit 2 before Hydra runs when an override would put a secret into the config, names a
    key that moved into a config group, or (with the command's `config_name`) names no key."""
    if keys := secret_overrides(argv):
        print(f"error: {', '.join(keys)}: {KEY_SOURCES}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    if moved := moved_overrides(argv):
        names = ", ".join(f"{old} is now {new}" for old, new in moved)
        print(f"error: {names} (the rollout and policy config groups); use {moved[0][1]}=...", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    if config_name and (why := unknown_keys(argv, config_name)):
        print(f"error: {why}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


# The OpenAI SDK's and its HTTP stack's loggers (`httpx2`: "HTTP Request: POST ... 200 OK").
HTTP_LOGGERS = ("openai", "httpx", "httpx2", "httpcore", "httpcore2")


def quiet_third_party_output() -> None:
    """Keep the console to our lines and real warnings, silencing known-benign output at its source.

    - Lightning's info lines (the "Tip: ... litlogger" banner, "GPU available", "`Trainer.fit`
      stopped"): its rank-zero logger shows warnings only. Its warnings use `warnings` and still show.
    - W&B's info lines (version banner, offline hints, end-of-run panel; we log where the run is) and
      its Weave suggestion whenever `openai` is imported: `WANDB_SHOW_INFO=false` and
      `WANDB_DISABLE_WEAVE=true` unless set. W&B's warnings still show.
    - transformers' "Loading weights" bars: off (hub download bars stay: a first download is long).
    - Lightning's own use of a torch API torch deprecated (`_pytree.py`: "`isinstance(treespec,
      LeafSpec)` is deprecated"): that one message from that module only.
    - Lightning's "does not have many workers" hint (printed per dataloader on a many-core GPU
      machine): gcache's datasets are in-memory lists of questions, batches cost nothing to make,
      and a worker process would only add start-up time.
    - HTTP request lines of the API client's libraries (`HTTP_LOGGERS`: one per request, thousands
      a run): below WARNING. A logger given a level of its own (`hydra.verbose=[httpx2,openai]`, or
      `hydra.verbose=true` for every logger) keeps it. API trouble shows as `gcache.llm.api` and
      `gcache.modes` warnings (retries, failed items) and the run's totals (`gcache.train`).
    """
    import huggingface_hub
    import transformers

    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    os.environ.setdefault("WANDB_SHOW_INFO", "false")
    os.environ.setdefault("WANDB_DISABLE_WEAVE", "true")
    transformers.utils.logging.disable_progress_bar()  # also turns the hub's bars off: back on
    huggingface_hub.utils.enable_progress_bars()
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            module=r"lightning\.pytorch\.utilities\._pytree")
    warnings.filterwarnings("ignore", message=r".*does not have many workers which may be a bottleneck")
    verbose = logging.getLogger().getEffectiveLevel() <= logging.DEBUG
    for name in HTTP_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET and not verbose:
            logger.setLevel(logging.WARNING)


# Every command computes in one numerical setting: float32 matmuls may use TF32 on GPUs ("high"), so
# a checkpoint is evaluated as it was trained. The realignment matrix is solved in float64 (TF32 never
# applies there), see gcache.kv.realignment.
MATMUL_PRECISION = "high"


def set_numerics() -> None:
    """The numerical setting of every gcache command (train, evaluate, study), set in one place."""
    import torch

    torch.set_float32_matmul_precision(MATMUL_PRECISION)


def run_job(job: Callable[..., T], *args: Any) -> T:
    """Run a command's job under the exit-code contract of the module docstring. The job decides
    which of its errors are bad input (`config_errors` around its setup): an error while training
    keeps its traceback."""
    from gcache.llm.api import ApiError

    load_dotenv()  # from the directory the command runs in (Hydra does not chdir)
    install_secret_filter(env_secrets())
    logging.captureWarnings(True)  # warnings go through the (filtered) log handlers too
    quiet_third_party_output()
    set_numerics()
    try:
        return job(*args)
    except (ConfigError, ApiError) as exc:  # the message says what to fix; a traceback would bury it
        log.error("error: %s", exc)
        sys.exit(EXIT_BAD_INPUT)
    except Interrupted as exc:
        log.error("%s", exc)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        log.error("interrupted")
        sys.exit(128 + signal.SIGINT)
