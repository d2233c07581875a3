"""Serving: the inference engine, protocol adapters and the jupyter_server extension that exposes them.

    engine.py       one scheduler thread owns the model; queued requests decode in batches (batch.py, stops.py)
    state.py        what is served is decided in settings.json (ServingChoice: its one reader and writer)
    prepare.py      one path from a request to token ids, budget and sampling (HTTP and in-process)
    checkpoints.py  runs and LoRA checkpoints as serving sees them; best / latest / specific / off
    protocol.py     OpenAI, Refact caps and Tabby wire formats, request checks with clear errors
    upstream.py     GPT models with an OpenAI key, any OpenAI-compatible engine by URL (proxied)
    handlers.py     the HTTP API; extension.py starts the engine inside `refact-lab serve`
    client.py       reaching the engine from a kernel: over HTTP, or in-process without a server
    hosting.py      the Model hosting service; deploy.py the Deploy service (playground, IDE settings)

Importing this package is cheap: torch and transformers are imported inside the functions that use them.
"""
