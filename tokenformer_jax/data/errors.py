"""The one exception the data layer raises for bad input."""


class DataError(ValueError):
  """Bad data or a bad data setting: the message is one line saying what is wrong and what to do.

  Command-line mains catch it and print the message instead of a traceback.
  """
