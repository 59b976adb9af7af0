"""The wire protocol both sides share: the HTTP APIs' bodies as msgspec structs (``openai``,
``tgi``, ``feedback``) and the one SSE codec (``sse``). The server encodes and decodes with them,
the SDK decodes with them; neither imports the other. Free of aiohttp and torch."""
