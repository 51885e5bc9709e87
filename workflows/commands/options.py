"""Options shared by the ``geomask`` subcommands, declared once, and the config they resolve to.

As in ``rasterio.rio.options``: each shared flag is a decorator, so its name, type and meaning are the
same in every command that takes it; a command only words the help for what the flag applies to.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from geomask.config import Config, load_config, merge_overrides

F = TypeVar("F", bound=Callable[..., Any])


def config_option(help: str) -> Callable[[F], F]:
    """``-c/--config PATH``: a YAML file of settings (passed to the command as ``config_path``)."""
    return click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), help=help)


def overwrite_option(help: str) -> Callable[[F], F]:
    """``--overwrite``: replace existing outputs; without it an existing output is refused in one line."""
    return click.option("--overwrite", is_flag=True, help=help)


def device_option(help: str) -> Callable[[F], F]:
    """``--device``: the torch device (``auto``, ``cpu``, ``cuda``, ``cuda:N``)."""
    return click.option("--device", help=help)


def resolve_cli_config(config_path: str | None, overrides: dict[str, Any]) -> Config:
    """Load the YAML config and apply the command-line overrides that were given."""
    cfg = load_config(config_path)
    given = {k: v for k, v in overrides.items() if v is not None}
    return merge_overrides(cfg, given) if given else cfg
