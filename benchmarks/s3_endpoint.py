"""A small S3-compatible endpoint on 127.0.0.1 for benchmarks: latency, request counts, little CPU.

moto, the tests' S3 server, spends CPU of its own on every byte it stores and reads
the whole object for every ranged GET, so on this two-core machine a benchmark of a
conversion to or from it measures moto. This endpoint answers only what s3fs
asks of a bucket during a conversion (path-style requests):

* ``PUT`` of a bucket and of an object (plain or ``aws-chunked`` bodies, server-side
  copies with ``x-amz-copy-source``, multipart uploads);
* ``GET`` and ``HEAD`` of an object (byte ranges; presigned URLs: the query is
  ignored) and of a bucket; ``ListObjectsV2`` (prefix, delimiter, paging);
* ``DELETE`` of an object and ``POST ?delete`` of many.

Objects written are kept in memory; objects under the served directory (``root``)
are read from disk with ``sendfile`` (a source file, as S3 serves ranges). It checks
no signature and keeps no versions; it is not a test of S3 semantics (the tests use
moto for those). Each request waits ``latency`` seconds first, as an object store's
first byte does, and is counted.

Run as ``python benchmarks/s3_endpoint.py ROOT LATENCY_S``: prints its URL and the
URL of a page with its counts (``/<requests since>/<arrival since>``: requests,
arrivals and round trips since then, see the tests' ``_rounds``, and the CPU seconds
the endpoint's process has spent so far).
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import socket
import sys
import threading
import time
import urllib.parse
from email.utils import formatdate
from pathlib import Path
from xml.sax.saxutils import escape

NS = "http://s3.amazonaws.com/doc/2006-03-01/"
#: keys listed per page at most (ListObjectsV2's default and limit)
MAX_KEYS = 1000


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(t))


def _decode_chunked(body: bytes) -> bytes:
    """The payload of an ``aws-chunked`` body (``size[;sig]\\r\\ndata\\r\\n``... then trailers)."""
    out, pos = [], 0
    while True:
        eol = body.index(b"\r\n", pos)
        size = int(body[pos:eol].split(b";")[0], 16)
        pos = eol + 2
        if size == 0:
            return b"".join(out)
        out.append(body[pos : pos + size])
        pos += size + 2


class S3Endpoint:
    """The endpoint (a threaded HTTP server); see the module's docstring."""

    def __init__(self, root: str | os.PathLike[str], latency: float = 0.0) -> None:
        self.root = Path(root)
        self.latency = latency
        self.objects: dict[tuple[str, str], tuple[bytes, float]] = {}
        self.buckets: set[str] = {p.name for p in self.root.iterdir() if p.is_dir()}
        self.uploads: dict[str, dict[int, bytes]] = {}
        self.requests = 0
        self.arrivals: list[float] = []
        self.lock = threading.Lock()
        endpoint = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # connections kept open, as S3 does

            def log_message(self, *args: object) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                # headers and body go out as written: with Nagle's algorithm a small
                # body waited for the client's delayed ACK of the headers (40 ms)
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def _route(self) -> tuple[str, str, dict[str, list[str]]]:
                url = urllib.parse.urlsplit(self.path)
                bucket, _, key = urllib.parse.unquote(url.path).lstrip("/").partition("/")
                return bucket, key, urllib.parse.parse_qs(url.query, keep_blank_values=True)

            def _arrive(self) -> bytes:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                with endpoint.lock:
                    endpoint.requests += 1
                    endpoint.arrivals.append(time.monotonic())
                if endpoint.latency:
                    time.sleep(endpoint.latency)
                if "aws-chunked" in self.headers.get("Content-Encoding", "") or \
                        self.headers.get("x-amz-decoded-content-length"):
                    body = _decode_chunked(body)
                return body

            def _send(self, status: int, body: bytes = b"", headers: dict | None = None
                      ) -> None:
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                if "Content-Length" not in (headers or {}):
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if body and self.command != "HEAD":
                    self.wfile.write(body)

            def _xml(self, status: int, text: str) -> None:
                self._send(status, ('<?xml version="1.0" encoding="UTF-8"?>' + text).encode(),
                           {"Content-Type": "application/xml"})

            def _error(self, status: int, code: str, message: str) -> None:
                if self.command == "HEAD":
                    self._send(status)
                    return
                self._xml(status, f"<Error><Code>{code}</Code><Message>{escape(message)}"
                          "</Message></Error>")

            def _find(self, bucket: str, key: str) -> tuple[bytes | Path, float] | None:
                with endpoint.lock:
                    got = endpoint.objects.get((bucket, key))
                if got is not None:
                    return got
                p = endpoint.root / bucket / key
                if key and p.is_file():
                    return p, p.stat().st_mtime
                return None

            def do_HEAD(self) -> None:
                self._get()

            def do_GET(self) -> None:
                self._get()

            def _get(self) -> None:
                bucket, key, query = self._route()
                self._arrive()
                if bucket not in endpoint.buckets:
                    self._error(404, "NoSuchBucket", bucket)
                elif not key:
                    if query.get("list-type") == ["2"]:
                        self._list(bucket, query)
                    else:  # HeadBucket, GetBucketLocation...
                        self._xml(200, f'<LocationConstraint xmlns="{NS}"/>')
                else:
                    self._object(bucket, key)

            def _object(self, bucket: str, key: str) -> None:
                found = self._find(bucket, key)
                if found is None:
                    self._error(404, "NoSuchKey", key)
                    return
                data, mtime = found
                size = data.stat().st_size if isinstance(data, Path) else len(data)
                start, end, status = 0, size - 1, 200
                rng = self.headers.get("Range")
                if rng and rng.startswith("bytes="):
                    a, _, b = rng[6:].partition("-")
                    start = int(a) if a else max(size - int(b), 0)
                    end = min(int(b), size - 1) if a and b else end
                    if start >= size:
                        self._error(416, "InvalidRange", rng)
                        return
                    status = 206
                n = end - start + 1
                headers = {"Content-Length": str(n), "Accept-Ranges": "bytes",
                           "ETag": f'"{int(mtime * 1e6):x}-{size:x}"',
                           "Last-Modified": formatdate(mtime, usegmt=True),
                           "Content-Type": "application/octet-stream"}
                if status == 206:
                    headers["Content-Range"] = f"bytes {start}-{end}/{size}"
                if not isinstance(data, Path) or self.command == "HEAD":
                    self._send(status, b"" if isinstance(data, Path) else
                               data[start : end + 1], headers)
                    return
                self._send(status, b"", headers)
                self.wfile.flush()
                with open(data, "rb") as fh:  # the kernel copies file to socket
                    sent = 0
                    while sent < n:
                        sent += os.sendfile(self.connection.fileno(), fh.fileno(),
                                            start + sent, n - sent)

            def _list(self, bucket: str, query: dict[str, list[str]]) -> None:
                prefix = query.get("prefix", [""])[0]
                delimiter = query.get("delimiter", [""])[0]
                after = query.get("continuation-token", query.get("start-after", [""]))[0]
                limit = min(int(query.get("max-keys", [MAX_KEYS])[0]), MAX_KEYS)
                with endpoint.lock:
                    names = {k: (len(v), t) for (b, k), (v, t) in endpoint.objects.items()
                             if b == bucket and k.startswith(prefix)}
                base = endpoint.root / bucket
                for p in base.rglob("*"):
                    k = p.relative_to(base).as_posix()
                    if p.is_file() and k.startswith(prefix):
                        names.setdefault(k, (p.stat().st_size, p.stat().st_mtime))
                entries: dict[str, tuple[int, float] | None] = {}  # None: a common prefix
                for k in sorted(names):
                    rest = k[len(prefix):]
                    if delimiter and delimiter in rest:
                        entries[prefix + rest.split(delimiter, 1)[0] + delimiter] = None
                    else:
                        entries[k] = names[k]
                keys = [k for k in entries if k > after]
                page, more = keys[:limit], len(keys) > limit
                parts = [f'<ListBucketResult xmlns="{NS}"><Name>{bucket}</Name>'
                         f"<Prefix>{escape(prefix)}</Prefix><KeyCount>{len(page)}</KeyCount>"
                         f"<MaxKeys>{limit}</MaxKeys><Delimiter>{escape(delimiter)}</Delimiter>"
                         f"<IsTruncated>{'true' if more else 'false'}</IsTruncated>"]
                if more:
                    parts.append(f"<NextContinuationToken>{escape(page[-1])}"
                                 "</NextContinuationToken>")
                for k in page:
                    if entries[k] is None:
                        parts.append(f"<CommonPrefixes><Prefix>{escape(k)}</Prefix>"
                                     "</CommonPrefixes>")
                    else:
                        size, mtime = entries[k]
                        parts.append(f"<Contents><Key>{escape(k)}</Key><LastModified>"
                                     f"{_iso(mtime)}</LastModified><ETag>&quot;{size:x}&quot;"
                                     f"</ETag><Size>{size}</Size><StorageClass>STANDARD"
                                     "</StorageClass></Contents>")
                parts.append("</ListBucketResult>")
                self._xml(200, "".join(parts))

            def do_PUT(self) -> None:
                bucket, key, query = self._route()
                body = self._arrive()
                if not key:
                    endpoint.buckets.add(bucket)
                    self._send(200)
                    return
                if bucket not in endpoint.buckets:
                    self._error(404, "NoSuchBucket", bucket)
                    return
                if "uploadId" in query:  # a part of a multipart upload
                    with endpoint.lock:
                        endpoint.uploads[query["uploadId"][0]][
                            int(query["partNumber"][0])] = body
                    self._send(200, b"", {"ETag": f'"{hashlib.md5(body).hexdigest()}"'})
                    return
                copy = self.headers.get("x-amz-copy-source")
                if copy is not None:
                    b, _, k = urllib.parse.unquote(copy.split("?")[0]).lstrip("/").partition("/")
                    found = self._find(b, k)
                    if found is None:
                        self._error(404, "NoSuchKey", k)
                        return
                    data = found[0].read_bytes() if isinstance(found[0], Path) else found[0]
                    self._store(bucket, key, data)
                    self._xml(200, f"<CopyObjectResult><LastModified>{_iso(time.time())}"
                              "</LastModified><ETag>&quot;x&quot;</ETag></CopyObjectResult>")
                    return
                self._store(bucket, key, body)
                self._send(200, b"", {"ETag": f'"{len(body):x}"'})

            def _store(self, bucket: str, key: str, data: bytes) -> None:
                with endpoint.lock:
                    endpoint.objects[(bucket, key)] = (bytes(data), time.time())

            def do_DELETE(self) -> None:
                bucket, key, _ = self._route()
                self._arrive()
                with endpoint.lock:
                    endpoint.objects.pop((bucket, key), None)
                self._send(204)

            def do_POST(self) -> None:
                bucket, key, query = self._route()
                body = self._arrive()
                if "delete" in query:
                    import xml.etree.ElementTree as ET

                    keys = [e.text or "" for e in ET.fromstring(body).iter()
                            if e.tag.endswith("Key")]
                    with endpoint.lock:
                        for k in keys:
                            endpoint.objects.pop((bucket, k), None)
                    self._xml(200, f'<DeleteResult xmlns="{NS}">' + "".join(
                        f"<Deleted><Key>{escape(k)}</Key></Deleted>" for k in keys)
                        + "</DeleteResult>")
                elif "uploads" in query:
                    upload = os.urandom(8).hex()
                    with endpoint.lock:
                        endpoint.uploads[upload] = {}
                    self._xml(200, f'<InitiateMultipartUploadResult xmlns="{NS}"><Bucket>'
                              f"{bucket}</Bucket><Key>{escape(key)}</Key><UploadId>{upload}"
                              "</UploadId></InitiateMultipartUploadResult>")
                elif "uploadId" in query:
                    with endpoint.lock:
                        parts = endpoint.uploads.pop(query["uploadId"][0])
                    self._store(bucket, key, b"".join(parts[i] for i in sorted(parts)))
                    self._xml(200, f'<CompleteMultipartUploadResult xmlns="{NS}"><Bucket>'
                              f"{bucket}</Bucket><Key>{escape(key)}</Key><ETag>&quot;x&quot;"
                              "</ETag></CompleteMultipartUploadResult>")
                else:
                    self._error(400, "NotImplemented", self.path)

        class Server(http.server.ThreadingHTTPServer):
            request_queue_size = 256
            daemon_threads = True

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from conftest import _rounds

    endpoint = S3Endpoint(sys.argv[1], float(sys.argv[2]))

    class Stats(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            since = [int(x) for x in self.path.strip("/").split("/") if x] or [0, 0]
            with endpoint.lock:
                body = json.dumps({"requests": endpoint.requests,
                                   "arrivals": len(endpoint.arrivals),
                                   "rounds": _rounds(endpoint.arrivals[since[1]:],
                                                     endpoint.latency),
                                   "cpu_s": time.process_time()}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    stats = http.server.HTTPServer(("127.0.0.1", 0), Stats)
    threading.Thread(target=stats.serve_forever, daemon=True).start()
    print(endpoint.url, f"http://127.0.0.1:{stats.server_address[1]}", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
