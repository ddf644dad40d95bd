"""One small error hierarchy; the CLI maps each class to an exit code and a one-line message."""


class SkinOfflineError(Exception):
    """Base class: the message is a complete, one-line explanation with what to do next."""

    exit_code = 1


class UsageError(SkinOfflineError):
    exit_code = 2


class ConfigError(UsageError, ValueError):
    """A configuration value out of range (sampling, beam search, quantization, ...): a usage error for the CLI
    (exit 2, one line), and still a ValueError for library callers that catch that."""


class ImageError(SkinOfflineError):
    """The image cannot be read or is not usable."""

    exit_code = 3


class PromptError(SkinOfflineError):
    """The question (or conversation) cannot be turned into a prompt."""

    exit_code = 3


class ContextLengthError(PromptError):
    """Prompt + requested new tokens exceed the model's context."""


class BundleError(SkinOfflineError):
    """The bundle is missing, incomplete, corrupt or from an unsupported schema."""

    exit_code = 4


class CheckpointError(SkinOfflineError):
    """The source checkpoint cannot be recognised or read (export time)."""

    exit_code = 4


class DeviceError(SkinOfflineError):
    """The requested execution device / provider is unavailable."""

    exit_code = 5


class EngineBusy(SkinOfflineError):
    """Every slot is busy and the waiting queue is full: retry later (HTTP 503 with Retry-After)."""

    exit_code = 1


class EngineClosed(SkinOfflineError):
    """The engine is shutting down and accepts no new requests."""

    exit_code = 1


class ConstraintError(UsageError):
    """A constraint (JSON schema, regex, choice, grammar) that cannot be used: names the field and the reason
    (HTTP 400; CLI exit 2). Never quotes the constraint's text beyond what the library's reason says."""
