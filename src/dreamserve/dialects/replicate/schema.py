"""The model and version objects of ``GET /v1/models/{owner}/{name}`` (and ``.../versions/{id}``), with the input
schema ``decode.py`` reads, in the OpenAPI form cog publishes (``components.schemas.Input`` and ``Output``)."""

from __future__ import annotations

from typing import Any

from dreamserve.dialects.replicate.decode import ASPECT_RATIOS, MAX_INPUT_IMAGES, MAX_SIDE, MIN_SIDE, SIZES
from dreamserve.request import MAX_TOTAL_IMAGES

#: The one version every served model answers with (Replicate's clients need a version id; this server has one).
VERSION = "dreamserve-seedream-4-v1"
VERSION_CREATED = "2025-09-09T00:00:00.000000Z"
#: A modern cog, so ``replicate.run`` returns the output as a list (cog < 0.3.9 meant an iterator).
COG_VERSION = "0.16.8"


def _input_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "title": "Input",
        "required": ["prompt"],
        "properties": {
            "prompt": {"type": "string", "title": "Prompt", "x-order": 0, "description": "Text prompt."},
            "image_input": {
                "type": "array",
                "items": {"type": "string", "format": "uri"},
                "title": "Image Input",
                "default": [],
                "maxItems": MAX_INPUT_IMAGES,
                "x-order": 1,
                "description": f"1-{MAX_INPUT_IMAGES} reference images (https, data URIs, this server's file URLs).",
            },
            "size": {"enum": list(SIZES), "type": "string", "title": "size", "default": "2K", "x-order": 2},
            "aspect_ratio": {
                "enum": list(ASPECT_RATIOS),
                "type": "string",
                "title": "aspect_ratio",
                "default": "match_input_image",
                "x-order": 3,
                "description": "Not used with size custom.",
            },
            **{
                side: {
                    "type": "integer",
                    "title": side.title(),
                    "default": 2048,
                    "minimum": MIN_SIDE,
                    "maximum": MAX_SIDE,
                    "x-order": order,
                    "description": "Only with size custom.",
                }
                for order, side in ((4, "width"), (5, "height"))
            },
            "sequential_image_generation": {
                "enum": ["disabled", "auto"],
                "type": "string",
                "title": "sequential_image_generation",
                "default": "disabled",
                "x-order": 6,
            },
            "max_images": {
                "type": "integer",
                "title": "Max Images",
                "default": 1,
                "minimum": 1,
                "maximum": MAX_TOTAL_IMAGES,
                "x-order": 7,
                "description": f"With sequential_image_generation auto; inputs + outputs <= {MAX_TOTAL_IMAGES}.",
            },
            "enhance_prompt": {
                "type": "boolean",
                "title": "Enhance Prompt",
                "default": True,
                "x-order": 8,
                "description": "Accepted, not applied: the prompt is used as written.",
            },
        },
    }


def openapi_schema() -> dict[str, Any]:
    output = {"type": "array", "items": {"type": "string", "format": "uri"}, "title": "Output"}
    return {
        "openapi": "3.0.2",
        "info": {"title": "Cog", "version": "0.1.0"},
        "paths": {},
        "components": {"schemas": {"Input": _input_schema(), "Output": output}},
    }


def version_object() -> dict[str, Any]:
    return {
        "id": VERSION,
        "created_at": VERSION_CREATED,
        "cog_version": COG_VERSION,
        "openapi_schema": openapi_schema(),
    }


def model_object(base_url: str, owner: str, name: str, run_count: int) -> dict[str, Any]:
    return {
        "url": f"{base_url}/v1/models/{owner}/{name}",
        "owner": owner,
        "name": name,
        "description": "Seedream 4.0 image generation and editing, served by dreamserve.",
        "visibility": "public",
        "github_url": None,
        "paper_url": None,
        "license_url": None,
        "run_count": run_count,
        "cover_image_url": None,
        "default_example": None,
        "latest_version": version_object(),
    }
