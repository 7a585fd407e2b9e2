"""Schemathesis against a real lane agent: every POS API operation, from its own OpenAPI document.

The lane is a real ``lane-agent run`` process with its SQLite store (tests/lane_harness.py); its
OpenAPI document is fetched from ``/openapi.json``, as a POS vendor would.  Positive and negative
cases (schemathesis' default modes), authenticated, must meet every operation's contract: no
5xx, only documented status codes and content types, responses matching their documented
schema, and schema-invalid requests refused with a 4xx.  ``LANE_FUZZ=long`` (``make fuzz``)
multiplies the examples.  Each test prints a one-line summary through pytest's terminal reporter,
so that it shows in ``make test`` and ``make fuzz`` output without ``-s``.
"""

from __future__ import annotations

import os
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lane_harness import TOKEN, Lane

LONG = os.environ.get("LANE_FUZZ") == "long"
EXAMPLES = 1000 if LONG else 25
STATEFUL_EXAMPLES = 1000 if LONG else 30
RAW_EXAMPLES = 2000 if LONG else 60
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# /v1/events is a Server-Sent Events stream that never ends: it gets its own test below.
STREAM = "/v1/events"

pytestmark = pytest.mark.timeout(1800 if LONG else 240)

CHECKS = [
    schemathesis.checks.not_a_server_error,
    schemathesis.checks.status_code_conformance,
    schemathesis.checks.content_type_conformance,
    schemathesis.checks.response_headers_conformance,
    schemathesis.checks.response_schema_conformance,
    schemathesis.checks.negative_data_rejection,
]

# What every call answered, per operation: printed once the module is done.
STATUSES: dict[str, Counter[int]] = {}


def summary(request: pytest.FixtureRequest, line: str) -> None:
    """One line in pytest's own output, past its capture: the figures the reliability docs quote."""
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if capture is None or reporter is None:
        print(f"[fuzz] {line}")
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line(f"\n[fuzz] {line}")


@pytest.fixture(scope="module")
def lane(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Lane]:
    agent = Lane(tmp_path_factory.mktemp("fuzz-lane"))
    agent.import_members()
    agent.start()
    started = time.monotonic()
    yield agent
    code = agent.stop()
    total = sum(sum(c.values()) for c in STATUSES.values())
    server_errors = sum(n for c in STATUSES.values() for status, n in c.items() if status >= 500)
    # Per operation, whichever test sent it ("POST /v1/sales (retried)" counts for POST /v1/sales).
    per_op: Counter[str] = Counter()
    for label, counts in STATUSES.items():
        per_op[label.split(" (")[0].replace("/S-1/", "/{sale_id}/")] += sum(counts.values())
    statuses: Counter[int] = sum(STATUSES.values(), Counter())
    summary(
        request,
        f"POS API: {total} requests, schemathesis {EXAMPLES} examples per operation; by operation "
        + ", ".join(f"{op} {n}" for op, n in sorted(per_op.items()))
        + f"; statuses {dict(sorted(statuses.items()))}; server errors {server_errors}; "
        f"{time.monotonic() - started:.0f} s",
    )
    assert code == 0, agent.log()
    # A bug answers 500 and is logged with its traceback: none may hide behind a passing check.
    assert "unhandled error" not in agent.log()


@pytest.fixture(scope="module")
def pos_schema(lane: Lane) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{lane.url}/openapi.json").exclude(path=STREAM)


@pytest.fixture(scope="module")
def session() -> Iterator[requests.Session]:
    with requests.Session() as http:
        yield http


def tally(operation: str, status: int) -> None:
    STATUSES.setdefault(operation, Counter())[status] += 1


# Listed here rather than taken from the document at collection time (the lane is not running yet);
# test_the_fuzzed_operations_are_all_the_document_has keeps the list honest.
OPERATIONS = [
    ("GET", "/v1/status"),
    ("POST", "/v1/identify"),
    ("POST", "/v1/price"),
    ("POST", "/v1/sales"),
    ("POST", "/v1/returns"),
    ("POST", "/v1/sales/{sale_id}/void"),
]


def test_the_fuzzed_operations_are_all_the_document_has(lane: Lane) -> None:
    spec = httpx.get(f"{lane.url}/openapi.json", timeout=15).json()
    documented = {(method.upper(), path) for path, item in spec["paths"].items() for method in item}
    assert documented == {*OPERATIONS, ("GET", STREAM)}


