"""The HTTP layer. It never touches tensors.

``app.py`` assembles the FastAPI application and ``run.py`` serves it; ``core/`` is what every API family
shares (settings, the runtime, admission, errors, the serving template, images in and out, metrics); each
API family has its own folder with its protocol models, rendering, serving class and routes: ``emu35/``
(Emu3.5's endpoints), ``openai/`` (OpenAI's image API), ``ops/`` (health, readiness, metrics, models,
records, the playground and offline docs).
"""
