"""The viewer over HTTP (Starlette's TestClient): every page answers, what it shows matches the
store, untrusted text is escaped, nothing writes, and only GET from a loopback name is served."""

from __future__ import annotations

import os
import re

import polars as pl
import pytest

if os.environ.get("SELM_REQUIRE_OPTIONAL") != "1":  # `make test`: a missing extra fails
    pytest.importorskip("starlette", reason="the view extra: pip install 'selm[view]'")

from starlette.testclient import TestClient

from selm_data.errors import SelmError
from selm_data.view import app as view_app
from selm_data.view.queries import PairQuery, pair_page
from viewstore import ONERROR, SCRIPT, SHARED, Built, built_store


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return built_store(tmp_path_factory)


@pytest.fixture(scope="module")
def client(built: Built) -> TestClient:
    return TestClient(view_app.make_app(built.store), base_url="http://127.0.0.1")


def pair_of(built: Built, question: str, iteration: int = 1) -> dict:
    prompts = built.store.scan("prompts").collect()
    prompt_id = next(p["prompt_id"] for p in prompts.iter_rows(named=True)
                     if p["messages"][0]["content"] == question)
    return (built.store.scan("pairs").filter((pl.col("prompt_id") == prompt_id)
                                             & (pl.col("iteration") == iteration))
            .collect().row(0, named=True))


def shown_pairs(html: str) -> list[str]:
    return re.findall(r'data-pair="([0-9a-f]{32})"', html)


def test_every_page_answers_with_the_security_headers(client, built):
    pair = pair_of(built, SHARED)
    for url in ("/", "/plots/scores.png", "/pairs", "/pairs?iter=1&failed=1",
                "/pairs?snapshot=it1", f"/pair/{pair['pair_id']}", f"/prompt/{pair['prompt_id']}",
                "/compare", "/compare?a=1&b=2", "/compare?a=it1&b=1",
                f"/lineage/{built.checkpoint_id}", "/static/view.css"):
        r = client.get(url)
        assert r.status_code == 200, (url, r.text[:500])
        assert "script-src" not in r.headers["content-security-policy"]
        assert r.headers["content-security-policy"].startswith("default-src 'none'")
        assert r.headers["x-content-type-options"] == "nosniff"
    assert client.get("/plots/scores.png").content.startswith(b"\x89PNG")


def test_nothing_is_written_and_only_get_is_served(client, built):
    before = built.store.versions()
    pair = pair_of(built, SHARED)
    for url in ("/", "/pairs?iter=2&q=paris", f"/pair/{pair['pair_id']}", "/compare?a=1&b=2"):
        assert client.get(url).status_code == 200
        assert client.post(url).status_code == 405
        assert client.delete(url).status_code == 405
    assert built.store.versions() == before


def test_a_host_name_other_than_loopback_is_refused(built):
    """A page elsewhere that rebinds its DNS name to 127.0.0.1 cannot read the store."""
    assert TestClient(view_app.make_app(built.store), base_url="http://evil.example").get(
        "/").status_code == 400
    for host in ("127.0.0.1", "localhost", "[::1]"):
        assert TestClient(view_app.make_app(built.store), base_url=f"http://{host}:8765").get(
            "/").status_code == 200
    assert TestClient(view_app.make_app(built.store), base_url="http://127.0.0.1.evil.example"
                      ).get("/").status_code == 400
    assert [view_app.host_name(h) for h in ("[::1]:8765", "[::1]", "localhost:1", "a.b")] == [
        "[::1]", "[::1]", "localhost", "a.b"]


def test_planted_markup_is_escaped_on_every_page(client, built):
    pair = pair_of(built, "Say something dangerous")
    pages = [client.get(f"/pair/{pair['pair_id']}").text,
             client.get("/pairs?iter=1&q=dangerous").text,
             client.get("/pairs?snapshot=it1&q=pwned").text,
             client.get(f"/prompt/{pair['prompt_id']}").text,
             client.get(f"/lineage/{pair['ref_id']}").text]
    for html in pages:
        assert "<script" not in html and "<img" not in html
        assert "&lt;script&gt;" in html or "&lt;img" in html
    # the failed generation's error is text, too
    failed = client.get("/pairs?iter=1&failed=1").text
    assert "server timed out &lt;b&gt;x&lt;/b&gt;" in failed and "<b>x</b>" not in failed


def test_markdown_renders_code_and_drops_unsafe_links(client, built):
    pair = pair_of(built, "Show me code")
    html = client.get(f"/pair/{pair['pair_id']}").text
    assert '<pre><code class="language-python">print(&#x27;hello&#x27;)' in html \
        or "<pre><code class=\"language-python\">print('hello')" in html
    assert "<strong>bold</strong>" in html
    assert "<p>[a link](javascript:alert(1))</p>" in html  # not a link: left as text
    assert "href=\"javascript" not in html and "<a " not in html.split('id="prompt"')[1].split(
        "<h2>Ranking")[0]