# schemathesis' own @schema.parametrize() (with pytest.from_fixture) fails on pytest 9.2
# ("'Function' object has no attribute '_nodeid'"): the operations' strategies are driven here
# with hypothesis directly, which is what parametrize does underneath.
@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_every_operation_keeps_its_documented_contract(
    pos_schema: schemathesis.BaseSchema, session: requests.Session, method: str, path: str
) -> None:
    operation = pos_schema[path][method]

    @given(case=operation.as_strategy())
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def run(case: schemathesis.Case) -> None:
        response = case.call(session=session, headers=AUTH, timeout=30)
        tally(f"{method} {path}", response.status_code)
        case.validate_response(response, checks=CHECKS)

    run()


# --- what schemathesis cannot see: idempotency, authentication, the event stream ----------

KEYS = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=64)
MONEY = st.decimals(min_value=0, max_value=99999, places=2, allow_nan=False).map(str)
QTY = st.decimals(min_value="0.001", max_value=999, places=3, allow_nan=False).map(lambda q: str(q.normalize()))


@st.composite
def baskets(draw: st.DrawFn) -> dict[str, Any]:
    """Baskets of the 888 mall that the engine prices (schema-random bodies almost never commit)."""
    count = draw(st.integers(1, 6))
    lines = [
        {
            "line_id": str(number),
            "sku": draw(st.from_regex(r"\A[0-9]{8,13}\Z")),
            "category": draw(st.sampled_from(["womenswear", "fresh", "tobacco", "cosmetics", "gold", "other"])),
            "qty": draw(QTY),
            "unit_price": draw(MONEY),
            **({"regular_price": draw(MONEY)} if draw(st.booleans()) else {}),
        }
        for number in range(1, count + 1)
    ]
    doc: dict[str, Any] = {"sale_id": draw(KEYS), "lines": lines}
    member = draw(st.sampled_from([None, "M000123", "M000124", "M000125", "M999999"]))
    if member is not None:
        doc["member_id"] = member
    return doc


