"""`gkd models`: the supported model families and what works for each."""

from __future__ import annotations

import json

from gkd.config import _OneLineErrors


def run(argv: list[str]) -> None:
    from gkd.models import support

    p = _OneLineErrors(prog="gkd models", description="The supported model families and what works for each.")
    p.add_argument("--json", action="store_true", help="one JSON object per family instead of a table")
    a = p.parse_args(argv)
    print("\n".join(json.dumps(r) for r in support.rows()) if a.json else support.markdown())
