"""The HTTP layer: the app factory, Label Studio's contract routes, the webhook, /admin routes, gunicorn."""
