#!/usr/bin/python3
"""A Python application that imports its plugins only when asked: after the
restore, never before the dump. tests/apps.rs copies it to APP/main.py on
the "old host", next to APP/plugins/ (packages, nested packages, a data file,
bytecode compiled there), and runs

    python3 APP/main.py RUN

with channel.py beside it. It works in APP (its working directory) and answers on RUN/commands (see channel.py):
`loaded` (the plugin modules imported so far), `list` (the plugins found by
listing APP/plugins), `import NAME` (imports plugins.NAME and returns what
its run() says, and where its code came from).
"""
import importlib
import os
import pkgutil
import sys

import channel


def handle(word, arg):
    if word == "loaded":
        return sorted(name for name in sys.modules if name == "plugins" or name.startswith("plugins."))
    if word == "list":
        import plugins
        return sorted(m.name for m in pkgutil.iter_modules(plugins.__path__))
    if word == "import":
        module = importlib.import_module("plugins." + arg)
        return {"run": module.run(), "file": os.path.relpath(module.__file__)}
    raise ValueError("unknown command %r" % word)


def main(run):
    os.setsid()
    os.chdir(os.path.dirname(os.path.abspath(__file__)))
    channel.serve(run, handle)


if __name__ == "__main__":
    main(sys.argv[1])
