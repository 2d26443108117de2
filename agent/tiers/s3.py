"""The S3 tier: one object per chunk under ``s3.prefix``, shared by every node that
uses the same bucket. Works with any S3-compatible store through ``s3.endpoint_url``.

Objects carry the ``format`` header block, then the payload (optionally an lz4 frame).
Credentials come from boto3's standard chain only. Every call has connect/read
timeouts; retries (with exponential backoff and jitter) are ours, not botocore's, so
``s3.retries_max`` bounds them exactly. After ``FAILURES_TO_TRIP`` operations in a row
fail, the tier reports itself unhealthy for a cool-down that doubles up to
``COOLDOWN_MAX_S``: the manager then drops writes and skips probes instead of queueing
work behind a dead endpoint.

A frozen endpoint (accepts connections, never answers) fails nothing until a read
timeout, so failures alone would notice it only after ``timeout_s`` x attempts. The
store therefore keeps the start time of every request in flight: when one has waited
``stuck_after_s`` and nothing has been answered meanwhile, the endpoint is stuck and
the tier trips at once. An attempt that hung that long is not retried, so a frozen
endpoint holds an I/O thread for one timeout, not four.

A key this node has not seen is probed with a ranged GET of the header; misses are
remembered for ``s3.negative_ttl_s`` so a popular miss costs one request per TTL.
"""

from __future__ import annotations

import itertools
import logging
import random
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar

from kvnode.agent.tiers.base import SlotBuffers, StatelessStore, TierStats, read_back, sealed_header
from kvnode.agent.tiers.format import (
    CODEC_LZ4,
    CODEC_NONE,
    CODECS,
    HEADER_BYTES,
    HEADER_STRUCT_BYTES,
    NO_FINGERPRINT,
    ChunkMeta,
    decode_header,
)
from kvnode.errors import CorruptEntry, S3Error

log = logging.getLogger("kvnode.tiers.s3")

T = TypeVar("T")

PART_BYTES_MIN = 5 * 1024 * 1024  # S3's smallest multipart part (but the last)
STREAM_CHUNK_BYTES = 4 * 1024 * 1024
# A GET's body must arrive within max(READ_SLOWEST_S, its bytes at READ_RATE_MIN): the
# read timeout bounds each socket read, not the whole body, and an endpoint that sends
# a byte a second held an I/O thread, the promotion's arena pages and the tier's health
# for as long as it liked (a day for a 64 KiB chunk).
READ_RATE_MIN = 1024 * 1024  # bytes per second
READ_SLOWEST_S = 16.0
KNOWN_MAX = 262_144  # keys this node knows are in the bucket (saves a probe each)
NEGATIVE_MAX = 65_536
FAILURES_TO_TRIP = 3
COOLDOWN_MIN_S = 1.0
COOLDOWN_MAX_S = 30.0
STUCK_AFTER_S = 4.0  # a request unanswered this long, nothing else answered: stuck
BACKOFF_BASE_S = 0.05
BACKOFF_MAX_S = 2.0
_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}


class _NotFound(Exception):
    pass