def test_random_sales_replay_or_conflict_and_never_fail(
    lane: Lane, session: requests.Session, request: pytest.FixtureRequest
) -> None:
    """A POS retries: the same body under the same id replays the answer; another body under it is 409.

    Each basket is priced, paid in full, sent twice, sent once more with other tenders, then its
    sale voided twice, as a flaky network and an impatient cashier would.
    """
    seen: Counter[str] = Counter()

    def post(label: str, path: str, body: dict[str, Any]) -> requests.Response:
        answer = session.post(f"{lane.url}{path}", json=body, headers=AUTH, timeout=30)
        tally(label, answer.status_code)
        assert answer.status_code < 500, answer.text
        return answer

    @given(doc=baskets(), split=st.booleans(), note=st.text(max_size=20))
    @settings(max_examples=STATEFUL_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def run(doc: dict[str, Any], split: bool, note: str) -> None:
        doc["sale_id"] = f"{doc['sale_id'][:40]}-{uuid.uuid4().hex[:12]}"  # hypothesis repeats its small ids
        priced = post("POST /v1/price (sale)", "/v1/price", {k: v for k, v in doc.items() if k != "sale_id"})
        if priced.status_code != 200:
            seen["unpriced"] += 1
            return
        net = priced.json()["totals"]["net"]
        cents = int(Decimal(net) * 100)
        if split and cents >= 2:
            half = cents // 2
            doc["tenders"] = [
                {"kind": "cash", "amount": f"{half // 100}.{half % 100:02d}"},
                {"kind": "bank_card", "amount": f"{(cents - half) // 100}.{(cents - half) % 100:02d}"},
            ]
        else:  # a free basket takes no tender (a zero amount is refused)
            doc["tenders"] = [{"kind": "cash", "amount": net}] if cents else []
        first = post("POST /v1/sales (retried)", "/v1/sales", doc)
        again = post("POST /v1/sales (retried)", "/v1/sales", doc)
        assert again.status_code == first.status_code, (first.text, again.text)
        if first.status_code != 200:
            # Priced, then refused: a tender the engine takes in pricing but not in the sale would be a bug.
            raise AssertionError(first.text)
        seen["committed"] += 1
        assert again.headers.get("Idempotent-Replay") == "true"
        assert again.json() == first.json()
        changed = {**doc, "tenders": [*doc["tenders"], {"kind": "cash", "amount": "0.01"}]}
        assert post("POST /v1/sales (changed)", "/v1/sales", changed).status_code == 409
        void_path = f"/v1/sales/{requests.utils.quote(doc['sale_id'], safe='')}/void"
        voids = [post("POST /v1/sales/{sale_id}/void (retried)", void_path, {"reason": note}) for _ in range(2)]
        assert voids[0].status_code == 200, voids[0].text
        assert voids[1].status_code == 200, voids[1].text
        assert voids[1].headers.get("Idempotent-Replay") == "true"
        seen["voided"] += 1

    run()
    summary(request, f"POS API sales retried: {dict(seen)}")
    # A fuzzer that never got a sale through has not tested idempotency at all.
    assert seen["committed"] > 0


@pytest.mark.parametrize("sale_id", ["A/B", "/", "x%2Fy", "a?b#c", "../void"])
def test_a_sale_whose_id_holds_url_characters_can_be_voided(
    lane: Lane, session: requests.Session, sale_id: str
) -> None:
    """Found by the fuzzer: a sale id is any printable ASCII, "/" included, and its void must reach it."""
    doc = {
        "sale_id": sale_id,
        "lines": [{"line_id": "1", "sku": "1", "category": "other", "qty": "1", "unit_price": "5.00"}],
    }
    priced = session.post(f"{lane.url}/v1/price", json={"lines": doc["lines"]}, headers=AUTH, timeout=30)
    doc["tenders"] = [{"kind": "cash", "amount": priced.json()["totals"]["net"]}]
    assert session.post(f"{lane.url}/v1/sales", json=doc, headers=AUTH, timeout=30).status_code == 200
    path = f"{lane.url}/v1/sales/{requests.utils.quote(sale_id, safe='')}/void"
    voided = session.post(path, json={"reason": "fuzz"}, headers=AUTH, timeout=30)
    tally("POST /v1/sales/{sale_id}/void (url characters)", voided.status_code)
    assert voided.status_code == 200, voided.text
    assert voided.json()["sale_id"] == sale_id


def _nested(depth: int) -> bytes:
    return b'{"lines":' + b"[" * depth + b"]" * depth + b"}"


RAW_BODIES = (
    st.binary(max_size=300)
    | st.integers(1_000, 200_000).map(_nested)  # deeper than any JSON parser's stack
    | st.sampled_from(
        [
            b'{"lines": [], "lines": []}',
            b'{"code": "\\ud800"}',
            b'{"code": "6200", "kind": "card"}\x00',
            b'{"sale_id": 1e999, "lines": [{"qty": NaN}]}',
            b'{"lines": [{"line_id": "1", "sku": "1", "category": "x", "qty": "1", "unit_price": '
            + b"9" * 5000
            + b"}]}",
            b"\xef\xbb\xbf{}",
            b"\xff\xfe{\x00}\x00",
        ]
    )
    | st.text(max_size=200).map(lambda text: text.encode("utf-8", "surrogatepass"))
)


@pytest.mark.parametrize("path", ["/v1/identify", "/v1/price", "/v1/sales", "/v1/returns", "/v1/sales/S-1/void"])
def test_any_bytes_posted_are_refused_with_the_error_document(lane: Lane, session: requests.Session, path: str) -> None:
    """Bodies no schema describes: not JSON, not UTF-8, nested past the parser, a BOM, a NUL, NaN."""

    @given(
        body=RAW_BODIES, media=st.sampled_from(["application/json", "application/json; charset=utf-8", "text/plain"])
    )
    @settings(max_examples=RAW_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def run(body: bytes, media: str) -> None:
        answer = session.post(f"{lane.url}{path}", data=body, headers={**AUTH, "Content-Type": media}, timeout=30)
        tally(f"POST {path} (raw bytes)", answer.status_code)
        assert answer.status_code < 500, answer.text
        if answer.status_code != 200:  # a void with an empty body is a void; anything else is refused
            assert set(answer.json()) == {"error"}
            assert {"code", "message", "field"} <= set(answer.json()["error"])

    run()


def test_every_operation_refuses_a_missing_or_wrong_token(lane: Lane) -> None:
    with httpx.Client(base_url=lane.url, timeout=15) as http:
        spec = http.get("/openapi.json").json()
        operations = [(method.upper(), path) for path, item in spec["paths"].items() for method in item]
        assert len(operations) == 7
        wrong = [
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": f"Basic {TOKEN}"},
            {"Authorization": f"Bearer {TOKEN}x"},
            {"Authorization": "Bearer"},
            {"Authorization": f"bearer  {TOKEN[:-1]}"},
        ]
        for method, template in operations:
            path = template.replace("{sale_id}", "S-1")
            for headers in wrong:
                answer = http.request(method, path, headers=headers, json={"sale_id": "S-1"})
                tally(f"{method} {template} (no token)", answer.status_code)
                assert answer.status_code == 401, (method, path, headers, answer.text)
                assert answer.json()["error"]["code"] == "unauthorized"
                assert answer.headers["WWW-Authenticate"] == "Bearer"


def test_the_event_stream_opens_with_a_token_and_refuses_without(lane: Lane) -> None:
    with httpx.Client(base_url=lane.url, timeout=15) as http:
        assert http.get(STREAM, params={"x": "\x00"}).status_code == 401
        with http.stream("GET", STREAM, headers=AUTH) as stream:
            tally(f"GET {STREAM}", stream.status_code)
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
