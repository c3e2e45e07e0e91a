"""One driver per sweep at a time: a lease in the store, and the write sequence it hands out.

A lease is a file ``<results>/<sweep>/leases/lease-<generation>.json``, created only if absent
(``O_CREAT | O_EXCL`` on local and shared filesystems; a conditional PUT, ``If-None-Match: *``,
on S3). The highest generation is the lease; its holder rewrites its own file every
``heartbeat_s`` with a growing ``beat`` counter, and marks it ``released`` when it ends. A new
driver takes generation + 1 when the highest lease is released or its holder is dead, so a later
run always has a larger generation: rows are ordered by (``write_generation``, ``write_seq``),
never by hosts' clocks. Two drivers racing for one generation cannot both create its file.

A holder is dead when it ran on this host and its process is gone, or (``--wait``) when its
``beat`` has not changed for ``stale_after_s`` by this process's own monotonic clock, or (without
``--wait``) when its last heartbeat's own timestamp is older than ``stale_after_s`` by this host's
clock (this assumes the hosts' clocks agree within that margin: say ``--wait`` where they may
not). A holder that finds a higher generation than its own has lost the lease (someone took it
over while it was stalled) and stops writing: ``check`` raises ``LeaseLost`` before every write.

Environment: ``QSWEEP_LEASE_HEARTBEAT_S`` (10), ``QSWEEP_LEASE_STALE_S`` (60).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

log = logging.getLogger(__name__)
LEASE_DIR = "leases"


class LeaseHeld(Exception):
    """Another driver holds the sweep's lease."""


class LeaseLost(Exception):
    """This driver's lease was taken over: it must stop writing."""


@dataclass(frozen=True)
class Holder:
    generation: int
    host: str
    pid: int
    since: str  # ISO time on the holder's clock: for people, never for ordering
    beat: int = 0
    beat_at: float = 0.0  # the holder's time.time() at its last heartbeat
    released: bool = False

    def describe(self) -> str:
        return (f"generation {self.generation}, held by pid {self.pid} on host {self.host} since "
                f"{self.since} (heartbeat {self.beat} at "
                f"{dt.datetime.fromtimestamp(self.beat_at, dt.timezone.utc):%Y-%m-%d %H:%M:%S} UTC, "
                "its clock)")


def _env_seconds(name: str, default: float) -> float:
    return float(os.environ.get(name) or default)


