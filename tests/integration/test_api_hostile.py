"""`deepbatch serve` against hostile callers: every bad input the issue found answered with a 4xx in
OpenAI's shape (NUL and unpaired surrogates anywhere, completion windows past any calendar, metadata
over OpenAI's limits), no file left on disk by a refused upload, list cursors that tell one key nothing
of another's objects, the upload line limit to the line, and the queued-lines limit under concurrent
creates from two servers."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from tests.integration.api_server import write_batch_file
from tests.integration.hostile_requests import HostileClient, new_key, openai_error, orphan_files

pytestmark = pytest.mark.integration

UNLIMITED_RATE = {"DEEPBATCH_API_REQUESTS_PER_S": "1000", "DEEPBATCH_API_BURST": "1000"}
CHAT = "/v1/chat/completions"


def upload(client: HostileClient, path: Path) -> str:
    response = client.upload(path.name, path.read_bytes())
    assert response.status_code == 200, response.text
    return response.json()["id"]


@pytest.mark.parametrize("broker_url", ["redis"], indirect=True)
def test_hostile_strings_are_refused_in_openai_shape_and_leave_no_file(tmp_path: Path, api_env: dict, start_server,
                                                                       db_engine: Engine) -> None:
    server = start_server(**UNLIMITED_RATE)
    client = HostileClient(server.url, new_key(db_engine, "hostile")[1])
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
    assert orphan_files(Path(api_env["DEEPBATCH_FILES_DIR"]), db_engine) == set()
    with db_engine.connect() as connection:
        assert connection.scalar(text("SELECT count(*) FROM files WHERE purpose = 'batch'")) == 1
    # (A filename's bytes that are not UTF-8, a surrogate's among them, are read as Latin-1: no error to give.)

    # A state change another site's page asks a browser for is refused; API clients send no Origin.
    for header in ({"Sec-Fetch-Site": "cross-site"}, {"Origin": "https://evil.example"}):
        refused = client.http.post(f"/v1/batches/{accepted.json()['id']}/cancel", headers=header)
        assert openai_error(refused, 403)["code"] == "cross_origin_request"
    assert client.get("/v1/files").headers["x-frame-options"] == "DENY"


@pytest.mark.parametrize("broker_url", ["redis"], indirect=True)
def test_list_cursors_consider_only_the_callers_objects(tmp_path: Path, start_server, db_engine: Engine) -> None:
    """B's `after=<A's id>` answers exactly as `after=<an id that never existed>`: no existence oracle."""
    server = start_server(**UNLIMITED_RATE)
    alice = HostileClient(server.url, new_key(db_engine, "alice")[1])
    bob = HostileClient(server.url, new_key(db_engine, "bob")[1])
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


@pytest.mark.parametrize("broker_url", ["redis"], indirect=True)
def test_upload_line_limit_is_exact(tmp_path: Path, api_env: dict, start_server, db_engine: Engine) -> None:
    server = start_server(DEEPBATCH_API_MAX_FILE_LINES="5", **UNLIMITED_RATE)
    client = HostileClient(server.url, new_key(db_engine, "lines")[1])
    five = write_batch_file(tmp_path / "five.jsonl", 5).read_bytes()
    six = write_batch_file(tmp_path / "six.jsonl", 6).read_bytes()
    assert client.upload("five.jsonl", five).json()["bytes"] == len(five)
    assert client.upload("five.jsonl", five.rstrip(b"\n")).status_code == 200  # the last newline is optional
    for refused in (six, six.rstrip(b"\n")):
        assert "DEEPBATCH_API_MAX_FILE_LINES" in openai_error(client.upload("six.jsonl", refused), 400)["message"]
    assert orphan_files(Path(api_env["DEEPBATCH_FILES_DIR"]), db_engine) == set()


@pytest.mark.parametrize("broker_url", ["redis"], indirect=True)
def test_queued_lines_limit_holds_under_concurrent_creates(tmp_path: Path, api_env: dict, start_server,
                                                          db_engine: Engine) -> None:
    """Limit 10 with 1 line queued: of six concurrent creates of a 5-line file, on two servers, one fits."""
    limits = {"DEEPBATCH_API_MAX_QUEUED_LINES": "10", **UNLIMITED_RATE}
    key_id, secret = new_key(db_engine, "busy")
    with ThreadPoolExecutor(2) as pool:  # started together: each takes seconds
        clients = [HostileClient(server.url, secret) for server in pool.map(lambda _: start_server(**limits), range(2))]
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
