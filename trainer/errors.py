"""The one exception type for bad user input (flags, specs, regexes, paths, data)."""


class ConfigError(ValueError):
    """Bad input from the user: the message names the bad value and what would be valid.

    The CLI turns it into one line on stderr and exit status 2; library users get a
    `ValueError` they can catch.
    """
