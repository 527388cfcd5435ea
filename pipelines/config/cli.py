"""One command line for every job: ``--config RECIPE``, dotted ``key=value`` overrides, ``--print-config``.

Each job describes its configuration as a frozen dataclass. Its resolved value is, in order: the
dataclass defaults, the recipe's sections that the dataclass has fields for (a recipe such as
``recipes/embedded.yaml`` is shared by jobs, each takes what it knows), then the overrides, which
must name real keys. The one validation pass (types, ranges, the adapters' rank rule) runs here,
before the job takes any resource; argparse is left with what is not configuration (actions such
as ``--dry-run``, cluster addresses, output format).

    python jobs/distill_local.py steps=200 vsd.gen_lr=3e-4 --print-config
    python jobs/evaluate.py run model.uri=runs/x/export num_prompts=1000
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

import yaml

from wadi_core.config import ConfigError, field_help, from_dict, merge, parse_overrides, to_flat_dict, unflatten
from wadi_core.redact import redact

__all__ = ["RECIPES_DIR", "available_recipes", "read_recipe", "add_config_arguments", "load_job_config",
           "config_from_args", "format_config", "config_help", "format_config_help"]

T = TypeVar("T")

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"


def available_recipes() -> list[str]:
    """The recipe names in ``recipes/`` (what ``--config NAME`` accepts)."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def read_recipe(recipe: str) -> tuple[str, dict[str, Any]]:
    """A recipe (name in ``recipes/`` or a path to a .yaml file) -> (name, parsed mapping)."""
    path = Path(recipe)
    if path.suffix in (".yaml", ".yml") and path.exists():
        name = path.stem
    else:
        path = RECIPES_DIR / f"{recipe}.yaml"
        name = recipe
        if not path.exists():
            raise ConfigError(
                f"unknown recipe {recipe!r}: pass one of {available_recipes()} or a path to a .yaml file"
            )
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"recipe {where}: YAML syntax error ({problem}); fix the file") from None
    except OSError as e:
        raise ConfigError(f"cannot read recipe {path}: {e.strerror or e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a YAML mapping, got {type(data).__name__}")
    return name, data


def add_config_arguments(parser: argparse.ArgumentParser, default_recipe: str | None = None) -> None:
    """``--config``, ``--print-config`` and the positional ``KEY=VALUE`` overrides."""
    parser.add_argument("--config", default=default_recipe, metavar="RECIPE",
                        help=f"recipe name ({', '.join(available_recipes())}) or a YAML path"
                             + ("" if default_recipe else " (default: none, the job's own defaults)"))
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides of the job's config, e.g. vsd.gen_lr=3e-4 (see --print-config)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (YAML, each key with its description) and exit")
    parser.add_argument("--help-config", action="store_true",
                        help="list every config key with its default and description, and exit")


def load_job_config(cls: type[T], recipe: str | None = None, overrides: Sequence[str] | Mapping[str, Any] = (),
                    *, fixed: Mapping[str, Any] | None = None, check: Callable[[dict], None] | None = None,
                    whole_recipe: bool = False, preset: Mapping[str, Any] | None = None) -> T:
    """Defaults < the recipe's sections that ``cls`` has < ``preset`` (a job's named bundle of
    values, e.g. ``--budget smoke``) < ``overrides`` (< ``fixed``) -> validated ``cls``.

    Unknown override keys raise ``ConfigError`` with the valid keys; so do unknown recipe keys with
    ``whole_recipe`` (the job the recipe is written for: ``jobs/distill.py``). ``check`` sees the
    merged mapping before it is built (e.g. the adapters' rank rule, with config-key names).
    """
    data: dict[str, Any] = {}
    if recipe:
        name, recipe_data = read_recipe(recipe)
        names = {f.name for f in dataclasses.fields(cls)}
        data = dict(recipe_data) if whole_recipe else _known_keys(cls, recipe_data)
        if "recipe" in names:
            data.setdefault("recipe", name)
    if preset:
        data = merge(data, unflatten(dict(preset)))
    if not isinstance(overrides, Mapping):
        overrides = parse_overrides(list(overrides))
    data = merge(data, unflatten(dict(overrides)))
    if fixed:
        data = merge(data, unflatten(dict(fixed)))
    if check is not None:
        check(data)
    return from_dict(cls, data)


