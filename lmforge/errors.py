"""The package's error type for user mistakes, so the CLI can tell them from bugs.

A UserError names the problem and the fix in one line; `lmforge VERB` prints it and exits with status 2. Anything
else that escapes is a bug and keeps its traceback. Both are ValueErrors (MissingFileError is also a
FileNotFoundError), so code calling the library can catch them as it always did.
"""


class UserError(ValueError):
    """A mistake in what the user asked for: a bad value, a bad combination, an unusable file."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist (or is not what it should be)."""
