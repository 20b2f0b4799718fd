"""The one exception type users see."""


class BakeError(Exception):
    """An error a person can act on: the message says what is wrong and where.

    Anything else raised out of the engine is a bug and shows a traceback.
    """
