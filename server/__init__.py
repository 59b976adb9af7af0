"""The HTTP server (aiohttp on uvloop): the OpenAI, TGI and feedback routes, admission, metrics,
and the ``mace`` command line."""
