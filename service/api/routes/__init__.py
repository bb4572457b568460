"""Route modules; ``api_router`` gathers the versioned ones (health probes stay outside /v1).

Every ``/v1`` route needs an API key (401), may be sent a body over the size limit (413) and
refuses a NUL character in any path, query or header value (422); each route adds its own.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends

from service.api.params import refuse_nul_characters
from service.api.routes.jobs import router as jobs_router
from service.api.routes.models import router as models_router
from service.api.routes.webhooks import router as webhooks_router
from service.api.schemas import error_responses

api_router = APIRouter(
    prefix="/v1",
    dependencies=[Depends(refuse_nul_characters)],
    responses=error_responses(401, 413, 422),
)
api_router.include_router(jobs_router)
api_router.include_router(models_router)
api_router.include_router(webhooks_router)
