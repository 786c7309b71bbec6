"""Writer heartbeats: a small file per live writer, so a second writer of the same run can tell.

Usage::

    beat = Heartbeat(lake_root, run_id, shard=(0, 1))
    beat.check(force=False)   # LakeError if another live writer holds this run (or shard)
    beat.start()              # writes now, then every `interval_s` from a daemon thread
    ...
    beat.stop()               # stops the thread and removes the file (marks it stopped on S3)

Two writers of one run must never overlap: the second one's resume clean-up deletes the first
one's in-flight rows as stale, and both then commit the same samples. Delta has no lock to take,
so each writer keeps ``_writers/<run_id>.<shard>-<count>.json`` at the lake root fresh; a writer
whose heartbeat is older than ``stale_s`` counts as dead (killed, its node lost), so a requeued
job resumes on its own a couple of minutes later (on the same host at once: the pid is asked).
Shards of one layout own disjoint samples and may run together; any other combination is
refused unless forced.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import socket
import threading
import time
import weakref
from typing import Any

from pyarrow import fs as pafs

from vrp.lake import storage
from vrp.lake.errors import LakeError

WRITERS_DIR = "_writers"
#: Seconds between two beats of a live writer.
INTERVAL_S = 20.0
#: A heartbeat older than this belongs to a writer that is gone.
STALE_S = 120.0


class RunBusyError(LakeError):
    """Another live writer is writing the same run (or an overlapping shard of it)."""


class Heartbeat:
    """The heartbeat file of one writer (one shard of one run); see the module docstring."""

    def __init__(
        self,
        root: str,
        run_id: str,
        *,
        shard: tuple[int, int] = (0, 1),
        interval_s: float = INTERVAL_S,
        stale_s: float = STALE_S,
    ) -> None:
        self.root = root
        self.run_id = run_id
        self.shard = shard
        self.interval_s = interval_s
        self.stale_s = stale_s
        self.fs, base = storage.filesystem(root)
        self.folder = posixpath.join(base, WRITERS_DIR)
        self.path = posixpath.join(self.folder, f"{run_id}.{shard[0]}-{shard[1]}.json")
        self.token = f"{socket.gethostname()}:{os.getpid()}:{id(self)}"
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    def others(self) -> list[dict[str, Any]]:
        """Fresh heartbeats of other writers of this run that overlap this writer's samples."""
        prefix = f"{self.run_id}."
        with storage.translated_errors(self.root):
            infos = self.fs.get_file_info(pafs.FileSelector(self.folder, allow_not_found=True))
        now = time.time()
        out = []
        for info in infos:
            if info.type != pafs.FileType.File or not info.base_name.startswith(prefix):
                continue
            try:
                with self.fs.open_input_stream(info.path) as stream:
                    beat = json.loads(stream.read().decode("utf-8"))
                shard = (int(beat["shard"][0]), int(beat["shard"][1]))
                age = now - float(beat["beat_at"])
            except (OSError, ValueError, KeyError, TypeError, IndexError):
                continue  # half-written or foreign file: no live writer can be told from it
            if beat.get("stopped") or age > self.stale_s or not _alive_elsewhere(beat):
                continue
            if shard[1] == self.shard[1] and shard[0] != self.shard[0]:
                continue  # another shard of the same layout owns other samples
            out.append({**beat, "age_s": max(0.0, age)})
        return out

    def check(self, *, force: bool = False) -> None:
        """Raise RunBusyError when another live writer holds this run, unless `force`."""
        if force:
            return
        busy = self.others()
        if busy:
            beat = busy[0]
            raise RunBusyError(
                f"run {self.run_id} is being written by another process ({beat.get('host')}, pid "
                f"{beat.get('pid')}, shard {beat['shard'][0] + 1}/{beat['shard'][1]}, last heartbeat "
                f"{beat['age_s']:.0f} s ago): wait for it to finish, or pass --force if that process "
                f"is gone (its heartbeat goes stale after {self.stale_s:.0f} s)"
            )

    def beat(self, *, stopped: bool = False) -> None:
        """Write the heartbeat now (atomically: readers never see half a file on a local lake)."""
        body = json.dumps(
            {
                "run_id": self.run_id,
                "shard": list(self.shard),
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "token": self.token,
                "beat_at": time.time(),
                "stopped": stopped,
            }
        ).encode("utf-8")
        with storage.translated_errors(self.root):
            if storage.is_remote(self.root):  # an object put is atomic already; no folders to make
                with self.fs.open_output_stream(self.path) as stream:
                    stream.write(body)
                return
            self.fs.create_dir(self.folder, recursive=True)
            temp = f"{self.path}.{os.getpid()}.tmp"
            with self.fs.open_output_stream(temp) as stream:
                stream.write(body)
            self.fs.move(temp, self.path)

    def start(self) -> None:
        """Beat now and then every `interval_s` until :meth:`stop` (or the owner is collected)."""
        self.beat()
        stop = threading.Event()
        self._stop = stop
        self._thread = threading.Thread(
            target=_beat_until, args=(weakref.ref(self), stop, self.interval_s), daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop beating and remove the file, so the next writer of the run need not wait."""
        if self._stop is not None:
            self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._stop = self._thread = None
        try:
            with self.fs.open_input_stream(self.path) as stream:
                mine = json.loads(stream.read().decode("utf-8")).get("token") == self.token
            if not mine:
                return  # replaced by a forced writer: theirs to remove
            if storage.is_remote(self.root):
                # deleting an object's last sibling makes pyarrow leave a "folder/" marker behind
                self.beat(stopped=True)
            else:
                self.fs.delete_file(self.path)
        except (OSError, ValueError, LakeError):
            pass  # already gone

    def __del__(self) -> None:
        if self._stop is not None:
            self._stop.set()


def _alive_elsewhere(beat: dict[str, Any]) -> bool:
    """Whether the writer of a heartbeat may still be running in another process.

    On this host a pid can be asked directly: a killed or interrupted ingest is known dead at
    once, so rerunning it right away resumes. This process's own writers never block each other
    (one process drives one writer per run). On another host only the age can tell.
    """
    if beat.get("host") != socket.gethostname():
        return True
    try:
        pid = int(beat.get("pid"))
    except (TypeError, ValueError):
        return True
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _beat_until(owner: weakref.ref[Heartbeat], stop: threading.Event, interval_s: float) -> None:
    """The thread's loop: holds only a weak reference, so a dropped writer stops beating."""
    while not stop.wait(interval_s):
        heartbeat = owner()
        if heartbeat is None:
            return
        # a missed beat only lets a forced takeover happen sooner; the run goes on
        with contextlib.suppress(OSError, LakeError):
            heartbeat.beat()
        del heartbeat
