"""A live ``moetier serve`` process for the server tests, and raw HTTP calls to it."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import time

KEY = "test-key"


class LiveServer:
    """``moetier serve`` run as a user would, in its own process."""

    def __init__(self, *args: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server_address = ("127.0.0.1", self.port)
        self.proc = subprocess.Popen([sys.executable, "-m", "moetier", "serve", *(args or ("--model", "demo")),
                                      "--port", str(self.port), "--api-key", KEY], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stdout.read()}")
            try:
                self.health()
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("server did not come up")

    def health(self) -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        conn.request("GET", "/health")
        data = json.loads(conn.getresponse().read())
        conn.close()
        return data

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)


def openai_client(server, key=KEY):
    """The official ``openai`` client on ``server``'s /v1, without retries."""
    import openai

    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key=key, max_retries=0)


def raw_call(server, method, path, body: bytes | None = None, key=KEY):
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    conn.request(method, path, body=body, headers=headers)
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, json.loads(data)


def open_stream(port: int, model: str, prompt: str) -> socket.socket:
    """Start a long streamed completion on a raw socket and return once its first event arrived."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 120, "temperature": 0, "stream": True,
                       "ignore_eos": True}).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: " + str(len(body)).encode()
                 + b"\r\n\r\n" + body)
    got = b""
    while b"data: " not in got:
        got += sock.recv(4096)
    assert got.startswith(b"HTTP/1.1 200"), got
    return sock
