"""OSCQuery over real HTTP (urllib), with a real OSC server changing the values underneath."""

from __future__ import annotations

import importlib.util
import json
import logging
import urllib.error
import urllib.request

import pytest
from test_osc import SPECS, Peer, RecordingShow, make_params, wait_until

from instrument.control import oscquery
from instrument.control.osc import CONTROL_ADDRESSES, OscServer
from instrument.control.oscquery import OscQueryServer
from instrument.params import ParamSpec


@pytest.fixture
def params():
    return make_params()


@pytest.fixture
def osc(params):
    with OscServer(params, RecordingShow(params), port=0) as server:
        yield server


@pytest.fixture
def query(params, osc):
    with OscQueryServer(params, osc_port=osc.address[1], port=0, name="test-instrument", advertise=False) as q:
        yield q


def get(query: OscQueryServer, path: str):
    """(status, decoded JSON or None) for a GET on the running server."""
    try:
        with urllib.request.urlopen(query.url.rstrip("/") + path, timeout=5) as r:
            body = r.read()
            if r.status == 204:
                assert body == b""
                return 204, None
            assert r.headers.get("Content-Type") == "application/json"
            return r.status, json.loads(body)
    except urllib.error.HTTPError as e:
        body = e.read()
        return e.code, json.loads(body) if body else None


def test_root_holds_the_whole_tree(query):
    status, root = get(query, "/")
    assert status == 200
    assert root["FULL_PATH"] == "/"
    assert set(root["CONTENTS"]) >= {"bend", "prompt", "patch", "freeze", "panic", "learn", "tempo"}
    bend = root["CONTENTS"]["bend"]
    assert bend["FULL_PATH"] == "/bend"
    assert set(bend["CONTENTS"]) == {"melt", "swirl"}
    assert set(bend["CONTENTS"]["melt"]["CONTENTS"]) == {"mix", "gain"}
    gain = bend["CONTENTS"]["melt"]["CONTENTS"]["gain"]
    assert gain == {
        "FULL_PATH": "/bend/melt/gain",
        "TYPE": "f",
        "RANGE": [{"MIN": 0.0, "MAX": 4.0}],
        "VALUE": [1.0],
        "ACCESS": 3,
        "CLIPMODE": ["both"],
        "DESCRIPTION": "melt gain",
        "UNIT": ["x"],
    }
    layer = bend["CONTENTS"]["swirl"]["CONTENTS"]["layer"]
    assert (layer["TYPE"], layer["RANGE"], layer["VALUE"]) == ("i", [{"MIN": 0, "MAX": 29}], [10])
    assert isinstance(layer["VALUE"][0], int)


def test_every_parameter_is_in_the_tree_with_its_spec(query, params):
    _, root = get(query, "/")

    def leaves(node):
        if "TYPE" in node and node.get("ACCESS") == 3:
            yield node
        for child in node.get("CONTENTS", {}).values():
            yield from leaves(child)

    found = {n["FULL_PATH"]: n for n in leaves(root)}
    assert set(found) == {"/" + s.name for s in SPECS}
    for spec in SPECS:
        node = found["/" + spec.name]
        assert node["RANGE"] == [{"MIN": spec.lo, "MAX": spec.hi}]
        assert node["VALUE"] == [params.get(spec.name)]


def test_control_addresses_are_write_only_nodes(query):
    _, root = get(query, "/")
    prompt = root["CONTENTS"]["prompt"]
    assert (prompt["TYPE"], prompt["ACCESS"]) == ("s", 2)
    assert prompt["CONTENTS"]["b"]["TYPE"] == "s"
    assert prompt["CONTENTS"]["blend"]["ACCESS"] == 3  # the parameter prompt/blend
    nxt = root["CONTENTS"]["patch"]["CONTENTS"]["next"]
    assert (nxt["FULL_PATH"], nxt["TYPE"], nxt["ACCESS"]) == ("/patch/next", "N", 2)
    assert "VALUE" not in nxt
    assert "describe" not in root["CONTENTS"]
    published = {a for a in CONTROL_ADDRESSES if a != "/describe"}
    for address in published:
        assert get(query, address)[0] == 200


