"""The command channel of the applications tests/apps.rs restores: a FIFO
RUN/commands the test writes `N WORD [ARG]` lines to, and a reply
RUN/reply-N.json per line, `{"result": ...}` or `{"error": "Type: message"}`
(an application's error is an answer too: the test decides what it means).
RUN stays on the host; the FIFO is open (read-write) across the dump, so a
restored application answers on it again.
"""
import json
import os


def serve(run, handle):
    """Makes RUN/commands, writes RUN/ready, then answers each line with
    handle(word, arg) for ever."""
    path = os.path.join(run, "commands")
    os.mkfifo(path)
    fifo = os.open(path, os.O_RDWR)
    open(os.path.join(run, "ready"), "w").close()
    pending = b""
    while True:
        pending += os.read(fifo, 4096)
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            n, word, arg = (line.decode().split(" ", 2) + [""])[:3]
            try:
                reply = {"result": handle(word, arg)}
            except Exception as e:  # the test reads the error
                reply = {"error": "%s: %s" % (type(e).__name__, e)}
            tmp = os.path.join(run, "reply-%s.json.tmp" % n)
            with open(tmp, "w") as f:
                json.dump(reply, f)
            os.rename(tmp, os.path.join(run, "reply-%s.json" % n))
