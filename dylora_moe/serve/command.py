"""``dylora serve``: its flags, and the run that loads the model and serves it (docs/serving.md).

Only :func:`add_parser` runs when the CLI builds its parser; torch, the model and the web
framework load in :func:`run`.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal

from ..errors import EXIT_STATUS_HELP, ConfigError

log = logging.getLogger(__name__)

DESCRIPTION = """Serve a model over an OpenAI-compatible HTTP API: POST /v1/completions, POST /v1/chat/completions
(when the tokenizer has a chat template), GET /v1/models, GET /health. Concurrent requests are batched
together (continuous batching, one KV cache), each routed once from its own prompt; every response carries
that gate in a "dylora" field. SIGTERM or Ctrl-C: stop taking requests, finish those in flight (at most
--drain_timeout seconds), exit 0."""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("serve", help="an OpenAI-compatible HTTP server for a mixture or a base model",
                                   description=DESCRIPTION, epilog=EXIT_STATUS_HELP)
    parser.add_argument("--model", required=True, metavar="REF",
                        help="a trained mixture (runs/RUN_ID/final or a checkpoint reference, as for dylora ckpt: "
                             "fetched and verified) or a base model (a local directory, a hub id, tiny-python-lm)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine "
                        "only; 0.0.0.0 listens on every interface: set --api_key then)")
    parser.add_argument("--port", type=int, default=8000, help="default: 8000")
    parser.add_argument("--api_key", default=os.environ.get("DYLORA_API_KEY"), metavar="KEY",
                        help="require 'Authorization: Bearer KEY' on /v1/ (default: env DYLORA_API_KEY; none: open)")
    parser.add_argument("--served_model_name", default=None, metavar="NAME",
                        help="the model name clients send and /v1/models lists (default: REF as given)")
    parser.add_argument("--max_batch_size", type=int, default=16, metavar="N",
                        help="sequences decoded together (a request with n choices takes n; default: 16)")
    parser.add_argument("--max_queue", type=int, default=64, metavar="N",
                        help="requests that may wait for a slot; more are refused with 503 (default: 64)")
    parser.add_argument("--drain_timeout", type=float, default=30.0, metavar="S",
                        help="on SIGTERM, how long in-flight requests may take to finish (default: 30)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch CPU threads (default: 1 for models under 100M parameters on CPU, else torch's)")
    return parser


def run(args: argparse.Namespace) -> int:
    for name, minimum in (("port", 0), ("max_batch_size", 1), ("max_queue", 0), ("threads", 1)):
        value = getattr(args, name)
        if value is not None and value < minimum or (name == "port" and value > 65535):
            raise ConfigError(f"--{name} {value} is invalid: give an integer >= {minimum}"
                              f"{' and <= 65535' if name == 'port' else ''}.")
    if args.drain_timeout < 0:
        raise ConfigError(f"--drain_timeout {args.drain_timeout} is invalid: give seconds >= 0.")
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        raise ConfigError(f"dylora serve needs the 'serve' extra ({err.name} is missing): "
                          "pip install fastapi uvicorn (the serve extra).") from err
    import torch

    model, tokenizer = load_model(args.model)
    if torch.cuda.is_available():
        model = model.to("cuda")
    from ..model.base import choose_threads

    threads = choose_threads(model, args.threads)
    if threads:
        torch.set_num_threads(threads)
    return serve(model, tokenizer, args.served_model_name or args.model, host=args.host, port=args.port,
                 api_key=args.api_key, max_batch_size=args.max_batch_size, max_queue=args.max_queue,
                 drain_timeout=args.drain_timeout)


def load_model(ref: str):
    """(model in eval mode, tokenizer) for any --model reference, as dylora generate loads it."""
    from ..generate.loading import load_for_inference

    model, tokenizer, _ = load_for_inference(ref, "dylora-serve")
    return model, tokenizer


def served_model(model, tokenizer, name: str):
    from .app import ServedModel

    config = getattr(model, "config", None)
    lm = model.base_model if hasattr(model, "routing") else model
    window = getattr(lm.config, "max_position_embeddings", None)
    info = {}
    if hasattr(model, "routing"):
        info = {"num_experts": model.num_experts, "shared_experts": config.shared_experts, "routing": config.routing,
                "top_k": config.top_k, "base_model": config.base_model_name_or_path,
                "layers": list(model.adapted_names)}
    return ServedModel(name, tokenizer, window, info)


def build(model, tokenizer, name: str, *, api_key: str | None = None, max_batch_size: int = 16,
          max_queue: int = 64):
    """(engine, app): the started engine and the ASGI app over it (tests serve it in-process)."""
    from .app import create_app
    from .engine import Engine

    engine = Engine(model, tokenizer, max_batch_size=max_batch_size, max_queue=max_queue).start()
    return engine, create_app(engine, served_model(model, tokenizer, name), api_key=api_key)


def serve(model, tokenizer, name: str, *, host: str, port: int, api_key: str | None, max_batch_size: int,
          max_queue: int, drain_timeout: float) -> int:
    import uvicorn

    engine, app = build(model, tokenizer, name, api_key=api_key, max_batch_size=max_batch_size, max_queue=max_queue)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # SIGTERM/SIGINT: refuse new requests at once, then uvicorn drains
            engine.drain()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, lifespan="off", access_log=False, log_level="warning",
                            timeout_graceful_shutdown=drain_timeout)
    server = Server(config)
    # uvicorn raises the signal it stopped for again once it is done; with these handlers that ends in exit 0
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    where = f"http://{host}:{port}"
    kind = f"a mixture of {model.num_experts} experts" if hasattr(model, "routing") else "a base model"
    log.info("starting: %s (%s) on %s/v1; SIGTERM or Ctrl-C stops it after the requests in flight (at most %gs)",
             name, kind, where, drain_timeout)
    try:
        server.run()
    except SystemExit:  # uvicorn's answer to an address it cannot bind (it logged why)
        pass
    finally:
        engine.stop(timeout=5)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:
        raise ConfigError(f"could not listen on {host}:{port} (in use, or not an address of this "
                          "machine): choose another --port or --host.")
    log.info("stopped")
    return 0
