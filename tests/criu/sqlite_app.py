#!/usr/bin/python3
"""An application with an open SQLite connection: tests/apps.rs dumps it
with the connection open and restores it on another "host".

    python3 sqlite_app.py DB RUN

It connects to DB (rollback journal, SQLite's default) once, and answers on
RUN/commands (see channel.py): `count` (rows of table t), `insert TEXT`
(one row, committed; returns the count), `ino` (what SQLite compares: the
inode number of DB now). SQLite remembers the inode number of the database it
opened and refuses writes once the file at that path has another one
(SQLITE_READONLY_DBMOVED, "attempt to write a readonly database").
"""
import os
import sqlite3
import sys

import channel


def main(db_path, run):
    os.setsid()
    os.chdir(run)
    db = sqlite3.connect(db_path)

    def handle(word, arg):
        if word == "count":
            return db.execute("select count(*) from t").fetchone()[0]
        if word == "insert":
            with db:
                db.execute("insert into t(v) values (?)", (arg,))
            return db.execute("select count(*) from t").fetchone()[0]
        if word == "ino":
            return os.stat(db_path).st_ino
        raise ValueError("unknown command %r" % word)

    handle("count", "")
    channel.serve(run, handle)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
