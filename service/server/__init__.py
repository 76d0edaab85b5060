"""The HTTP layer: FastAPI app, settings, routes, serving classes, metrics. It never touches tensors."""
