"""``/v1/Tool/*``: List, Detail and Explore over the models this server serves (``catalogue.py``)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from dreamserve.api.deps import ProjectDep, ServicesDep, read_fields, read_page, text_field
from dreamserve.dialects.wiro import render
from dreamserve.dialects.wiro.catalogue import SORTS, ModelFacts, Tool, catalogue, find_tool, select_tools, task_stats
from dreamserve.errors import NotFound
from dreamserve.presets import resolve

router = APIRouter()


async def _tools(services: ServicesDep) -> list[Tool]:
    facts = {}
    for slug, spec in services.settings.models.items():
        resolved = resolve(spec)
        facts[slug] = ModelFacts(resolved.source, resolved.licence, resolved.max_references)
    return catalogue(services.settings, facts, await task_stats(services.sessions))


def _list(fields: dict[str, list[Any]], name: str) -> list[str]:
    """A JSON array of strings, or repeated form fields (a single string is one entry)."""
    values: list[str] = []
    for value in fields.get(name, []):
        values.extend(str(v) for v in (value if isinstance(value, list) else [value]) if v is not None)
    return values


@router.post("/v1/Tool/List")
async def tool_list(request: Request, _: ProjectDep, services: ServicesDep) -> dict[str, Any]:
    """``{start, limit, search, sort: "id"|"relevance", order, categories, tags, slugowner, hideworkflows,
    summary}``; there are no workflows here, and items are the same with or without ``summary``."""
    fields = await read_fields(request, max_file_bytes=0)
    page = read_page(fields, SORTS, order="ASC")
    chosen = select_tools(
        await _tools(services),
        search=text_field(fields, "search")[:200],
        slugowner=text_field(fields, "slugowner")[:200],
        categories=_list(fields, "categories"),
        tags=_list(fields, "tags"),
        sort=page.sort,
        descending=page.descending,
    )
    return render.tool_list(chosen[page.start : page.start + page.limit], len(chosen))


@router.post("/v1/Tool/Detail")
async def tool_detail(request: Request, _: ProjectDep, services: ServicesDep) -> dict[str, Any]:
    fields = await read_fields(request, max_file_bytes=0)
    owner, project = text_field(fields, "slugowner"), text_field(fields, "slugproject")
    tool = find_tool(await _tools(services), owner, project)
    if tool is None:
        served = ", ".join(sorted(services.settings.models))
        raise NotFound(
            f"slug-owner-project-not-exist: {owner[:60]}/{project[:60]} is not served here. "
            f"Send slugowner and slugproject of one of: {served}."
        )
    return render.tool_detail(tool)


@router.post("/v1/Tool/Explore")
async def tool_explore(_: ProjectDep, services: ServicesDep) -> dict[str, Any]:
    return render.tool_explore(await _tools(services))
