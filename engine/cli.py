"""What every command line of the engine shares: bad input is one line and exit status 2."""

from __future__ import annotations

import argparse


class UsageError(Exception):
    """Bad command-line input: one line, exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one ``UsageError`` line instead of usage text."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see --help)")
