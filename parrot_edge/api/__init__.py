"""The HTTP API: OpenAI-compatible routes over the engine (app), request bodies (schemas), chat templates,
/metrics, and the `parrot-edge serve` command that starts it all (serve)."""
