"""serve.py's API against a tiny trained checkpoint: streamed answers equal to ask(), every kind of bad input
answered with a JSON error (and the server still answering after), path traversal, the runs view, a
bounded load test; and minimm/server.py's queue directly."""
import base64
import http.client
import io
import json
import socket
import subprocess
import sys
import threading
import time
import wave
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from minimm.audio import load_audio_features
from minimm.chat import ask, load_model
from minimm.data import audio_tokens
from minimm.render import render_prompt
from minimm.server import ApiError, Chat
from minimm.vit import load_image

ROOT = Path(__file__).resolve().parent.parent
MAX_NEW = 7
MAX_UPLOAD = 300_000


@pytest.fixture(scope="module")
def port(serve):
    return serve(f"--max_new_tokens={MAX_NEW}", f"--max_upload_bytes={MAX_UPLOAD}", "--max_queue=8")


@pytest.fixture(scope="module")
def local(tiny_run):
    """The same checkpoint loaded in this process: what the server's answers must equal."""
    return load_model(tiny_run.out_dir, "cpu")


def request(port: int, method: str, path: str, body=None, headers=None) -> tuple[int, str, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **(headers or {})} if body is not None else headers or {}
    conn.request(method, path, body=body, headers=headers)
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, response.getheader("Content-Type", ""), data


def chat(port: int, **body) -> tuple[int, list[dict] | dict]:
    """POST /api/chat -> (200, the events) or (status, the JSON error)."""
    status, kind, data = request(port, "POST", "/api/chat", body)
    if status != 200:
        assert kind == "application/json", (status, data)
        return status, json.loads(data)
    assert kind == "text/event-stream"
    blocks = data.decode().split("\n\n")
    assert blocks[-1] == "" and all(b.startswith("data: ") for b in blocks[:-1]), data
    return status, [json.loads(b.removeprefix("data: ")) for b in blocks[:-1]]


def b64(path: Path | bytes) -> str:
    return base64.b64encode(path if isinstance(path, bytes) else path.read_bytes()).decode()


def user(text: str, images=(), audio=()) -> dict:
    return {"role": "user", "text": text, "images": [b64(p) for p in images], "audio": [b64(p) for p in audio]}


def answer_of(events: list[dict]) -> str:
    assert events[-1].get("done") is True, events
    assert all("text" in e or "dropped" in e for e in events[:-1]), events
    return "".join(e.get("text", "") for e in events)


def test_page_and_info(port):
    status, kind, page = request(port, "GET", "/")
    assert status == 200 and kind == "text/html" and b"/static/app.js" in page
    for name, expected in (("app.js", "javascript"), ("style.css", "text/css")):
        status, kind, _ = request(port, "GET", f"/static/{name}")
        assert status == 200 and expected in kind
    status, _, data = request(port, "GET", "/api/info")
    info = json.loads(data)
    assert status == 200 and info["tasks"] == ["text", "code", "image", "audio"]
    assert info["images"] and info["audio"] and info["block_size"] == 128 and info["run"] == "tiny"
    assert info["max_new_tokens"] == MAX_NEW and info["max_upload_bytes"] == MAX_UPLOAD
    assert info["max_audio_seconds"] == 10.0 and info["temperature"]["code"] == 0.2


def test_answers_equal_ask_for_text_image_audio(port, local, tiny_run):
    model, tok, ckpt = local
    image = load_image(tiny_run.images["green"], model.vision.config.image_size, ckpt["config"]["resize"])
    mels = load_audio_features(tiny_run.wavs["blue"]).T
    cases = [("text", [("user", "Say 4.")], {}, user("Say 4.")),
             ("image", [("user", "<image>\nWhat color is it?")], {"images": [image]},
              user("What color is it?", images=[tiny_run.images["green"]])),
             ("audio", [("user", "<audio>\nWhich tone?")], {"audio": [mels]},
              user("Which tone?", audio=[tiny_run.wavs["blue"]]))]
    for task, turns, media, sent in cases:
        expected = ask(model, tok, task, turns, MAX_NEW, temperature=0.0, **media)
        status, events = chat(port, task=task, temperature=0, max_new_tokens=MAX_NEW, turns=[sent])
        assert status == 200 and answer_of(events) == expected, (task, events)
        n_audio = [audio_tokens(len(m)) for m in media.get("audio", [])]
        assert events[-1]["prompt_tokens"] == len(render_prompt(tok, task, turns, model.image_tokens, n_audio))


