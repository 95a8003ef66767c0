"""Small helpers shared by the three scripts: the config system, atomic saves, logging.

Config system (nanoGPT/timm habits, so a script's defaults read at its top): each script declares
one nested dict of defaults, one level of sections, where every leaf is ``(default, "help text")`` or
``(default, "help text", type_or_choices)``. Precedence is defaults < ``--config file.yaml``
< dotted command-line overrides (``optim.lr=5e-4``). Unknown keys, wrong types and values
outside the declared choices are errors that name the key before any work starts.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path, PurePath
from typing import Any

import yaml

from errors import ConfigError, DiskFullError, ProjectError


class Nullable:
    """Spec type marker: a key with a non-null default that also accepts null."""

    def __init__(self, kind) -> None:
        self.kind = kind


# ----------------------------------------------------------------------------- config


def split_spec(spec: dict) -> tuple[dict, dict, dict]:
    """Turn a spec ``{section: {key: (default, help[, type])}}`` into values, helps and types."""
    values, helps, types = {}, {}, {}
    for section, leaves in spec.items():
        values[section] = {}
        for key, leaf in leaves.items():
            if not (isinstance(leaf, tuple) and len(leaf) in (2, 3)):
                raise TypeError(f"spec leaf {section}.{key} must be (default, help[, type])")
            default, help_text = leaf[0], leaf[1]
            kind = leaf[2] if len(leaf) == 3 else (type(default) if default is not None else object)
            optional = default is None
            if isinstance(kind, Nullable):
                kind, optional = kind.kind, True
            values[section][key] = copy.deepcopy(default)
            helps[f"{section}.{key}"] = help_text
            types[f"{section}.{key}"] = (kind, optional)
    return values, helps, types


def _type_name(kind) -> str:
    if isinstance(kind, tuple):
        return "one of " + ", ".join(repr(c) for c in kind)
    return getattr(kind, "__name__", str(kind))


def coerce(key: str, value: Any, kind, optional: bool) -> Any:
    """Check ``value`` against the declared type of ``key``; return it converted if safe.

    YAML 1.1 (PyYAML) reads ``1e-3`` as a string, so floats are parsed deliberately; ints
    are accepted where floats are expected; bools are never taken for numbers.
    """
    if value is None:
        if optional or kind is object:
            return None
        raise ConfigError(f"{key}: null is not allowed (expected {_type_name(kind)})")
    if isinstance(kind, tuple):  # choices
        if isinstance(value, bool):  # YAML 1.1 reads no/yes/off/on as booleans
            for word in (("yes", "on", "true") if value else ("no", "off", "false")):
                if word in kind:
                    return word
        if value in kind and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: {value!r} is not allowed; choose {_type_name(kind)}")
    if kind is object:
        return value
    if kind is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        number = None
        if isinstance(value, (int, float)):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(number):  # nan / inf pass every `x > 0` style check unnoticed
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if kind is list:
        if isinstance(value, (list, tuple)):
            return list(value)
        raise ConfigError(f"{key}: expected a list like [1, 2], got {value!r}")
    if kind is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if not isinstance(value, kind):
        raise ConfigError(f"{key}: expected {_type_name(kind)}, got {value!r}")
    return value


# The errors collected by `collect_errors` (None: `check` and `report` raise at once).
_collected: list | None = None


def report(error: ConfigError) -> None:
    """Raise ``error``, or keep it for the surrounding ``collect_errors`` block."""
    if _collected is None:
        raise error
    _collected.append(error)


@contextlib.contextmanager
def collect_errors():
    """Run a block of checks and raise one ConfigError listing every failed one (one line,
    ``; ``-separated), so a config with several mistakes needs one start, not one per mistake.

    ``check`` and ``report`` inside the block record instead of raising; a ConfigError raised
    directly ends the block and is listed too. Any other exception after a recorded failure is
    taken as a consequence of it (a later check reading the bad value) and dropped."""
    global _collected
    outer, _collected = _collected, []
    errors = _collected
    try:
        yield
    except ConfigError as e:
        errors.append(e)
    except Exception:
        if not errors:
            raise
    finally:
        _collected = outer
    if len(errors) == 1:
        raise errors[0]
    if errors:
        unique = list(dict.fromkeys(str(e) for e in errors))
        raise ConfigError(f"{len(unique)} problems: " + "; ".join(unique))


def merge(cfg: dict, updates: dict, types: dict, origin: str) -> None:
    """Merge a nested ``updates`` dict into ``cfg`` in place, checking every key and type
    (inside ``collect_errors``, every bad key is reported, not only the first)."""
    for section, leaves in updates.items():
        if section not in cfg:
            report(ConfigError(f"{origin}: unknown section {section!r}; known sections: {', '.join(cfg)}"))
            continue
        if not isinstance(leaves, dict):
            report(ConfigError(f"{origin}: section {section!r} must be a mapping of keys to values"))
            continue
        for key, value in leaves.items():
            full = f"{section}.{key}"
            if full not in types:
                known = ", ".join(sorted(cfg[section]))
                report(ConfigError(f"{origin}: unknown key {full!r}; keys in {section!r}: {known}"))
                continue
            kind, optional = types[full]
            try:
                cfg[section][key] = coerce(full, value, kind, optional)
            except ConfigError as e:  # a bad value read from a file also names where it was read
                report(e if origin == "command line" else ConfigError(f"{e} (read from {origin})"))


_INT, _FLOAT, _TIMESTAMP = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float",
                            "tag:yaml.org,2002:timestamp")


class _DuplicateKeyError(yaml.YAMLError):
    """A mapping names the same key twice (raised while constructing; one line)."""


class ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` for config files and command-line values, with two YAML 1.1 traps
    closed:

    - a key (or section) given twice is an error naming it and both lines; PyYAML keeps the
      last one silently (a second ``train:`` section would drop the first);
    - tokens that YAML 1.1 reads as octal (``010`` -> 8) or sexagesimal (``1:30`` -> 90)
      integers or floats, and dates (``2024-01-01``), stay strings: ``output_dir: 010`` is the
      folder '010'. Decimal, ``0x`` and ``0b`` integers and decimal floats resolve as usual.
    """

    def construct_document(self, node):
        # The section of each second-level mapping, to name a duplicate key as section.key.
        self._config_root = node
        self._section_of = {}
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if isinstance(key_node, yaml.ScalarNode) and isinstance(value_node, yaml.MappingNode):
                    self._section_of[id(value_node)] = key_node.value
        return super().construct_document(node)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first_line: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` overrides on purpose
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    hash(key)
                except TypeError:
                    continue  # SafeConstructor reports the unhashable key itself
                line = key_node.start_mark.line + 1
                if key in first_line:
                    if node is getattr(self, "_config_root", None):
                        what = f"section {key!r}"
                    else:
                        section = getattr(self, "_section_of", {}).get(id(node))
                        what = f"key {f'{section}.{key}' if section is not None else key!r}"
                    raise _DuplicateKeyError(
                        f"duplicate {what} at lines {first_line[key]} and {line} (YAML would "
                        f"silently keep only the last one; merge them)")
                first_line[key] = line
        return super().construct_mapping(node, deep)


ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_INT, _FLOAT, _TIMESTAMP)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
ConfigLoader.add_implicit_resolver(  # PyYAML's int rule without octal 0[0-7]+ and base 60
    _INT, re.compile(r"""^(?:[-+]?0b[0-1_]+
                    |[-+]?(?:0|[1-9][0-9_]*)
                    |[-+]?0x[0-9a-fA-F_]+)$""", re.X), list("-+0123456789"))
ConfigLoader.add_implicit_resolver(  # PyYAML's float rule without base 60
    _FLOAT, re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?
                    |\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X), list("-+0123456789."))


def load_yaml_text(stream) -> Any:
    """Parse YAML text or a file object with ``ConfigLoader`` (see there)."""
    return yaml.load(stream, Loader=ConfigLoader)  # a SafeLoader subclass: no arbitrary objects


def read_yaml(path: str | os.PathLike, _chain: tuple = ()) -> dict:
    """Read a config file; ``_base_: other.yaml`` (relative to the file) is merged first.

    Duplicate keys or sections, a ``_base_`` that is not a file name and ``_base_`` cycles are
    ConfigErrors naming the file (and the lines or the cycle)."""
    path = Path(path)
    if not path.is_file():
        where = f" (the _base_ of {_chain[-1]})" if _chain else ""
        raise ConfigError(f"config file not found: {path}{where}")
    resolved = path.resolve()
    if resolved in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain[_chain.index(resolved):], resolved))
        raise ConfigError(f"{path}: _base_ cycle: {cycle}")
    with open(path) as f:
        try:
            data = load_yaml_text(f) or {}
        except _DuplicateKeyError as e:
            raise ConfigError(f"{path}: {e}") from None
        except yaml.YAMLError as e:
            mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
            where = f"{path}:{mark.line + 1}" if mark is not None else f"{path}"
            raise ConfigError(f"{where}: not valid YAML: {problem or e}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    base = data.pop("_base_", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{path}: _base_ must name a YAML file (a string, relative to this "
                          f"file), got {base!r}")
    merged = read_yaml(path.parent / base, (*_chain, resolved))
    for section, leaves in data.items():
        if isinstance(leaves, dict) and isinstance(merged.get(section), dict):
            merged[section].update(leaves)
        else:
            merged[section] = leaves
    return merged


def parse_override(text: str, example: str = "optim.lr=5e-4") -> dict:
    """``optim.lr=5e-4`` -> ``{"optim": {"lr": 5e-4}}`` (value parsed as YAML)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"override {text!r} must look like section.key=value, e.g. {example}")
    dotted, raw = text.split("=", 1)
    section, key = dotted.split(".", 1)
    try:
        value = load_yaml_text(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    return {section: {key: value}}


def override_example(spec: dict) -> str:
    """An override this spec accepts, for help texts and messages: ``optim.lr=5e-4`` where the
    spec has it (the training scripts), else its last section's first key at its default."""
    if "lr" in spec.get("optim", {}):
        return "optim.lr=5e-4"
    section = list(spec)[-1]
    key, leaf = next(iter(spec[section].items()))
    return f"{section}.{key}={json.dumps(leaf[0])}"


def check_unknown_flags(parser: argparse.ArgumentParser, argv: list[str], spec: dict) -> None:
    """A ``--name`` that is no option of ``parser`` is a ConfigError pointing to the config key
    of that name (``--epochs 3`` -> ``train.epochs=3``): DeiT's and timm's command lines use
    flags, these scripts use dotted keys. Abbreviations of real options are left to argparse."""
    options = [o for o in parser._option_string_actions if o.startswith("--")]
    for i, token in enumerate(argv):
        if token == "--":
            return
        if not token.startswith("--") or token == "--":
            continue
        flag, _, value = token.partition("=")
        if any(option.startswith(flag) for option in options):
            continue
        if not value and i + 1 < len(argv) and not argv[i + 1].startswith("-") and "=" not in argv[i + 1]:
            value = argv[i + 1]
        name = flag[2:].replace("-", "_")
        keys = [f"{section}.{name}={value or '...'}" for section, leaves in spec.items() if name in leaves]
        if keys:
            raise ConfigError(f"{flag} is not an option: config keys are set as section.key=value, "
                              f"here {' or '.join(keys)}")
        raise ConfigError(f"{flag} is not an option (see --help); config keys are set as "
                          f"section.key=value, e.g. {override_example(spec)}")


def format_help(spec: dict) -> str:
    lines = ["config keys (override with section.key=value; defaults shown):"]
    values, helps, types = split_spec(spec)
    for section, leaves in values.items():
        lines.append(f"\n  [{section}]")
        for key, value in leaves.items():
            full = f"{section}.{key}"
            kind, _ = types[full]
            lines.append(f"    {full} = {json.dumps(value)}  ({_type_name(kind)})")
            lines.append(f"        {helps[full]}")
    return "\n".join(lines)


def parse_config(spec: dict, argv: list[str] | None = None, description: str = "",
                 validate=None, add_arguments=None, base_layers=None,
                 other_sections_ok: bool = False, finalize=None) -> tuple[dict, argparse.Namespace]:
    """Parse ``--config``, ``--print-config`` and dotted overrides against ``spec``.

    Returns ``(cfg, args)``: the resolved nested dict of plain values and the parsed
    arguments (``args.print_config``; ``args.explicit_keys``, the dotted keys that --config or
    an override set). Precedence: defaults < ``base_layers(args)`` < ``--config`` < overrides.

    - ``add_arguments(parser)`` adds a script's own flags (evaluate.py's ``--ckpt``).
    - ``base_layers(args)`` returns ``[(origin, updates), ...]`` merged over the defaults
      before --config; their keys unknown to ``spec`` are skipped (a checkpoint's stored
      config may be older or newer than the code), their values are checked.
    - ``other_sections_ok`` lets a tool that needs only some sections read a script's full
      config file, skipping the sections it does not know.
    - ``finalize(cfg, explicit_keys)`` resolves defaults that depend on what was set
      explicitly (``data.build.finalize_data``: a generic dataset is subsampled only when
      data.imb_factor was set); the resolved values are what the run stores.
    - ``validate(cfg)`` may raise ConfigError for impossible combinations; it is not run with
      ``--print-config``.

    Every unknown key and bad value of the files and the command line is reported at once.
    Raises ConfigError naming the key(s); prints nothing itself.
    """
    example = override_example(spec)
    parser = argparse.ArgumentParser(
        description=description, epilog=format_help(spec),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML file with sections of overrides "
                        "(may name a `_base_` file to start from)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as YAML and exit (keys, types and ranges "
                             "are checked; checks needing files, such as the teacher, are not)")
    if add_arguments is not None:
        add_arguments(parser)
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help=f"dotted overrides applied after --config, e.g. {example}")
    argv = sys.argv[1:] if argv is None else list(argv)
    check_unknown_flags(parser, argv, spec)
    args = parser.parse_args(argv)
    cfg, _, types = split_spec(spec)
    args.explicit_keys = set()
    with collect_errors():
        for origin, updates in (base_layers(args) if base_layers is not None else []):
            known = {section: {k: v for k, v in (leaves or {}).items() if f"{section}.{k}" in types}
                     for section, leaves in updates.items() if section in cfg and isinstance(leaves, dict)}
            merge(cfg, known, types, origin)
        layers = []
        if args.config:
            updates = read_yaml(args.config)
            if other_sections_ok:
                updates = {k: v for k, v in updates.items() if k in cfg}
            layers.append((args.config, updates))
        for text in args.overrides:
            try:
                layers.append(("command line", parse_override(text, example)))
            except ConfigError as e:
                report(e)
        for origin, updates in layers:
            merge(cfg, updates, types, origin)
            args.explicit_keys |= {f"{s}.{k}" for s, leaves in updates.items()
                                   if isinstance(leaves, dict) for k in leaves}
    if finalize is not None:
        finalize(cfg, args.explicit_keys)
    if validate is not None and not args.print_config:
        with collect_errors():
            validate(cfg)
    return cfg, args


def print_config(cfg: dict) -> None:
    print(yaml.safe_dump(cfg, sort_keys=False), end="")


def load_config(spec: dict, argv: list[str] | None = None, description: str = "",
                validate=None, other_sections_ok: bool = False, actions: dict | None = None,
                finalize=None, smoke=None) -> dict:
    """``parse_config`` for a training script: a config error exits with status 2 and one
    line listing every key at fault; ``--print-config`` prints the YAML and exits.

    ``actions``: ``{"--flag": (help, fn)}``, flags that print something about the resolved
    config and exit 0 instead of training (``--print-schedule``). ``validate(cfg)`` runs before
    them and before ``--print-config``, as ``validate(cfg, files=False)``: the range checks,
    not those that read files (a teacher checkpoint). ``finalize``: see ``parse_config``.
    ``smoke``: ``(help, fn)``; adds ``--smoke``, where ``fn(cfg)`` turns the config into a
    quick end-to-end check and returns a line saying what it changed.
    """
    actions = actions or {}

    def add_arguments(parser):
        for flag, (help_text, _) in actions.items():
            parser.add_argument(flag, action="store_true", help=help_text)
        if smoke is not None:
            parser.add_argument("--smoke", action="store_true", help=smoke[0])

    try:
        cfg, args = parse_config(spec, argv, description, None, add_arguments=add_arguments,
                                 other_sections_ok=other_sections_ok, finalize=finalize)
        note = smoke[1](cfg) if smoke is not None and args.smoke else None
        chosen = [fn for flag, (_, fn) in actions.items() if getattr(args, flag.lstrip("-").replace("-", "_"))]
        printing = args.print_config or bool(chosen)
        if validate is not None:
            with collect_errors():
                validate(cfg, files=False) if printing else validate(cfg)
        if note and os.environ.get("RANK", "0") == "0":  # once, not per process
            print(note, file=sys.stderr if printing else sys.stdout, flush=True)
        for fn in chosen:
            fn(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    except ProjectError as e:  # a validate() that looked at a named file (a teacher checkpoint)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if args.print_config:
        print_config(cfg)
    if printing:
        sys.exit(0)
    return cfg


def with_defaults(section: dict, **defaults) -> dict:
    """A copy of a spec section with other defaults (help texts and types kept)."""
    out = dict(section)
    for key, value in defaults.items():
        out[key] = (value,) + tuple(section[key][1:])
    return out


def check(condition: bool, key: str, message: str) -> None:
    """Raise ConfigError naming ``key`` unless ``condition`` holds (inside ``collect_errors``:
    record it and go on)."""
    if not condition:
        report(ConfigError(f"{key}: {message}"))


def save_config(cfg: dict, path: str | os.PathLike) -> None:
    atomic_write_text(path, yaml.safe_dump(cfg, sort_keys=False))


# ----------------------------------------------------------------------------- files


_DISK_FULL = ("No space left on device", "Disk quota exceeded", "StorageFull")


def disk_full(error: BaseException | None) -> bool:
    """Whether ``error`` (or one it was raised from or during) says the disk or quota is full.
    torch's writer reports a failed write as a RuntimeError ("unexpected pos ...") raised while
    handling the file's OSError; safetensors' writer puts the OS message in its own."""
    import errno

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(error) for text in _DISK_FULL):
            return True
        error = error.__cause__ or error.__context__
    return False


def disk_full_error(path: str | os.PathLike, error: BaseException | None = None) -> DiskFullError:
    """The one line a write that ran out of space ends with, naming ``path``."""
    import shutil

    try:
        free = f", {shutil.disk_usage(Path(path).parent).free / 1e6:.0f} MB free now"
    except OSError:
        free = ""
    return DiskFullError(f"{path}: no space left on the device while writing it{free} (the "
                         f"previous complete files are kept); free some space and rerun the same "
                         f"command to resume")


def _atomic_write(path: str | os.PathLike, write) -> int:
    """Write through ``write(binary_file)`` to a temporary file in the same folder, fsync, then
    rename over ``path``: a kill at any moment leaves either the old complete file or the new
    complete one, never a truncated file under the final name (timm's habit, plus fsync).
    Returns the bytes written. A full disk is a DiskFullError naming ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        size = os.path.getsize(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
        return size
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if disk_full(e):
            raise disk_full_error(path) from None
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> int:
    return _atomic_write(path, lambda f: f.write(text.encode()))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> int:
    return _atomic_write(path, lambda f: f.write(data))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> int:
    """``torch.save`` atomically (see ``_atomic_write``); the bytes written."""
    import torch

    return _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_link(source: str | os.PathLike, path: str | os.PathLike) -> bool:
    """Make ``path`` a hard link to ``source`` (a temporary name, then a rename: atomic like
    the writes); False where that cannot be done (no file, no hard links on the filesystem).
    Safe because files are only ever replaced, never rewritten in place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.link")
    try:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.link(source, tmp)
    except OSError:
        return False
    os.replace(tmp, path)
    if os.path.lexists(tmp):  # rename(2) keeps both when they already named one file
        os.unlink(tmp)
    return True


def append_json_line(path: str | os.PathLike, record: dict) -> None:
    """One JSON object per line, DeiT's ``log.txt`` habit."""
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
    except OSError as e:
        if disk_full(e):
            raise disk_full_error(path) from None
        raise


def to_plain(obj: Any) -> Any:
    """Namespace, paths, tuples, numpy and torch values -> dicts, lists, str and Python numbers
    (JSON-safe and loadable with ``torch.load(weights_only=True)``)."""
    if isinstance(obj, argparse.Namespace):
        obj = vars(obj)
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, PurePath):
        return str(obj)
    if hasattr(obj, "tolist") and callable(obj.tolist):  # numpy scalars/arrays, tensors
        return obj.tolist()
    return obj


# ----------------------------------------------------------------------------- misc


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=Path(__file__).parent, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
