"""Config files and path settings as the ``unet3d`` command reads them.

YAML is read as YAML defines it, with one rule more: a key written twice in one mapping is an error naming the file
and both lines (PyYAML would keep the last one silently). Keys brought in by a merge key (``<<: *defaults``) are not
written in the mapping, so an explicit key overrides them, as YAML's merge rules say. The same rules hold for
``--config`` files (:func:`check_config_files`), for YAML given as a value or nested config
(:func:`use_unique_key_yaml`), and for pytorch-3dunet's training config read by ``unet3d import-pytorch3dunet``
(:class:`UniqueKeyLoader`).

Paths in settings may hold ``$VAR``, ``${VAR}`` and a leading ``~`` (:func:`expand_path_setting`).

Example::

    yaml.load(text, Loader=UniqueKeyLoader)   # raises yaml.YAMLError on "a: 1\\na: 2"
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigurationError


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader that rejects a key given twice in one mapping (PyYAML keeps the last and drops the
    first)."""


_MERGE_TAG = "tag:yaml.org,2002:merge"


def _check_unique_keys(loader: yaml.SafeLoader, node: yaml.MappingNode) -> None:
    """Raise on a key written twice in ``node``. Keys brought in by a merge key (``<<: *defaults``) are not written
    in the mapping: an explicit key overrides them, as YAML's merge rules say; the merged mappings are checked on
    their own."""
    seen: dict[Any, int] = {}
    for key_node, value_node in node.value:
        if key_node.tag == _MERGE_TAG:
            merged = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
            for mapping in merged:
                if isinstance(mapping, yaml.MappingNode):
                    _check_unique_keys(loader, mapping)
            continue
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key '{key}' is given twice (lines {seen[key]} and {line}); keep one", key_node.start_mark
            )
        seen[key] = line


def _construct_unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    _check_unique_keys(loader, node)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def yaml_problem(err: yaml.YAMLError) -> str:
    """`` line N: problem`` of a YAML error, as the error lines name it (the line left out when YAML gives none)."""
    where = getattr(err, "problem_mark", None)
    line = f" line {where.line + 1}:" if where is not None else ""
    problem = getattr(err, "problem", None) or str(err).strip().splitlines()[0]
    return f"{line} {problem}"


def check_config_files(args: list[str]) -> None:
    """Check the files given with ``--config`` in ``args`` (the command line) before the parser reads them: an
    empty file, invalid YAML or a key given twice in one mapping each end with one ConfigurationError naming the
    file and line. A value that is no file (a YAML string, a missing file) is left to the parser's own message."""
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith("--config="):
            value = arg.split("=", 1)[1]
        else:
            continue
        path = Path(value)
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        try:
            content = yaml.load(text, Loader=UniqueKeyLoader)
        except yaml.YAMLError as err:
            raise ConfigurationError(f"config {value}:{yaml_problem(err)}") from None
        if content is None:
            raise ConfigurationError(
                f"config {value} is empty; give settings such as 'trainer:', 'model:' and 'data:' sections (see "
                "configs/demo.yaml), or leave out --config"
            )
        if not isinstance(content, dict):
            raise ConfigurationError(
                f"config {value}: holds a {type(content).__name__}, not 'key: value' settings (see configs/demo.yaml)"
            )


def unique_key_yaml_load(stream: str) -> Any:
    """jsonargparse's YAML value loader with the duplicate-key check (for nested config files and values)."""
    from jsonargparse._loaders_dumpers import get_yaml_default_loader

    loader = type("Loader", (get_yaml_default_loader(),), {})
    loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)
    value = yaml.load(stream, Loader=loader)
    if isinstance(value, dict) and value and all(v is None for v in value.values()):
        # jsonargparse reads "a, b" or "key:" given as a value as a string, not as a mapping of nulls.
        if len(value) == 1 and stream.strip() == next(iter(value)) + ":":
            return stream
        keys = set(stream.strip(" {}").replace(" ", "").split(","))
        if keys and keys == set(value):
            return stream
    return value


def use_unique_key_yaml() -> None:
    """Make jsonargparse read every YAML value and nested config file with :func:`unique_key_yaml_load`."""
    try:
        from jsonargparse import set_loader
    except ImportError:  # pragma: no cover - an old jsonargparse: the --config pre-check still runs
        return
    set_loader("yaml", unique_key_yaml_load, exceptions=(yaml.YAMLError,))


# Settings that name files or directories: environment variables and ~ in them are expanded.
PATH_SETTINGS = (
    "trainer.default_root_dir", "ckpt_path", "data.train_paths", "data.val_paths", "data.test_paths",
    "data.predict_paths", "data.label_paths", "prediction.output_dir", "checkpoint.dirpath",
)
# Python's os.path.expandvars rule for a variable: $name or ${name}.
_VARIABLE = re.compile(r"\$(\w+|\{[^}]*\})", re.ASCII)


def expand_path_setting(value: Any, key: str) -> Any:
    """``value`` (a path, a list of paths, or a mapping of them such as ``data.label_paths``) with ``$VAR``,
    ``${VAR}`` and a leading ``~`` expanded; an unset variable raises a ConfigurationError naming ``key``."""
    if isinstance(value, (list, tuple)):
        return type(value)(expand_path_setting(v, key) for v in value)
    if isinstance(value, Mapping):
        return {k: expand_path_setting(v, f"{key}.{k}") for k, v in value.items()}
    if not isinstance(value, (str, os.PathLike)):
        return value
    text = os.fspath(value)
    for match in _VARIABLE.finditer(text):
        name = match.group(1).strip("{}")
        if name and name not in os.environ:
            raise ConfigurationError(
                f"{key} {text!r}: the environment variable {name} is not set; set it (export {name}=...) or write "
                "the path out"
            )
    expanded = os.path.expanduser(os.path.expandvars(text))
    return expanded if isinstance(value, str) else type(value)(expanded)
