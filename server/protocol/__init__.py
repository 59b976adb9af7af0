"""Wire types of the HTTP APIs as msgspec structs: what the server decodes and encodes, and what
the SDK decodes. Free of aiohttp and torch, so the client imports them alone."""
