"""The one exception family edgeray raises for things a user can fix; the CLI prints these without a traceback."""


class EdgerayError(Exception):
    """Base class: the message alone tells the user what is wrong and what would be valid."""
