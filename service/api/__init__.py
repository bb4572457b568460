"""The REST API under ``/v1``: dependencies, response schemas and routes."""
