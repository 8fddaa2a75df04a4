"""Wiro's published answers, kept as data: every answer of ours is compared with them for keys, order and types.

The task object and its outputs are the model page's "API Sample" (WSAMPLE, api-spec.md §1.5: the field list in
its order, with the sample's values and JSON types); the envelopes' key orders are the page's (Run, Detail, Kill,
Cancel: issue 12 item 3). Tool/* items follow Wiro's docs (WD models.md, api-spec.md §1.3, issue 12 item 4).
The page shows ``uuid`` truncated ("15bce51f-…"); a UUID of that form stands in for it.
"""

from __future__ import annotations

import json
from typing import Any

OUTPUT: dict[str, Any] = {
    "id": "3460563",
    "name": "0.png",
    "contenttype": "image/png",
    "parentid": "1151546",
    "uuid": "15bce51f-4a8b-4c2e-9d1a-6f0e2b7c8d9e",
    "size": "202472",
    "addedtime": "1734513813",
    "modifiedtime": "1734513813",
    "accesskey": "eDcCm5yyUfIvMFspTwww49OUfgXkQt",
    "foldercount": "0",
    "filecount": "0",
    "ispublic": 0,
    "expiretime": None,
    "url": "https://cdn1.wiro.ai/d3b1c5a2-6e7f4a8b-9c0d1e2f-3a4b5c6d-7e8f9a0b-1c2d3e4f-5a6b7c8d-9e0f1a2b/0.png",
}

TASK: dict[str, Any] = {
    "id": "534574",
    "uuid": "15bce51f-4a8b-4c2e-9d1a-6f0e2b7c8d9e",
    "name": "",
    "socketaccesstoken": "eDcCm5yyUfIvMFspTwww49OUfgXkQt",
    "parameters": {
        "inputImage": "https://api.wiro.ai/v1/File/mCmUTndwX3BUbyRCDUN5GZ2PRBqQqG/inputImage-6060136.png",
        "prompt": "Make a poster of these",
    },
    "debugoutput": "",
    "debugerror": "",
    "starttime": "1734513809",
    "endtime": "1734513813",
    "elapsedseconds": "6.0000",
    "status": "task_postprocess_end",
    "cps": "0.000585000000",
    "totalcost": "0.003510000000",
    "guestid": None,
    "projectid": "699",
    "modelid": "598",
    "description": "",
    "basemodelid": "0",
    "runtype": "model",
    "modelfolderid": "",
    "modelfileid": "",
    "callbackurl": "",
    "marketplaceid": None,
    "createtime": "1734513807",
    "canceltime": "0",
    "assigntime": "1734513808",
    "accepttime": "1734513808",
    "preprocessstarttime": "1734513808",
    "preprocessendtime": "1734513808",
    "postprocessstarttime": "1734513813",
    "postprocessendtime": "1734513813",
    "pexit": "0",
    "categories": json.dumps(["tool", "image-to-image", "image-editing"]),
    "outputs": [OUTPUT],
    "size": "202472",
}

RUN = {"errors": [], "taskid": "2221", "socketaccesstoken": "eDcCm5yyUfIvMFspTwww49OUfgXkQt", "result": True}
DETAIL = {"total": "1", "errors": [], "tasklist": [TASK], "result": True}
STOPPED = {"errors": [], "tasklist": [{**TASK, "status": "task_cancel", "outputs": []}], "result": True}

TASKSTAT = {"runcount": "12", "successcount": "11", "errorcount": "1", "lastruntime": "1734513807"}
TOOL: dict[str, Any] = {
    "id": "598",
    "title": "Seedream V4",
    "slugowner": "bytedance",
    "slugproject": "seedream-v4",
    "cleanslugowner": "bytedance",
    "cleanslugproject": "seedream-v4",
    "description": "Seedream 4.0 image generation and editing.",
    "seodescription": "Seedream 4.0 image generation and editing.",
    "categories": ["tool", "text-to-image"],
    "image": "",
    "computingtime": "6.0000",
    "tags": ["seedream"],
    "readme": "# Seedream",
    "samples": [],
    "dynamicprice": json.dumps([{"inputs": {}, "price": 0.03, "priceMethod": "cpr"}]),
    "cps": "0.000585000000",
    "approximatelycost": "0.003510000000",
    "taskstat": TASKSTAT,
}
PARAMETER: dict[str, Any] = {
    "id": "size",
    "type": "select",
    "label": "Size",
    "description": "",
    "default": "2048x2048",
    "required": False,
    "options": [{"label": "2048x2048 (1:1)", "value": "2048x2048"}],
    "min": "",
    "max": "",
    "step": "",
    "placeholder": "",
    "note": "",
}
TOOL_DETAIL_ITEM = {**TOOL, "parameters": [{"title": "Inputs", "items": [PARAMETER]}]}
TOOL_LIST = {"result": True, "errors": [], "total": "1", "tool": [TOOL]}
TOOL_DETAIL = {"result": True, "errors": [], "tool": [TOOL_DETAIL_ITEM]}
TOOL_EXPLORE = {"result": True, "errors": [], "explore": [{"id": "1", "title": "Models", "tools": [TOOL]}]}

#: Where our answer may hold another JSON type than the sample's: ``expiretime`` is null on the page and a unix
#: time string when this server keeps files for a limited time (the retention setting).
OTHER_TYPES = {"expiretime": (str,)}
#: Objects whose keys are the request's own (the echo of its parameters): types are compared, not keys.
FREE_FORM = {"parameters"}


def assert_like(answer: Any, sample: Any, where: str = "answer") -> None:
    """``answer`` has the sample's keys first, in its order (extensions may follow), and the same JSON types,
    down through nested objects and the first item of every list."""
    if isinstance(sample, dict):
        assert isinstance(answer, dict), f"{where}: {type(answer).__name__}, expected an object"
        keys = list(answer)
        assert keys[: len(sample)] == list(sample), f"{where}: keys {keys} do not start with {list(sample)}"
        for key, value in sample.items():
            if answer[key] is not None and key in OTHER_TYPES and isinstance(answer[key], OTHER_TYPES[key]):
                continue
            if key in FREE_FORM and isinstance(value, dict):
                assert isinstance(answer[key], dict), f"{where}.{key}: expected an object"
                for name in set(value) & set(answer[key]):
                    # One entry is a string, as on the page; several are an array (the page shows one).
                    if not (isinstance(answer[key][name], list) and len(answer[key][name]) > 1):
                        assert_like(answer[key][name], value[name], f"{where}.{key}.{name}")
                continue
            assert_like(answer[key], value, f"{where}.{key}")
        return
    if isinstance(sample, list):
        assert isinstance(answer, list), f"{where}: {type(answer).__name__}, expected an array"
        if sample and answer:
            for index, item in enumerate(answer):
                assert_like(item, sample[0], f"{where}[{index}]")
        return
    # bool is a subclass of int in Python, not in JSON: compare exact types.
    assert type(answer) is type(sample), f"{where}: {answer!r} is {type(answer).__name__}, sample {sample!r}"
