"""``python -m wsimil.cli``."""

from wsimil.cli import app

app()
