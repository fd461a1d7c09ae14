"""`deepbatch serve` against hostile callers: every bad input the issue found answered with a 4xx in
OpenAI's shape (NUL and unpaired surrogates anywhere, completion windows past any calendar, metadata
over OpenAI's limits), no file left on disk by a refused upload, list cursors that tell one key nothing
of another's objects, the upload line limit to the line, the queued-lines limit under concurrent
creates from two servers; and every route driven with hostile strings by hypothesis (250 examples) without
a 5xx or an orphan file. One server for the module (HOSTILE_LIMITS), each test with keys of its own."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, text

from tests.integration.api_server import Server, write_batch_file
from tests.integration.hostile_requests import (HostileClient, encoded, files_dir, new_key, openai_error,
                                                orphan_files)
from tests.integration.hostile_requests import hostile_server  # noqa: F401  (this module's server)

pytestmark = pytest.mark.integration

CHAT = "/v1/chat/completions"

# The fuzz test's strings: hostile characters and strings, in any mixture.
EXAMPLES = 250
NASTY_CHARACTERS = ["\x00", "\ud800", "\udfff", "\u202e", "\ufeff", "%", "/", "?", "#", "&", "=", "\\", '"', "\r",
                    "\n", "\t", ".", "💥"]
NASTY_STRINGS = ["", " ", "\x00", "\ud800", "a\x00b", "file-\x00", "batch_\ud800", "999999999d",
                 "99999999999999999999d", "0d", "-1h", "1.5h", "24h", "365d", "../../etc/passwd", "%00", "%ed%a0%80",
                 "null", "{}", "[]", "file-doesnotexist", "batch_doesnotexist", "A" * 5000, "9" * 400,
                 "/v1/chat/completions", "batch", "-1", "0", "1e309"]
hostile_text = st.one_of(
    st.sampled_from(NASTY_STRINGS),
    st.text(st.one_of(st.sampled_from(NASTY_CHARACTERS), st.characters(exclude_categories=[])), max_size=40),
)
json_value = st.one_of(hostile_text, st.integers(), st.floats(allow_nan=False), st.none(), st.booleans(),
                       st.lists(hostile_text, max_size=3))
metadata = st.one_of(st.none(), hostile_text, st.dictionaries(hostile_text, json_value, max_size=20),
                     st.dictionaries(st.text(max_size=70), st.text(max_size=600), max_size=18))
file_content = st.one_of(
    st.binary(max_size=300),
    st.lists(st.one_of(hostile_text, st.builds(lambda custom_id, content: json.dumps(
        {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "tiny-deepseek-v3", "messages": [{"role": "user", "content": content}]}}),
        hostile_text, hostile_text)), max_size=4).map(lambda lines: "\n".join(lines).encode("utf-8", "surrogatepass")),
)


def upload(client: HostileClient, path: Path) -> str:
    response = client.upload(path.name, path.read_bytes())
    assert response.status_code == 200, response.text
    return response.json()["id"]


def test_hostile_strings_are_refused_in_openai_shape_and_leave_no_file(tmp_path: Path, hostile_server: Server,
                                                                       db_engine: Engine) -> None:
    client = HostileClient(hostile_server.url, new_key(db_engine, "hostile")[1])
    file_id = upload(client, write_batch_file(tmp_path / "p.jsonl", 2))

    for path in ("/v1/files/abc\x00def", "/v1/files/abc\x00def/content", "/v1/batches/batch_\x00"):
        assert "NUL" in openai_error(client.get(path.replace("\x00", "%00")), 400)["message"]
    assert openai_error(client.request("DELETE", "/v1/files/x%00"), 400)["param"] == "file_id"
    assert openai_error(client.get("/v1/files", after="x\x00"), 400)["param"] == "after"
    assert openai_error(client.get("/v1/batches", after="x\x00"), 400)["param"] == "after"
    openai_error(client.get("/v1/files", purpose="\x00"), 400)
    openai_error(client.get("/v1/no/such/route"), 404)

    def create(**fields) -> dict:
        return openai_error(client.post_json("/v1/batches", {"input_file_id": file_id, "endpoint": CHAT, **fields}))

    for field in ("input_file_id", "endpoint", "completion_window"):
        for value in ("file-\x00", "\ud800", "a\udfffb"):
            assert create(**{field: value})["param"] == field
    assert create(metadata={"a": "x\x00y"})["param"] == "metadata.a"
    assert create(metadata={"\ud800": "x"})["param"].startswith("metadata")
    assert "365d" in create(completion_window="999999999d")["message"]
    assert "365d" in create(completion_window="99999999999999999999d")["message"]
    assert create(metadata={f"k{n}": "v" for n in range(17)})["param"] == "metadata"
    assert create(metadata={"k" * 65: "v"})["param"].startswith("metadata")
    assert create(metadata={"k": "v" * 513})["param"] == "metadata.k"
    assert create(metadata={"k": 5})["param"] == "metadata.k"
    accepted = client.post_json("/v1/batches", {"input_file_id": file_id, "endpoint": CHAT, "completion_window": "365d",
                                                "metadata": {f"k{n:02}": "v" * 512 for n in range(16)}})
    assert accepted.status_code == 200 and len(accepted.json()["metadata"]) == 16, accepted.text

    # Refused uploads, before or after their bytes were read: nothing on disk, nothing in the table.
    lines = (tmp_path / "p.jsonl").read_bytes()
    assert openai_error(client.upload("evil\x00.jsonl", lines), 400)["param"] == "filename"
    openai_error(client.upload("p.jsonl", lines, purpose="batch\x00"), 400)
    openai_error(client.upload("p.jsonl", lines, purpose="\ud800"), 400)
    assert orphan_files(files_dir(hostile_server), db_engine) == set()
    with db_engine.connect() as connection:
        assert connection.scalar(text("SELECT count(*) FROM files WHERE filename LIKE 'evil%'")) == 0
    # (A filename's bytes that are not UTF-8, a surrogate's among them, are read as Latin-1: no error to give.)

    # A state change another site's page asks a browser for is refused; API clients send no Origin.
    for header in ({"Sec-Fetch-Site": "cross-site"}, {"Origin": "https://evil.example"}):
        refused = client.http.post(f"/v1/batches/{accepted.json()['id']}/cancel", headers=header)
        assert openai_error(refused, 403)["code"] == "cross_origin_request"
    assert client.get("/v1/files").headers["x-frame-options"] == "DENY"


def test_list_cursors_consider_only_the_callers_objects(tmp_path: Path, hostile_server: Server,
                                                        db_engine: Engine) -> None:
    """B's `after=<A's id>` answers exactly as `after=<an id that never existed>`: no existence oracle."""
    alice = HostileClient(hostile_server.url, new_key(db_engine, "alice")[1])
    bob = HostileClient(hostile_server.url, new_key(db_engine, "bob")[1])
    alice_file = upload(alice, write_batch_file(tmp_path / "a.jsonl", 1))
    alice_batch = alice.post_json("/v1/batches", {"input_file_id": alice_file, "endpoint": CHAT}).json()["id"]
    bob_files = [upload(bob, write_batch_file(tmp_path / f"b{n}.jsonl", 1)) for n in range(2)]
    bob.post_json("/v1/batches", {"input_file_id": bob_files[0], "endpoint": CHAT})

    for route, foreign, absent in (("/v1/files", alice_file, "file-doesnotexist"),
                                   ("/v1/batches", alice_batch, "batch_doesnotexist")):
        answers = [bob.get(route, after=cursor) for cursor in (foreign, absent)]
        errors = [openai_error(answer, 400) for answer in answers]
        assert [(e["param"], e["type"], e["code"]) for e in errors] == [("after", "invalid_request_error", None)] * 2
        assert errors[0]["message"].replace(foreign, "ID") == errors[1]["message"].replace(absent, "ID")
    # Bob's own cursor pages through Bob's files, a deleted one included.
    assert [f["id"] for f in bob.get("/v1/files", after=bob_files[1]).json()["data"]] == [bob_files[0]]
    assert bob.request("DELETE", f"/v1/files/{bob_files[1]}").status_code == 200
    assert [f["id"] for f in bob.get("/v1/files", after=bob_files[1]).json()["data"]] == [bob_files[0]]
    assert [f["id"] for f in alice.get("/v1/files").json()["data"]] == [alice_file]


def test_upload_line_limit_is_exact(tmp_path: Path, hostile_server: Server, db_engine: Engine) -> None:
    """DEEPBATCH_API_MAX_FILE_LINES is 5 (HOSTILE_LIMITS)."""
    client = HostileClient(hostile_server.url, new_key(db_engine, "lines")[1])
    five = write_batch_file(tmp_path / "five.jsonl", 5).read_bytes()
    six = write_batch_file(tmp_path / "six.jsonl", 6).read_bytes()
    assert client.upload("five.jsonl", five).json()["bytes"] == len(five)
    assert client.upload("five.jsonl", five.rstrip(b"\n")).status_code == 200  # the last newline is optional
    for refused in (six, six.rstrip(b"\n")):
        assert "DEEPBATCH_API_MAX_FILE_LINES" in openai_error(client.upload("six.jsonl", refused), 400)["message"]
    assert orphan_files(files_dir(hostile_server), db_engine) == set()


def test_queued_lines_limit_holds_under_concurrent_creates(tmp_path: Path, hostile_server: Server,
                                                          db_engine: Engine) -> None:
    """Limit 10 (HOSTILE_LIMITS) with 1 line queued: of six concurrent creates of a 5-line file, on two
    servers sharing the database and the files, one fits."""
    key_id, secret = new_key(db_engine, "busy")
    second_server = Server(hostile_server.env, tmp_path / "serve-second.log")
    try:
        clients = [HostileClient(server.url, secret) for server in (hostile_server, second_server)]
        one, five = (upload(clients[0], write_batch_file(tmp_path / f"{n}.jsonl", n)) for n in (1, 5))
        assert clients[0].post_json("/v1/batches", {"input_file_id": one, "endpoint": CHAT}).status_code == 200

        def create(n: int):
            return clients[n % 2].post_json("/v1/batches", {"input_file_id": five, "endpoint": CHAT})

        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(create, range(6)))
        assert sorted(answer.status_code for answer in answers) == [200] + [429] * 5, [a.text for a in answers]
        assert {openai_error(a)["code"] for a in answers if a.status_code == 429} == {"queued_lines_limit_exceeded"}
        with db_engine.connect() as connection:
            queued = connection.scalar(text("SELECT count(*) FROM requests r JOIN jobs j ON j.id = r.job_id "
                                            "WHERE j.owner_key_id = :k AND r.state = 'queued'"), {"k": key_id})
        assert queued == 6
    finally:
        second_server.stop()


def test_hostile_strings_never_get_a_5xx_nor_leave_an_orphan_file(tmp_path: Path, hostile_server: Server,
                                                                  db_engine: Engine) -> None:
    client = HostileClient(hostile_server.url, new_key(db_engine, "fuzz")[1])
    real_file = client.upload("p.jsonl", write_batch_file(tmp_path / "p.jsonl", 2).read_bytes()).json()["id"]
    real_batch = client.post_json("/v1/batches", {"input_file_id": real_file, "endpoint": "/v1/chat/completions"})
    ids = st.one_of(hostile_text, st.just(real_file), st.just(real_batch.json()["id"]))

    routes = {
        "retrieve file": lambda s, t, m, c: client.get(f"/v1/files/{encoded(s)}"),
        "file content": lambda s, t, m, c: client.get(f"/v1/files/{encoded(s)}/content"),
        "delete file": lambda s, t, m, c: client.request("DELETE", f"/v1/files/{encoded(s)}-{encoded(t)}"),
        "list files": lambda s, t, m, c: client.get("/v1/files", after=s, purpose=t),
        "list files by limit": lambda s, t, m, c: client.get("/v1/files", **{"limit": s, t: s}),
        "retrieve batch": lambda s, t, m, c: client.get(f"/v1/batches/{encoded(s)}"),
        "cancel batch": lambda s, t, m, c: client.request("POST", f"/v1/batches/{encoded(s)}-{encoded(t)}/cancel"),
        "list batches": lambda s, t, m, c: client.get("/v1/batches", after=s, limit=t),
        "create batch": lambda s, t, m, c: client.post_json("/v1/batches", {
            "input_file_id": s, "endpoint": "/v1/chat/completions", "completion_window": t, "metadata": m}),
        "create batch, any body": lambda s, t, m, c: client.post_json("/v1/batches", {s: t, "metadata": m}),
        "upload": lambda s, t, m, c: client.upload(s, c, purpose=t),
        "upload a batch file": lambda s, t, m, c: client.upload(s, c),
        "unknown route": lambda s, t, m, c: client.get(f"/v1/{encoded(s)}"),
        "dashboard cancel": lambda s, t, m, c: client.request("POST", f"/dashboard/batches/{encoded(s)}/cancel"),
        "dashboard download": lambda s, t, m, c: client.get(f"/dashboard/files/{encoded(s)}"),
    }

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.sampled_from(sorted(routes)), ids, hostile_text, metadata, file_content)
    def answers_without_5xx(route: str, first: str, second: str, pairs, content: bytes) -> None:
        response = routes[route](first, second, pairs, content)
        assert response.status_code < 500, (route, response.status_code, response.text[:300])
        if response.status_code >= 400 and not route.startswith("dashboard"):
            openai_error(response)

    answers_without_5xx()
    assert orphan_files(files_dir(hostile_server), db_engine) == set()
    assert "Traceback" not in hostile_server.log_path.read_text(errors="replace")
