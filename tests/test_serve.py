"""`mobilellm serve`, started as a user starts it, answering the official OpenAI client."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from mobilellm.chat_template import ChatFormatter
from mobilellm.inference import SamplingParams, load_engine
from test_generate import make_model_dir, one_thread  # noqa: F401  (one_thread: autouse fixture)

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

KEY = "test-key-123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`mobilellm serve <dir> --port N ...` in a subprocess; stopped (by its own pid) at teardown."""

    def __init__(self, model_dir, *args, env=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mobilellm", "serve", str(model_dir), "--port", str(self.port), *map(str, args)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited: {self.proc.stderr.read()}")
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise AssertionError("server did not answer /health within 120 s")

    def request(self, method, path, body=None, headers=None, raw=None):
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def get(self, path, headers=None):
        return self.request("GET", path, headers=headers)

    def post(self, path, body=None, **kw):
        return self.request("POST", path, body, **kw)

    def client(self, key="unused", **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, **kw)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve") / "tiny-chat"
    make_model_dir(root, init_std=0.1)  # larger weights: outputs depend clearly on the prompt
    return root


@pytest.fixture(scope="module")
def server(model_dir):
    s = Server(model_dir, "--max-batch", 16)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def engine(model_dir):
    return load_engine(model_dir)


def expected_completion(engine, prompt, max_tokens):
    return engine.generate([prompt], SamplingParams(max_new_tokens=max_tokens))[0]


def test_models_and_health(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["tiny-chat"]
    status, health = server.get("/health")
    assert status == 200 and health["status"] == "ok" and health["max_batch"] == 16


def test_completions_with_the_openai_client(server, engine):
    client = server.client()
    prompt = "the model runs on a phone"
    want = expected_completion(engine, prompt, 20)
    got = client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=20, temperature=0)
    assert got.choices[0].text == want.text and got.choices[0].finish_reason == want.finish_reason
    assert got.usage.completion_tokens == len(want.token_ids) and got.usage.prompt_tokens == want.prompt_tokens
    stream = client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=20, temperature=0, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == want.finish_reason and len(chunks) > 2


def test_chat_completions_with_the_openai_client(server, engine):
    client = server.client()
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "where is the cache?"}]
    fmt = ChatFormatter(engine.tokenizer, engine.max_len)
    want = engine.generate([fmt.encode(messages)], SamplingParams(max_new_tokens=24, stop=fmt.stops))[0]
    got = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=24, temperature=0)
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want.text and got.choices[0].finish_reason == want.finish_reason
    stream = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert chunks[-1].usage.completion_tokens == len(want.token_ids)


