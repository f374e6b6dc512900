"""Click option types shared by ``mcpq`` and ``mcpq batch``."""

from __future__ import annotations

from typing import Any

import click

from mcpq.worker.contract.numbers import seconds


class Seconds(click.ParamType):  # type: ignore[type-arg]
    """A click option in seconds, checked by the one rule (``contract/numbers.py``):
    ``inf``, ``nan``, negatives (and 0 where a deadline is meant) are usage errors."""

    name = "seconds"

    def __init__(self, allow_zero: bool = False) -> None:
        self.allow_zero = allow_zero

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        where = f"--{param.name.replace('_', '-')}" if param is not None and param.name else "value"
        try:
            return seconds(value, where, allow_zero=self.allow_zero)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


DEADLINE = Seconds()
WAIT = Seconds(allow_zero=True)
