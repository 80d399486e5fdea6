"""One error hierarchy for headstart. Each message names the fix.

The HTTP layer maps `http_status` to a JSON answer; jobs let these propagate so RQ records them.
"""


class HeadstartError(Exception):
    """Base class. `http_status` is what the HTTP layer answers when this escapes a request."""

    http_status = 500


class ConfigurationError(HeadstartError):
    """A setting is missing or malformed."""

    http_status = 500


class BadRequest(HeadstartError):
    """The request body is not what Label Studio sends."""

    http_status = 400


class UnsupportedLabelConfig(HeadstartError):
    """The labeling config has nothing headstart can serve."""

    http_status = 400


class MediaError(HeadstartError):
    """One task's media could not be fetched or decoded; other tasks are unaffected."""

    http_status = 422


class UnknownBackbone(HeadstartError):
    http_status = 400


class HeadMismatch(HeadstartError):
    """A stored head was trained for other classes than the labeling config now has."""

    http_status = 409


class NotEnoughLabels(HeadstartError):
    """Training was asked for, but the labels cannot support a head yet."""

    http_status = 409


class TrainingRunning(HeadstartError):
    """A project's training holds its run lock, so what needs the project to itself waits (its job retries)."""

    http_status = 409


class LabelStudioUnavailable(HeadstartError):
    """Label Studio's API could not be reached or refused the credentials."""

    http_status = 502


class StoreUnavailable(HeadstartError):
    """Redis could not be reached."""

    http_status = 503


class UnknownModelClass(UnsupportedLabelConfig):
    """A <Choice predicted_values="..."> names a class the image backbone's ImageNet classifier does not have."""

    http_status = 400
