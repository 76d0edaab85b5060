"""The shared core of the HTTP layer: settings, the runtime, admission, errors, the serving template,
images in and out, metrics, and what every family's routes share."""
