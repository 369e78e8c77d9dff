#!/usr/bin/python3
"""reaper.py CMD ARG...: runs CMD as the child of a child subreaper that reaps
every orphan of CMD's tree (this machine's pid 1 does not), so the pids of a
dumped or killed tree are free again at once. Prints `pid N` once CMD is
started and `exit N` once it has ended (its exit code, or 128+signal), then
keeps reaping until no descendant is left. CMD runs with stdin, stdout and
stderr on /dev/null. tests/criu_restore.rs runs the workload and
`criu restore -d` under it.
"""
import ctypes
import os
import sys

PR_SET_CHILD_SUBREAPER = 36


def main(argv):
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        sys.exit("reaper: prctl(PR_SET_CHILD_SUBREAPER) failed: %s" % os.strerror(ctypes.get_errno()))
    child = os.fork()
    if child == 0:
        try:
            null = os.open("/dev/null", os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            os.execvp(argv[0], argv)
        finally:
            os._exit(127)
    print("pid %d" % child, flush=True)
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            return
        if pid == child:
            print("exit %d" % code(status), flush=True)


def code(status):
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


if __name__ == "__main__":
    main(sys.argv[1:])
