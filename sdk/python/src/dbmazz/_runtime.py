"""Where the plugin runs: inside a component (componentize-py) or under plain CPython."""

import importlib.util

#: True inside a component built by componentize-py, False in CPython (tests).
IN_COMPONENT = importlib.util.find_spec("componentize_py_runtime") is not None
