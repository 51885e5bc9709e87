"""The ``geomask`` command: a thin click layer over the library and the Dask workflow.

Every :class:`~geomask.errors.GeomaskError` becomes one line on stderr and exit code 2; no traceback
for bad input. Ctrl-C (exit 130) and SIGTERM (exit 143: what Slurm and Kubernetes send at a time limit
or an eviction) stop the job the same way: nothing more is submitted, finished tasks stay in
``--run-dir``, no output is written from unfinished work, and one line says so.
"""

from __future__ import annotations

import logging
import signal
import sys
from types import FrameType

import click

from geomask.errors import GeomaskError
from geomask.remote import configure_gdal
from workflows.exits import EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_USAGE, KEPT, JobStopped

log = logging.getLogger("geomask")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C so that the same clean-up runs."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated()


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
    set_options = configure_gdal()  # s3:// and https:// inputs: the AWS variables in GDAL's spelling, retries
    log.debug("GDAL options from the environment: %s", ", ".join(sorted(set_options)))  # names only: never values


def _register() -> None:
    from workflows import commands

    for command in commands.ALL:
        cli.add_command(command)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the CLI, turning geomask errors into exit code 2 and signals into one line.

    The command is invoked directly rather than through ``cli.main``: click turns Ctrl-C into ``Abort``
    after printing an empty line, and could not tell SIGINT from SIGTERM.
    """
    _register()
    signal.signal(signal.SIGTERM, _raise_terminated)
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        with cli.make_context("geomask", args) as ctx:
            cli.invoke(ctx)
    except click.exceptions.Exit as err:  # --help, --version
        sys.exit(err.exit_code)
    except click.exceptions.Abort:
        click.echo("geomask: aborted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except click.ClickException as err:
        err.show()
        sys.exit(EXIT_USAGE if err.exit_code in (1, 2) else err.exit_code)
    except GeomaskError as err:
        click.echo(f"geomask: error: {err}", err=True)
        sys.exit(EXIT_USAGE)
    except JobStopped as err:
        click.echo(f"geomask: {err}", err=True)
        sys.exit(err.exit_code)
    except Terminated:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM during the exit changes nothing
        click.echo(f"geomask: terminated (SIGTERM); {KEPT}", err=True)
        sys.exit(EXIT_TERMINATED)
    except KeyboardInterrupt:
        click.echo(f"geomask: interrupted; {KEPT}", err=True)
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
