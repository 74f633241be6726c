"""What every job shares: parsing ``--config FILE key=value ...`` into its config, writing
its results (with their provenance) and resolved config, and the distiller a run continues
from."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import yaml
from accelerate.utils import set_seed

from mend.config import config_data, from_dict, to_dict
from mend.core.backbones import process_state
from mend.core.config import MendConfig
from mend.core.distiller import IDENTITY, Distiller, read_config
from mend.errors import ConfigError, MendError
from mend.provenance import provenance, write_json
from mend.training.engine import check_launch, end_launch, load_device


class Recipe(NamedTuple):
    """One job: the config dataclass it reads, and the ``main(cfg)`` that runs it."""
    config: type
    main: Callable[[Any], Any]


def run(recipe: Recipe | Callable[[dict[str, Any]], Recipe], argv: Sequence[str] | None = None,
        prog: str | None = None) -> int:
    """Parse ``--config FILE key=value ...``, check the config, and call the recipe's main.

    ``recipe`` may instead choose the recipe from the config's keys (``mend finetune`` picks
    by ``method``); the YAML file is read once either way.
    """
    parser = argparse.ArgumentParser(prog=prog, description=_description(recipe))
    parser.add_argument("--config", help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=5e-5")
    args = parser.parse_args(argv)
    try:
        check_launch()  # before any model loads: a missing engine is named, with its install
        data = config_data(args.config, args.overrides)
        chosen = recipe if isinstance(recipe, Recipe) else recipe(data)
        cfg = from_dict(chosen.config, data)
        check_output_dir(cfg)
        result = chosen.main(cfg)
    except MendError as e:
        print(f"mend: error: {e}", file=sys.stderr)
        return 2
    end_launch()
    return 143 if getattr(result, "status", None) == "interrupted" else 0


def check_output_dir(cfg: Any) -> None:
    """Refuse an ``output_dir`` that is a file before any work, so no result is lost at the
    end of a run that cannot write it."""
    out = getattr(cfg, "output_dir", None)
    if out and Path(out).exists() and not Path(out).is_dir():
        raise ConfigError(f"output_dir={out} is a file; the results go into a directory. "
                          f"Choose another output_dir (the file was left as it is).")


def run_verb(verbs: dict[str, Recipe], argv: Sequence[str] | None, prog: str) -> int:
    """``PROG VERB --config FILE key=value ...``: the recipe named by the first word."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in verbs:
        what = f"unknown command `{args[0]}`" if args and not args[0].startswith("-") else \
            "name a command"
        print(f"usage: {prog} {{{','.join(verbs)}}} --config FILE [key=value ...]\n"
              f"{prog}: error: {what}; choose from {', '.join(verbs)}.", file=sys.stderr)
        return 0 if args[:1] in (["-h"], ["--help"]) else 2
    return run(verbs[args[0]], args[1:], prog=f"{prog} {args[0]}")


def _description(recipe) -> str:
    main = recipe.main if isinstance(recipe, Recipe) else recipe
    return (main.__doc__ or "").split("\n")[0]


def begin_distiller(cfg: Any) -> Distiller:
    """How a MEND training job begins (``cfg``: a stage's config): the seed first, since fresh
    placeholders and a fresh projection are random; the resolved config written; then the
    distiller, fresh or continued from ``cfg.init_from``."""
    set_seed(cfg.train.seed)
    write_config(cfg, cfg.output_dir)
    return load_distiller(cfg.model, cfg.init_from, load_device(cfg.model.llm_8bit))


def load_distiller(model: MendConfig, init_from: str | None, device: str) -> Distiller:
    """A fresh distiller, or one whose trainable weights come from a checkpoint."""
    if init_from is None:
        return Distiller.from_config(model, device=device)
    saved = read_config(init_from)
    differ = [f for f in IDENTITY if getattr(saved, f) != getattr(model, f)]
    if differ:
        raise ConfigError(
            f"init_from={init_from} was trained with different "
            + ", ".join(f"{f} ({getattr(saved, f)!r} there, {getattr(model, f)!r} here)"
                        for f in differ) + ". Make the model section match the checkpoint.")
    load_time = {k: v for k, v in to_dict(model).items() if k not in IDENTITY}
    return Distiller.from_pretrained(init_from, device=device, **load_time)


def write_results(cfg: Any, result: dict[str, Any], name: str = "results.json",
                  echo: Sequence[str] = ()) -> dict[str, Any]:
    """Add provenance to ``result`` and write it to ``cfg.output_dir/name`` (on the main
    process only), printing its ``echo`` keys as JSON; returns ``result``."""
    result["provenance"] = provenance(to_dict(cfg))
    if process_state().is_main_process:
        write_json(Path(cfg.output_dir) / name, result)
        if echo:
            print(json.dumps({k: v for k, v in result.items() if k in echo}, indent=1))
    return result


def write_config(cfg: Any, output_dir: str | Path) -> None:
    """Write the resolved config to ``output_dir/config.yaml``; warn when resuming a run
    whose saved config differs."""
    if not process_state().is_main_process:
        return
    path = Path(output_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    new = to_dict(cfg)
    if path.is_file():
        old = yaml.safe_load(path.read_text()) or {}
        changed = sorted(_diff(old, new))
        if changed:
            warnings.warn(f"{path} was written by a run with a different config (changed: "
                          f"{', '.join(changed)}); it is overwritten, and the run resumes from "
                          f"its checkpoints.", stacklevel=2)
    path.write_text(yaml.safe_dump(new, sort_keys=False))


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in old.keys() | new.keys()
                for d in _diff(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".")]
