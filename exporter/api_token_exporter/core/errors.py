"""The errors users catch, and the import of an optional dependency that names its extra."""
from __future__ import annotations

import importlib


class ConfigError(ValueError):
    """A setting, a file or a flag that cannot work, named in the message."""


def optional_import(module: str, extra: str, purpose: str):
    """Import a dependency of an optional feature, or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(f"{purpose} needs the Python package {module.split('.')[0]!r}: "
                          f"pip install 'api-token-exporter[{extra}]'") from exc
