"""Where a setting may come from besides the TOML file: the environment, a file the environment names,
and systemd's credentials directory. So passwords, tokens and camera URLs need not be written into it.

Every key of the file has one environment name, derived from its dotted path: ``EDGE_AGENT_``, then the
path's parts joined by ``_``, upper-cased. ``mqtt.password`` is ``EDGE_AGENT_MQTT_PASSWORD`` (the names of
earlier versions are among these), ``rfid.mqtt.password`` is ``EDGE_AGENT_RFID_MQTT_PASSWORD`` and the
first camera's URL ``EDGE_AGENT_VISION_CAMERAS_0_URL``. A key's value is taken from, first found wins:

1. ``EDGE_AGENT_<KEY>``: the value itself;
2. ``EDGE_AGENT_<KEY>_FILE``: the path of a file holding it (the Docker and Compose secrets convention);
3. ``$CREDENTIALS_DIRECTORY/<dotted key>``, e.g. ``mqtt.password``: what systemd's ``LoadCredential=``,
   ``LoadCredentialEncrypted=`` or ``SetCredential=`` gave the service;
4. the TOML file.

A file's value is its content without one trailing newline (what ``echo`` and editors add). Giving both 1
and 2 for a key is an error: which one counts must not depend on a precedence rule. Only keys that hold one
value can be given (tables, arrays of values and maps cannot); entries of an array of tables can, when the
file has that entry: ``vision.cameras.0.url`` exists once the file has a first camera, whose other keys say
what it is. A variable named ``EDGE_AGENT_...``, or a credential, that is no key's is reported as a
warning, not ignored: ``EDGE_AGENT_RFID_MQTT_PASWORD`` would otherwise leave the reader broker without its
password, silently.

Why not pydantic-settings: it merges its sources before validation, so a bad value could no longer be
traced to the environment variable, file or credential that gave it (errors here name it, as file values
have their line); it knows no ``*_FILE`` variables; it does not report unknown variables; and its models
read the process environment whenever one is constructed, tests and tools included. What it would bring is
the name mapping and the secrets folder, which is the few lines below.
"""

from __future__ import annotations

import types
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel

PREFIX = "EDGE_AGENT_"
FILE_SUFFIX = "_FILE"
# Variables with the prefix that are not config keys (so not reported as unknown).
OTHER_VARIABLES = frozenset({"EDGE_AGENT_MODEL_CACHE"})  # edge_agent/vision/detector.py


def env_name(key: tuple[str, ...]) -> str:
    return PREFIX + "_".join(key).upper()


def _unwrap(annotation: Any) -> Any:
    """The type inside Annotated[...] and Optional[...]."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            args = [a for a in get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                return annotation
            annotation = args[0]
        else:
            return annotation


def _model(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def keys(model: type[BaseModel], data: Any) -> Iterator[tuple[str, ...]]:
    """Every key of one value that ``model`` has, given the file's ``data`` (for the entries of arrays)."""
    node = data if isinstance(data, Mapping) else {}
    for name, field in model.model_fields.items():
        annotation = _unwrap(field.annotation)
        origin = get_origin(annotation)
        if (sub := _model(annotation)) is not None:
            yield from ((name, *k) for k in keys(sub, node.get(name)))
        elif origin is list:
            item = _model(_unwrap(get_args(annotation)[0]))
            entries = node.get(name)
            for i, entry in enumerate(entries if isinstance(entries, list) and item is not None else []):
                yield from ((name, str(i), *k) for k in keys(item, entry))  # type: ignore[arg-type]
        elif origin not in (dict, set, tuple, frozenset):
            yield (name,)


def _read_value(path: Path) -> str:
    text = path.read_text(encoding="utf-8")
    return text[:-1] if text.endswith("\n") else text


class SourceProblem(Exception):
    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def apply(model: type[BaseModel], data: dict[str, Any], env: Mapping[str, str]) -> dict[str, str]:
    """Put the values the environment supplies into ``data``; returns {dotted key: where its value came
    from}. Raises SourceProblem for a key whose variable or file cannot be used."""
    creds = Path(env["CREDENTIALS_DIRECTORY"]) if env.get("CREDENTIALS_DIRECTORY") else None
    applied: dict[str, str] = {}
    for key in keys(model, data):
        dotted = ".".join(key)
        var = env_name(key)
        if var in env and var + FILE_SUFFIX in env:
            raise SourceProblem(dotted, f"both {var} and {var}{FILE_SUFFIX} are set; give one")
        try:
            if var in env:
                value, where = env[var], f"environment variable {var}"
            elif var + FILE_SUFFIX in env:
                file = Path(env[var + FILE_SUFFIX])
                where = f"file {file} ({var}{FILE_SUFFIX})"
                value = _read_value(file)
            elif creds is not None and (creds / dotted).is_file():
                where = f"credential {creds / dotted}"
                value = _read_value(creds / dotted)
            else:
                continue
        except (OSError, UnicodeDecodeError) as e:
            raise SourceProblem(dotted, f"cannot read the {where}: {getattr(e, 'strerror', None) or e}") from e
        if _put(data, key, value):
            applied[dotted] = where
    return applied


def _put(data: dict[str, Any], key: tuple[str, ...], value: str) -> bool:
    node: Any = data
    for part in key[:-1]:
        if isinstance(node, list):
            node = node[int(part)]
        elif isinstance(node, dict):
            node = node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            return False  # the file gives a value where a table belongs: validation says so
    if not isinstance(node, dict):
        return False
    node[key[-1]] = value
    return True


def unknown_sources(model: type[BaseModel], data: Any, env: Mapping[str, str]) -> list[str]:
    """The ``EDGE_AGENT_*`` variables, and the files of ``$CREDENTIALS_DIRECTORY``, that name no key of
    ``model`` (with this file's arrays), each said as a warning would say it."""
    ks = list(keys(model, data))
    known = {env_name(k) for k in ks}
    known |= {v + FILE_SUFFIX for v in known} | OTHER_VARIABLES
    out = [f"environment variable {v}" for v in sorted(env) if v.startswith(PREFIX) and v not in known]
    creds = Path(env["CREDENTIALS_DIRECTORY"]) if env.get("CREDENTIALS_DIRECTORY") else None
    if creds is not None and creds.is_dir():
        dotted = {".".join(k) for k in ks}
        out += [f"credential {p}" for p in sorted(creds.iterdir()) if p.name not in dotted]
    return out
