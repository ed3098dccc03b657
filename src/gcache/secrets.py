"""Keep API keys out of configs, logs and W&B.

- Keys come from the environment or a git-ignored `.env` (`load_dotenv`), never from the
  config: `secret_overrides` finds command-line overrides that would put one there (Hydra
  writes every override to `.hydra/overrides.yaml` and `.hydra/config.yaml`).
- Config dumps (W&B, hparams files) go through `redacted_config`.
- `install_secret_filter` redacts the keys found in the environment from every log record
  the process's handlers write (console, Hydra's `<job>.log`, Lightning's own handler).

Not covered: text written with `print` or straight to stderr by other libraries.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

# A config key or environment variable that holds a secret: its last `_`/`-`/`.` separated
# part is a key, token, secret or password. Counts such as `max_new_tokens` or flags such as
# `require_key` do not match.
SECRET_KEY_PATTERN = re.compile(
    r"(^|[_.-])(api[_-]?key|access[_-]?key|secret[_-]?key|private[_-]?key|token|secret|password|passwd)$",
    re.IGNORECASE,
)
REDACTED = "***"
KEY_SOURCES = "API keys are read from OPENAI_API_KEY (the environment or a git-ignored .env), never from the config"
MIN_SECRET_LENGTH = 8  # shorter values ("1", "true") are not redacted from logs


def is_secret_key(name: str) -> bool:
    return bool(SECRET_KEY_PATTERN.search(name))


def redacted_config(cfg: DictConfig | dict) -> dict[str, Any]:
    """A plain dict of the config with every secret-looking field replaced by '***'."""
    data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)

    def scrub(value: Any, key: str = "") -> Any:
        if isinstance(value, dict):
            return {k: scrub(v, str(k)) for k, v in value.items()}
        if isinstance(value, list):
            return [scrub(v) for v in value]
        if key and is_secret_key(key) and value not in (None, ""):
            return REDACTED
        return value

    return scrub(data)


def secret_overrides(overrides: Iterable[str]) -> list[str]:
    """The keys of Hydra command-line overrides (`a.b=v`, `+a.b=v`, `++a.b=v`) that name a secret."""
    found = []
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~") if "=" in override else ""
        if key and is_secret_key(key):
            found.append(key)
    return found


def env_secrets(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of environment variables named like secrets (OPENAI_API_KEY, WANDB_API_KEY, HF_TOKEN, ...)."""
    environ = os.environ if environ is None else environ
    return [v for k, v in environ.items() if is_secret_key(k) and len(v) >= MIN_SECRET_LENGTH]


def install_secret_filter(secrets: Iterable[str | None]) -> logging.Filter:
    """Redact `secrets` from every record written by the handlers that exist now: the root
    logger's (console, Hydra's job log file) and those of loggers that keep their own
    (Lightning's, when it was imported before logging was configured). Returns the filter;
    `filter.add(secret)` covers a secret learnt later."""
    from gcache.llm.api import SecretFilter

    secret_filter = SecretFilter(secrets)
    loggers = [logging.getLogger()]
    loggers += [lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    for logger in loggers:
        for handler in logger.handlers:
            handler.addFilter(secret_filter)
    return secret_filter


def load_dotenv(path: str | Path = ".env") -> list[str]:
    """Set variables from a `KEY=value` file that are not already in the environment.
    Returns the names set (never the values)."""
    path = Path(path)
    if not path.is_file():
        return []
    names = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        key = key.strip().removeprefix("export ").strip()
        value = value.strip().strip("'\"")
        if key and key not in os.environ:
            os.environ[key] = value
            names.append(key)
    return names
