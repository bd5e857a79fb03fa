"""docs/SECURITY.md: API keys are never echoed in error messages. A bad app arg is reported by pydantic, whose
message repeats what was written (`input_value`); with keys among the args that put a key, or its tail, into the
error that `serve deploy`, `serve status` and the dashboard show."""

from __future__ import annotations

import pytest

from elasticmoe.app import resolve_args

SECRET = "sk-prod-7f3a9c21d4e8b6057f3a9c21"


@pytest.mark.parametrize("args, field", [
    ({"model": "tiny:mixtral", "api_keys": [SECRET, "short-secret"]}, "api_keys"),  # the key check itself
    ({"model": "tiny:mixtral", "api_keys": SECRET}, "api_keys"),  # one key where a list belongs
    ({"model": "tiny:mixtral", "revision": "main", "api_keys": [SECRET]}, "revision"),  # a check of the whole args
    ({"model": "tiny:mixtral", "limits": {"max_num_seqs": 0}, "api_keys": [SECRET]}, "limits.max_num_seqs"),
], ids=["weak-key", "not-a-list", "model-check", "nested-field"])
def test_a_bad_app_arg_never_repeats_a_key(args, field):
    with pytest.raises(ValueError, match="elasticmoe app args") as e:
        resolve_args(args)
    text = str(e.value) + repr(e.value.__cause__)
    for key in (SECRET, "short-secret", SECRET[-12:]):
        assert key not in text, text
    assert field in text  # the error still names the field
