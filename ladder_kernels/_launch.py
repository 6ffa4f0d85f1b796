"""Environment defaults of the `ladder-kernels` command, applied before torch is imported.

torch's OpenMP runtime reads OMP_WAIT_POLICY once, when torch loads it, so the default has to be in the
environment before the first `import torch`. Every module of the package imports torch (defaults.py too), so
this one imports only the standard library and runs first from `ladder_kernels/__init__.py`. It changes
nothing when the package is imported as a library: library users set the variable themselves (README,
performance notes). The user's own value always wins.
"""

from __future__ import annotations

import os
import sys

# Not in defaults.py, which imports torch: these must be read before torch is.
# PASSIVE: idle OpenMP threads sleep instead of spinning. Beside one busy process on 2 cores a Ladder training
# step took 13.8 s with spinning threads and 2.4 s with PASSIVE; on an idle machine PASSIVE costs about 15%.
CLI_ENV_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}
COMMAND_NAMES = ("ladder-kernels", "ladder-kernels.exe", "ladder-kernels-script.py")  # console script, any OS
MODULE_NAME = "ladder_kernels"

applied: dict[str, str] = {}  # what this process set (for --help): name -> value


def runs_as_module(orig_argv: list[str], module: str = MODULE_NAME) -> bool:
    """Whether the interpreter command line `orig_argv` (sys.orig_argv) is `python [options] -m <module> ...`."""
    args = iter(orig_argv[1:])
    for arg in args:
        if arg == "-m":
            return next(args, None) == module
        if arg.startswith("-m"):
            return arg[2:] == module
        if arg in ("-W", "-X"):  # interpreter options that take a value
            next(args, None)
        elif arg == "-c" or arg == "-" or not arg.startswith("-"):  # -c code, stdin or a script
            return False
    return False


def is_cli_process(argv: list[str] | None = None, orig_argv: list[str] | None = None) -> bool:
    """Whether this process is the `ladder-kernels` command (console script or `python -m ladder_kernels`)."""
    argv = sys.argv if argv is None else argv
    orig_argv = getattr(sys, "orig_argv", []) if orig_argv is None else orig_argv
    command = os.path.basename(argv[0]) if argv and argv[0] else ""
    return command in COMMAND_NAMES or runs_as_module(orig_argv)


def apply_cli_env_defaults(environ=None, cli: bool | None = None) -> dict[str, str]:
    """Set CLI_ENV_DEFAULTS that `environ` (os.environ) lacks, when this process is the command line; returns
    what was set. A value the user set, even an empty one, is left alone."""
    environ = os.environ if environ is None else environ
    if not (is_cli_process() if cli is None else cli):
        return {}
    set_now = {name: value for name, value in CLI_ENV_DEFAULTS.items() if name not in environ}
    environ.update(set_now)
    if environ is os.environ:
        applied.update(set_now)
    return set_now


def describe_env() -> str:
    """One line per default for `ladder-kernels --help`: its value here and where it came from."""
    lines = []
    for name, default in CLI_ENV_DEFAULTS.items():
        value = os.environ.get(name)
        source = "set by ladder-kernels" if name in applied else ("yours" if value is not None else "unset")
        lines.append(f"  {name}={value if value is not None else ''} ({source}; default {default})")
    return "\n".join(lines)


apply_cli_env_defaults()
