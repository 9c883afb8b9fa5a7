"""Serving (Yang et al. §5: cost and latency in deployment): an OpenAI-compatible HTTP API
and a web chat page on lmlab's continuous-batching engine, so the `openai` client, curl,
a browser, and other tools that speak the protocol drive any lmlab-loadable model.

- `engine.py`: one model's scheduler stepped by its own thread, and the bridge to asyncio.
- `protocol.py`: the request bodies; `app.py`: the routes, errors and limits;
  `text.py`: streamed text that never shows half a character or a stop string;
  `metrics.py`: Prometheus text; `page.html`: the chat page; `server.py`: `lmlab serve`.
"""
