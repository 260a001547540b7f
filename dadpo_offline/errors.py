"""Domain errors. The CLI turns every DadpoError into a one-line message and exit code 1."""


class DadpoError(Exception):
    """A problem the user can fix: the message says what is wrong and, where possible, what to run."""


class ManifestError(DadpoError):
    """A run manifest (or an override) is invalid."""


class InputError(DadpoError):
    """A prompt file or data set has bad content; the message names file, line and field."""


class ModelError(DadpoError):
    """A model reference cannot be resolved or loaded."""


class CacheError(DadpoError):
    """The cache directory is missing, not a cache, incomplete or corrupted."""


class TrainError(DadpoError):
    """Training cannot start or must stop: bad settings, a failed step-0 check, a non-finite step."""


class JudgeError(DadpoError):
    """The judge endpoint is unset, unreachable, refuses the request or replies with something unreadable."""