def make_client(
    endpoint_url: str = "", region: str = "", timeout_s: float = 10.0, concurrency: int = 8
) -> Any:
    """A boto3 S3 client: standard credential chain, our timeouts, no botocore retries."""
    import boto3
    from botocore.config import Config

    cfg = Config(
        connect_timeout=timeout_s,
        read_timeout=timeout_s,
        retries={"total_max_attempts": 1},
        max_pool_connections=max(10, concurrency * 2),
        # S3-compatible stores behind an endpoint URL rarely do virtual-hosted buckets.
        s3={"addressing_style": "path"} if endpoint_url else None,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    session = boto3.session.Session()
    return session.client(
        "s3", endpoint_url=endpoint_url or None, region_name=region or None, config=cfg
    )


def _classify(exc: Exception) -> tuple[bool, bool]:
    """(not_found, retryable) for a library error."""
    from botocore.exceptions import BotoCoreError, ClientError

    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code == "NoSuchBucket":  # a misconfigured tier, not a missing chunk
            return False, False
        if code in _NOT_FOUND or status == 404:
            return True, False
        return False, status >= 500 or status == 429 or "Throttl" in code or code == "SlowDown"
    return False, isinstance(exc, (BotoCoreError, OSError))


def _reason(exc: Exception | None) -> str:
    """A boto error in words: its code, without botocore's retry note (ours are counted
    above; botocore's own are off, so it always says "reached max retries: 0")."""
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = err.get("Code") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return f"{code}: {err.get('Message') or exc}".replace(" (reached max retries: 0)", "")
    return re.sub(r"\s*\(reached max retries: \d+\)", "", str(exc))


class S3Store(StatelessStore):
    def __init__(
        self,
        bucket: str,
        client: Any,
        prefix: str = "kvnode/",
        codec: str = "none",
        multipart_bytes: int = 64 * 1024 * 1024,
        retries_max: int = 3,
        negative_ttl_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        name: str = "s3",
        stuck_after_s: float = STUCK_AFTER_S,
    ) -> None:
        self.name = name
        self.bucket = bucket
        self.client = client
        self.prefix = prefix
        self.codec = CODECS[codec]
        self.multipart_bytes = multipart_bytes
        self.retries_max = retries_max
        self.negative_ttl_s = negative_ttl_s
        self.clock = clock
        self.sleep = sleep
        self.stuck_after_s = stuck_after_s
        self.stats = TierStats(name)
        self._lock = threading.Lock()
        self._known: OrderedDict[bytes, int] = OrderedDict()
        self._known_bytes = 0
        self._negative: OrderedDict[bytes, float] = OrderedDict()
        self._failures = 0
        self._cooldown_s = COOLDOWN_MIN_S
        self._down_until = 0.0
        self._down = False  # tripped and not answered since: report recovery once
        # request id -> start time. One request per I/O thread at a time, so this holds
        # at most s3.concurrency entries.
        self._inflight: dict[int, float] = {}
        self._request_ids = itertools.count()
        self._last_ok = float("-inf")  # when the endpoint last answered

    def object_key(self, key: bytes) -> str:
        return f"{self.prefix}{key.hex()}"

    # -- health and retries ------------------------------------------------------
    def healthy(self) -> bool:
        """False while tripped, or while a request waits on an endpoint that has
        answered nothing for ``stuck_after_s`` (checked here, so no timer is needed)."""
        now = self.clock()
        with self._lock:
            if now < self._down_until:
                return False
            waited = self._stuck_for(now)
            if waited is None:
                return True
            self._trip(now)
        self.stats.error("endpoint stopped answering", f"a request has waited {waited:.1f}s")
        return False

    def _stuck_for(self, now: float) -> float | None:
        """How long the oldest request has waited with nothing answered meanwhile,
        when that is ``stuck_after_s`` or more. Caller holds the lock."""
        if not self._inflight:
            return None
        waited = now - max(min(self._inflight.values()), self._last_ok)
        return waited if waited >= self.stuck_after_s else None

    def _trip(self, now: float) -> None:
        """Unhealthy for the cool-down, which doubles while the tier keeps failing.
        Caller holds the lock."""
        self._down_until = now + self._cooldown_s
        if not self._down:
            log.warning("tier %s: failing; writes dropped, lookups miss", self.name)
        self._down = True
        self._cooldown_s = min(COOLDOWN_MAX_S, self._cooldown_s * 2)
        self._failures = 0

    def _succeeded(self) -> None:
        with self._lock:
            self._failures = 0
            self._cooldown_s = COOLDOWN_MIN_S
            self._last_ok = self.clock()
            was_down, self._down = self._down, False
            self._down_until = 0.0  # it answered: healthy again at once
        if was_down:
            self.stats.recovered("S3 answers again")

    def _failed(self, what: str, exc: Exception | None) -> None:
        self.stats.error(f"{what} failed", exc)
        with self._lock:
            self._failures += 1
            if self._failures >= FAILURES_TO_TRIP:
                self._trip(self.clock())

    def _attempt(self, fn: Callable[[], T]) -> T:
        """One request, its start time kept while it is in flight (see healthy())."""
        rid = next(self._request_ids)
        with self._lock:
            self._inflight[rid] = self.clock()
        try:
            return fn()
        finally:
            with self._lock:
                del self._inflight[rid]

    def _retrying(self, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` with our retries. Raises _NotFound, CorruptEntry or S3Error."""
        last: Exception | None = None
        for attempt in range(self.retries_max + 1):
            if attempt:
                if not self.healthy():
                    break  # no retries into a tripped or stuck endpoint
                delay = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** (attempt - 1))
                self.sleep(delay * (0.5 + random.random() / 2))
            started = self.clock()
            try:
                out = self._attempt(fn)
            except (CorruptEntry, _NotFound):
                self._succeeded()  # the endpoint answered
                raise
            except Exception as exc:
                not_found, retryable = _classify(exc)
                if not_found:
                    self._succeeded()
                    raise _NotFound() from exc
                last = exc
                # An attempt that hung this long found the endpoint stuck, not flaky.
                if not retryable or self.clock() - started >= self.stuck_after_s:
                    break
                continue
            self._succeeded()
            return out
        self._failed(what, last)
        tries = attempt + 1
        raise S3Error(
            f"S3 {what} failed after {tries} attempt{'s' if tries > 1 else ''} "
            f"(s3.retries_max = {self.retries_max}): {_reason(last)}"
        ) from last

    # -- start-up ---------------------------------------------------------------------
    def startup_scan(self) -> Callable[[], None] | None:
        return self._check_bucket

    def _check_bucket(self) -> None:
        """Once at start, on an I/O thread: the bucket answers with these credentials.
        If not, the tier is unhealthy from the start (not after its first write fails)
        and the log says why."""
        try:
            self._retrying("bucket check", lambda: self.client.head_bucket(Bucket=self.bucket))
        except (S3Error, _NotFound) as exc:
            with self._lock:
                self._trip(self.clock())
            reason = str(exc) if isinstance(exc, S3Error) else "no such bucket"
            log.error(
                "tier %s: s3://%s cannot be used: %s (check s3.bucket, s3.endpoint_url and "
                "the AWS credentials; kvnode doctor says more)", self.name, self.bucket, reason,
            )  # fmt: skip
            return
        log.info("tier %s: s3://%s answers", self.name, self.bucket)

    # -- local knowledge ------------------------------------------------------------
    def _remember(self, key: bytes, size: int) -> None:
        with self._lock:
            self._negative.pop(key, None)
            old = self._known.pop(key, None)
            self._known_bytes += size - (old or 0)
            self._known[key] = size
            while len(self._known) > KNOWN_MAX:
                _, n = self._known.popitem(last=False)
                self._known_bytes -= n

    def _forget(self, key: bytes, negative: bool) -> None:
        with self._lock:
            old = self._known.pop(key, None)
            if old is not None:
                self._known_bytes -= old
            if negative:
                self._negative[key] = self.clock() + self.negative_ttl_s
                self._negative.move_to_end(key)
                while len(self._negative) > NEGATIVE_MAX:
                    self._negative.popitem(last=False)

    def _skipped(self, key: bytes) -> bool:
        with self._lock:
            until = self._negative.get(key)
            return until is not None and until > self.clock()

    def size_of(self, key: bytes) -> int | None:
        with self._lock:
            return self._known.get(key)

    def may_probe(self, key: bytes) -> bool:
        if not self.healthy():
            return False
        with self._lock:
            until = self._negative.get(key)
            if until is None:
                return True
            if until > self.clock():
                return False
            del self._negative[key]
            return True

    def gauges(self) -> dict[str, int]:
        # entries/bytes: what this node knows to be in the bucket; no limit of ours.
        with self._lock:
            return {"entries": len(self._known), "bytes": self._known_bytes, "bytes_max": 0}

    # -- I/O ------------------------------------------------------------------------
    def probe(self, key: bytes) -> int | None:
        def fetch() -> bytes:
            rep = self.client.get_object(
                Bucket=self.bucket,
                Key=self.object_key(key),
                Range=f"bytes=0-{HEADER_STRUCT_BYTES - 1}",
            )
            body = rep["Body"]
            try:
                return _read_upto(body, HEADER_STRUCT_BYTES, _read_deadline(HEADER_STRUCT_BYTES))
            finally:
                body.close()

        try:
            raw = self._retrying("probe", fetch)
            h = decode_header(raw, key)
        except _NotFound:
            self._forget(key, negative=True)
            return None
        except CorruptEntry:
            self._corrupt(key)
            raise
        self._remember(key, h.raw_bytes)
        return h.raw_bytes

    def put(
        self,
        key: bytes,
        slot: SlotBuffers,
        checksum: int,
        fingerprint: bytes = NO_FINGERPRINT,
        meta: ChunkMeta | None = None,
    ) -> bool:
        t0 = time.perf_counter()
        if self.size_of(key) is not None:
            return False
        if self.codec == CODEC_LZ4:
            import lz4.frame

            stored = [lz4.frame.compress(b"".join(slot.views))]
        else:
            stored = list(slot.views)
        stored_bytes = sum(len(s) for s in stored)
        head = sealed_header(
            self.stats, key, slot, checksum, fingerprint, meta, stored_bytes, self.codec
        )
        body = b"".join([head, *stored])
        okey = self.object_key(key)
        try:
            if len(body) > self.multipart_bytes:
                self._put_multipart(okey, memoryview(body))
            else:
                self._retrying(
                    "put", lambda: self.client.put_object(Bucket=self.bucket, Key=okey, Body=body)
                )
        except _NotFound as exc:  # e.g. the upload vanished: a failed write, not a miss
            self._failed("put", exc)
            raise S3Error(f"S3 put of {okey} failed: not found") from exc
        self._remember(key, slot.size)
        self.stats.write_done(t0, slot.size)
        return True

    def _put_multipart(self, okey: str, body: memoryview) -> None:
        part_bytes = max(PART_BYTES_MIN, self.multipart_bytes)
        up = self._retrying(
            "create multipart",
            lambda: self.client.create_multipart_upload(Bucket=self.bucket, Key=okey),
        )
        upload_id = up["UploadId"]
        parts = []
        try:
            for number, off in enumerate(range(0, len(body), part_bytes), start=1):
                piece = bytes(body[off : off + part_bytes])

                def send(piece: bytes = piece, number: int = number) -> Any:
                    return self.client.upload_part(
                        Bucket=self.bucket,
                        Key=okey,
                        UploadId=upload_id,
                        PartNumber=number,
                        Body=piece,
                    )

                rep = self._retrying("upload part", send)
                parts.append({"ETag": rep["ETag"], "PartNumber": number})
            self._retrying(
                "complete multipart",
                lambda: self.client.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=okey,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                ),
            )
        except BaseException:
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=okey, UploadId=upload_id)
            except Exception:
                pass  # the bucket's lifecycle rule cleans up what we cannot
            raise

    def read_into(self, key: bytes, slot: SlotBuffers) -> int | None:
        t0 = time.perf_counter()
        if self._skipped(key):
            return None  # found corrupt (or absent) lately: not asked again yet
        try:
            got = self._retrying("get", lambda: self._get_into(key, slot))
        except _NotFound:
            self._forget(key, negative=True)
            return None
        except CorruptEntry:
            self._corrupt(key)
            raise
        self._remember(key, slot.size)
        self.stats.read_done(t0, slot.size)
        return got

    def _get_into(self, key: bytes, slot: SlotBuffers) -> int:
        rep = self.client.get_object(Bucket=self.bucket, Key=self.object_key(key))
        body = rep["Body"]
        try:
            length = int(rep.get("ContentLength", -1))
            deadline = _read_deadline(max(length, slot.size))
            head = _read_exact(body, HEADER_BYTES, deadline)
            h = decode_header(head, key)
            if h.raw_bytes != slot.size or length != h.total_bytes:
                raise CorruptEntry("object length does not match its header")
            if h.codec == CODEC_NONE:
                for v in slot.views:
                    _read_into(body, v, deadline)
            else:
                _decode_lz4_into(_read_exact(body, h.stored_bytes, deadline), slot)
            if _read_some(body, 1, deadline):
                raise CorruptEntry("object longer than its header says")
        finally:
            body.close()
        return read_back(h, slot, head)

    def _corrupt(self, key: bytes) -> None:
        """What came back for ``key`` is not its object: forgotten here (a miss until
        the negative cache lets it be asked again), counted, and left in the bucket.
        The bucket is the fleet's (only its lifecycle rules delete objects), and a
        fault on the way (a short Content-Length, a proxy's wrong body) looks the same
        from here: deleting lost a good object for every node."""
        self.stats.error("corrupt object skipped", self.object_key(key), "corrupt")
        self._forget(key, negative=True)

    def delete(self, key: bytes) -> None:
        self._forget(key, negative=True)
        okey = self.object_key(key)
        try:
            self._retrying(
                "delete", lambda: self.client.delete_object(Bucket=self.bucket, Key=okey)
            )
        except _NotFound:
            pass
        self.stats.inc("deletes")

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:
            pass


class BodyError(OSError):
    """A body that did not arrive whole, or not by its deadline (the endpoint
    trickles): a transport fault, retried as one."""


def _read_deadline(nbytes: int) -> float:
    return time.monotonic() + max(READ_SLOWEST_S, nbytes / READ_RATE_MIN)


def _read_some(body: Any, n: int, deadline: float) -> bytes:
    """Up to ``n`` bytes of ``body``, whatever has come (b"" at its end); raises
    ``SlowRead`` past ``deadline``. Reads what arrived rather than waiting for all
    ``n`` (a full read waits for every byte, each socket read within the timeout,
    however slowly they come), from the HTTP response itself when it can; raises
    ``BodyError`` past ``deadline`` or when the response breaks off."""
    if time.monotonic() > deadline:
        raise BodyError("the object's body did not arrive in time")
    raw = getattr(body, "_raw_stream", None)
    read1 = getattr(raw, "read1", None)
    if read1 is None:
        return bytes(body.read(n))
    from urllib3.exceptions import HTTPError

    try:
        return bytes(read1(n))
    except HTTPError as exc:  # cut short, or a broken chunk: what botocore would retry
        raise BodyError(f"the object's body broke off: {exc}") from exc


def _read_exact(body: Any, n: int, deadline: float) -> bytes:
    data = _read_upto(body, n, deadline)
    if len(data) < n:
        raise CorruptEntry("object shorter than its header says")
    return data


def _read_upto(body: Any, n: int, deadline: float) -> bytes:
    """``body`` to its end, ``n`` bytes at most."""
    parts = []
    left = n
    while left:
        data = _read_some(body, min(left, STREAM_CHUNK_BYTES), deadline)
        if not data:
            break
        parts.append(data)
        left -= len(data)
    return b"".join(parts)


def _read_into(body: Any, view: memoryview, deadline: float) -> None:
    pos = 0
    while pos < len(view):
        data = _read_some(body, min(len(view) - pos, STREAM_CHUNK_BYTES), deadline)
        if not data:
            raise CorruptEntry("object shorter than its header says")
        view[pos : pos + len(data)] = data
        pos += len(data)


def _decode_lz4_into(stored: bytes, slot: SlotBuffers) -> None:
    import lz4.frame

    try:
        raw = lz4.frame.decompress(stored)
    except RuntimeError as exc:
        raise CorruptEntry(f"lz4 frame does not decode: {exc}") from exc
    if len(raw) != slot.size:
        raise CorruptEntry("decoded length does not match header")
    pos = 0
    for v in slot.views:
        v[:] = raw[pos : pos + len(v)]
        pos += len(v)