def _known_keys(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a shared recipe that ``cls`` has fields for, section by section (a recipe's
    ``tracking:`` for the Ray job may hold keys another job's ``tracking`` does not have)."""
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value, tp = data[f.name], hints[f.name]
        out[f.name] = _known_keys(tp, value) if dataclasses.is_dataclass(tp) and isinstance(value, Mapping) else value
    return out


def config_from_args(cls: type[T], args: argparse.Namespace, *, fixed: Mapping[str, Any] | None = None,
                     check: Callable[[dict], None] | None = None, whole_recipe: bool = False,
                     preset: Mapping[str, Any] | None = None) -> T:
    """``load_job_config`` on parsed arguments; a config error exits with status 2 and the message,
    ``--print-config`` prints the result and exits 0, ``--help-config`` lists the keys and exits 0."""
    if getattr(args, "help_config", False):
        print(format_config_help(cls))
        raise SystemExit(0)
    try:
        cfg = load_job_config(cls, args.config, args.overrides, fixed=fixed, check=check, whole_recipe=whole_recipe,
                              preset=preset)
    except ConfigError as e:
        print(redact(f"config error: {e}"), file=sys.stderr)
        raise SystemExit(2) from None
    if args.print_config:
        print(format_config(cfg))
        raise SystemExit(0)
    return cfg


def config_help(cls: type) -> dict[str, str]:
    """Dotted key -> one-line description, for every field of ``cls`` and of its nested sections."""
    hints = typing.get_type_hints(cls)
    helps = field_help(cls)
    out: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        section = _section_type(hints[f.name])
        if section is None:
            out[f.name] = helps[f.name]
        else:
            out[f.name] = helps[f.name] or (section.__doc__ or "").strip().split("\n")[0]
            out.update({f"{f.name}.{k}": v for k, v in config_help(section).items()})
    return out


def _section_type(tp: Any) -> type | None:
    """The dataclass of a nested section (``X`` or ``X | None``), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
    return inner[0] if inner else None


def format_config(cfg: Any) -> str:
    """The resolved config as YAML (URI user info redacted), in the override syntax's nesting, each
    key followed by its description as a comment (a recipe can be started from it)."""
    helps = config_help(type(cfg))
    lines: list[str] = []

    def emit(node: Mapping[str, Any], prefix: str, indent: str) -> None:
        for key, value in node.items():
            dotted = f"{prefix}{key}"
            note = f"  # {helps[dotted]}" if helps.get(dotted) else ""
            if isinstance(value, Mapping) and value and dotted in helps and _is_section(type(cfg), dotted):
                lines.append(f"{indent}{_yaml_key(key)}:{note}")
                emit(value, dotted + ".", indent + "  ")
            else:
                text = yaml.safe_dump({key: value}, default_flow_style=True, width=float("inf"), sort_keys=False)
                lines.append(f"{indent}{text.strip()[1:-1]}{note}")

    emit(redact(unflatten(to_flat_dict(cfg))), "", "")
    return "\n".join(lines)


def _is_section(cls: type, dotted: str) -> bool:
    """Whether ``dotted`` names a nested config section of ``cls`` (not a dict-valued setting)."""
    for part in dotted.split("."):
        hints = typing.get_type_hints(cls)
        section = _section_type(hints.get(part)) if part in hints else None
        if section is None:
            return False
        cls = section
    return True


def _field_defaults(cls: type, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> default, field by field (a class with required fields or a check that needs
    them, e.g. ``checkpoints=``, cannot be built with its defaults alone)."""
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        elif f.default is not dataclasses.MISSING:
            value = f.default
        elif _section_type(hints[f.name]) is not None:
            out.update(_field_defaults(_section_type(hints[f.name]), f"{prefix}{f.name}."))
            continue
        else:
            continue  # required: no default
        if dataclasses.is_dataclass(value):
            out.update(to_flat_dict(value, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = list(value) if isinstance(value, tuple) else value
    return out


def _yaml_key(key: str) -> str:
    return yaml.safe_dump(key, default_flow_style=True).split("\n")[0]


def format_config_help(cls: type) -> str:
    """Every key of ``cls`` with its default and description: what ``--help-config`` prints."""
    defaults = _field_defaults(cls)
    rows = []
    for key, text in config_help(cls).items():
        if _is_section(cls, key):
            rows.append(f"\n{key}: {text}")
        else:
            default = yaml.safe_dump(defaults[key], default_flow_style=True, width=float("inf")).split("\n...")[0].strip() \
                if key in defaults else "(required)"
            rows.append(f"  {key} = {redact(default)}\n      {text}")
    return "config keys (KEY=VALUE overrides; --print-config shows the resolved values):\n" + "\n".join(rows)
