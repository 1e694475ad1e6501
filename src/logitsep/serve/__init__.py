"""``logitsep serve``: single-logit class search as a web service (FastAPI + uvicorn) with a live page.

- :mod:`.service`: the core without HTTP (decode/check images, embed once, store, search, score one logit);
- :mod:`.app`: the FastAPI app (JSON API with its OpenAPI schema, server-sent events, the page in ``static/``);
- :mod:`.demo`: the cached MNIST demo run and its steady feed of test images;
- :mod:`.main`: the command line (``add_arguments``, ``run``).

This package imports nothing heavy itself, so that ``logitsep --help`` stays fast.
"""
