"""The result cache key: equal greedy requests share it, whatever the line's key order or label fields."""

from schema.cache import CLI_OWNER, cache_owner, result_cache_key
from schema.lines import CHAT_URL, COMPLETIONS_URL, parse_line

MODEL = "tiny-deepseek-v3"


def key(line: str, url: str = CHAT_URL, model: str = MODEL, owner: str = CLI_OWNER) -> str | None:
    return result_cache_key(model, url, parse_line(line, 1).body, owner)


def test_key_ignores_field_order_and_label_fields():
    first = key('{"messages": [{"role": "user", "content": "hi"}], "temperature": 0, "max_tokens": 5}')
    reordered = key('{"max_tokens": 5, "model": "m", "seed": 3, "user": "u", "temperature": 0,'
                    ' "messages": [{"content": "hi", "role": "user"}]}')
    assert first is not None and first == reordered


def test_key_tells_apart_what_changes_the_output():
    base = key('{"messages": [{"role": "user", "content": "hi"}], "temperature": 0}')
    assert base != key('{"messages": [{"role": "user", "content": "hi!"}], "temperature": 0}')
    assert base != key('{"messages": [{"role": "user", "content": "hi"}], "temperature": 0, "max_tokens": 9}')
    assert base != key('{"messages": [{"role": "user", "content": "hi"}], "temperature": 0}', model="other")
    assert key('{"prompt": "hi", "temperature": 0}', COMPLETIONS_URL) != key('{"prompt": "hi", "top_k": 1}',
                                                                             COMPLETIONS_URL)


def test_only_greedy_requests_have_a_key():
    assert key('{"prompt": "hi"}', COMPLETIONS_URL) is None
    assert key('{"prompt": "hi", "temperature": 0.7}', COMPLETIONS_URL) is None
    assert key('{"prompt": "hi", "top_k": 1, "temperature": 0.7}', COMPLETIONS_URL) is not None


def test_owners_never_share_a_key_unless_the_deployment_shares_its_cache():
    line = '{"prompt": "hi", "temperature": 0}'
    owners = {cache_owner("key_a", "owner"), cache_owner("key_b", "owner"), cache_owner(None, "owner")}
    assert len({key(line, COMPLETIONS_URL, owner=owner) for owner in owners}) == 3
    assert cache_owner("key_a", "deployment") == cache_owner("key_b", "deployment") == cache_owner(None, "deployment")
    assert cache_owner("key_a", "deployment") not in owners


def test_keys_of_version_3_do_not_move():
    """Keys already stored must keep matching: a change here needs KEY_VERSION bumped (schema/cache.py)."""
    completion = key('{"prompt": "The capital of France is", "temperature": 0, "max_tokens": 16, "seed": 3,'
                     ' "stop": ["\\n"]}', COMPLETIONS_URL)
    chat = key('{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m",'
               ' "messages": [{"role": "user", "content": "Hi"}], "top_k": 1, "user": "u"}}')
    assert completion == "cbde67310b67daa70654fff7b47a3d00bc0d8c519d43cd5dd09661d91ae6258e"
    assert chat == "cfb069ae24c673fe9e2540dbca8dffffedcba213add544fa3b425cd9408e2fdb"