def test_media_without_text_gets_the_default_question(port, local, tiny_run):
    model, tok, _ = local
    status, events = chat(port, task="image", temperature=0, turns=[user("", images=[tiny_run.images["red"]])])
    expected = render_prompt(tok, "image", [("user", "<image>\nDescribe the image.")], model.image_tokens)
    assert status == 200 and events[-1]["prompt_tokens"] == len(expected)


def test_history_is_kept_and_dropped_from_the_start_when_too_long(port, local):
    model, tok, _ = local
    turns = [("user", "Say 1."), ("assistant", "1 it is."), ("user", "Say 2.")]
    status, events = chat(port, task="text", temperature=0, turns=[
        {"role": r, "text": t} for r, t in turns])
    assert status == 200 and events[-1]["prompt_tokens"] == len(render_prompt(tok, "text", turns))
    long = " ".join(f"word{i}" for i in range(8))  # about 50 tokens a turn in a 128-token context
    history = [{"role": "user", "text": long}, {"role": "assistant", "text": long}] * 3 + [{"role": "user", "text": "Say 3."}]
    status, events = chat(port, task="text", temperature=0, max_new_tokens=MAX_NEW, turns=history)
    assert status == 200 and "dropped" in events[0] and "left out" in events[0]["notice"]
    dropped = events[0]["dropped"]
    kept, one_more = ([(t["role"], t["text"]) for t in history[start:]] for start in (dropped, dropped - 2))
    assert dropped % 2 == 0 and events[-1]["prompt_tokens"] == len(render_prompt(tok, "text", kept))
    assert len(render_prompt(tok, "text", kept)) + MAX_NEW <= 128 < len(render_prompt(tok, "text", one_more)) + MAX_NEW
    many = [{"role": "user", "text": "Say 1."}, {"role": "assistant", "text": "1 it is."}] * 2000 + history[-1:]
    status, events = chat(port, task="text", temperature=0, max_new_tokens=MAX_NEW, turns=many)
    assert status == 200 and events[0]["dropped"] >= 3900 and events[-1]["prompt_tokens"] + MAX_NEW <= 128
    status, error = chat(port, task="text", turns=[{"role": "user", "text": long * 4}])
    assert status == 400 and "block_size=128" in error["error"]


def bomb_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (5000, 4100)).save(buffer, "PNG")  # 20 M pixels in about 20 kB
    return buffer.getvalue()


@pytest.mark.parametrize("body, status, words", [
    (b"{bad json", 400, "malformed JSON"),
    (b"[" * 100_000, 400, "malformed JSON"),
    ([1, 2], 400, "JSON object"),
    ({"task": "poetry", "turns": [user("hi")]}, 400, "text, code, image, audio"),
    ({"task": "text", "turns": [user("hi")], "temperature": "hot"}, 400, "temperature"),
    ({"task": "text", "turns": [user("hi")], "temperature": 9}, 400, "temperature"),
    ({"task": "text", "turns": [user("hi")], "max_new_tokens": MAX_NEW + 1}, 400, "max_new_tokens"),
    ({"task": "text", "turns": []}, 400, "alternating"),
    ({"task": "text", "turns": [user("hi"), {"role": "assistant", "text": "yo"}]}, 400, "alternating"),
    ({"task": "text", "turns": [{"role": "assistant", "text": "hi"}]}, 400, "turn 0"),
    ({"task": "text", "turns": [user("")]}, 400, "empty"),
    ({"task": "text", "turns": [user("see <image> here")]}, 400, "attach a file"),
    ({"task": "image", "turns": [user("hi", images=[b"GIF89a not really"])]}, 400, "not an image"),
    ({"task": "image", "turns": [user("hi", images=[bomb_png()])]}, 400, "too large"),
    ({"task": "image", "turns": [{"role": "user", "text": "hi", "images": ["%%%"]}]}, 400, "not base64"),
    ({"task": "image", "turns": [{"role": "user", "text": "hi", "images": "abc"}]}, 400, "lists"),
    ({"task": "audio", "turns": [user("hi", audio=[b"RIFF\x00\x00\x00\x00WAVE"])]}, 400, "not a WAV"),
    ({"task": "audio", "turns": [user("hi", audio=[b"\x89PNG\r\n\x1a\n"])]}, 400, "not a WAV"),
])
def test_bad_chat_requests_get_json_errors(port, body, status, words):
    got, kind, data = request(port, "POST", "/api/chat", body if isinstance(body, bytes) else json.dumps(body).encode(),
                              {"Content-Type": "application/json"})
    assert (got, kind) == (status, "application/json") and words in json.loads(data)["error"], data
    assert request(port, "GET", "/api/info")[0] == 200


