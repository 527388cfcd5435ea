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
from typing import Any, Callable, Mapping, Sequence, TypeVar

from wadi_core.config import ConfigError, from_dict, merge, parse_overrides, to_flat_dict, unflatten

__all__ = ["add_config_arguments", "load_job_config", "config_from_args", "format_config"]

T = TypeVar("T")


def add_config_arguments(parser: argparse.ArgumentParser, default_recipe: str | None = None) -> None:
    """``--config``, ``--print-config`` and the positional ``KEY=VALUE`` overrides."""
    from pipelines.config import available_recipes

    parser.add_argument("--config", default=default_recipe, metavar="RECIPE",
                        help=f"recipe name ({', '.join(available_recipes())}) or a YAML path"
                             + ("" if default_recipe else " (default: none, the job's own defaults)"))
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides of the job's config, e.g. vsd.gen_lr=3e-4 (see --print-config)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


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
        from pipelines.config import read_recipe

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
    import typing

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
    ``--print-config`` prints the result and exits 0."""
    from pipelines.tracking import redact

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


def format_config(cfg: Any) -> str:
    """The resolved config as YAML (URI user info redacted), in the override syntax's nesting."""
    import yaml

    from pipelines.tracking import redact

    return yaml.safe_dump(redact(unflatten(to_flat_dict(cfg))), sort_keys=False).rstrip()
