"""
nanoGPT-style configuration, one idiom for every script. A script lists its settings at the top
as plain `name = literal` lines, each with a comment that says what it is, and then calls

    config = load_config(globals())

which applies the command line in order: a bare `config/x.py` runs that file and takes the
settings it assigns, `--key=value` sets one setting (the value read as a Python literal, else
kept as a string). A key that is not a setting, or a value of another type than the setting's,
is a one-line error naming the key. `--help` lists the settings with their values and comments.
A setting that names a device or a dtype is resolved here, and `require` checks an optional package.
"""

import ast
import difflib
import io
import os
import sys
import tokenize

import torch


def _fail(msg):
    sys.exit(f"error: {msg}")


def settings(path):
    """{name: (default, comment)} of a script's settings, read from its source (nothing is run): the
    top-level `name = literal` lines of lowercase names before its load_config call and its first
    def or class, with the comment on the same line and on the comment lines just below it."""
    with open(path, encoding="utf-8") as f:
        source = f.read()
    comments, code_lines = {}, set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = (tok.start[1], tok.string.lstrip("#").strip())
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code_lines.add(tok.start[0])
    found = {}
    for node in ast.parse(source).body:
        calls = {n.func.id for n in ast.walk(node) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) or "load_config" in calls:
            break
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            continue
        name = node.targets[0].id
        try:
            value = ast.literal_eval(node.value)
        except ValueError:
            continue
        if not name.islower() or name.startswith("_"):
            continue
        lines, line = [], node.end_lineno
        if line in comments:  # a comment after the value, continued on comment-only lines below at its column
            column = comments[line][0]
            lines.append(comments[line][1])
            line += 1
            while line in comments and line not in code_lines and comments[line][0] == column:
                lines.append(comments[line][1])
                line += 1
        found[name] = (value, " ".join(lines))
    return found


def _close_file(path):
    """' (did you mean ...?)' for a misspelled config file: the .py files beside it, in config/ and below."""
    folders = {os.path.dirname(path) or ".", "config"} | {os.path.join("config", d) for d in
                                                          (os.listdir("config") if os.path.isdir("config") else [])}
    files = [os.path.join(d, f) if d != "." else f for d in folders if os.path.isdir(d) for f in os.listdir(d)
             if f.endswith(".py")]
    close = difflib.get_close_matches(path, files, n=1, cutoff=0.7)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _check(key, value, config, nullable, origin):
    """value, if it may replace config[key]: the same type as the current value (an int for a
    float is widened, anything for a string is kept as text), or None where that is allowed."""
    current = config[key]
    if value is None and (current is None or key in nullable):
        return None
    if current is None or type(value) is type(current):
        return value
    if type(current) is float and type(value) is int:
        return float(value)
    if type(current) is tuple and type(value) in (int, float, str):  # one value: a tuple of one
        return (value,)
    if type(current) is str:
        return str(value)
    _fail(f"{origin}: '{key}' must be {type(current).__name__} like its current value {current!r}, "
          f"got {value!r} ({type(value).__name__})")


def configure(defaults, argv=None, nullable=()):
    """The settings after applying config files and --key=value overrides in argv (default:
    the command line) to `defaults`. Keys in `nullable` may also be set to None."""
    config = dict(defaults)
    for arg in sys.argv[1:] if argv is None else argv:
        if arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")
            if not eq:
                _fail(f"'{arg}' has no value: write --{key}=VALUE (--help lists the settings)")
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text
            given, origin, where = {key: value}, f"--{key}", ""
        else:
            if not os.path.isfile(arg):
                _fail(f"config file '{arg}' not found{_close_file(arg)} (settings are given as --key=value; "
                      f"--help lists them)")
            scope = {}
            try:
                exec(open(arg).read(), scope)
            except Exception as e:
                _fail(f"config file '{arg}' does not run: {type(e).__name__}: {e}")
            given = {k: v for k, v in scope.items() if not k.startswith("_") and type(v).__name__ != "module"}
            origin, where = arg, f"{arg}: "
        for key, value in given.items():
            if key not in defaults:
                close = difflib.get_close_matches(key, list(defaults), n=1)
                _fail(f"{where}unknown setting '{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
            config[key] = _check(key, value, config, nullable, origin)
    return config


def _help(script, doc, table, config):
    lines = [(doc or "").strip(), "", f"usage: python {script} [config/x.py ...] [--key=value ...]", "",
             "settings (value, then what it is; 'default' where a config file or flag changed it):"]
    width = max(len(f"{k} = {config[k]!r}") for k in table) + 2
    for key, (default, comment) in table.items():
        changed = f" (default {default!r})" if config[key] != default else ""
        lines.append(f"  {f'{key} = {config[key]!r}':{width}}{comment}{changed}")
    return "\n".join(lines)


def load_config(scope, nullable=()):
    """Applies the command line to the settings of the script whose globals are `scope`, in place,
    and returns them as a dict. -h or --help prints the settings and exits."""
    table = settings(scope["__file__"])
    defaults = {k: scope[k] for k in table}
    argv = sys.argv[1:]
    asks = [i for i, a in enumerate(argv) if a in ("-h", "--help") or a.startswith("--help=")]
    if asks:  # the settings as the config files and flags before --help leave them
        config = configure(defaults, argv[:asks[0]], nullable)
        print(_help(os.path.relpath(scope["__file__"]), scope.get("__doc__"), table, config))
        sys.exit(0)
    config = configure(defaults, argv, nullable)
    scope.update(config)
    return config


def require(package, flag):
    """A one-line exit unless the optional `package` that `flag` needs is installed."""
    try:
        __import__(package)
    except ImportError:
        _fail(f"{flag} needs {package}: pip install {package} (or leave out {flag})")


def resolve_device(device):
    """'auto' -> 'cuda' if there is a GPU, else 'cpu'; anything torch cannot use is a one-line error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        _fail(f"device {device!r} is not a device torch knows; use --device=cpu (or auto, cuda, cuda:N, mps)")
    if kind == "cuda" and not torch.cuda.is_available():
        _fail(f"device={device!r} but CUDA is not available here; use --device=cpu")
    if kind == "cuda" and (torch.device(device).index or 0) >= torch.cuda.device_count():
        _fail(f"device={device!r} but this machine has {torch.cuda.device_count()} GPU(s); use --device=cuda:0")
    if kind == "mps" and not torch.backends.mps.is_available():
        _fail(f"device={device!r} but MPS is not available here; use --device=cpu")
    if kind not in ("cpu", "cuda", "mps"):
        _fail(f"device {device!r} is not supported; use --device=cpu (or auto, cuda, cuda:N, mps)")
    return device


def dtype_of(name):
    """The torch dtype of a --dtype value other than 'auto'; a ValueError naming the flag for anything else."""
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be one of 'auto', 'float32', 'bfloat16', 'float16', got {name!r} (--dtype)")
    return getattr(torch, name)


def resolve_dtype(dtype, device):
    """'auto' -> bfloat16 on a GPU that has it, else float32; returns the torch dtype."""
    cuda = device.startswith("cuda")
    if dtype == "auto":
        dtype = "bfloat16" if cuda and torch.cuda.is_bf16_supported() else "float32"
    try:
        ptdtype = dtype_of(dtype)
    except ValueError as e:
        _fail(str(e))
    if ptdtype == torch.bfloat16 and cuda and not torch.cuda.is_bf16_supported():
        _fail("this GPU does not support bfloat16; use --dtype=float16 (or float32)")
    return ptdtype
