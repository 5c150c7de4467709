"""YAML is data: safe_load, duplicate keys rejected, located errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import InputError


class _UniqueKeyLoader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    mapping: dict = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in mapping:
            raise InputError(f"duplicate key '{key}' at line {key_node.start_mark.line + 1}",
                             fix="each key may appear once")
        mapping[key] = loader.construct_object(value_node, deep=deep)
    return mapping


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping from `path`; any problem is an InputError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise InputError("file not found", file=path, fix="check the path")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 - SafeLoader subclass
    except InputError as err:
        raise err.at(file=path) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else None
        raise InputError(f"not valid YAML: {getattr(err, 'problem', err)}", file=path, field=where) from None
    except UnicodeDecodeError:
        raise InputError("not a UTF-8 text file", file=path) from None
    if not isinstance(data, dict):
        raise InputError("expected a YAML mapping at the top level", file=path)
    return data


def dump_yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=120)
