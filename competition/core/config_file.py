"""Reading a run configuration: a YAML file (or a shipped config's name) plus dotted command-line overrides,
relative paths resolved, validated (``core.config``); an error names the key at fault and blames the override
that set it, or the file."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from smp_unet3p._names import did_you_mean

from .config import Config, ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"  # the shipped configs: competition/configs


def _fields_of(model: type[BaseModel], path: tuple[Any, ...]) -> list[str]:
    """Field names of the section at ``path`` (for suggestions)."""
    for part in path:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _format_errors(exc: ValidationError, source: str, overrides: list[str] = ()) -> ConfigError:
    """One line per problem: a key an override set is blamed on the override, the others on ``source``."""
    given, lines, rest = {item.partition("=")[0].strip(): item for item in overrides}, [], []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not str(p).startswith(("literal[", "function-")))
        key = ".".join(map(str, loc)) or "<top level>"
        text = (f"unknown key.{did_you_mean(str(loc[-1]), _fields_of(Config, loc[:-1]))}"
                if err["type"] == "extra_forbidden" else "required key is missing" if err["type"] == "missing"
                else f"{err['msg'].removeprefix('Value error, ')} (got {err.get('input')!r})")  # fmt: skip
        blame = next((v for k, v in given.items() if f"{key}.".startswith(f"{k}.")), None)
        (lines if blame else rest).append(f"override {blame}: {text}" if blame else f"{key}: {text}")
    rest = [f"invalid config {source}:\n  " + "\n  ".join(dict.fromkeys(rest))] if rest else []
    return ConfigError("\n".join(dict.fromkeys(lines + rest)))


def flat_params(raw: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"model": {"arch": "unet3plus"}}`` -> ``{"model.arch": "unet3plus"}`` (values as text)."""
    out: dict[str, str] = {}
    for key, value in raw.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out |= flat_params(value, f"{name}.")
        else:
            out[name] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return out


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``["train.epochs=3", "model.params.cgm=false"]`` applied to a nested dict (values parsed as YAML)."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not key.sub=value")
        parts = key.strip().split(".")
        node = raw
        for depth, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[: depth + 1])} is not a section")
        node[parts[-1]] = yaml.safe_load(text) if text.strip() else None
    return raw


# data keys holding a path, resolved against the config file's folder
PATH_KEYS = ("root", "annotations", "merge_map", "cache_dir", "image_dir", "mask_dir", "folds", "exclude")


def _resolve_paths(raw: dict[str, Any], base: Path) -> None:
    data = raw.get("data")
    if isinstance(data, dict):
        for key in PATH_KEYS:
            if isinstance(data.get(key), str):
                data[key] = str((base / os.path.expanduser(data[key])).resolve())
        if isinstance(data.get("extra"), list):
            data["extra"] = [
                str((base / os.path.expanduser(v)).resolve()) if isinstance(v, str) else v
                for v in data["extra"]
            ]
    raw.setdefault("output_dir", "runs")
    if isinstance(raw.get("output_dir"), str):
        raw["output_dir"] = str((base / raw["output_dir"]).resolve())
    weights = raw.get("model", {}).get("encoder_weights") if isinstance(raw.get("model"), dict) else None
    if isinstance(weights, str) and (os.sep in weights or weights.endswith((".pth", ".pt", ".safetensors"))):
        raw["model"]["encoder_weights"] = str((base / os.path.expanduser(weights)).resolve())


def config_from_dict(
    raw: dict[str, Any], overrides: list[str] | None = None, source: str = "<dict>", base: Path | None = None
) -> Config:
    """Validate a nested dict (+ overrides); relative paths are resolved against ``base`` (default: cwd)."""
    raw = apply_overrides(raw, overrides or [])
    _resolve_paths(raw, base or Path.cwd())
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise _format_errors(exc, source, overrides or []) from None


def find_config(name_or_path: str | os.PathLike) -> Path:
    """A YAML path, or the name of a shipped config (``unet3plus_r34`` -> ``competition/configs/...``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = CONFIG_DIR / f"{path.stem}.yaml"
    if shipped.is_file() and path.parent == Path("."):
        return shipped
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"config {name_or_path} not found.{did_you_mean(path.stem, names)} Shipped: {names}")


def merge_config(base: Mapping[str, Any], child: Mapping[str, Any]) -> dict[str, Any]:
    """``child`` over ``base``: sections (mappings) merge key by key, any other value replaces the base's."""
    out = copy.deepcopy(dict(base))
    for key, value in child.items():
        both = isinstance(value, Mapping) and isinstance(out.get(key), Mapping)
        out[key] = merge_config(out[key], value) if both else copy.deepcopy(value)
    return out


def read_config_file(path: str | os.PathLike, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML config's sections with its ``base:`` resolved: ``base: camvid_lite0`` (a shipped config's name,
    or a path relative to this file's folder) is read first and this file's keys merged over it
    (``merge_config``), so a recipe is written as its differences. Without a ``name`` of its own the file's
    stem is its name (not the base's, whose runs folder it would share). Bases may chain; a loop is an
    error."""
    path = find_config(path).resolve()
    if path in chain:
        raise ConfigError("config base loop: " + " -> ".join(str(p) for p in (*chain, path)))
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(raw).__name__}")
    if "base" not in raw:
        return raw
    base = raw.pop("base")
    raw.setdefault("name", path.stem)  # never the base's name: its runs folder would be shared
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{path}: base: give a shipped config's name or a YAML path, got {base!r}")
    relative = path.parent / os.path.expanduser(base)
    named = not (relative.is_file() or relative.suffix or os.sep in base)  # a shipped config's name
    try:
        parent = read_config_file(base if named else relative, (*chain, path))
    except ConfigError as exc:
        raise ConfigError(f"{path}: base {base!r}: {exc}") from None
    return merge_config(parent, raw)


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or a shipped config's name; its ``base:`` merged, ``read_config_file``), apply
    dotted overrides and validate."""
    source = find_config(path)
    return config_from_dict(read_config_file(source), overrides, source=str(source))
