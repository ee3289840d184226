"""What the benchmark scripts share: their report written as JSON and Markdown side by side."""

from __future__ import annotations

import json
from pathlib import Path


def write_report(prefix: str, result: dict, text: str) -> None:
    """Print the Markdown ``text``, write ``PREFIX.json`` (``result``) and ``PREFIX.md`` (``text``)."""
    print("\n" + text)
    out = Path(prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(text)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}", flush=True)
