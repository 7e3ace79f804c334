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


def generator_arguments(parser, what: str, out: str) -> None:
    """The flags of a command that renders files from the thresholds (rules, dashboards)."""
    parser.add_argument("--thresholds", help="the thresholds file (default: prometheus/thresholds.yml when the "
                        "current directory has one, as a checkout does, else the packaged defaults)")
    parser.add_argument("--out", "--output-dir", dest="out", default=out,
                        help=f"where to write the {what} (default %(default)s)")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if the generated files are out of date, write nothing")
