"""Every route of `deepbatch serve` driven with hostile strings (hypothesis): NUL, unpaired surrogates,
control and format characters, URL syntax, huge numbers, long strings — in paths, queries, JSON bodies,
metadata, form fields, filenames and file contents. No answer is a 5xx, every /v1 refusal is in
OpenAI's error shape, and no file is left on disk without its row. Bounded: 250 examples, one server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine

from tests.integration.api_server import write_batch_file
from tests.integration.hostile_requests import HostileClient, encoded, new_key, openai_error, orphan_files

pytestmark = pytest.mark.integration

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


@pytest.mark.parametrize("broker_url", ["redis"], indirect=True)
def test_hostile_strings_never_get_a_5xx_nor_leave_an_orphan_file(tmp_path: Path, api_env: dict, start_server,
                                                                  db_engine: Engine) -> None:
    server = start_server(DEEPBATCH_API_REQUESTS_PER_S="10000", DEEPBATCH_API_BURST="10000",
                          DEEPBATCH_API_MAX_FILE_LINES="3", DEEPBATCH_API_MAX_FILE_BYTES="2000")
    client = HostileClient(server.url, new_key(db_engine, "fuzz")[1])
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
    assert orphan_files(Path(api_env["DEEPBATCH_FILES_DIR"]), db_engine) == set()
    assert "Traceback" not in server.log_path.read_text(errors="replace")
