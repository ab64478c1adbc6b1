"""The HTTP service over a gallery (FastAPI on uvicorn)."""

from xbt.serve.app import ServeConfig, create_app, serve

__all__ = ["ServeConfig", "create_app", "serve"]
