"""``tierlm serve``: the app under uvicorn, with a graceful exit.

On SIGTERM (or Ctrl-C) uvicorn stops accepting connections and waits for in-flight requests. They get
``shutdown_timeout_s`` to finish; one still running then ends with an error (an error event in a stream, a
503 otherwise) and its sequences are cancelled, so every response closes cleanly. Then the app's shutdown
stops the scheduler, and the process exits 0.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import uvicorn

from tierlm.errors import CheckpointError
from tierlm.serve.app import ServeOptions, create_app

log = logging.getLogger("tierlm.serve")

__all__ = ["ServeOptions", "serve"]


def serve(options: ServeOptions) -> int:
    """Run the server until SIGTERM/SIGINT; 0 after a graceful shutdown, 1 if the model failed to load."""
    if options.model is not None and not Path(options.model).exists():
        raise CheckpointError(f"{options.model} does not exist: pass a checkpoint folder (config.json + "
                              "*.safetensors), or nothing for the demo model")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if options.host not in ("127.0.0.1", "localhost", "::1") and options.api_key is None:
        log.warning("serving on %s without --api-key: anyone who can reach this address can use the model",
                    options.host)
    app = create_app(options)
    state = app.state.tierlm
    # uvicorn's own limit is the backstop: it cancels handler tasks that outlive our deadline by far.
    server = _Server(uvicorn.Config(app, host=options.host, port=options.port, log_level="info",
                                    timeout_graceful_shutdown=options.shutdown_timeout_s + 5))
    server.state = state

    def stop() -> None:
        server.should_exit = True

    state.on_fatal = stop
    # uvicorn re-raises the signal that stopped it once it is done, to exit "by" that signal; a graceful
    # shutdown is a success here, so the re-raised signal must find a handler that does nothing.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    return 1 if state.error else 0


class _Server(uvicorn.Server):
    state = None

    def handle_exit(self, sig, frame) -> None:
        engine = self.state.engine if self.state else None
        if engine is not None and engine.deadline is None:
            engine.drain(self.state.options.shutdown_timeout_s)
        super().handle_exit(sig, frame)
