"""Everything about keeping secrets (API keys) out of configs, logs and messages.

- Keys come from the environment or a git-ignored `.env` (`load_dotenv`), never from the
  config: `secret_overrides` finds command-line overrides that would put one there (Hydra
  writes every override to `.hydra/overrides.yaml` and `.hydra/config.yaml`).
- Config dumps (W&B, hparams files) go through `redacted_config`.
- `redact` replaces known secrets in a piece of text (error messages, ...); `SecretFilter` does
  the same for the log records a handler or logger sees.
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


def redact(text: str, secrets: Iterable[str | None]) -> str:
    """Replace every occurrence of each non-empty secret in `text` with `***`."""
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text


class SecretFilter(logging.Filter):
    """Redacts configured secrets from log records (message, arguments and traceback text).

    Attach it to a handler to cover every record that handler emits (a filter on a logger only sees
    records created on that very logger, not those propagated from its children):

        handler.addFilter(SecretFilter([cfg.api_key]))
    """

    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        super().__init__()
        self._secrets: set[str] = {s for s in secrets if s}

    def add(self, secret: str | None) -> None:
        if secret:
            self._secrets.add(secret)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._secrets:
            return True
        message = record.getMessage()
        if any(s in message for s in self._secrets):
            record.msg, record.args = redact(message, self._secrets), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text, self._secrets)
        if record.stack_info:
            record.stack_info = redact(record.stack_info, self._secrets)
        return True


def install_secret_filter(secrets: Iterable[str | None]) -> SecretFilter:
    """Redact `secrets` from every record written by the handlers that exist now: the root
    logger's (console, Hydra's job log file) and those of loggers that keep their own
    (Lightning's, when it was imported before logging was configured). Returns the filter;
    `filter.add(secret)` covers a secret learnt later."""
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
