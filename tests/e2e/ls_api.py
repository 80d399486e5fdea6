"""The Label Studio API client of the end-to-end flows; the code lives in bench.ls_api (the `loop`
benchmark uses it too, and bench/ may not import tests/)."""

from bench.ls_api import LabelStudioApi, LabelStudioError  # noqa: F401
