"""User-facing errors: the CLI prints these as one line (no traceback) and exits with status 2."""


class UserError(Exception):
    """Bad input the user can fix: a config field, a file, a row of data."""


class ConfigError(UserError):
    pass


class DataError(UserError):
    pass


class CheckpointError(UserError):
    pass
