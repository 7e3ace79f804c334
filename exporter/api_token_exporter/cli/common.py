"""What several commands share: the key file they default to and the settings they pass to a
server through ATE_* variables."""
from __future__ import annotations

import os

DEFAULT_KEYS_FILE = os.environ.get("ATE_KEYS_FILE", "keys.yml")


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
