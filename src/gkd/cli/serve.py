"""`gkd serve`: a teacher's top-k log-probs over HTTP (vLLM's API, plus a compact form)."""

from __future__ import annotations

import os
import sys

from gkd.config import ServeConfig, build_config, parser_for


def run(argv: list[str]) -> None:
    from gkd.teacher.serve import TeacherServer

    p = parser_for(ServeConfig, "gkd serve", "Serve a teacher's top-k log-probs (vLLM's API, plus a compact form).")
    ns = vars(p.parse_args(argv))
    cfg = build_config(ServeConfig, {k: v for k, v in ns.items() if k != "config"}, ns.get("config"))
    cfg.api_key = cfg.api_key or os.environ.get("GKD_API_KEY", "")
    if not TeacherServer(cfg).serve_forever():
        # a forward still runs in the scoring thread: the interpreter's exit would wait for it, or abort
        # under it (torch's threads); its requests are answered, so leave now
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
