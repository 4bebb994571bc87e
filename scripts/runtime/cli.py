"""Command-line guard for `python -m monai.bundle run`: reject override keys that no config defines, JSON spellings
(`true`, `false`, `null`) that the command line would pass on as text, and values of the wrong kind for a key whose
config default is a number or a true/false switch."""

# MONAI silently adds an unknown `--key value` pair as a new config entry, so a typo such as `--num_subject 5`
# would run with the default; this check turns it into a clear error.

from __future__ import annotations

import ast
import difflib
import inspect
import os
import sys
from collections.abc import Iterator, Sequence

from monai.bundle import ConfigParser, ConfigWorkflow
from monai.bundle import scripts as bundle_scripts
from monai.bundle.utils import DEFAULT_EXP_MGMT_SETTINGS


def _named_args(*functions: object) -> frozenset[str]:
    """The named parameters of `functions` (not self, *args or **kwargs)."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return frozenset(name for f in functions for name, p in inspect.signature(f).parameters.items()
                     if p.kind in kinds and name != "self")


# options of `monai.bundle run` itself (config_file, tracking, ...) and of the workflow it creates (workflow_type, ...)
RUN_ARGS = _named_args(bundle_scripts.run, bundle_scripts.create_workflow, ConfigWorkflow.__init__)
# ids renamed to the MONAI model-zoo ids that the bundle properties check: old id -> new id
RENAMED = {"prepared_dir": "dataset_dir", "latent_dir": "dataset_dir"}


def tracking_keys(tracking: str) -> set[str]:
    """The config keys that `--tracking <name or settings file>` adds and the command line may set: the "configs" of
    MONAI's settings (DEFAULT_EXP_MGMT_SETTINGS, e.g. mlflow's tracking_uri, experiment_name, run_name), less the
    handlers it patches in."""
    settings = DEFAULT_EXP_MGMT_SETTINGS.get(tracking) or ConfigParser.load_config_files(tracking)
    return set(settings["configs"]) - set(settings["handlers_id"])


def _ids(config: object, prefix: str = "") -> Iterator[str]:
    """Every id of a nested config, e.g. `network_def`, `network_def#channels`, `train#handlers#0`."""
    items = config.items() if isinstance(config, dict) else enumerate(config) if isinstance(config, list) else ()
    for key, value in items:
        cid = f"{prefix}{key}"
        yield cid
        yield from _ids(value, cid + "#")


def _cli_pairs(argv: Sequence[str]) -> dict[str, str]:
    """`--key value` and `--key=value` pairs of a `monai.bundle run` command line."""
    pairs, i = {}, 0
    while i < len(argv):
        token = argv[i]
        if token.startswith("--"):
            key, eq, value = token[2:].partition("=")
            if not eq and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value, i = argv[i + 1], i + 1
            pairs[key] = value
        i += 1
    return pairs


def _as_list(value: str) -> list[str]:
    """A `--config_file` value: one path, or a Python/JSON list of paths."""
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = value
    return [str(p) for p in parsed] if isinstance(parsed, (list, tuple)) else [str(parsed)]


def load_configs(pairs: dict[str, str]) -> dict:
    """The merged config files of a command line's `--config_file`."""
    return ConfigParser.load_config_files(_as_list(pairs["config_file"]))


def unknown_keys(argv: Sequence[str], config: dict | None = None) -> tuple[list[str], list[str]]:
    """(override keys of a `monai.bundle run` command line that no config file defines, all known keys); MONAI's run
    options and, with `--tracking`, its tracking settings' keys are known, and so is a key inside a meta config's
    `forward` section (e.g. `mar_def#width`): the stage's config has it."""
    pairs = _cli_pairs(argv)
    if "config_file" not in pairs:
        return [], []
    config = load_configs(pairs) if config is None else config
    known = set(_ids(config)) | RUN_ARGS | (tracking_keys(pairs["tracking"]) if "tracking" in pairs else set())
    forward = config.get("forward") if isinstance(config.get("forward"), dict) else {}
    return [k for k in pairs if k not in known and k.split("#")[0] not in forward], sorted(known)


