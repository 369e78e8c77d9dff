#!/usr/bin/python3
"""The process benches/restore dumps with CRIU and restores after its files moved.

    app.py serve model|tree DATA PORT RUN
    app.py expect model|tree DATA SEED

model: maps DATA/model.bin (shared, read-only: its pages are the file's, so
CRIU dumps none of them) and answers each `SEED` line on 127.0.0.1:PORT with
the sha256 of 64 4 KiB pages of it that SEED picks.
tree: holds every file below DATA/app open (a Python application's modules)
and DATA/data.bin (its database); answers `SEED` with the sha256 of every 10th
module, starting at SEED % 10, read through its descriptors.
`serve` writes RUN/ready once it listens; `expect` prints the answer to SEED
computed from the files themselves.
"""
import hashlib
import mmap
import os
import resource
import socket
import sys

PAGE = 4096
PAGES = 64


def model_answer(mapped, seed):
    pages = len(mapped) // PAGE
    digest = hashlib.sha256()
    for i in range(PAGES):
        page = (seed * 2654435761 + i * 40503) % pages
        digest.update(mapped[page * PAGE:(page + 1) * PAGE])
    return digest.hexdigest()


def tree_answer(fds, seed):
    digest = hashlib.sha256()
    for fd in fds[seed % 10::10]:
        digest.update(os.pread(fd, os.fstat(fd).st_size, 0))
    return digest.hexdigest()


def modules(data):
    found = []
    for root, dirs, files in os.walk(os.path.join(data, "app")):
        dirs.sort()
        found.extend(os.path.join(root, name) for name in sorted(files))
    return found


def opened(mode, data):
    """What the process holds, and how it answers a seed."""
    if mode == "model":
        fd = os.open(os.path.join(data, "model.bin"), os.O_RDONLY)
        mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        os.close(fd)
        return lambda seed: model_answer(mapped, seed)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    fds = [os.open(path, os.O_RDONLY) for path in modules(data)]
    fds.append(os.open(os.path.join(data, "data.bin"), os.O_RDONLY))
    return lambda seed: tree_answer(fds[:-1], seed)


def serve(mode, data, port, run):
    # CRIU dumps a session leader's tree; "/" keeps the cwd off every mount.
    os.setsid()
    os.chdir("/")
    answer = opened(mode, data)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(16)
    with open(os.path.join(run, "ready"), "w"):
        pass
    while True:
        conn, _ = listener.accept()
        with conn:
            request = b""
            while not request.endswith(b"\n"):
                more = conn.recv(64)
                if not more:
                    break
                request += more
            conn.sendall((answer(int(request)) + "\n").encode())


def main(argv):
    if argv[0] == "serve":
        serve(argv[1], argv[2], int(argv[3]), argv[4])
    else:
        print(opened(argv[1], argv[2])(int(argv[3])))


if __name__ == "__main__":
    main(sys.argv[1:])
