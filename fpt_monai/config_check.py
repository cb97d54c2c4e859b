"""Refuse config overrides the bundle does not have, or values of the wrong type, before anything runs.

MONAI's ``ConfigParser`` accepts any override: ``--num_epoch 3`` (a typo) silently adds a new key and training
runs with the default ``num_epochs``; ``--batch_size abc`` fails only when the data loader is built, deep in a
traceback. :func:`check_overrides` compares overrides with the config files they apply to:

- the key must exist in the configs (``#``/``::`` paths, list indices in range), or be a new argument of an
  existing component (``--network_def#token_ratio 0.3``: an argument of its ``_target_``); otherwise the error
  names the key and suggests the closest existing one;
- a literal value must have the type of the literal it replaces (``int`` for an ``int``, ``int`` or ``float``
  for a ``float``, ``bool``, ``str``, ``list``, ``dict``), with the exceptions given in ``extra_types`` (e.g.
  ``pretrained`` takes ``true``/``false`` or a weights file path, ``image_reader#max_pixels`` a number or ``None``);
- a value must be one the key accepts (``value_checks``: ``num_epochs``, ``batch_size``, ``val_interval`` and
  ``image_reader#max_pixels`` at least 1, a positive finite ``learning_rate``, a ``preset`` that exists, a
  ``kv_dtype`` of the cache's storage dtypes, ``selection_map_images`` at least 0, ``mean``/``std`` of
  ``"dataset"`` or per-channel numbers, known ``conventions``, ``label_table`` split fractions in [0, 1),
  ``kernels`` one of the networks' paths);
- a top-level key holding a literal must be used by the configs (referred to as ``@key``): an override of a
  setting that nothing reads (e.g. ``--kv_dtype`` for a baseline, which preloads nothing) would have no effect.

Every bad override is reported in one :class:`ConfigOverrideError`.

Booleans: ``fire``, which parses ``monai.bundle``'s command line, turns the Python spelling ``False``/``True``
into a bool but leaves the JSON spelling ``false``/``true`` as text. ``pretrained`` takes both (the network
factories read the text ``"false"``/``"true"`` as the bool, see :func:`fpt_monai.weights.pretrained_argument`);
for the other boolean keys the text is refused, with the spelling to use.

What is checked and where: ``python -m monai.bundle run ...`` command lines (and their ``--args_file``), through
:func:`check_command_line` in the bundle's ``initialize`` list; ``fpt-monai demo --...`` overrides. Not checked:
overrides that are expressions or references (``"$..."``, ``"@..."``: their type is known only when they run),
values replacing an expression (e.g. ``--device cpu`` where the config has ``$torch.device(...)``), overrides
given to ``ConfigWorkflow``/``ConfigParser`` from Python (call :func:`check_overrides` yourself), and other
``monai.bundle`` commands. ``--check_overrides False`` turns the command-line check off.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import math
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from pydoc import locate
from typing import Any

from fire.parser import DefaultParseValue
from monai.bundle import ConfigParser
from monai.bundle.config_item import ComponentLocator

from fpt_monai.conventions import CONVENTIONS
from fpt_monai.data.normalization import DATASET
from fpt_monai.networks.cpu_kernels import KERNEL_MODES
from fpt_monai.preload.transform import STORAGE_DTYPES
from fpt_monai.presets import PRESETS

__all__ = [
    "BUNDLE_RUN_ARGUMENTS",
    "ConfigOverrideError",
    "check_command_line",
    "check_overrides",
    "command_line_overrides",
]

#: Arguments of ``monai.bundle run`` that are not config overrides.
BUNDLE_RUN_ARGUMENTS = (
    "run_id",
    "init_id",
    "final_id",
    "meta_file",
    "config_file",
    "logging_file",
    "tracking",
    "args_file",
)
#: Keys of the FPT bundle that accept more than the type of their default value.
FPT_EXTRA_TYPES: dict[str, tuple[type, ...]] = {"pretrained": (bool, str), "image_reader#max_pixels": (int, type(None))}


def _at_least_one(value: Any) -> str | None:
    return f"must be at least 1, got {value!r}" if isinstance(value, int) and value < 1 else None


def _at_least_zero(value: Any) -> str | None:
    return f"must be at least 0, got {value!r}" if isinstance(value, int) and value < 0 else None


def _positive_finite(value: Any) -> str | None:
    if isinstance(value, (int, float)) and not (math.isfinite(value) and value > 0):
        return f"must be a positive finite number, got {value!r}"
    return None


def _known_preset(value: Any) -> str | None:
    names = list(PRESETS)
    if not isinstance(value, str) or value in names:
        return None
    close = difflib.get_close_matches(value, names, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown preset {value!r} (the presets: {', '.join(names)}){hint}"


def _known_storage_dtype(value: Any) -> str | None:
    if not isinstance(value, str) or value in STORAGE_DTYPES:
        return None
    return f"unknown K/V storage dtype {value!r} (the storage dtypes: {', '.join(STORAGE_DTYPES)})"


def _statistics(value: Any) -> str | None:
    if value == DATASET:
        return None
    numbers = isinstance(value, (list, tuple)) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
    )
    return None if numbers and value else f"must be {DATASET!r} or a list of per-channel values, got {value!r}"


def _known_conventions(value: Any) -> str | None:
    if not isinstance(value, str) or value in CONVENTIONS:
        return None
    return f"unknown conventions {value!r} (one of: {', '.join(CONVENTIONS)})"


def _fraction(value: Any) -> str | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not 0 <= value < 1:
        return f"must be a fraction in [0, 1), got {value!r}"
    return None


def _known_kernels(value: Any) -> str | None:
    if not isinstance(value, str) or value in KERNEL_MODES:
        return None
    return f"unknown kernels {value!r} (the choices: {', '.join(KERNEL_MODES)})"


#: Checks of the values of the FPT bundle's keys (after the type check): value -> problem or ``None``.
FPT_VALUE_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "num_epochs": _at_least_one,
    "batch_size": _at_least_one,
    "val_interval": _at_least_one,
    "image_reader#max_pixels": _at_least_one,
    "learning_rate": _positive_finite,
    "preset": _known_preset,
    "kv_dtype": _known_storage_dtype,
    "selection_map_images": _at_least_zero,
    "conventions": _known_conventions,
    "mean": _statistics,
    "std": _statistics,
    "label_table#val_fraction": _fraction,
    "label_table#test_fraction": _fraction,
    "kernels": _known_kernels,
}
_SPECIAL_KEYS = ("_target_", "_disabled_", "_requires_", "_desc_", "_mode_")


class ConfigOverrideError(ValueError):
    """Overrides naming keys the config does not have, or values of the wrong type; ``problems`` lists them."""

    def __init__(self, message: str, problems: dict[str, str]) -> None:
        super().__init__(message, problems)  # both in args: the error pickles (multi-process runs)
        self.problems = problems

    def __str__(self) -> str:
        return str(self.args[0])


def _is_expression(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(("$", "@", "%"))


def _type_name(types: tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in types)


def _expected_types(default: Any) -> tuple[type, ...] | None:
    """The override types a literal default allows; ``None``: anything."""
    if default is None or _is_expression(default):
        return None
    if isinstance(default, bool):
        return (bool,)
    if isinstance(default, int):
        return (int,)
    if isinstance(default, float):
        return (int, float)
    if isinstance(default, str):
        return (str,)
    if isinstance(default, (list, tuple)):
        return (list, tuple)
    if isinstance(default, dict):
        return (dict,)
    return None


def _has_type(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool) and bool not in types:
        return False  # True is an int to Python, not to a config
    return isinstance(value, types)


def _resolve_target(target: str) -> Any:
    """The callable a component's ``_target_`` names (as ``ConfigComponent`` finds it), or ``None``."""
    if "." in target:
        return locate(target)
    module_name = ComponentLocator().get_component_module_name(target)
    if isinstance(module_name, list):
        module_name = module_name[0] if module_name else None
    if not module_name:
        return None
    return getattr(importlib.import_module(module_name), target, None)