class Lease:
    """The lease this driver holds; ``stamp`` numbers its rows, ``check`` fences its writes."""

    def __init__(self, backend: Any, sweep: str, holder: Holder, heartbeat_s: float):
        self.backend, self.sweep, self.holder = backend, sweep, holder
        self.run_id = f"{holder.host}:{holder.pid}:g{holder.generation}"
        self._seq = 0
        self._lock = threading.Lock()
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(heartbeat_s,), daemon=True,
                                        name=f"qsweep-lease-{sweep}")
        self._thread.start()

    @property
    def generation(self) -> int:
        return self.holder.generation

    def stamp(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Rows with this run's write sequence."""
        with self._lock:
            stamped = []
            for row in rows:
                stamped.append({**row, "run_id": self.run_id, "write_generation": self.generation,
                                "write_seq": self._seq})
                self._seq += 1
            return stamped

    def check(self) -> None:
        """Raise ``LeaseLost`` when a later generation exists (this driver was taken over)."""
        if self._lost is None:
            newer = [g for g in self.backend.generations(self.sweep) if g > self.generation]
            if newer:
                self._lost = f"generation {max(newer)} exists"
        if self._lost is not None:
            raise LeaseLost(f"sweep {self.sweep!r}: this driver's lease (generation {self.generation}) "
                            f"was taken over ({self._lost}) while it was stalled; it stops writing. "
                            "Its finished rows are in the store; the new driver runs the rest.")

    def _beat(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            try:
                self.check()
                with self._lock:
                    self.holder = replace(self.holder, beat=self.holder.beat + 1, beat_at=time.time())
                    self.backend.overwrite(self.sweep, self.holder)
            except LeaseLost as exc:
                log.error("%s", exc)
                return
            except OSError as exc:  # a store hiccup: try again at the next beat
                log.warning("lease heartbeat for sweep %s failed: %s", self.sweep, exc)

    def release(self) -> None:
        """Mark the lease released (the next driver takes the next generation at once)."""
        self._stop.set()
        self._thread.join(timeout=30)
        if self._lost is not None:
            return
        with self._lock:
            self.holder = replace(self.holder, released=True, beat_at=time.time())
            self.backend.overwrite(self.sweep, self.holder)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def acquire(backend: Any, sweep: str, wait: bool = False, poll_s: float = 1.0,
            heartbeat_s: float | None = None, stale_after_s: float | None = None) -> Lease:
    """Take the sweep's lease: at once when it is free, released or its holder is dead; else
    raise ``LeaseHeld`` naming the holder, or (``wait``) poll until one of those is true."""
    heartbeat_s = heartbeat_s or _env_seconds("QSWEEP_LEASE_HEARTBEAT_S", 10)
    stale_after_s = stale_after_s or _env_seconds("QSWEEP_LEASE_STALE_S", 60)
    seen: tuple[int, int] | None = None  # (generation, beat) of the holder, last time we looked
    seen_since = time.monotonic()
    announced = False
    while True:
        current = backend.current(sweep)
        if current is not None and seen != (current.generation, current.beat):
            seen, seen_since = (current.generation, current.beat), time.monotonic()
        stalled = current is not None and time.monotonic() - seen_since > stale_after_s
        free = current is None or current.released or _dead(current, stale_after_s) or (wait and stalled)
        if free:
            if current is not None and not current.released:
                log.warning("sweep %s: taking over the lease of a dead driver (%s)", sweep, current.describe())
            holder = Holder(generation=(current.generation if current else 0) + 1,
                            host=socket.gethostname(), pid=os.getpid(),
                            since=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                            beat_at=time.time())
            if backend.create(sweep, holder):
                backend.prune(sweep, below=holder.generation)
                return Lease(backend, sweep, holder, heartbeat_s)
            continue  # another driver took this generation first: look again
        if not wait:
            raise LeaseHeld(f"sweep {sweep!r} is being run by another driver: {current.describe()}. "
                            "Wait for it (qsweep run --wait), or stop it; a lease whose driver died "
                            f"is taken over once its heartbeat is {stale_after_s:.0f} s old.")
        if not announced:
            log.warning("sweep %s: waiting for the driver holding the lease (%s)", sweep, current.describe())
            announced = True
        time.sleep(poll_s)


def _dead(holder: Holder, stale_after_s: float) -> bool:
    if holder.host == socket.gethostname():
        try:
            os.kill(holder.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
        return False
    return time.time() - holder.beat_at > stale_after_s


def encode(holder: Holder) -> bytes:
    return json.dumps(asdict(holder), sort_keys=True).encode()


def decode(data: bytes) -> Holder:
    known = {f.name for f in fields(Holder)}  # a lease written by another qsweep version
    return Holder(**{k: v for k, v in json.loads(data).items() if k in known})


def lease_name(generation: int) -> str:
    return f"lease-{generation:012d}.json"


def generation_of(name: str) -> int | None:
    if name.startswith("lease-") and name.endswith(".json"):
        try:
            return int(name[len("lease-"):-len(".json")])
        except ValueError:
            return None
    return None


class LocalLeases:
    """Lease files on a local or shared filesystem: created by ``link`` of a complete temporary
    file (atomic create-if-absent, NFS included), rewritten by rename."""

    def __init__(self, root: Any):
        self.root = root

    def _dir(self, sweep: str) -> Any:
        return self.root / sweep / LEASE_DIR

    def generations(self, sweep: str) -> list[int]:
        try:
            names = os.listdir(self._dir(sweep))
        except FileNotFoundError:
            return []
        return sorted(g for g in map(generation_of, names) if g is not None)

    def current(self, sweep: str) -> Holder | None:
        generations = self.generations(sweep)
        if not generations:
            return None
        return decode((self._dir(sweep) / lease_name(generations[-1])).read_bytes())

    def _staged(self, sweep: str, holder: Holder) -> Any:
        directory = self._dir(sweep)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(encode(holder))
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def create(self, sweep: str, holder: Holder) -> bool:
        tmp = self._staged(sweep, holder)
        try:
            os.link(tmp, self._dir(sweep) / lease_name(holder.generation))
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def overwrite(self, sweep: str, holder: Holder) -> None:
        os.replace(self._staged(sweep, holder), self._dir(sweep) / lease_name(holder.generation))

    def prune(self, sweep: str, below: int) -> None:
        for generation in self.generations(sweep):
            if generation < below:
                (self._dir(sweep) / lease_name(generation)).unlink(missing_ok=True)


class RemoteLeases:
    """Lease objects on a ``pyarrow.fs`` store. Create-if-absent is a conditional PUT
    (``If-None-Match: *``) through boto3 on S3; on other URI stores it is a look-then-write,
    which two drivers starting within the same second can both pass (a warning says so)."""

    def __init__(self, fs: Any, base: str, uri: str):
        self.fs, self.base, self.uri = fs, base, uri
        self._warned = False

    def _dir(self, sweep: str) -> str:
        return f"{self.base}/{sweep}/{LEASE_DIR}"

    def generations(self, sweep: str) -> list[int]:
        import pyarrow.fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(self._dir(sweep), allow_not_found=True))
        return sorted(g for g in (generation_of(i.base_name) for i in infos) if g is not None)

    def current(self, sweep: str) -> Holder | None:
        generations = self.generations(sweep)
        if not generations:
            return None
        with self.fs.open_input_stream(f"{self._dir(sweep)}/{lease_name(generations[-1])}") as f:
            return decode(f.read())

    def create(self, sweep: str, holder: Holder) -> bool:
        path = f"{self._dir(sweep)}/{lease_name(holder.generation)}"
        if self.fs.type_name == "s3":
            return _s3_put_if_absent(self.uri, path, encode(holder))
        if not self._warned:
            log.warning("results at %s: this store has no create-if-absent; the sweep's lease is "
                        "checked, then written (two drivers starting at the same moment may both run)",
                        self.uri.split("?")[0])
            self._warned = True
        if holder.generation in self.generations(sweep):
            return False
        self.overwrite(sweep, holder)
        return True

    def overwrite(self, sweep: str, holder: Holder) -> None:
        from orchestrator.store import _put

        _put(self.fs, f"{self._dir(sweep)}/{lease_name(holder.generation)}", encode(holder))

    def prune(self, sweep: str, below: int) -> None:
        for generation in self.generations(sweep):
            if generation < below:
                try:
                    self.fs.delete_file(f"{self._dir(sweep)}/{lease_name(generation)}")
                except FileNotFoundError:
                    pass


def _s3_put_if_absent(uri: str, path: str, data: bytes) -> bool:
    """A conditional PUT: True when this call created the object, False when it existed."""
    from urllib.parse import parse_qs, urlsplit

    try:
        import boto3
        from botocore.exceptions import ClientError
    except ImportError:
        raise OSError("the sweep's lease on s3:// needs boto3 for a conditional PUT "
                      "(pip install boto3)") from None
    query = parse_qs(urlsplit(uri).query)
    endpoint = (query.get("endpoint_override") or [None])[0]
    scheme = (query.get("scheme") or ["https"])[0]
    endpoint_url = f"{scheme}://{endpoint}" if endpoint else os.environ.get("AWS_ENDPOINT_URL")
    region = (query.get("region") or [None])[0] or os.environ.get("AWS_DEFAULT_REGION")
    client = boto3.client("s3", endpoint_url=endpoint_url, region_name=region)
    bucket, key = path.split("/", 1)
    try:
        client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        return True
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict", "412"):
            return False
        raise OSError(f"conditional PUT of s3://{bucket}/{key} failed: {exc}") from None
