"""User-facing errors. The CLI prints these without a traceback."""


class WsimilError(ValueError):
    """An error caused by user input (files, tables, options), with a message that says how to fix it."""


def problems_error(title: str, problems: list[str], limit: int = 50) -> WsimilError:
    """Build one error that lists every problem found, so a user can fix them all in one pass."""
    shown = problems[:limit]
    lines = [f"{title} ({len(problems)} problem{'s' if len(problems) != 1 else ''}):"]
    lines += [f"  - {p}" for p in shown]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    return WsimilError("\n".join(lines))


def one_line_warnings() -> None:
    """Print every warning as one line, ``Warning: message`` (the CLI's format; Python's default adds the source
    file, line number and a line of code, which mean nothing to a user)."""
    import warnings

    def fmt(message, category, *args, **kwargs) -> str:
        kind = "" if category is UserWarning else f" ({category.__name__})"
        text = " ".join(str(message).split())
        return f"Warning{kind}: {text}\n"

    warnings.formatwarning = fmt
