"""Secret redaction: which variables are secrets, and a streaming redactor that matches a one-shot one."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from runner.logs.redact import (
    DEFAULT_REDACTED_VARS,
    MIN_SECRET_BYTES,
    Redactor,
    mask_secrets,
    possible_secret_start,
    secret_needles,
    secret_values,
    short_secret_names,
)

R = b"[REDACTED]"


def one_shot(data: bytes, secrets: Sequence[bytes], replacement: bytes = R) -> bytes:
    """Reference redaction over the whole stream: every occurrence found by brute force, runs of
    overlapping occurrences replaced once, adjacent ones separately."""
    found = sorted((i, i + len(s)) for s in secrets if s for i in range(len(data)) if data.startswith(s, i))
    out = bytearray()
    pos = 0
    run: tuple[int, int] | None = None
    for start, stop in [*found, (len(data) + 1, len(data) + 1)]:
        if run is not None and start < run[1]:
            run = (run[0], max(run[1], stop))
            continue
        if run is not None:
            out += data[pos:run[0]] + replacement
            pos = run[1]
        run = (start, stop)
    return bytes(out + data[pos:])


def streamed(redactor: Redactor, parts: Sequence[bytes]) -> bytes:
    return b"".join(redactor.feed(part) for part in parts) + redactor.flush()


def split(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


# --- which values are secrets ---------------------------------------------------------------------


def test_default_patterns_are_the_agents() -> None:
    assert DEFAULT_REDACTED_VARS == ("*_PASSWORD", "*_SECRET", "*_TOKEN", "*_PRIVATE_KEY", "*_SSH_KEY",
                                     "*_ACCESS_KEY", "*_SECRET_KEY", "*_CONNECTION_STRING", "*_API_KEY")
    assert MIN_SECRET_BYTES == 6


def test_secret_values_match_default_names() -> None:
    env = {
        "DB_PASSWORD": "hunter22",
        "GITHUB_TOKEN": "ghp_abcdef",
        "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI",
        "DEPLOY_SSH_KEY": "-----BEGIN KEY-----",
        "PG_CONNECTION_STRING": "postgres://u:p@h/db",
        "STRIPE_API_KEY": "sk_live_123",
        "APP_SECRET": "s3cr3t!",
        "PATH": "/usr/bin:/bin",
        "TOKEN": "not-matched-no-underscore",
        "db_password": "lowercase-name",
    }
    assert secret_values(env, []) == ["hunter22", "ghp_abcdef", "wJalrXUtnFEMI", "-----BEGIN KEY-----",
                                      "postgres://u:p@h/db", "sk_live_123", "s3cr3t!"]


def test_configured_patterns_add_to_the_defaults() -> None:
    env = {"MY_CREDS": "abcdefgh", "X_TOKEN": "tokentoken", "OTHER": "plainvalue"}
    assert secret_values(env, ["MY_*"]) == ["abcdefgh", "tokentoken"]
    assert secret_values(env, ["?THER"]) == ["tokentoken", "plainvalue"]


def test_short_values_are_not_secrets_but_are_reported() -> None:
    env = {"A_TOKEN": "none", "B_TOKEN": "12345", "C_TOKEN": "123456", "D_TOKEN": "", "E_TOKEN": "ééé"}
    # Length is in bytes: three two-byte characters are long enough.
    assert secret_values(env, []) == ["123456", "ééé"]
    assert short_secret_names(env, []) == ["A_TOKEN", "B_TOKEN"]


def test_secret_values_are_distinct() -> None:
    env = {"A_TOKEN": "samesame", "B_SECRET": "samesame", "C_PASSWORD": "other-one"}
    assert secret_values(env, []) == ["samesame", "other-one"]


# --- the streaming redactor -------------------------------------------------------------------------


def test_replaces_every_occurrence() -> None:
    r = Redactor(["hunter22"])
    assert streamed(r, [b"pw=hunter22 again hunter22\n"]) == b"pw=[REDACTED] again [REDACTED]\n"


def test_secret_split_across_writes() -> None:
    r = Redactor(["hunter22"])
    assert r.feed(b"pw=hunt") == b"pw="
    assert r.feed(b"er2") == b""
    assert r.feed(b"2 ok\n") == b"[REDACTED] ok\n"
    assert r.flush() == b""


def test_secret_split_into_single_bytes() -> None:
    data = b"x hunter22 y hunter2 z"
    assert streamed(Redactor(["hunter22"]), [bytes([b]) for b in data]) == b"x [REDACTED] y hunter2 z"


def test_holds_back_at_most_longest_secret_minus_one() -> None:
    r = Redactor(["abcdefgh", "xyzxyz"])
    # No occurrence can be under way before the last 7 bytes, so everything else is released.
    assert r.feed(b"0123456789abcdefg") == b"0123456789"
    assert r.flush() == b"abcdefg"


def test_without_secrets_nothing_is_held_back() -> None:
    r = Redactor([])
    assert r.feed(b"abc") == b"abc"
    assert r.flush() == b""


def test_overlapping_occurrences_become_one_replacement() -> None:
    r = Redactor(["abcdef", "defghi"])
    assert streamed(r, [b"<abcdefghi>"]) == b"<[REDACTED]>"
    r = Redactor(["aaaaaa"])
    assert streamed(r, [b"-aaaaaaaa-"]) == b"-[REDACTED]-"


def test_adjacent_occurrences_are_replaced_separately() -> None:
    assert streamed(Redactor(["abcdef"]), [b"abcdefabcdef"]) == R + R


def test_overlap_extending_a_replacement_already_written() -> None:
    r = Redactor(["abcdef", "efghijklmn"])
    # "abcdef" completes here; its replacement is written while "ef" may still begin the longer one.
    first = r.feed(b"..abcdef")
    assert first == b".." + R
    assert r.feed(b"ghijklmn!") + r.flush() == b"!"


def test_flush_resets_for_the_next_stream() -> None:
    r = Redactor(["hunter22"])
    assert r.feed(b"hunter") == b""
    assert r.flush() == b"hunter"
    # The earlier "hunter" does not join up with it across the flush.
    assert r.feed(b"22") == b"22"
    assert r.flush() == b""


def test_custom_replacement_and_non_utf8_values() -> None:
    secret = b"\xffsecret\xfe".decode("utf-8", "surrogateescape")
    r = Redactor([secret], replacement="***")
    assert streamed(r, [b"a\xffsec", b"ret\xfeb"]) == b"a***b"


def test_empty_secret_is_ignored() -> None:
    assert streamed(Redactor(["", "abcdef"]), [b"xabcdefx"]) == b"x[REDACTED]x"


# Secrets from an alphabet the replacement does not use, so an output secret could only come
# from a missed occurrence; the data alphabet shares bytes with the secrets so partial matches abound.
SECRET = st.text(alphabet="abc", min_size=1, max_size=8)
FILLER = st.binary(max_size=12).map(lambda b: bytes(b"abc\n"[x % 4] for x in b))


@settings(max_examples=400, deadline=None)
@given(secrets=st.lists(SECRET, min_size=1, max_size=4), pieces=st.lists(st.tuples(FILLER, st.integers(0, 3)),
                                                                          max_size=12),
       cuts=st.lists(st.integers(0, 10_000), max_size=12))
def test_streaming_matches_one_shot_and_leaks_nothing(secrets: list[str], pieces: list[tuple[bytes, int]],
                                                       cuts: list[int]) -> None:
    needles = [s.encode() for s in secrets]
    data = b"".join(filler + needles[i % len(needles)] for filler, i in pieces)
    expected = one_shot(data, needles)
    redactor = Redactor(secrets)
    out = bytearray()
    for part in split(data, cuts):
        out += redactor.feed(part)
        # What is released is final: never taken back or changed by later input.
        assert expected.startswith(out)
    out += redactor.flush()
    assert bytes(out) == expected
    for needle in needles:
        assert needle not in out


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=200), cuts=st.lists(st.integers(0, 10_000), max_size=20),
       secrets=st.lists(st.binary(min_size=1, max_size=6), max_size=3))
def test_any_split_of_arbitrary_bytes_matches_one_shot(data: bytes, cuts: list[int],
                                                       secrets: list[bytes]) -> None:
    names = [s.decode("utf-8", "surrogateescape") for s in secrets]
    assert streamed(Redactor(names), split(data, cuts)) == one_shot(data, secrets)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200).map(lambda b: bytes(b"xyz\n"[x % 4] for x in b)),
       cuts=st.lists(st.integers(0, 10_000), max_size=20), start=st.text(alphabet="xyz", max_size=8))
def test_holds_back_only_a_tail_that_may_begin_a_secret(data: bytes, cuts: list[int], start: str) -> None:
    # The secret ends in "w", which the data never contains: nothing is ever replaced, and the
    # only output withheld is the longest tail that is a proper prefix of the secret.
    secret = (start + "w").encode()
    redactor = Redactor([secret.decode()])
    out = bytearray()
    fed = 0
    for part in split(data, cuts):
        out += redactor.feed(part)
        fed += len(part)
        held = max(k for k in range(len(secret)) if data[:fed].endswith(secret[:k]))
        assert held <= len(secret) - 1
        assert bytes(out) == data[:fed - held]
    assert bytes(out) + redactor.flush() == data


# -- masking, where a log keeps its length --------------------------------------------------------


def test_masking_replaces_every_byte_of_every_secret_and_keeps_the_length() -> None:
    needles = secret_needles(["hunter2-secret", "abcdef", ""])
    log = b"token=hunter2-secret; again hunter2-secretabcdefabcdef end"
    masked = mask_secrets(log, needles)
    assert masked == b"token=" + b"*" * 14 + b"; again " + b"*" * 26 + b" end"
    assert len(masked) == len(log) and mask_secrets(log, ()) == log


def test_a_tail_that_may_begin_a_secret_is_found() -> None:
    needles = secret_needles(["hunter2-secret"])
    assert possible_secret_start(b"log line hunt", needles) == 9
    assert possible_secret_start(b"log line done", needles) == 13
