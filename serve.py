"""Chat with a trained minimm model and watch training runs, in the browser.

    python serve.py --out_dir=out/mixed                   # then open http://127.0.0.1:8000
    python serve.py --out_dir=out/mixed --port=8080 --device=cuda --max_new_tokens=128
    python serve.py --out_dir=out/lora --lora=out/lora/lora.pt --runs_dir=out

One page in plain HTML, CSS and JavaScript (web/), no build step, and a small JSON API on the standard
library's http.server:
  GET  /                        the page; GET /static/<file>: the rest of web/
  GET  /api/info                the checkpoint's tasks, defaults and limits
  POST /api/chat                a conversation (minimm/server.py has the format) -> the answer, streamed
  GET  /api/runs                every training run under runs_dir (folders with log.jsonl/eval.json/config.json)
  GET  /api/run?name=N&since=K  a run's config, eval.json and log.jsonl records from line K on

What this file teaches:
- Streaming over a POST: the answer is a `text/event-stream` body of `data: {json}` events, written as the
  tokens arrive; the page reads it with fetch() and a stream reader (EventSource can only GET). The server
  speaks HTTP/1.0, so the end of the answer is simply the end of the connection: no chunked encoding.
- Refusing early: the body's size is checked from Content-Length before a byte is read, and every error is
  a JSON object with a status code, so a bad request costs the server almost nothing and stops nothing.
- Static files are resolved on disk and must land inside web/: that defeats `..` in every spelling
  (%2e%2e, %2f, absolute paths, symbolic links) without trying to list the spellings.
- The runs view polls: the page asks for the log lines it has not seen yet every few seconds, and only whole
  lines are sent, because train.py may be halfway through writing the last one.

Bound to 127.0.0.1 by default: there is no authentication, so think before --host=0.0.0.0.
"""
import json
import mimetypes
import os
import sys
import time
import traceback
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import torch

from minimm.chat import load_model
from minimm.config import ConfigError, load_config
from minimm.server import ApiError, Chat, Prompt

WEB_DIR = Path(__file__).resolve().parent / "web"


@dataclass
class ServeConfig:
    out_dir: str = "out/mixed"  # the checkpoint to chat with
    runs_dir: str = "out"  # where the runs view looks for training runs
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (printed at start)
    device: str = "auto"
    lora: str = ""  # an adapter file to apply on top of the checkpoint
    max_new_tokens: int = 256  # the most a request may ask for, and the page's default
    max_upload_bytes: int = 8 * 2**20  # a whole chat request, media of every turn included
    max_queue: int = 8  # requests that may wait for the model while one generates; more get 503
    queue_timeout: float = 120.0  # seconds a request waits for the model before a 503
    seed: int = 1337


# ---- training runs: the folders train.py writes, read while they grow -----------------------------------
RUN_FILES = ("log.jsonl", "eval.json", "config.json")
MAX_RUN_DEPTH = 3  # out/<run> and out/<group>/<run>; no walking through a whole dataset folder
TAIL_BYTES = 4096  # enough of the log's end to hold its last record


def find_runs(runs_dir: Path) -> dict[str, Path]:
    """{name: folder} for each folder under runs_dir with a run's files; the name is the relative path."""
    runs = {}
    for folder, subdirs, files in os.walk(runs_dir):
        rel = Path(folder).relative_to(runs_dir)
        if len(rel.parts) >= MAX_RUN_DEPTH:
            subdirs.clear()
        if any(name in files for name in RUN_FILES):
            runs[rel.as_posix()] = Path(folder)
    return runs


def _complete_lines(path: Path) -> list[str]:
    """The log's lines that are whole: train.py may be halfway through writing the last one."""
    if not path.is_file():
        return []
    return path.read_text(errors="replace").split("\n")[:-1]