def as_bool(value: object, key: str) -> bool:
    """A true/false setting: a bool, or the text `true`/`false` (any case) that `--key true` on the command line gives;
    ValueError naming the key for anything else."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError(f"--{key} must be true or false, got {value!r}")


# The command line (python-fire) reads Python literals: `--resume false` would arrive as the text 'false', which is
# true, and `--mar#time_budget_s null` as the text 'null'. A None value is dropped by `monai.bundle run` itself
# (update_kwargs ignores None), so `--mar#time_budget_s None` would leave the config's value; '$None' (an expression,
# quoted for the shell) sets None.
NONE_SPELLING = "'$None'"
MISREAD_VALUES = {"true": "True", "false": "False", "null": NONE_SPELLING, "None": NONE_SPELLING}


def misread_values(argv: Sequence[str]) -> list[str]:
    """`--key value` pairs whose value does not reach the config as meant (a JSON literal, read as text; None, which
    MONAI drops without a word), each with the spelling to use instead."""
    return [f"--{k} {v} (write --{k} {MISREAD_VALUES[v]})" for k, v in _cli_pairs(argv).items() if v in MISREAD_VALUES]


def _default(config: object, cid: str) -> object:
    """The value at id `cid` ("a#b#0") of a nested config, or None where there is none."""
    for part in cid.split("#"):
        if isinstance(config, dict) and part in config:
            config = config[part]
        elif isinstance(config, list) and part.isdigit() and int(part) < len(config):
            config = config[int(part)]
        else:
            return None
    return config


def _literal(value: str) -> object:
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return value  # python-fire passes it on as text


def kind_errors(argv: Sequence[str], config: dict) -> list[str]:
    """`--key value` pairs whose value is not of the kind of the key's config default: a number (int: a whole
    number), or True/False; keys with other defaults (text, lists, None, expressions) are not checked."""
    errors = []
    for key, text in _cli_pairs(argv).items():
        default, value = _default(config, key), _literal(text)
        if isinstance(value, str) and value[:1] in ("$", "@", "%"):
            continue  # an expression or reference: MONAI evaluates it
        if isinstance(default, bool):
            if not isinstance(value, bool):
                errors.append(f"--{key} takes True or False, got {text!r}")
        elif isinstance(default, (int, float)) and value is not None:
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number or (isinstance(default, int) and isinstance(value, float) and not value.is_integer()):
                kind = "a whole number" if isinstance(default, int) else "a number"
                errors.append(f"--{key} takes {kind} (default {default!r}), got {text!r}")
    return errors


def hint(key: str, known: Sequence[str]) -> str:
    """What to write instead of an unknown `--key`: the id that replaced a renamed one, else the closest known id."""
    if RENAMED.get(key) in known:
        return f" (renamed: use --{RENAMED[key]})"
    return "".join(f" (did you mean --{c}?)" for c in difflib.get_close_matches(key, known, n=1))


USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)
DEBUG_ENV = "CPGG_DEBUG"  # set to 1 for full tracebacks of user errors


def user_error(error: BaseException) -> BaseException | None:
    """The outermost user error (bad value, file, table or cine: USER_ERRORS) in `error`'s chain of causes, or None:
    below MONAI's RuntimeError wrappers, and above the OSError a clearer message of ours was raised from."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, USER_ERRORS):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def one_line_errors(kind: type, error: BaseException, trace: object) -> None:
    """sys.excepthook of a bundle run: a user error ends with one line `error: <its message>` (and exit status 1)
    instead of MONAI's nested tracebacks; other exceptions, or any with CPGG_DEBUG=1, print the full traceback."""
    cause = user_error(error)
    if cause is None or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        sys.__excepthook__(kind, error, trace)
        return
    message = " ".join(str(cause).split()) or type(cause).__name__
    print(f"error: {message} (set {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)


def check_overrides(argv: Sequence[str] | None = None) -> None:
    """Raise `ValueError` naming each unknown `--key` (with the id that replaced it or a close match, if any),
    JSON-literal value or value of the wrong kind (`kind_errors`), and make user errors of the run end in one line
    (`one_line_errors`). Only acts when the process is `python -m monai.bundle run ...`; inside other programs it does
    nothing."""
    argv = list(sys.argv if argv is None else argv)
    if not (argv and argv[0].replace("\\", "/").endswith("monai/bundle/__main__.py") and "run" in argv[1:2]):
        return
    sys.excepthook = one_line_errors
    literals = misread_values(argv[2:])
    if literals:
        raise ValueError(f"the command line takes Python literals, and None only as the expression {NONE_SPELLING} "
                         f"(monai.bundle run drops a None value): {', '.join(literals)}")
    pairs = _cli_pairs(argv[2:])
    config = load_configs(pairs) if "config_file" in pairs else {}
    bad, known = unknown_keys(argv[2:], config)
    if bad:
        hints = [f"--{k}{hint(k, known)}" for k in bad]
        raise ValueError(f"unknown config key(s) on the command line: {', '.join(hints)}; the config files define no such id")
    kinds = kind_errors(argv[2:], config)
    if kinds:
        raise ValueError(f"wrong kind of value on the command line: {'; '.join(kinds)}")
