"""The command lines' help layout (``mode-train``, ``mode-prepare``)."""
from __future__ import annotations

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description and epilog as written (the examples keep their lines), and each option's
    default once: appended unless the help already states it, the option is required, positional or
    a plain switch, or the default is empty (None, "", [])."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text.lower() or not action.option_strings or action.required
                or default is argparse.SUPPRESS or default in (None, "", [], ())
                or (action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction))):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


def docstring_text(doc: str) -> str:
    """A module docstring as help text: reST literals (double backticks) as plain words."""
    return doc.replace("``", "").strip()
