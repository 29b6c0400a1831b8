"""The Litestar app: `create_app` builds the composition root (gateway/runtime.py) and mounts each
edge's routes; `app_from_env` is what `serve`'s workers run."""

from __future__ import annotations

import gc
import os

from litestar import Litestar
from litestar.di import Provide
from litestar.exceptions import HTTPException

from gateway.edges.answers import litestar_error, unexpected, with_request_id
from gateway.edges.fhir_routes import FhirController
from gateway.edges.healthcloud_routes import healthcloud_router
from gateway.edges.inbound import demo_credentials
from gateway.edges.service_routes import service_router
from gateway.operators.admin import admin_router
from gateway.runtime import Gateway
from gateway.settings import Settings, load_settings
from gateway.state.sealing import Sealer


def create_app(
    settings: Settings, *, extra_keys: dict[str, list[str]] | None = None, workers: int = 1,
    run_queue_workers: bool = True, sealer: Sealer | None = None,
) -> Litestar:
    """The gateway for `settings` (the options are `Gateway`'s)."""
    gateway = Gateway(settings, extra_keys=extra_keys, workers=workers, run_queue_workers=run_queue_workers,
                      sealer=sealer)
    app = Litestar(
        route_handlers=[FhirController, service_router(), admin_router(gateway.admin_deps()),
                        healthcloud_router(settings.file.healthcloud.path_prefix, gateway.healthcloud)],
        # the edges' parts, built once: handed to every handler that names them
        dependencies={"fhir": Provide(lambda: gateway.fhir, use_cache=True, sync_to_thread=False),
                      "service": Provide(lambda: gateway.service, use_cache=True, sync_to_thread=False)},
        exception_handlers={HTTPException: litestar_error, Exception: unexpected},
        after_request=with_request_id,
        # Litestar's lifespan hooks; as a lifespan context manager, close() ran inside the lifespan's
        # task group, where a cancelled background task could wait out the server's shutdown timeout
        on_startup=[gateway.start],
        on_shutdown=[gateway.close],
        request_max_body_size=settings.file.limits.max_body_bytes,
        logging_config=None,
        openapi_config=None,
        debug=False,
    )
    app.state.gateway = gateway
    app.state.breaker = gateway.breaker
    app.state.mllp_ports = gateway.mllp_ports  # source -> the port its MLLP listener bound
    return app


def _freeze_startup_objects() -> None:
    """What start-up built (modules, the app, compiled maps) lives as long as the process: frozen,
    the garbage collector's full passes skip it. Unfrozen, a full pass walked some 100,000 objects
    (about 50 ms with the event loop stopped), which showed as latency spikes. Only for `serve`'s
    workers: a test process builds many apps and should collect them."""
    gc.collect()
    gc.freeze()


def app_from_env() -> Litestar:
    """Entry point for `uvicorn --factory` workers: the serve command leaves everything in the
    environment (config folder, REDIS_URL, Salesforce connection or the sandbox's)."""
    from gateway.logs import configure

    configure()
    settings, extra = demo_credentials(load_settings(), os.environ)
    app = create_app(settings, extra_keys=extra, workers=int(os.environ.get("EHR_GATEWAY_WORKERS", "1")))
    app.on_startup.append(_freeze_startup_objects)  # after the app's own start-up
    return app
