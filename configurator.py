"""
nanoGPT-style configuration. A script lists its settings as plain globals with defaults, then

    globals().update(configure(defaults))

where `defaults` maps each setting to its default. Command-line arguments are read in order:
a bare `config/x.py` runs that file and takes the settings it assigns, `--key=value` sets one
setting (the value read as a Python literal, else kept as a string). A key that is not a
setting, or a value of another type than the default's, is a one-line error naming the key.
"""

import ast
import difflib
import os
import sys


def _fail(msg):
    sys.exit(f"error: {msg}")


def _unknown(key, defaults):
    close = difflib.get_close_matches(key, list(defaults), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown setting '{key}'{hint}"


def _check(key, value, defaults, nullable, origin):
    default = defaults[key]
    if value is None and (default is None or key in nullable):
        return None
    if default is None or type(value) is type(default):
        return value
    if type(default) is float and type(value) is int:
        return float(value)
    if type(default) is str:
        return str(value)
    _fail(f"{origin}: '{key}' must be {type(default).__name__} like its default {default!r}, "
          f"got {value!r} ({type(value).__name__})")


def configure(defaults, argv=None, nullable=()):
    """Returns the settings after applying config files and --key=value overrides in argv."""
    config = dict(defaults)
    for arg in sys.argv[1:] if argv is None else argv:
        if not arg.startswith("--"):
            if not os.path.isfile(arg):
                _fail(f"config file '{arg}' not found (settings are given as --key=value)")
            scope = {}
            try:
                exec(open(arg).read(), scope)
            except Exception as e:
                _fail(f"config file '{arg}' does not run: {type(e).__name__}: {e}")
            for key, value in scope.items():
                if key.startswith("_") or type(value).__name__ == "module":
                    continue
                if key not in defaults:
                    _fail(f"{arg}: {_unknown(key, defaults)}")
                config[key] = _check(key, value, defaults, nullable, arg)
        else:
            key, eq, text = arg[2:].partition("=")
            if not eq:
                _fail(f"'{arg}' has no value: write --{key}=VALUE")
            if key not in defaults:
                _fail(_unknown(key, defaults))
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text
            config[key] = _check(key, value, defaults, nullable, f"--{key}")
    return config
