"""`skin-offline serve`: a local OpenAI-compatible HTTP server (Chat Completions) and a web page.

Layout, one job per module:
- config.py      the server's settings, validated once (loopback / API key / CORS / limits)
- security.py    API key check (constant time), loopback test, Host check, file confinement
- schemas.py     pydantic request/response models with OpenAI's field names
- messages.py    OpenAI messages -> (image, history, question) in LLaVA's template order
- errors.py      one error shape ({"error": {message, type, param, code}}) and the exception mapping
- completions.py prepared request -> engine stream -> JSON response or SSE chunks
- middleware.py  pure-ASGI layers: request log (no patient data), Host check, auth, body limit
- metrics.py     Prometheus metrics (prometheus_client)
- app.py         routes (Starlette) and the server state
- server.py      socket binding, background model load, uvicorn, SIGTERM / Ctrl-C

The HTTP layer only translates; everything a request can be refused for is decided by `SkinVL.prepare`
(image, question, context, parameters) or by the schema, and every refusal is a 4xx in the one error shape.
Needs the `serve` extra (starlette, uvicorn, pydantic, prometheus_client).
"""
