"""Route modules; ``api_router`` gathers the versioned ones (health probes stay outside /v1)."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.routes.jobs import router as jobs_router
from service.api.routes.models import router as models_router

api_router = APIRouter(prefix="/v1")
api_router.include_router(jobs_router)
api_router.include_router(models_router)
