"""`moec serve`: an OpenAI-compatible HTTP server over the generation engine (docs/serving.md).

Starlette + uvicorn; request bodies validated with pydantic (moec.serve.protocol); the engine
runs on its own thread (moec.serve.runner) and the handlers only enqueue requests and stream
their tokens (moec.serve.openai_api); Prometheus metrics (moec.serve.metrics).

    from moec.serve import create_app
    app = create_app(moec.load("m.moec", max_batch=16))   # an ASGI app: uvicorn.run(app)
"""

from typing import Any

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:  # lazy: `moec --help` does not need starlette
    if name == "create_app":
        from moec.serve.app import create_app

        return create_app
    raise AttributeError(name)
