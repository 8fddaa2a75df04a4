"""fal's Seedream 4 apps (``fal-ai/bytedance/seedream/v4/text-to-image`` and ``.../edit``), on its queue and run
hosts: decode, render, routes."""
