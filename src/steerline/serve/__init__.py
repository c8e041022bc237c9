"""`steerline serve`: an OpenAI-compatible HTTP server on vLLM with steering per request.

    artifacts.py  what the server may apply (experts.json, a MAT-Steer checkpoint, prompt gates),
                  loaded and checked once at start
    steering.py   a request's `steering` object -> the backend's Steering plus what it applied
    engine.py     one thread drives vLLM's engine: requests with different steering share a batch
    app.py        the HTTP endpoints (/v1/models, /v1/chat/completions, /v1/completions, SSE)
    server.py     builds the engine and app and runs uvicorn (foreground, or a thread for tests)
"""
