"""A tiny OpenAI-compatible chat-completions server for tests: a real HTTP endpoint on 127.0.0.1
that answers every request in DSPy's chat-adapter format and records what it was sent.

    with ChatServer({"sentiment": "positive"}) as server:
        recipe_overrides = server.model_overrides("remote", "MY_KEY")
        ...
        server.authorizations   # the Authorization header of every request, in order

It can also fail the way servers do, for the tests of what jointopt makes of that (test_server.py):
`server.status = 500` answers every request with that HTTP error, `server.key = "sk-..."` refuses
(401) any other key, `server.delay = 5.0` answers that many seconds late; set back, it answers again.
`ChatServer(..., port=P, model=M)` takes another server's place (a recipe that names its port and model).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def chat_answer(fields: dict[str, str]) -> str:
    """What a model that follows DSPy's ChatAdapter answers: each field under its header, then the
    end marker. DSPy keeps the fields its signature asks for and ignores the rest."""
    return "".join(f"[[ ## {name} ## ]]\n{value}\n\n" for name, value in fields.items()) + "[[ ## completed ## ]]"


class ChatServer:
    def __init__(self, fields: dict[str, str], port: int = 0, model: str | None = None):
        self.answer = chat_answer(fields)
        # a model name of its own: DSPy's cache (keyed without api_base) never answers in its place
        self.model = model or f"openai/stub-{uuid.uuid4().hex[:12]}"
        self.authorizations: list[str | None] = []
        self.requests: list[dict] = []
        self.status: int | None = None  # answer every request with this HTTP error
        self.key: str | None = None  # refuse (401) a request that does not carry this key
        self.delay = 0.0  # seconds to wait before answering
        self._lock = threading.Lock()
        self._http = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self._thread = threading.Thread(
            target=self._http.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True, name="chat-server"
        )  # a short poll: a quick shutdown

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def port(self) -> int:
        return self._http.server_address[1]

    def model_overrides(self, name: str, key_env: str, **settings) -> list[str]:
        """Recipe overrides that declare `models.<name>` as a LiteLLM model served here, its API key
        in the environment variable `key_env` (an openai/ model needs one); `settings` are more of the
        model's fields (timeout=0.5, num_retries=0)."""
        spec = {
            "type": "litellm",
            "model": self.model,
            "api_base": self.api_base,
            "api_key_env": key_env,
            "max_tokens": 32,
            **settings,
        }
        return [f"models.{name}={json.dumps(spec)}"]

    def _record(self, authorization: str | None, body: dict) -> None:
        with self._lock:
            self.authorizations.append(authorization)
            self.requests.append(body)

    def _reply(self, authorization: str | None, body: dict) -> tuple[int, dict]:
        """(HTTP status, JSON body) for one request, as the server is set now."""
        if self.status is not None:
            return self.status, {
                "error": {"message": "Internal error: the stub was told to fail", "type": "server_error", "code": None}
            }
        if self.key is not None and authorization != f"Bearer {self.key}":
            # as OpenAI's does, the refusal quotes the key it was given, masked: jointopt leaves it out
            given = str(authorization).removeprefix("Bearer ")
            return 401, {
                "error": {
                    "message": f"Incorrect API key provided: {given[:3]}****{given[-4:]}",
                    "type": "invalid_request_error",
                    "code": "invalid_api_key",
                }
            }
        return 200, {
            "id": f"chatcmpl-{len(self.requests)}",
            "object": "chat.completion",
            "created": 0,
            "model": body.get("model", "stub-model"),
            "choices": [
                {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": self.answer}}
            ],
            "usage": {"prompt_tokens": 10, "completion_tokens": 8, "total_tokens": 18},
        }

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                server._record(self.headers.get("Authorization"), body)
                time.sleep(server.delay)
                status, answer = server._reply(self.headers.get("Authorization"), body)
                reply = json.dumps(answer).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(reply)))
                    self.end_headers()
                    self.wfile.write(reply)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up waiting (a timeout)
                    pass

            def log_message(self, *args):  # the test's captured stderr is for jointopt's output
                pass

        return Handler

    def __enter__(self) -> ChatServer:
        self._thread.start()
        return self

    def __exit__(self, *_):
        self.close()

    def close(self) -> None:
        """Stop answering and free the port: from now on, connecting to it is refused."""
        if self._thread.is_alive():
            self._http.shutdown()
        self._http.server_close()
