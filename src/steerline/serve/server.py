"""Start a server: the artifacts checked, the vLLM engine built (`make_backend("vllm", ...)`,
the same engine `steerline generate --backend vllm` runs), the app bound to host:port by
uvicorn. `Server` runs it in the foreground (`run`, Ctrl-C stops) or in a thread (`start` /
`stop`, for tests and benches); either way the engine is shut down on the way out."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn

from steerline.backends import make_backend
from steerline.serve.app import Service, build_app
from steerline.serve.artifacts import ExpertDefaults, load_artifacts
from steerline.serve.engine import SteeredEngine
from steerline.serve.steering import BadRequest, ModelShape, parse_steering

DEFAULT_HOST = "127.0.0.1"  # loopback: exposing it is the user's explicit choice
DEFAULT_PORT = 8000
START_TIMEOUT_S = 60.0


@dataclass
class ServeConfig:
    model: str
    name: str | None = None  # the model id clients send (default: `model` as given)
    experts: str | None = None
    mat: str | None = None
    gate: str | None = None
    defaults: ExpertDefaults = field(default_factory=ExpertDefaults)
    dtype: str = "float32"
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT  # 0: a free port (Server.port says which)
    vllm_options: dict[str, Any] = field(default_factory=dict)  # to VLLMBackend
    # the `steering` of requests that send none (an evaluation harness that cannot add a field)
    default_steering: dict[str, Any] | None = None


class Server:
    """One model served over HTTP; a context manager that shuts everything down on exit."""

    def __init__(self, config: ServeConfig) -> None:
        if not Path(config.model).is_dir():
            raise FileNotFoundError(f"model directory {config.model} not found: run the "
                                    "build_models stage or pass --model DIR")
        arts = load_artifacts(config.model, config.experts, config.mat, config.gate,
                              config.defaults, config.dtype)
        self.backend = make_backend("vllm", config.model, dtype=config.dtype, progress=False,
                                    capture="hooks", **config.vllm_options)
        b = self.backend
        shape = ModelShape(b.moe_layers, b.n_experts, b.top_k)
        try:
            try:  # checked before serving, as every request's steering is
                parse_steering(config.default_steering, arts, shape)
            except BadRequest as err:
                raise ValueError(f"the default steering: {err}") from None
            self.engine = SteeredEngine(b)
        except BaseException:
            b.close()
            raise
        from steerline.model.load import load_tokenizer

        self.service = Service(self.engine, load_tokenizer(config.model), arts, shape,
                               config.name or config.model, b.max_context,
                               int(time.time()), config.default_steering)
        self.app = build_app(self.service)
        self._uvicorn = uvicorn.Server(uvicorn.Config(self.app, host=config.host,
                                                      port=config.port, log_level="warning",
                                                      lifespan="off"))
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (once started)."""
        return int(self._uvicorn.servers[0].sockets[0].getsockname()[1])

    def run(self) -> None:
        """Serve in the foreground until Ctrl-C / SIGTERM, then shut down."""
        try:
            self._uvicorn.run()
        finally:
            self.close()

    def start(self) -> Server:
        """Serve from a thread; returns once the socket listens."""
        self._thread = threading.Thread(target=self._uvicorn.run, name="steerline-serve-http",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.close()
                raise RuntimeError("the HTTP server did not start (is the port taken?)")
            time.sleep(0.02)
        return self

    def close(self) -> None:
        """Stop accepting requests, then the engine, then vLLM."""
        self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.engine.close()
        self.backend.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
