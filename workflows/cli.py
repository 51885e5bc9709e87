"""The ``geomask`` command: a thin click layer over the library and the Dask workflow.

Every :class:`~geomask.errors.GeomaskError` becomes one line on stderr and exit code 2; no traceback
for bad input.
"""

from __future__ import annotations

import logging
import sys

import click

from geomask.errors import GeomaskError

log = logging.getLogger("geomask")


def setup_logging(verbose: int, quiet: int) -> None:
    """Log geomask's own messages at INFO (-v: DEBUG, -q: WARNING); other libraries only from WARNING."""
    level = max(logging.DEBUG, logging.INFO + 10 * (quiet - verbose))
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for name in ("geomask", "workflows"):
        logging.getLogger(name).setLevel(level)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="geomask")
@click.option("-v", "--verbose", count=True, help="More log output (repeatable).")
@click.option("-q", "--quiet", count=True, help="Less log output (repeatable).")
def cli(verbose: int, quiet: int) -> None:
    """Map buildings or tree crowns in aerial GeoTIFFs as georeferenced polygons."""
    setup_logging(verbose, quiet)


def _register() -> None:
    from workflows import commands

    for command in commands.ALL:
        cli.add_command(command)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the CLI, turning geomask errors into exit code 2."""
    _register()
    try:
        cli.main(args=argv, prog_name="geomask", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("geomask: aborted", err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(2 if err.exit_code in (1, 2) else err.exit_code)
    except GeomaskError as err:
        click.echo(f"geomask: error: {err}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("geomask: interrupted; finished work in --run-dir is kept", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
