#!/usr/bin/python3
"""An application with SQLite connections open: tests/apps.rs dumps it with
them open and restores it on another "host".

    python3 sqlite_app.py DIR RUN

It connects once to DIR/app.db (rollback journal, SQLite's default) and to
DIR/wal.db (write-ahead log: its -wal and -shm files open, the -shm mapped),
and answers on RUN/commands (see channel.py), each command naming the
database: `count DB` (rows of table t), `insert DB TEXT` (one row, committed;
returns the count), `ino DB` (what SQLite compares: the inode number of the
file at DB's path now). SQLite remembers the inode number of the database it
opened and, in rollback-journal mode, refuses writes once the file at that
path has another one (SQLITE_READONLY_DBMOVED, "attempt to write a readonly
database").
"""
import os
import sqlite3
import sys

import channel


def main(directory, run):
    os.setsid()
    os.chdir(run)
    dbs = {name: sqlite3.connect(os.path.join(directory, name)) for name in ("app.db", "wal.db")}

    def handle(word, arg):
        name, _, text = arg.partition(" ")
        db = dbs[name]
        if word == "count":
            return db.execute("select count(*) from t").fetchone()[0]
        if word == "insert":
            with db:
                db.execute("insert into t(v) values (?)", (text,))
            return db.execute("select count(*) from t").fetchone()[0]
        if word == "ino":
            return os.stat(os.path.join(directory, name)).st_ino
        raise ValueError("unknown command %r" % word)

    for name in dbs:
        handle("count", name)
    channel.serve(run, handle)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