def test_audio_longer_than_the_encoder_reads(port, tmp_path):
    with wave.open(str(tmp_path / "long.wav"), "wb") as w:  # 10.5 s of silence at 8 kHz, 8-bit
        w.setnchannels(1)
        w.setsampwidth(1)
        w.setframerate(8000)
        w.writeframes(b"\x80" * 84000)
    status, error = chat(port, task="audio", turns=[user("hi", audio=[tmp_path / "long.wav"])])
    assert status == 400 and "10.5 s is longer than the 10 s" in error["error"]


def raw(port: int, head: bytes) -> tuple[int, bytes]:
    """Send a request head (and no body) as bytes; the status and body of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data.split(b"\r\n\r\n", 1)[1]


def test_refused_before_reading_the_body(port):
    t0 = time.time()
    status, body = raw(port, b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 1000000000\r\n\r\n")
    assert status == 413 and "max_upload_bytes=300,000" in json.loads(body)["error"]
    assert time.time() - t0 < 10  # it answered without waiting for the gigabyte
    status, body = raw(port, b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\r\n")
    assert status == 411 and "Content-Length" in json.loads(body)["error"]
    status, _, data = request(port, "POST", "/api/chat", b"{}", {"Content-Type": "text/plain"})
    assert status == 415 and "application/json" in json.loads(data)["error"]
    for method, path, code in (("PUT", "/api/chat", 501), ("POST", "/api/nothing", 404), ("GET", "/api/nothing", 404)):
        status, kind, data = request(port, method, path, b"{}" if method != "GET" else None)
        assert status == code and kind == "application/json" and json.loads(data)["error"]
    status, body = raw(port, b"GET / two-paths HTTP/1.1\r\n\r\n")
    assert status == 400 and json.loads(body)["error"]
    assert request(port, "GET", "/api/info")[0] == 200


@pytest.mark.parametrize("path", ["/static/../../etc/passwd", "/static/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
                                  "/static/..%2f..%2fserve.py", "/static/%2E%2E/serve.py", "/static//etc/passwd",
                                  "/static/%2fetc%2fpasswd", "/../serve.py", "/static/%00", "/serve.py",
                                  "/static/missing.js"])
def test_no_file_outside_the_served_folder(port, path):
    status, _, data = request(port, "GET", path)
    assert status in (400, 403, 404) and b"root:" not in data and b"ServeConfig" not in data
    assert "error" in json.loads(data)


def test_a_client_that_leaves_mid_answer_does_not_stop_the_server(port):
    body = json.dumps({"task": "text", "turns": [user("Say 5.")]}).encode()
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(b"POST /api/chat HTTP/1.0\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    deadline = time.time() + 30  # the abandoned ones may hold the queue until their next write fails
    while (status := chat(port, task="text", turns=[user("Say 5.")])[0]) == 503 and time.time() < deadline:
        time.sleep(0.1)
    assert status == 200


def test_runs_listed_and_read_while_they_grow(port, tiny_run):
    status, _, data = request(port, "GET", "/api/runs")
    runs = {r["name"]: r for r in json.loads(data)["runs"]}
    assert status == 200 and runs["tiny"]["step"] == 8 and runs["tiny"]["finished"]
    status, _, data = request(port, "GET", "/api/run?name=tiny")
    run = json.loads(data)
    assert run["config"]["n_embd"] == 32 and "val_loss" in run["eval"]["image"]
    assert [r["step"] for r in run["log"] if "train" in r] == list(range(1, 9))
    status, _, data = request(port, "GET", f"/api/run?name=tiny&since={run['next']}")
    assert json.loads(data)["log"] == [] and json.loads(data)["next"] == run["next"]
    growing = tiny_run.runs_dir / "group" / "growing"
    growing.mkdir(parents=True)
    (growing / "log.jsonl").write_text('{"step": 1, "train": {"all": 3.5}}\nnot json\n{"step": 2, "train": {"al')
    status, _, data = request(port, "GET", "/api/run?name=group/growing")
    run = json.loads(data)
    assert status == 200 and run["next"] == 2 and [r["step"] for r in run["log"]] == [1]
    assert run["config"] is None and run["eval"] is None
    status, _, data = request(port, "GET", "/api/run?name=group/growing&since=5")
    assert json.loads(data)["reset"] and json.loads(data)["log"][0]["step"] == 1
    for query, code in (("name=../tiny", 404), ("name=%2e%2e", 404), ("name=tiny&since=-1", 400),
                        ("name=tiny&since=x", 400), ("", 404)):
        assert request(port, "GET", f"/api/run?{query}")[0] == code, query


def test_load_200_requests_from_8_threads(port, tiny_run):
    image = b64(tiny_run.images["blue"])

    def one(i: int) -> tuple[int, int]:
        if i % 4 == 0:
            return 0, request(port, "GET", "/api/info")[0]
        if i % 4 == 1:
            return 1, chat(port, task="nope", turns=[user("hi")])[0]
        status, events = chat(port, task="image", max_new_tokens=3,
                              turns=[{"role": "user", "text": f"Say {i}.", "images": [image]}])
        return 2, status if events[-1].get("done") else -1

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(200)))
    expected = {0: 200, 1: 400, 2: 200}  # 8 clients never fill a queue of 8: every chat is answered
    assert len(results) == 200 and all(status == expected[kind] for kind, status in results), results


def test_a_crowd_beyond_the_queue_gets_503(serve):
    port = serve("--max_queue=0")
    start = threading.Barrier(8)

    def one(i: int) -> tuple[int, list | dict]:
        start.wait(timeout=30)
        return chat(port, task="text", temperature=1.0, max_new_tokens=20, turns=[user(f"Say {i}.")])

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    for status, body in results:
        assert (status == 200 and body[-1]["done"]) or (status == 503 and "busy" in body["error"]), body
    assert {status for status, _ in results} == {200, 503}  # one generates, the others are turned away
    assert request(port, "GET", "/api/info")[0] == 200


def test_queue_is_bounded_in_size_and_time(local):
    model, tok, ckpt = local
    chat_now = Chat(model, tok, ckpt, MAX_NEW, max_queue=0, queue_timeout=5)
    with chat_now.turn():
        with pytest.raises(ApiError) as e, chat_now.turn():
            pass
        assert e.value.status == 503 and "0 requests are already waiting" in e.value.message
    patient = Chat(model, tok, ckpt, MAX_NEW, max_queue=1, queue_timeout=0.3)
    with patient.turn():
        t0 = time.time()
        with pytest.raises(ApiError) as e, patient.turn():
            pass
        assert e.value.status == 503 and "waited 0.3 s" in e.value.message and time.time() - t0 >= 0.29
    waited = threading.Event()

    def second() -> None:
        with patient.turn():
            waited.set()

    with patient.turn():
        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.05)
        assert not waited.is_set()  # it queues behind the one generating ...
    thread.join(5)
    assert waited.is_set()  # ... and goes when that one is done


@pytest.mark.parametrize("after, repeat, turn", [(False, False, "<image>\nWhat color is it?"),
                                                 (True, False, "What color is it?\n<image>"),
                                                 (True, True, "What color is it?\n<image>\nWhat color is it?")])
def test_an_upload_goes_where_the_checkpoint_was_trained_to_see_it(local, tiny_run, after, repeat, turn):
    model, tok, ckpt = local
    trained = {**ckpt, "config": {**ckpt["config"], "image_after_question": after, "repeat_question": repeat}}
    prompt = Chat(model, tok, trained, MAX_NEW, max_queue=0, queue_timeout=1).prepare(
        {"task": "image", "turns": [user("What color is it?", images=[tiny_run.images["red"]])]})
    assert prompt.turns == [("user", turn)]
    assert len(prompt.images) == 1


def test_cli_errors(tiny_run, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "serve.py", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=120)
    proc = run(f"--out_dir={tiny_run.out_dir}", "--prot=8000")
    assert proc.returncode != 0 and "unknown config key 'prot'" in proc.stderr and "port" in proc.stderr
    proc = run(f"--out_dir={tmp_path / 'nothing'}")
    assert proc.returncode != 0 and "no checkpoint" in proc.stderr

