"""The model catalogue behind ``Tool/List``, ``Tool/Detail`` and ``Tool/Explore``: one entry per served model.

Wiro's MCP server and WiroKit read a model's parameter schema before they run it, so each served slug is
described here with the parameters ``Run`` takes (api-spec.md §1.4) and this server's own task counts.
The records are typed; ``render.py`` renders them in Wiro's shapes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from sqlalchemy import case, func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from dreamserve.queue.db import Task
from dreamserve.request import MAX_REFERENCES, MAX_TOTAL_IMAGES
from dreamserve.settings import Settings
from dreamserve.sizes import PRESETS_2K
from dreamserve.status import Pexit, TaskStatus

CATEGORIES = ("tool", "text-to-image", "image-to-image", "image-editing")
TAGS = ("seedream", "image-generation", "image-editing", "multi-reference", "open-weights")
DESCRIPTION = "Seedream 4.0 compatible text-to-image and multi-reference editing on open weights."
SORTS = ("id", "relevance")


@dataclass(frozen=True)
class Option:
    label: str
    value: str


@dataclass(frozen=True)
class Parameter:
    """One entry of a model's parameter schema, in Wiro's terms (``type`` is Wiro's input kind)."""

    id: str
    type: str
    label: str
    description: str
    default: str = ""
    required: bool = False
    options: tuple[Option, ...] = ()
    min: str = ""
    max: str = ""
    step: str = ""
    placeholder: str = ""
    note: str = ""


@dataclass(frozen=True)
class ParameterGroup:
    title: str
    items: tuple[Parameter, ...]


@dataclass(frozen=True)
class ModelFacts:
    """What the catalogue says of a served model's weights (from ``models.resolve``, which the caller runs)."""

    source: str
    licence: str
    max_references: int


@dataclass(frozen=True)
class TaskStats:
    runcount: int = 0
    successcount: int = 0
    errorcount: int = 0
    lastruntime: float = 0.0
    #: Mean seconds on a worker of the successful tasks (0 when none yet).
    mean_seconds: float = 0.0


@dataclass(frozen=True)
class Tool:
    id: int
    slugowner: str
    slugproject: str
    title: str
    description: str
    categories: tuple[str, ...]
    tags: tuple[str, ...]
    readme: str
    cps: float
    parameters: tuple[ParameterGroup, ...]
    stats: TaskStats = field(default_factory=TaskStats)

    @property
    def slug(self) -> str:
        return f"{self.slugowner}/{self.slugproject}"

    def matches(self, search: str) -> int:
        """Relevance of a search text: 3 in the slug, 2 in the title, 1 in the description or tags, 0 none."""
        text = search.strip().lower()
        if not text:
            return 1
        if text in self.slug:
            return 3
        if text in self.title.lower():
            return 2
        return int(text in self.description.lower() or any(text in tag for tag in self.tags))


def seedream_parameters(max_references: int) -> tuple[ParameterGroup, ...]:
    """The schema of ``Run`` (api-spec.md §1.4): what an agent fills in before it calls the model."""
    used = "" if max_references >= MAX_REFERENCES else f" This server's model uses the first {max_references}."
    sizes = tuple(Option(f"{w}x{h} ({ratio})", f"{w}x{h}") for ratio, (w, h) in PRESETS_2K.items())
    return (
        ParameterGroup(
            "Inputs",
            (
                Parameter(
                    "prompt",
                    "textarea",
                    "Prompt",
                    "Please provide how many images you want to generate in the prompt. "
                    "Edit max images according to it.",
                    required=True,
                    placeholder="A poster of a red fox in the snow",
                ),
                Parameter(
                    "inputImage",
                    "combinefileinput",
                    "Input Image",
                    "Reference images: files, URLs, or mixed, in one repeated field (or a JSON array of URLs).",
                    note=f"Up to {MAX_REFERENCES} entries (files, URLs, or mixed).{used}",
                ),
                Parameter(
                    "size",
                    "select",
                    "Size",
                    "Output width x height.",
                    default="2048x2048",
                    options=sizes,
                    note="Also accepted: 1K, 2K, 4K and other WxH within the model's limits.",
                ),
                Parameter(
                    "maxImages",
                    "number",
                    "Max Images",
                    "How many images to generate.",
                    default="1",
                    min="1",
                    max=str(MAX_TOTAL_IMAGES),
                    step="1",
                    note=(
                        f"Number of input reference images + Number of generated must be smaller then or equal "
                        f"to {MAX_TOTAL_IMAGES}."
                    ),
                ),
                Parameter(
                    "watermark",
                    "select",
                    "Watermark",
                    "Add a visible watermark to the output.",
                    default="false",
                    options=(Option("false", "false"), Option("true", "true")),
                ),
            ),
        ),
    )


def catalogue(settings: Settings, facts: Mapping[str, ModelFacts], stats: Mapping[str, TaskStats]) -> list[Tool]:
    """Every served model, ids in slug order (stable while the configuration is)."""
    tools = []
    for number, slug in enumerate(sorted(settings.models), start=1):
        owner, _, project = slug.partition("/")
        resolved = facts[slug]
        readme = (
            f"# {slug}\n\n{DESCRIPTION}\n\nServed by dreamserve from `{resolved.source}` "
            f"(licence: {resolved.licence}). Run it with `POST /v1/Run/{slug}`; follow it with Task/Detail or "
            "the task socket."
        )
        tools.append(
            Tool(
                id=number,
                slugowner=owner,
                slugproject=project,
                title=project.replace("-", " ").title(),
                description=DESCRIPTION,
                categories=CATEGORIES,
                tags=TAGS,
                readme=readme,
                cps=settings.cost_per_second,
                parameters=seedream_parameters(resolved.max_references),
                stats=stats.get(slug, TaskStats()),
            )
        )
    return tools


async def task_stats(sessions: async_sessionmaker[AsyncSession]) -> dict[str, TaskStats]:
    """Counts of this server's tasks per model (every project): run, succeeded, failed, last run."""
    ended = Task.status == TaskStatus.POSTPROCESS_END
    succeeded = ended & (Task.pexit == Pexit.OK)
    query = select(
        Task.model,
        func.count(Task.id),
        func.sum(case((succeeded, 1), else_=0)),
        func.sum(case((ended & (Task.pexit != "0"), 1), else_=0)),
        func.max(Task.createtime),
        func.avg(case((succeeded, Task.postprocessendtime - Task.assigntime), else_=None)),
    ).group_by(Task.model)
    async with sessions() as session:
        rows = (await session.execute(query)).all()
    return {
        model: TaskStats(int(runs), int(ok or 0), int(failed or 0), float(last or 0), float(mean or 0))
        for model, runs, ok, failed, last, mean in rows
    }


def select_tools(
    tools: Sequence[Tool],
    *,
    search: str = "",
    slugowner: str = "",
    categories: Sequence[str] = (),
    tags: Sequence[str] = (),
    sort: str = "id",
    descending: bool = False,
) -> list[Tool]:
    """Tool/List's filters: search text, owner, any of the categories, any of the tags; then its order."""
    owner = slugowner.strip().lower()
    wanted, wanted_tags = _words(categories), _words(tags)
    chosen = [
        tool
        for tool in tools
        if tool.matches(search) and (not owner or tool.slugowner == owner) and _any_of(wanted, tool.categories)
        if _any_of(wanted_tags, tool.tags)
    ]
    if sort == "relevance":
        chosen.sort(key=lambda tool: (-tool.matches(search), tool.id))
        return chosen[::-1] if descending else chosen
    return sorted(chosen, key=lambda tool: tool.id, reverse=descending)


def _words(values: Sequence[str]) -> set[str]:
    return {value.strip().lower() for value in values if value.strip()}


def _any_of(wanted: set[str], have: Sequence[str]) -> bool:
    """No filter, or one of ``have`` is wanted."""
    return not wanted or bool(wanted & set(have))


def find_tool(tools: Sequence[Tool], slugowner: str, slugproject: str) -> Tool | None:
    slug = f"{slugowner.strip().lower()}/{slugproject.strip().lower()}"
    return next((tool for tool in tools if tool.slug == slug), None)