def test_the_pair_page_shows_the_store(client, built):
    pair = pair_of(built, SHARED, iteration=2)
    html = client.get(f"/pair/{pair['pair_id']}").text
    assert f'id="margin">{pair["margin"]:.3f}<' in html
    assert "Paris is the capital." in html  # y_ref of iteration 2, ranked between the two
    assert "y_ref (between)" in html
    assert "test-ranker 7" in html  # ranker and version
    assert f'href="/lineage/{built.checkpoint_id}">ckpt/iter1</a>' in html  # policy checkpoint
    one = client.get(f"/pair/{pair_of(built, SHARED)['pair_id']}").text
    assert 'class="snapshot-link" href="/pairs?snapshot=it1"' in one  # downstream
    assert f'class="checkpoint-link" href="/lineage/{built.checkpoint_id}"' in one
    assert "the base policy (no registered checkpoint)" in one


@pytest.mark.parametrize("params, expected", [
    ({"ref": "chosen"}, (pl.col("chosen_id") == pl.col("ref_id"))),
    ({"ref": "rejected"}, (pl.col("rejected_id") == pl.col("ref_id"))),
    ({"ref": "between"}, (pl.col("chosen_id") != pl.col("ref_id"))
     & (pl.col("rejected_id") != pl.col("ref_id"))),
    ({"ties": "only"}, pl.col("is_tie")),
    ({"ties": "none"}, ~pl.col("is_tie")),
    ({"margin_min": "0.5", "margin_max": "1.0"}, pl.col("margin").is_between(0.5, 1.0)),
    ({"chosen_origin": "policy"}, pl.col("chosen_origin") == "policy"),
])
def test_filters_show_exactly_the_matching_pairs(client, built, params, expected):
    query = "&".join(f"{k}={v}" for k, v in params.items())
    html = client.get(f"/pairs?iter=1&{query}").text
    want = (built.store.scan("pairs").filter((pl.col("iteration") == 1) & expected)
            .collect()["pair_id"].sort().to_list())
    assert want, "the store has such pairs"
    assert sorted(shown_pairs(html)) == want
    assert f"<strong>{len(want)}</strong> pair" in html


def test_text_search_is_literal_case_insensitive_and_covers_prompt_and_answers(client, built):
    both = shown_pairs(client.get("/pairs?iter=2&q=PARIS").text)
    assert both == [pair_of(built, SHARED, 2)["pair_id"]]
    prompt_hit = shown_pairs(client.get("/pairs?iter=1&q=capital+of").text)
    assert prompt_hit == [pair_of(built, SHARED)["pair_id"]]
    assert shown_pairs(client.get("/pairs?iter=1&q=.*").text) == []  # not a regex
    assert client.get("/pairs?iter=1&q=(").status_code == 200
    snap = shown_pairs(client.get("/pairs?snapshot=it1&q=lyon").text)
    assert snap == [pair_of(built, SHARED)["pair_id"]]


def test_sorting_and_pages(client, built):
    html = client.get("/pairs?iter=1&sort=-margin").text
    margins = dict(built.store.scan("pairs").select("pair_id", "margin").collect().iter_rows())
    shown = [margins[p] for p in shown_pairs(html)]
    assert shown == sorted(shown, reverse=True) and len(shown) == 13
    every = [pair_page(built.store, PairQuery(iteration=1, sort="margin", page=n, per_page=5))
             for n in (1, 2, 3)]
    assert [p.total for p in every] == [13] * 3 and every[0].pages == 3
    ids = [r["pair_id"] for p in every for r in p.rows]
    assert len(ids) == len(set(ids)) == 13
    assert [r["margin"] for p in every for r in p.rows] == sorted(margins[i] for i in ids)


def test_bad_input_is_a_page_that_says_what_is_wrong(client):
    r = client.get("/pairs?iter=1&margin_min=abc")
    assert r.status_code == 400 and "margin_min must be a number" in r.text
    r = client.get("/pairs?iter=1&sort=<b>")
    assert r.status_code == 404 and "&lt;b&gt;" in r.text
    assert client.get("/pair/" + "0" * 32).status_code == 404
    assert client.get("/compare?a=1&b=nosuch").status_code == 404
    with pytest.raises(SelmError):
        PairQuery()  # neither an iteration nor a snapshot


