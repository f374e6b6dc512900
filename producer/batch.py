"""`mcpq batch`: run a JSONL file of calls (placeholder until the batch runner lands)."""

from __future__ import annotations

import click


@click.command()
@click.argument("calls_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "out_file", required=True, type=click.Path(dir_okay=False), help="JSONL results file.")
def batch(calls_file: str, out_file: str) -> None:
    """Run every call in CALLS_FILE (JSONL) and write one result line per input line to --out."""
    raise click.ClickException("mcpq batch is not implemented yet")