def test_sampling_with_a_seed_is_reproducible(server):
    client = server.client()
    kw = dict(model="tiny-chat", prompt="keys and values", max_tokens=16, temperature=1.0, seed=11)
    a, b = (client.completions.create(**kw).choices[0].text for _ in range(2))
    assert a == b


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server):
    good = {"model": "tiny-chat", "prompt": "the cache", "max_tokens": 4, "temperature": 0}
    cases = [
        (dict(raw=b'{"model": "tiny-chat", "prompt": '), 400, None),  # malformed JSON
        (dict(raw=b"[1, 2"), 400, None),
        (dict(body={**good, "model": "gpt-9"}), 404, "model"),
        (dict(body={**good, "prompt": "keys " * 400}), 400, "prompt"),
        (dict(body={**good, "max_tokens": -1}), 400, "max_tokens"),
        (dict(body={**good, "max_tokens": 10**9}), 400, "max_tokens"),
        (dict(body={**good, "max_tokens": "5"}), 400, "max_tokens"),
        (dict(body={**good, "temperature": "hot"}), 400, "temperature"),
        (dict(body={**good, "temperature": 7}), 400, "temperature"),
        (dict(body={**good, "prompt": 42}), 400, "prompt"),
        (dict(body={**good, "prompt": [1, 99999]}), 400, "prompt"),
        (dict(body={**good, "stop": ["x"] * 40}), 400, "stop"),
        (dict(body={k: v for k, v in good.items() if k != "prompt"}), 400, "prompt"),
    ]
    for kwargs, status, param in cases:
        code, body = server.post("/v1/completions", **kwargs)
        assert code == status, (kwargs, body)
        err = body["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], body
        if param:
            assert err["param"] == param, body
    chat_cases = [
        {"model": "tiny-chat", "messages": "hello"},
        {"model": "tiny-chat", "messages": []},
        {"model": "tiny-chat", "messages": [{"role": "robot", "content": "hi"}]},
        {"model": "tiny-chat", "messages": [{"role": "user", "content": "keys " * 400}]},
        {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "n": 3},
    ]
    for body in chat_cases:
        code, out = server.post("/v1/chat/completions", body)
        assert code == 400 and "message" in out["error"], (body, out)
    code, out = server.get("/v1/nothing-here")
    assert code == 404 and "error" in out
    with pytest.raises(openai.NotFoundError):
        server.client().completions.create(model="gpt-9", prompt="x", max_tokens=2)
    code, out = server.post("/v1/completions", good)  # still serving
    assert code == 200 and out["choices"][0]["text"] is not None and out["usage"]["completion_tokens"] >= 1


def test_sixteen_concurrent_clients_are_batched_and_get_their_own_text(server):
    client = server.client()
    prompts = [f"question {i}: " + " ".join(["the cache", "keys", "values", "phone"][: 1 + i % 4]) for i in range(16)]
    alone = [client.completions.create(model="tiny-chat", prompt=p, max_tokens=24, temperature=0).choices[0].text
             for p in prompts]
    assert len(set(alone)) > 8  # different prompts, different answers: a mix-up would show
    results, errors = [None] * 16, []
    barrier = threading.Barrier(16)

    def worker(i):
        try:
            barrier.wait()
            if i % 2:  # half of them stream
                stream = client.completions.create(model="tiny-chat", prompt=prompts[i], max_tokens=24,
                                                   temperature=0, stream=True)
                results[i] = "".join(c.choices[0].text for c in stream)
            else:
                results[i] = client.completions.create(model="tiny-chat", prompt=prompts[i], max_tokens=24,
                                                       temperature=0).choices[0].text
        except Exception as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and results == alone
    assert server.get("/health")[1]["peak_batch"] > 1  # requests really shared decode steps


@pytest.fixture(scope="module")
def long_server(tmp_path_factory):
    """One row, one queue place, API key from the environment, a long context: a stream can hold the row."""
    root = tmp_path_factory.mktemp("serve_long") / "tiny-long"
    make_model_dir(root, max_seq_len=8192)
    s = Server(root, "--max-batch", 1, "--max-queue", 1, env={"MOBILELLM_API_KEY": KEY})
    yield s
    s.stop()


def test_api_key_is_required(long_server):
    with pytest.raises(openai.AuthenticationError):
        long_server.client("wrong").models.list()
    code, body = long_server.post("/v1/completions", {"prompt": "x", "max_tokens": 2})
    assert code == 401 and body["error"]["code"] == "invalid_api_key"
    got = long_server.client(KEY).completions.create(model="tiny-long", prompt="keys", max_tokens=3, temperature=0)
    assert got.usage.completion_tokens >= 1
    assert long_server.get("/health")[0] == 200  # health needs no key


def wait_for(server, predicate, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        health = server.get("/health")[1]
        if predicate(health):
            return health
        time.sleep(0.05)
    raise AssertionError(f"timed out; last health: {health}")


def test_disconnect_mid_stream_frees_the_slot_and_a_full_queue_answers_503(long_server):
    client = long_server.client(KEY)
    before = long_server.get("/health")[1]
    stream = client.completions.create(model="tiny-long", prompt="the cache", max_tokens=8000, temperature=0,
                                       stream=True)
    it = iter(stream)
    next(it)
    next(it)
    assert long_server.get("/health")[1]["active"] == 1
    # the only row is busy: one request may wait, the next one is turned away
    waiting_result = {}
    waiter = threading.Thread(target=lambda: waiting_result.update(
        r=client.completions.create(model="tiny-long", prompt="keys", max_tokens=3, temperature=0)))
    waiter.start()
    wait_for(long_server, lambda h: h["waiting"] == 1)
    code, body = long_server.post("/v1/completions", {"prompt": "x", "max_tokens": 2},
                                  headers={"Authorization": f"Bearer {KEY}"})
    assert code == 503 and body["error"]["code"] == "server_overloaded"
    stream.close()  # the client goes away mid-stream
    health = wait_for(long_server, lambda h: h["cancelled"] == before["cancelled"] + 1)
    waiter.join(60)
    assert waiting_result["r"].usage.completion_tokens >= 1  # the freed row served the waiting request
    assert health["generated_tokens"] - before["generated_tokens"] < 8000  # generation stopped early
    assert wait_for(long_server, lambda h: h["active"] == 0 and h["waiting"] == 0)


def test_serve_cli_bad_input(model_dir):
    port = free_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        proc = subprocess.run([sys.executable, "-m", "mobilellm", "serve", str(model_dir), "--port", str(port)],
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and proc.stderr.startswith("error:") and "--port" in proc.stderr


def test_a_huge_body_gets_413_while_health_stays_responsive(server):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.putrequest("POST", "/v1/completions")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(10_000_000))
    conn.endheaders()
    try:
        conn.send(b'{"model": "tiny-chat", "prompt": "' + b"x" * 1_000_000)  # the first megabyte of ten
    except OSError:
        pass  # the server may already have answered and closed
    started = time.perf_counter()
    code, body = server.get("/health")
    health_s = time.perf_counter() - started
    assert code == 200 and body
    assert health_s < 30, health_s  # answered while the big request is open, not queued behind it
    resp = conn.getresponse()
    err = json.loads(resp.read())
    conn.close()
    assert resp.status == 413 and "larger than" in err["error"]["message"], err


def test_out_of_range_fields_get_openai_400s(server):
    good = {"model": "tiny-chat", "prompt": "the cache", "max_tokens": 2}
    for field, value in (("seed", 2**64), ("seed", -1), ("top_p", 2), ("presence_penalty", "x")):
        code, body = server.post("/v1/completions", {**good, field: value})
        assert code == 400 and body["error"]["param"] == field, (field, body)


def test_a_looping_chat_template_gets_400_and_the_server_keeps_serving(tmp_path):
    model_dir = tmp_path / "loopy"
    make_model_dir(model_dir)
    cfg_path = model_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = "{% for i in range(10**6) %}{% for j in range(10**6) %}{% endfor %}{% endfor %}"
    cfg_path.write_text(json.dumps(cfg))
    (model_dir / "chat_template.jinja").unlink(missing_ok=True)
    s = Server(model_dir)
    try:
        code, body = s.post("/v1/chat/completions", {"model": "loopy", "messages": [{"role": "user", "content": "hi"}]})
        assert code == 400 and "chat template" in body["error"]["message"], body
        code, body = s.post("/v1/completions", {"model": "loopy", "prompt": "hi", "max_tokens": 2})
        assert code == 200, body
    finally:
        s.stop()


def test_a_context_too_large_for_memory_is_one_line(tmp_path):
    model_dir = tmp_path / "huge-context"
    make_model_dir(model_dir, max_seq_len=10**9)
    proc = subprocess.run([sys.executable, "-m", "mobilellm", "serve", str(model_dir), "--port", str(free_port())],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "KV cache" in lines[0] and "GiB" in lines[0], proc.stderr
