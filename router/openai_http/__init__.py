"""The OpenAI-compatible HTTP API: request bodies, responses, errors, routes, listener."""