def _read_json(path: Path):
    """A JSON file, or None while it is missing or half-written."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_json_line(line: str):
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def run_summary(name: str, folder: Path) -> dict:
    """A run's last logged step, and how long ago it last wrote anything (the page calls it live if recent)."""
    log, tail = folder / "log.jsonl", []
    if log.is_file():
        with open(log, "rb") as f:  # only the end: this runs for every run at every poll
            f.seek(max(0, log.stat().st_size - TAIL_BYTES))
            tail = f.read().decode(errors="replace").split("\n")[:-1]
    last = _read_json_line(tail[-1]) if tail else None
    updated = max(((folder / n).stat().st_mtime for n in RUN_FILES if (folder / n).is_file()), default=0.0)
    return {"name": name, "step": last.get("step") if last else None, "idle_seconds": time.time() - updated,
            "finished": (folder / "eval.json").is_file()}


def read_run(folder: Path, since: int) -> dict:
    """A run's config, eval.json and log records from line `since` on (the page asks only for new ones)."""
    lines = _complete_lines(folder / "log.jsonl")
    reset = since > len(lines)  # the log was started over (a new run in the same folder): send it all
    records = [r for r in map(_read_json_line, lines[0 if reset else since:]) if r is not None]
    return {"config": _read_json(folder / "config.json"), "eval": _read_json(folder / "eval.json"),
            "log": records, "next": len(lines), "reset": reset}


# ---- HTTP -----------------------------------------------------------------------------------------------
class ChatServer(ThreadingHTTPServer):
    daemon_threads = True  # a stalled connection must not keep the process alive at Ctrl-C
    request_queue_size = 64  # listen backlog: a burst of connections waits to be accepted, not refused

    def __init__(self, address: tuple[str, int], chat: Chat, web_dir: Path, runs_dir: Path, out_dir: Path,
                 max_upload_bytes: int):
        super().__init__(address, Handler)
        self.chat, self.web_dir, self.runs_dir = chat, Path(web_dir).resolve(), Path(runs_dir)
        self.out_dir, self.max_upload_bytes = Path(out_dir), max_upload_bytes

    def info(self) -> dict:
        serving = next((name for name, folder in find_runs(self.runs_dir).items()
                        if folder.resolve() == self.out_dir.resolve()), None)
        return {**self.chat.info(), "out_dir": str(self.out_dir), "run": serving,
                "max_upload_bytes": self.max_upload_bytes}

    def run(self, query: dict[str, list[str]]) -> dict:
        name = query.get("name", [""])[0]
        runs = find_runs(self.runs_dir)  # only names found here are read: no path from the URL is opened
        if name not in runs:
            raise ApiError(404, f"no run {name!r} under {self.runs_dir}")
        since = query.get("since", ["0"])[0]
        if not since.isdigit():
            raise ApiError(400, "since must be a whole number of log lines")
        return {"name": name, **read_run(runs[name], int(since))}


