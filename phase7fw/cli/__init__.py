"""The command line (docs/architecture.md: the top layer). ``phase7fw = "phase7fw.cli:main"``."""

from phase7fw.cli.app import build_parser, main

__all__ = ["build_parser", "main"]
