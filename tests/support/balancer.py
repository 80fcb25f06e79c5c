"""A round-robin load balancer on loopback.

Default: each new TCP connection goes to the next backend (so a keep-alive connection
stays on one backend). ``affinity=False``: every HTTP request goes to the next backend,
even on one keep-alive client connection, and a websocket upgrade is piped to whichever
backend is next, as a load balancer without sticky sessions does.
"""

from __future__ import annotations

import asyncio
import itertools
import threading

from tests.support.servers import free_port

MAX_HEAD = 65536


class RoundRobinBalancer:
    def __init__(self, backends: list[int], affinity: bool = True) -> None:
        self.backends = itertools.cycle(backends)
        self.affinity = affinity
        self.requests = 0
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()
        self._ready.wait(5)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        handler = self._serve if self.affinity else self._serve_per_request
        self._server = self._loop.run_until_complete(
            asyncio.start_server(handler, "127.0.0.1", self.port)
        )
        self._ready.set()
        self._loop.run_forever()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _serve(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        try:
            backend_reader, backend_writer = await asyncio.open_connection(
                "127.0.0.1", next(self.backends)
            )
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(
            self._pipe(client_reader, backend_writer), self._pipe(backend_reader, client_writer)
        )

    async def _serve_per_request(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        """Parse each request head; send each request to the next backend on a new connection."""
        try:
            while True:
                try:
                    head = await client_reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                headers = _headers(head)
                self.requests += 1
                backend_reader, backend_writer = await asyncio.open_connection(
                    "127.0.0.1", next(self.backends)
                )
                if headers.get("upgrade", "").lower() == "websocket":
                    backend_writer.write(head)
                    await asyncio.gather(
                        self._pipe(client_reader, backend_writer),
                        self._pipe(backend_reader, client_writer),
                    )
                    return
                length = int(headers.get("content-length", "0"))
                body = await client_reader.readexactly(length) if length else b""
                backend_writer.write(_with_close(head) + body)
                await backend_writer.drain()
                response_head = await backend_reader.readuntil(b"\r\n\r\n")
                response_headers = _headers(response_head)
                if "content-length" in response_headers:
                    response_body = await backend_reader.readexactly(
                        int(response_headers["content-length"])
                    )
                    client_writer.write(_keep_alive(response_head) + response_body)
                    await client_writer.drain()
                    backend_writer.close()
                    continue
                # No length (chunked or until close): relay until the backend closes, then end.
                client_writer.write(response_head)
                await self._pipe(backend_reader, client_writer)
                backend_writer.close()
                return
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            client_writer.close()

    def close(self) -> None:
        """Stop listening, end every relayed connection (their tasks finish, none is left
        pending for the garbage collector to close), then stop the loop."""
        ended = asyncio.run_coroutine_threadsafe(self._end_all(), self._loop)
        try:
            ended.result(5)
        except Exception:  # a relay that would not end: stopping the loop drops it anyway
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)

    async def _end_all(self) -> None:
        self._server.close()
        relays = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in relays:
            task.cancel()
        await asyncio.gather(*relays, return_exceptions=True)


def _headers(head: bytes) -> dict[str, str]:
    lines = head.decode("latin-1").split("\r\n")[1:]
    out = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if sep:
            out[name.strip().lower()] = value.strip()
    return out


def _replace_connection(head: bytes, value: bytes) -> bytes:
    lines = [
        line for line in head[:-4].split(b"\r\n") if not line.lower().startswith(b"connection:")
    ]
    return b"\r\n".join([*lines, b"Connection: " + value]) + b"\r\n\r\n"


def _with_close(head: bytes) -> bytes:
    return _replace_connection(head, b"close")


def _keep_alive(head: bytes) -> bytes:
    return _replace_connection(head, b"keep-alive")