def test_sub_path_and_attribute_queries(query):
    status, melt = get(query, "/bend/melt")
    assert status == 200
    assert melt["FULL_PATH"] == "/bend/melt"
    assert set(melt["CONTENTS"]) == {"mix", "gain"}
    assert get(query, "/bend/melt/")[1] == melt  # a trailing slash names the same node
    assert get(query, "/bend/melt/gain?VALUE") == (200, {"VALUE": [1.0]})
    assert get(query, "/bend/melt/gain?RANGE") == (200, {"RANGE": [{"MIN": 0.0, "MAX": 4.0}]})
    assert get(query, "/bend/melt/gain?TYPE") == (200, {"TYPE": "f"})
    assert get(query, "/bend/melt/gain?ACCESS") == (200, {"ACCESS": 3})
    assert get(query, "/bend/melt/gain?UNIT") == (200, {"UNIT": ["x"]})
    assert get(query, "/bend/melt/gain?FULL_PATH") == (200, {"FULL_PATH": "/bend/melt/gain"})
    assert get(query, "/bend?CONTENTS")[1]["CONTENTS"].keys() == {"melt", "swirl"}


def test_errors(query):
    assert get(query, "/bend/nope")[0] == 404
    assert get(query, "/bend/melt/mix/deeper")[0] == 404
    assert get(query, "/bend/melt/mix?BOGUS")[0] == 400
    assert get(query, "/bend/melt?VALUE") == (204, None)  # a container has no value
    assert get(query, "/bend/swirl/mix?UNIT") == (204, None)  # no unit declared


def test_host_info(query, osc):
    status, info = get(query, "/?HOST_INFO")
    assert status == 200
    assert info["NAME"] == "test-instrument"
    assert info["OSC_PORT"] == osc.address[1]
    assert info["OSC_TRANSPORT"] == "UDP"
    ext = info["EXTENSIONS"]
    assert ext["ACCESS"] and ext["VALUE"] and ext["RANGE"] and ext["DESCRIPTION"]
    assert ext["LISTEN"] is False


def test_values_follow_osc_and_patch_changes(query, osc, params):
    peer = Peer(osc.address)
    try:
        peer.send("/bend/melt/mix", 0.625)
        assert wait_until(lambda: get(query, "/bend/melt/mix?VALUE")[1] == {"VALUE": [0.625]})
        peer.send("/bend/*/mix", 0.25)
        assert wait_until(lambda: get(query, "/bend/swirl/mix?VALUE")[1] == {"VALUE": [0.25]})
    finally:
        peer.close()
    # a patch switch changes the address space itself
    params.remove_prefix("bend/swirl/")
    params.declare(ParamSpec("bend/glitch/rate", 1.0, 60.0, 12.0, unit="Hz"))
    _, bend = get(query, "/bend")
    assert set(bend["CONTENTS"]) == {"melt", "glitch"}
    assert get(query, "/bend/glitch/rate?VALUE") == (200, {"VALUE": [12.0]})
    assert get(query, "/bend/swirl/mix")[0] == 404


def test_port_in_use_is_a_clear_error(query, params):
    port = query.address[1]
    with pytest.raises(OSError, match=f"OSCQuery: cannot listen on 127.0.0.1:{port}"):
        OscQueryServer(params, osc_port=9000, port=port, advertise=False).start()


def test_stop_frees_the_port(params):
    q = OscQueryServer(params, osc_port=9000, port=0, advertise=False).start()
    port = q.address[1]
    assert get(q, "/?HOST_INFO")[0] == 200
    q.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
    again = OscQueryServer(params, osc_port=9000, port=port, advertise=False).start()
    try:
        assert get(again, "/bend/melt/mix?TYPE") == (200, {"TYPE": "f"})
    finally:
        again.stop()


@pytest.mark.skipif(importlib.util.find_spec("zeroconf") is not None, reason="zeroconf is installed")
def test_without_zeroconf_says_so_once(params, caplog, monkeypatch):
    monkeypatch.setattr(oscquery, "_zeroconf_missing_said", False)
    with caplog.at_level(logging.INFO, logger="instrument.control.oscquery"):
        for _ in range(2):
            with OscQueryServer(params, osc_port=9000, port=0) as q:
                assert get(q, "/?HOST_INFO")[0] == 200
                assert wait_until(lambda: oscquery._zeroconf_missing_said)
    said = [r for r in caplog.records if "zeroconf package is not installed" in r.getMessage()]
    assert len(said) == 1


@pytest.mark.skipif(importlib.util.find_spec("zeroconf") is None, reason="optional zeroconf not installed")
def test_zeroconf_advertises_oscjson(params):
    import zeroconf

    with OscQueryServer(params, osc_port=9000, port=0, name="zc-test") as q:
        browser = zeroconf.Zeroconf()
        try:
            info = browser.get_service_info("_oscjson._tcp.local.", "zc-test._oscjson._tcp.local.", timeout=5000)
        finally:
            browser.close()
        assert info is not None
        assert info.port == q.address[1]
        assert "127.0.0.1" in info.parsed_addresses()
