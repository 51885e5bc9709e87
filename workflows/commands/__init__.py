"""One module per subcommand; ``ALL`` is what the CLI registers."""

from __future__ import annotations

import click

from workflows.commands.evaluate import evaluate
from workflows.commands.export_model import export_model
from workflows.commands.import_model import import_model
from workflows.commands.predict import predict
from workflows.commands.preview import preview
from workflows.commands.train import train

ALL: list[click.Command] = [predict, evaluate, train, export_model, import_model, preview]
