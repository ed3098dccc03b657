"""Keep API keys out of configs, logs and W&B: keys come from the environment (or a git-ignored
`.env`), and every config dump goes through `redacted_config`."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

SECRET_KEY_PATTERN = re.compile(r"(api[_-]?key|token|secret|password)", re.IGNORECASE)
REDACTED = "***"


def redacted_config(cfg: DictConfig | dict) -> dict[str, Any]:
    """A plain dict of the config with every secret-looking field replaced by '***'."""
    data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)

    def scrub(value: Any, key: str = "") -> Any:
        if isinstance(value, dict):
            return {k: scrub(v, str(k)) for k, v in value.items()}
        if isinstance(value, list):
            return [scrub(v) for v in value]
        if key and SECRET_KEY_PATTERN.search(key) and value not in (None, ""):
            return REDACTED
        return value

    return scrub(data)


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