class Handler(BaseHTTPRequestHandler):
    server: ChatServer
    timeout = 60  # seconds a silent client may hold its thread (a body that never comes, a stalled reader)
    server_version = "minimm"

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        try:
            if url.path == "/api/info":
                self.send_json(200, self.server.info())
            elif url.path == "/api/runs":
                runs = [run_summary(n, f) for n, f in find_runs(self.server.runs_dir).items()]
                self.send_json(200, {"runs": sorted(runs, key=lambda r: r["idle_seconds"])})
            elif url.path == "/api/run":
                self.send_json(200, self.server.run(parse_qs(url.query)))
            elif url.path.startswith("/api/"):
                raise ApiError(404, f"no API endpoint {url.path}")
            else:
                self.send_static(url.path)
        except ApiError as e:
            self.send_json(e.status, {"error": e.message})

    def do_POST(self) -> None:
        try:
            if urlsplit(self.path).path != "/api/chat":
                raise ApiError(404, f"no POST endpoint {urlsplit(self.path).path}")
            prompt = self.server.chat.prepare(self.read_json())
            with self.server.chat.turn():
                self.stream(prompt)
        except ApiError as e:
            self.send_json(e.status, {"error": e.message})

    def read_json(self) -> object:
        """The request's JSON body, refused before reading when it is too large."""
        # Requiring application/json also keeps plain cross-site form posts out: browsers send those
        # without asking, but must ask this server first (CORS preflight) before sending JSON, and it never agrees.
        if self.headers.get_content_type() != "application/json":
            raise ApiError(415, "send the body as Content-Type: application/json")
        length = self.headers.get("Content-Length", "")
        if not length.isdigit():
            raise ApiError(411, "a Content-Length header with the body's size is required")
        if int(length) > self.server.max_upload_bytes:
            self.close_connection = True  # the body stays unread
            raise ApiError(413, f"the request is {int(length):,} bytes; this server takes at most "
                                f"max_upload_bytes={self.server.max_upload_bytes:,}")
        data = self.rfile.read(int(length))
        try:
            return json.loads(data)
        except (ValueError, RecursionError) as e:  # RecursionError: "[[[[..." nested past the parser's limit
            raise ApiError(400, f"malformed JSON: {str(e)[:200]}") from e

    def stream(self, prompt: Prompt) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        try:
            if prompt.dropped:
                self.send_event({"dropped": prompt.dropped, "notice": f"the first {prompt.dropped} turns were "
                                 f"left out to fit the {self.server.chat.block_size}-token context"})
            stats = self.server.chat.answer(prompt, lambda piece: self.send_event({"text": piece}))
            self.send_event({"done": True, **stats})
        except (ConnectionError, TimeoutError):  # the page stopped or went away: generation stops with it
            self.log_message("client closed the stream; generation stopped")
        except Exception as e:  # the 200 is already sent: the error can only travel as an event
            traceback.print_exc()
            self.send_event({"error": f"generation failed: {type(e).__name__}: {e}"})

    def send_event(self, event: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(event).encode() + b"\n\n")
        self.wfile.flush()

    def send_static(self, path: str) -> None:
        if path != "/" and not path.startswith("/static/"):
            raise ApiError(404, f"no page {path}")
        name = "index.html" if path == "/" else unquote(path.removeprefix("/static/"))
        try:
            target = (self.server.web_dir / name).resolve()
        except (OSError, ValueError) as e:  # a NUL byte, a link loop
            raise ApiError(400, f"bad path: {e}") from e
        if not target.is_relative_to(self.server.web_dir):
            raise ApiError(403, "that path is outside the served folder")
        if not target.is_file():
            raise ApiError(404, f"no file {name}")
        body = target.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", mimetypes.guess_type(target.name)[0] or "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-cache")  # edits to web/ show on reload
        self.end_headers()
        self.wfile.write(body)

    def send_json(self, status: int, obj) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The base class's own refusals (a malformed request line, an unsupported method) as JSON too."""
        self.close_connection = True
        self.send_json(code, {"error": message or f"HTTP {code}"})


def main(argv: list[str]) -> None:
    cfg = load_config(argv, ServeConfig)
    if cfg.device == "auto":
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(cfg.seed)
    try:
        model, tok, ckpt = load_model(cfg.out_dir, cfg.device, cfg.lora or None)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(str(e))
    chat = Chat(model, tok, ckpt, cfg.max_new_tokens, cfg.max_queue, cfg.queue_timeout)
    try:
        server = ChatServer((cfg.host, cfg.port), chat, WEB_DIR, Path(cfg.runs_dir), Path(cfg.out_dir),
                            cfg.max_upload_bytes)
    except OSError as e:  # the port is taken, or the host is not an address of this machine
        sys.exit(f"cannot listen on {cfg.host}:{cfg.port}: {e}")
    if cfg.host not in ("127.0.0.1", "localhost"):
        print(f"warning: listening on {cfg.host} without authentication: anyone who can reach it can use the model")
    print(f"serving {cfg.out_dir} (step {ckpt.get('step')}, tasks {', '.join(tok.tasks)}) on "
          f"http://{cfg.host}:{server.server_port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped")
    finally:
        server.server_close()


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ConfigError as e:
        sys.exit(f"error: {e}")
