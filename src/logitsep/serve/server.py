"""A served run: the app for a run folder and a serve folder, and uvicorn around it."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from ..classifier import SingleLogitClassifier
from ..core.extras import require
from .app import LOOPBACK_HOSTS, create_app
from .service import Service


def build(run: str | Path, index: str | Path, *, token: str | None = None, max_body: int = 8 << 20,
          device: str = "cpu", tasks: list | None = None, heartbeat: float = 15.0, score_cache_mb: int = 256,
          host: str | None = None) -> Any:
    """The FastAPI app serving ``run`` over the serve folder ``index``; bound to a loopback ``host``, it answers
    only requests addressed to a loopback name (DNS rebinding)."""
    classifier = SingleLogitClassifier.from_run(run, device=device)
    service = Service(classifier, index, score_cache=score_cache_mb << 20)
    allowed = LOOPBACK_HOSTS if host in LOOPBACK_HOSTS else None
    return create_app(service, token=token, max_body=max_body, heartbeat=heartbeat, tasks=tasks,
                      allowed_hosts=allowed)


def serve_forever(app: Any, host: str, port: int, log_level: str = "info") -> None:
    """Run uvicorn until SIGINT or SIGTERM, then release the service's index. uvicorn shuts down gracefully on
    either signal, then raises it again with the previous handlers: both become a KeyboardInterrupt, so that this
    returns normally (and a caller's clean-up, such as the demo's temporary index, runs)."""
    uvicorn = require("uvicorn")
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        from .protocol import GuardedH11Protocol

        # idle keep-alive connections close after 5 s, request heads must arrive within 5 s (the protocol's
        # deadline), its own 400s are JSON
        uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False, timeout_graceful_shutdown=2,
                    http=GuardedH11Protocol, timeout_keep_alive=5)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        app.state.service.close()
