"""`lmforge serve RUN`: an OpenAI-compatible HTTP server with continuous batching and a playground page.

Needs the `serve` extra (FastAPI, uvicorn, prometheus-client): `pip install 'lmforge[serve]'`. The parts:
loop.py (the engine's thread and the metrics), app.py (routes, validation, response shapes), static/index.html
(the playground). Nothing here is imported by the rest of the package.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

from ..errors import UserError


def _require_extra():
    missing = []
    for module in ("fastapi", "uvicorn", "prometheus_client"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise UserError(f"serving needs {', '.join(missing)}: pip install 'lmforge[serve]'")


def serve_cli(args) -> int:
    _require_extra()
    import uvicorn

    from ..cpu import keep_freed_memory
    from ..runs import check_device
    from .app import create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port={args.port} must be in [0, 65535]")
    if args.max_body_bytes < 1024:
        raise UserError(f"--max-body-bytes={args.max_body_bytes} must be at least 1024")
    api_key = args.api_key or os.environ.get("LMFORGE_API_KEY") or None
    if check_device(args.device).type == "cpu":  # the server owns its process: freed activations are reused
        keep_freed_memory()
    holder = {}

    def failed(error: BaseException):  # an engine could not be built (its Server logged why): stop
        if "server" in holder:
            holder["server"].should_exit = True

    if args.drain_seconds < 0:
        raise UserError(f"--drain-seconds={args.drain_seconds} must not be negative")
    app = create_app(args.runs, max_body_bytes=args.max_body_bytes, device=args.device, dtype=args.dtype,
                     checkpoint=args.checkpoint,
                     max_batch=args.max_batch, max_seq_len=args.max_seq_len, max_tokens_limit=args.max_tokens_limit,
                     max_queue=args.max_queue, api_key=api_key, compile=args.compile, model_names=args.model_name,
                     on_failure=failed, request_timeout=args.request_timeout, log_prompts=args.log_prompts,
                     max_connections=args.max_connections, client_timeout=args.client_timeout)
    if args.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        logging.getLogger("lmforge.serve").warning(
            "serving on %s without an API key: anyone who can reach this port can use the model", args.host)
    class Draining(uvicorn.Server):
        """uvicorn, with SIGTERM starting a drain (Server.drain) instead of closing the port at once; a second
        SIGTERM, or Ctrl-C, stops it as uvicorn would."""
        draining = False

        def handle_exit(self, sig, frame):
            if sig != signal.SIGTERM or self.draining:
                return super().handle_exit(sig, frame)
            self.draining = True

            def done():
                self.should_exit = True
            threading.Thread(target=app.state.served.drain, args=(args.drain_seconds, done, lambda: app.active),
                             name="lmforge-drain", daemon=True).start()

    server = holder["server"] = Draining(uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5,
        access_log=False))  # the request log (lmforge.serve.requests) says more, one JSON line each
    server.run()
    error = app.state.served.error
    return 1 if error is not None else 0
