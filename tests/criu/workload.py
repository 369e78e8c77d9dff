#!/usr/bin/python3
"""The process tree tests/criu_restore.rs dumps with CRIU and restores over a
lazyfs mount.

    workload.py DATA RUN

DATA is the directory lazyfs serves after the dump; RUN stays on the host
(the FIFO, the reports, the deleted-but-mapped file). The tree: this process
(a session leader, two threads ticking), an unreaped child (a zombie), a
child that stopped itself, and a child appending a line to DATA/app.log every
50 ms. This process holds DATA/data.bin, DATA/big.bin, DATA/twice.txt twice (read-only and
read-write), DATA/sub/mapped.bin mapped (by Python's mmap, which keeps a duplicate descriptor), DATA/opath.txt
as O_PATH, a memfd, an eventfd, RUN/fifo, a socketpair with a message queued,
and RUN/ghost.bin mapped and deleted.

Each line `check N` on RUN/fifo makes it read everything again through its
descriptors and mappings and write RUN/report-N.json; `write N` also writes
to DATA/twice.txt through its read-write descriptor first. report-0.json is
written before anything is queued on the socketpair; then RUN/ready appears.
"""
import hashlib
import json
import mmap
import os
import signal
import socket
import sys
import threading
import time

GHOST = b"deleted but mapped\n" * 1000
MEMFD = b"memfd contents " * 300


def sha(data):
    return hashlib.sha256(data).hexdigest()


def state_of(pid):
    """The state letter of /proc/PID/stat, or None once the process is gone."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


def appender(log):
    fd = os.open(log, os.O_WRONLY | os.O_APPEND)
    n = 0
    while True:
        n += 1
        os.write(fd, b"%d line %d\n" % (os.getpid(), n))
        time.sleep(0.05)


def main(data, run):
    os.setsid()
    os.chdir(run)
    ticks = [0, 0]

    def tick(i):
        while True:
            ticks[i] += 1
            time.sleep(0.01)

    zombie = os.fork()
    if zombie == 0:
        os._exit(3)
    stopped = os.fork()
    if stopped == 0:
        os.kill(os.getpid(), signal.SIGSTOP)
        os._exit(0)
    writer = os.fork()
    if writer == 0:
        appender(os.path.join(data, "app.log"))
    for i in range(2):
        threading.Thread(target=tick, args=(i,), daemon=True).start()

    data_fd = os.open(os.path.join(data, "data.bin"), os.O_RDONLY)
    big_fd = os.open(os.path.join(data, "big.bin"), os.O_RDONLY)
    ro_fd = os.open(os.path.join(data, "twice.txt"), os.O_RDONLY)
    rw_fd = os.open(os.path.join(data, "twice.txt"), os.O_RDWR)
    with open(os.path.join(data, "sub/mapped.bin"), "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, mmap.MAP_SHARED, mmap.PROT_READ)
    path_fd = os.open(os.path.join(data, "opath.txt"), os.O_PATH)
    memfd = os.memfd_create("lazyfs-test")
    os.write(memfd, MEMFD)
    efd = os.eventfd(7)
    fifo_path = os.path.join(run, "fifo")
    os.mkfifo(fifo_path)
    fifo = os.open(fifo_path, os.O_RDWR)
    left, right = socket.socketpair()
    ghost_path = os.path.join(run, "ghost.bin")
    with open(ghost_path, "wb+") as f:
        f.write(GHOST)
        f.flush()
        ghost = mmap.mmap(f.fileno(), 0, mmap.MAP_SHARED, mmap.PROT_READ)
    os.unlink(ghost_path)

    def report(n):
        size = os.fstat(data_fd).st_size
        ev = os.eventfd_read(efd)
        os.eventfd_write(efd, ev)
        right.setblocking(False)
        try:
            queued = right.recv(4096).decode()
        except BlockingIOError:
            queued = ""
        out = {
            "pids": {"root": os.getpid(), "zombie": zombie, "stopped": stopped, "writer": writer},
            "states": {name: state_of(pid) for name, pid in
                       [("zombie", zombie), ("stopped", stopped), ("writer", writer)]},
            "threads": threading.active_count(),
            "ticks": list(ticks),
            "data.bin": sha(os.pread(data_fd, size, 0)),
            "big.bin": sha(os.pread(big_fd, os.fstat(big_fd).st_size, 0)),
            "twice.txt ro": os.pread(ro_fd, 4096, 0).decode(),
            "twice.txt rw": os.pread(rw_fd, 4096, 0).decode(),
            "mapped.bin": sha(mapped[:]),
            "opath.txt": [os.readlink("/proc/self/fd/%d" % path_fd), os.fstat(path_fd).st_size],
            "memfd": sha(os.pread(memfd, len(MEMFD) + 1, 0)) == sha(MEMFD),
            "eventfd": ev,
            "ghost.bin": ghost[:] == GHOST,
            "socketpair": queued,
        }
        tmp = os.path.join(run, "report-%d.json.tmp" % n)
        with open(tmp, "w") as f:
            json.dump(out, f)
        os.rename(tmp, os.path.join(run, "report-%d.json" % n))

    # The zombie has exited and the child has stopped before anything is reported.
    while state_of(zombie) != "Z" or state_of(stopped) != "T":
        time.sleep(0.01)
    report(0)
    left.send(b"queued before the dump")
    open(os.path.join(run, "ready"), "w").close()
    lines = b""
    while True:
        lines += os.read(fifo, 4096)
        while b"\n" in lines:
            line, lines = lines.split(b"\n", 1)
            word, n = line.decode().split()
            if word == "write":
                os.pwrite(rw_fd, b"LOCAL", 0)
            report(int(n))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
