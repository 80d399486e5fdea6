"""A real Label Studio 1.23.2 for the end-to-end suite; the code lives in bench.label_studio (the
`loop` benchmark starts it too, and bench/ may not import tests/)."""

from bench.label_studio import (DEFAULT_VENV, FRESH_START_TIMEOUT_S, INSTALL_TIMEOUT_S,  # noqa: F401
                                LABEL_STUDIO_VERSION, LabelStudioCredentials, LabelStudioServer,
                                ensure_installed, installed_version)
