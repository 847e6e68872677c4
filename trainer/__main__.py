"""``python -m trainer train --config ...``: the same commands as ``cxr train``."""

import typer

from trainer.cli import register

app = typer.Typer(help="cxr-screen trainer. Screening aid, not for clinical use.", no_args_is_help=True,
                  add_completion=False)
register(app)
app(prog_name="python -m trainer")
