"""What the three console scripts share: library errors become one line without a traceback."""

from __future__ import annotations

import click

from maestro_data.errors import MaestroError, describe_os_error


class CleanErrors(click.Group):
    """Print library errors and failed file operations as one line without a traceback and exit non-zero."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MaestroError as exc:
            raise click.ClickException(str(exc)) from None
        except OSError as exc:
            raise click.ClickException(describe_os_error(exc)) from None
