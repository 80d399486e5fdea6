"""The admin's errors: part of headstart's one hierarchy, so the HTTP layer maps them like any other."""

from backend.common.errors import HeadstartError


class NotFound(HeadstartError):
    """A project, version, control, job or worker that does not exist (CLI exit 1)."""

    http_status = 404


class Refused(HeadstartError):
    """The action is understood but not allowed in the current state (CLI exit 1)."""

    http_status = 409
