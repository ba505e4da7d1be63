"""Self-contained HTML reports of training runs (:func:`wsimil.report.html.build_report`)."""

from wsimil.report.html import build_report

__all__ = ["build_report"]
