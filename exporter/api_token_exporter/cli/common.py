"""What the commands share: one way to read settings (``--config`` or ATE_CONFIG, ATE_* variables,
then the command's own flags, named as the settings are) and the settings a server command passes
to its workers through ATE_* variables."""
from __future__ import annotations

import os

KEYS_FILE_HELP = "the key file (default: keys_file of the settings, $ATE_KEYS_FILE, or keys.yml)"


def command_settings(args, **flags):
    """The settings a command runs with; a ConfigError (cli.main prints it) names a bad one."""
    from ..core.config import load_settings
    return load_settings(getattr(args, "config", None), **flags)


def keys_file_of(args) -> str:
    return args.keys_file or command_settings(args).keys_file or "keys.yml"


def settings_env(args) -> dict:
    env = {}
    if args.config:
        env["ATE_CONFIG"] = os.path.abspath(args.config)
    if args.keys_file:
        env["ATE_KEYS_FILE"] = os.path.abspath(args.keys_file)
    if args.storage_uri:
        env["ATE_STORAGE_URI"] = args.storage_uri
    if args.state_dir:
        env["ATE_STATE_DIR"] = os.path.abspath(args.state_dir)
    return env