def test_the_overview_shows_iterations_snapshots_checkpoints_and_win_rates(client, built):
    html = client.get("/").text
    assert '<a href="/pairs?iter=1">iteration 1</a>' in html
    assert '<a href="/pairs?iter=2">iteration 2</a>' in html
    assert '<a href="/pairs?snapshot=it1">it1</a>' in html
    assert "ckpt/iter1" in html and 'src="/plots/scores.png"' in html
    assert 'id="winrates"' in html and "iter1" in html
    assert 'href="/pairs?iter=1&amp;failed=1">iteration 1 (1)' in html


def test_serve_binds_loopback_and_warns_for_any_other_host(built, monkeypatch):
    import uvicorn

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(kw))
    said: list[str] = []
    view_app.serve(built.store, say=said.append)
    assert seen["host"] == "127.0.0.1" and seen["port"] == 8765
    assert not any("warning" in s for s in said)
    view_app.serve(built.store, host="0.0.0.0", port=9000, say=said.append)
    assert seen["host"] == "0.0.0.0" and any(s.startswith("warning") for s in said)
    assert view_app.is_loopback("::1") and view_app.is_loopback("localhost")
    assert not view_app.is_loopback("0.0.0.0") and not view_app.is_loopback("example.com")


def test_payloads_are_in_the_store_as_planted(built):
    """The escaping tests mean something only if the payloads are really there."""
    texts = built.store.scan("responses").select("text").collect()["text"].to_list()
    assert SCRIPT in texts and ONERROR in texts


def test_search_sees_what_the_store_holds_now(tmp_path):
    """The in-memory texts of a search are keyed by the tables' versions: never stale."""
    from selm_data.store.store import RunInfo, open_store
    from viewstore import iteration_one, prompt_rows, write

    store = open_store(tmp_path / "store", create=True, run=RunInfo.new("pytest"))
    write(store, iteration_one())
    client = TestClient(view_app.make_app(store), base_url="http://127.0.0.1")
    assert shown_pairs(client.get("/pairs?iter=1&q=brand+new").text) == []
    write(store, [prompt_rows(1, "A brand new question", ("x", "y", "z"), (0.1, 0.2, 0.3),
                              fingerprint="base")])
    found = shown_pairs(client.get("/pairs?iter=1&q=brand+new").text)
    assert len(found) == 1
    assert client.get("/pairs?iter=1").text.count("A brand new question") == 1  # its snippet


def test_concurrent_requests_each_read_through_their_own_store(built):
    """The server answers from a thread pool; a Store refreshes its tables in place, so each
    thread has its own (two threads refreshing one Delta table at once can fail)."""
    from concurrent.futures import ThreadPoolExecutor

    client = TestClient(view_app.make_app(built.store), base_url="http://127.0.0.1")
    urls = ["/", "/pairs?iter=1&q=paris", "/pairs?iter=2&q=paris", "/compare?a=1&b=2",
            "/pairs?snapshot=it1&q=lyon", "/plots/scores.png"] * 3
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda url: client.get(url).status_code, urls))
    assert codes == [200] * len(urls)


def _serve(args: list[str], port: int) -> tuple[int, str, str]:
    """`selm-data view ARGS` in a process: the status of GET / on 127.0.0.1:port and what it
    printed, then stopped."""
    import subprocess
    import sys
    import time
    import urllib.request

    proc = subprocess.Popen([sys.executable, "-m", "selm_data.cli", "view", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as r:
                    status, body = r.status, r.read().decode()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "no server"
                time.sleep(0.2)
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    return status, body, out


@pytest.mark.slow
def test_the_command_serves_on_loopback_and_warns_for_another_host(built):
    import socket

    def free() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    port = free()
    status, body, out = _serve(["--store", str(built.store.root), "--port", str(port)], port)
    assert status == 200 and "<title>Overview" in body
    assert f"http://127.0.0.1:{port}/" in out and "warning" not in out
    port = free()
    _, _, out = _serve(["--store", str(built.store.root), "--port", str(port),
                        "--host", "0.0.0.0"], port)
    assert "warning: --host 0.0.0.0 serves the store to every machine" in out


def test_an_evaluation_question_across_policies(client, built):
    answers = built.store.scan("eval_answers").collect()
    question = answers.row(0, named=True)
    html = client.get("/compare").text
    href = f'/question?set={question["prompt_set"]}&amp;id={question["question_id"]}'
    assert href in html
    page = client.get(href.replace("&amp;", "&")).text
    theirs = answers.filter(pl.col("question_id") == question["question_id"])
    assert sorted(theirs["iteration"].to_list()) == [0, 1]
    for text in theirs["text"].to_list():
        assert text in page
    assert 'id="policy-base"' in page and 'id="policy-iter1"' in page
    assert f'href="/lineage/{built.checkpoint_id}"' in page  # iter1's checkpoint
    assert "<td>base</td><td>iter1</td>" in page or "<td>iter1</td><td>base</td>" in page