def _argument_problem(component: Mapping, name: str) -> str | None:
    """Why ``name`` is not an argument of ``component``'s ``_target_`` (``None`` if it is, or unknown)."""
    if name in _SPECIAL_KEYS:
        return None
    target = component.get("_target_")
    if not isinstance(target, str) or _is_expression(target):
        return None
    try:
        function = _resolve_target(target)
        signature = inspect.signature(function) if function is not None else None
    except (ImportError, TypeError, ValueError):  # not importable here or no signature: do not guess
        return None
    if signature is None:
        return None
    parameters = signature.parameters
    if name in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return None
    names = [p for p in parameters if p != "self"]
    close = difflib.get_close_matches(name, names, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f" (it takes {', '.join(names)})"
    return f"{target} has no argument '{name}'{hint}"


def _is_referenced(config: Any, key: str) -> bool:
    """Whether any string of ``config`` refers to the top-level ``key`` (``@key``, ``@key#...``, ``$@key ...``)."""
    pattern = re.compile(rf"@{re.escape(key)}(?![\w])")
    stack = [config]
    while stack:
        node = stack.pop()
        if isinstance(node, str) and pattern.search(node):
            return True
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return False


def _override_problem(
    config: Any,
    key: str,
    value: Any,
    extra_types: Mapping[str, tuple[type, ...]],
    value_checks: Mapping[str, Callable[[Any], str | None]] | None = None,
) -> str | None:
    parts = [p for p in str(key).replace("#", "::").split("::")]
    node, path = config, []
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(node, dict) and part in node:
            node, path = node[part], [*path, part]
            continue
        if isinstance(node, list) and re.fullmatch(r"-?\d+", part) and -len(node) <= int(part) < len(node):
            node, path = node[int(part)], [*path, part]
            continue
        where = "::".join(path) or "the config"
        if isinstance(node, list):
            return f"'{where}' is a list of {len(node)} items; there is no item {part!r}"
        if isinstance(node, dict) and last and "_target_" in node:
            return _argument_problem(node, part)  # a new argument of a component
        if isinstance(node, dict):
            close = difflib.get_close_matches(part, [str(k) for k in node], n=1)
            hint = f"; did you mean '{'::'.join([*path, close[0]])}'?" if close else ""
            return f"'{where}' has no key '{part}'{hint}" if path else f"no such key{hint}"
        return f"'{where}' is a {type(node).__name__}, not a dict or list, so it has no '{part}'"
    if _is_expression(value):
        return None
    expected = extra_types.get("::".join(parts)) or _expected_types(node)
    if expected is not None and not _has_type(value, expected):
        if bool in expected and isinstance(value, str) and value.strip().lower() in ("true", "false"):
            spelled = value.strip().capitalize()
            return f"expects bool, got the text {value!r}: write {spelled} (the command line reads {value} as text)"
        return f"expects {_type_name(expected)} (the config has {node!r:.60}), got {type(value).__name__} {value!r:.60}"
    check = (value_checks or {}).get("::".join(parts))
    problem = check(value) if check is not None else None
    if problem:
        return problem
    unused = len(parts) == 1 and not parts[0].startswith("_") and not _is_referenced(config, parts[0])
    if unused and expected is not None:  # a literal setting that no component reads
        return f"has no effect: nothing in these configs refers to @{parts[0]}"
    return None


def check_overrides(
    config_file: str | os.PathLike | Sequence[str | os.PathLike],
    overrides: Mapping[str, Any],
    meta_file: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    extra_types: Mapping[str, tuple[type, ...]] | None = None,
    value_checks: Mapping[str, Callable[[Any], str | None]] | None = None,
) -> None:
    """Raise :class:`ConfigOverrideError` naming every override that the configs do not have, do not use,
    mistype, or give a value the key does not accept.

    Args:
        config_file: the config file(s) the overrides apply to, merged in order as ``monai.bundle`` does.
        overrides: ``{key: value}`` (``#`` or ``::`` separated keys), e.g. ``{"num_epochs": 3}``.
        meta_file: metadata file(s) for ``_meta_#...`` keys; by default ``metadata.json`` beside the first config
            file, when it exists.
        extra_types: key -> allowed types, beyond the type of the config's own value (default: the FPT bundle's,
            ``pretrained`` takes a bool or a path).
        value_checks: key -> function of the value returning a problem or ``None`` (default:
            :data:`FPT_VALUE_CHECKS`).
    """
    files = [str(f) for f in ([config_file] if isinstance(config_file, (str, os.PathLike)) else config_file)]
    parser = ConfigParser()
    parser.read_config(files)
    if meta_file is None:
        default_meta = Path(files[0]).parent / "metadata.json"
        meta_file = str(default_meta) if default_meta.is_file() else None
    if meta_file is not None:
        parser.read_meta(meta_file)
    config = parser.get()
    extra_types = FPT_EXTRA_TYPES if extra_types is None else extra_types
    extra = {str(k).replace("#", "::"): tuple(v) for k, v in extra_types.items()}
    value_checks = FPT_VALUE_CHECKS if value_checks is None else value_checks
    checks = {str(k).replace("#", "::"): v for k, v in value_checks.items()}
    problems = {}
    for key, value in overrides.items():
        if str(key).startswith("_meta_") and meta_file is None:
            continue  # metadata not read here: cannot tell
        problem = _override_problem(config, str(key), value, extra, checks)
        if problem:
            problems[str(key)] = problem
    if problems:
        lines = "\n".join(f"  --{key}: {problem}" for key, problem in problems.items())
        raise ConfigOverrideError(
            f"config overrides that do not fit the bundle's configs ({', '.join(files)}):\n{lines}\n"
            "Check the spelling and the value types (an intended new key: pass --check_overrides False).",
            problems,
        )


def _is_flag(token: str) -> bool:
    return token.startswith("--") or re.match(r"^-[a-zA-Z](=|$)", token) is not None


def command_line_overrides(argv: Sequence[str] | None = None) -> tuple[dict, dict] | None:
    """``(run arguments, overrides)`` of a ``python -m monai.bundle run ...`` command line, parsed as `fire`
    parses it; ``None`` for any other program or command.

    ``--args_file`` contents are merged in (the command line wins), as ``monai.bundle`` does.
    """
    argv = list(sys.argv if argv is None else argv)
    program = Path(argv[0]) if argv else Path()
    is_bundle_main = program.name == "__main__.py" and program.parent.parts[-2:] == ("monai", "bundle")
    if len(argv) < 2 or not is_bundle_main or argv[1] != "run":
        return None
    tokens = argv[2:]
    if "--" in tokens:  # what follows is for fire itself (--help, --trace, ...)
        tokens = tokens[: tokens.index("--")]
    positional, keyed = [], {}
    index = 0
    while index < len(tokens):
        token = tokens[index]
        if token.startswith("--") and len(token) > 2:
            name = token[2:]
            if "=" in name:
                name, raw = name.split("=", 1)
                index += 1
            elif index + 1 < len(tokens) and not _is_flag(tokens[index + 1]):
                raw, index = tokens[index + 1], index + 2
            else:
                raw, index = "True", index + 1
            keyed[name.replace("-", "_")] = DefaultParseValue(raw)
        else:
            positional.append(DefaultParseValue(token))
            index += 1
    arguments = dict(zip(BUNDLE_RUN_ARGUMENTS, positional))
    arguments.update({k: v for k, v in keyed.items() if k in BUNDLE_RUN_ARGUMENTS})
    overrides = {k: v for k, v in keyed.items() if k not in BUNDLE_RUN_ARGUMENTS}
    if arguments.get("args_file"):
        from_file = ConfigParser.load_config_file(arguments["args_file"])
        arguments = {**{k: v for k, v in from_file.items() if k in BUNDLE_RUN_ARGUMENTS}, **arguments}
        overrides = {**{k: v for k, v in from_file.items() if k not in BUNDLE_RUN_ARGUMENTS}, **overrides}
    return arguments, overrides


def check_command_line(enabled: bool = True, argv: Sequence[str] | None = None) -> None:
    """Check the overrides of the running ``python -m monai.bundle run`` command (see :func:`check_overrides`).

    Meant for a bundle's ``initialize`` list: ``"$fpt_monai.config_check.check_command_line(@check_overrides)"``.
    Does nothing when disabled, or when the process is not ``monai.bundle run`` (e.g. ``ConfigWorkflow`` used
    from Python).
    """
    if not enabled:
        return
    parsed = command_line_overrides(argv)
    if parsed is None:
        return
    arguments, overrides = parsed
    if not overrides or not arguments.get("config_file"):
        return
    check_overrides(arguments["config_file"], overrides, meta_file=arguments.get("meta_file"))
