"""A tiny OpenAI-compatible chat-completions server for tests: a real HTTP endpoint on 127.0.0.1
that answers every request in DSPy's chat-adapter format and records what it was sent.

    with ChatServer({"sentiment": "positive"}) as server:
        recipe_overrides = server.model_overrides("remote", "MY_KEY")
        ...
        server.authorizations   # the Authorization header of every request, in order
"""

from __future__ import annotations

import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def chat_answer(fields: dict[str, str]) -> str:
    """What a model that follows DSPy's ChatAdapter answers: each field under its header, then the
    end marker. DSPy keeps the fields its signature asks for and ignores the rest."""
    return "".join(f"[[ ## {name} ## ]]\n{value}\n\n" for name, value in fields.items()) + "[[ ## completed ## ]]"


class ChatServer:
    def __init__(self, fields: dict[str, str]):
        self.answer = chat_answer(fields)
        # a model name of its own: DSPy's cache (keyed without api_base) never answers in its place
        self.model = f"openai/stub-{uuid.uuid4().hex[:12]}"
        self.authorizations: list[str | None] = []
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._http.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True, name="chat-server")  # a short poll: a quick shutdown

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self._http.server_address[1]}/v1"

    def model_overrides(self, name: str, key_env: str) -> list[str]:
        """Recipe overrides that declare `models.<name>` as a LiteLLM model served here, its API key
        in the environment variable `key_env` (an openai/ model needs one)."""
        spec = {"type": "litellm", "model": self.model, "api_base": self.api_base,
                "api_key_env": key_env, "max_tokens": 32}
        return [f"models.{name}={json.dumps(spec)}"]

    def _record(self, authorization: str | None, body: dict) -> None:
        with self._lock:
            self.authorizations.append(authorization)
            self.requests.append(body)

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                server._record(self.headers.get("Authorization"), body)
                reply = json.dumps({
                    "id": f"chatcmpl-{len(server.requests)}", "object": "chat.completion", "created": 0,
                    "model": body.get("model", "stub-model"),
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": server.answer}}],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 8, "total_tokens": 18}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):  # the test's captured stderr is for jointopt's output
                pass

        return Handler

    def __enter__(self) -> "ChatServer":
        self._thread.start()
        return self

    def __exit__(self, *_):
        self._http.shutdown()
        self._http.server_close()
