"""Exception types for errors a user can cause; each message says what to fix."""


class SegframeError(Exception):
    """Base class of every error segframe raises on purpose."""


class ConfigError(SegframeError, ValueError):
    """A YAML file or config value is invalid."""


class PluginError(SegframeError):
    """A plugin is unknown, broken, or registered twice."""


class CheckpointError(SegframeError):
    """A checkpoint file is missing, unreadable, or does not fit the backbone."""
