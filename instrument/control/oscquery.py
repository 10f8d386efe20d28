"""OSCQuery: the OSC address space described as JSON over HTTP (Vidvox OSCQuery proposal).

Clients such as VDMX, ossia score, Chataigne and MadMapper read it to list every parameter with
its type, range, unit and live value. The tree is generated on each request from the ParamSpace,
so it follows patch switches; the control addresses (/prompt, /patch/next, ...) appear as
write-only nodes.

    GET /                     the whole tree
    GET /bend/melt            one node and everything under it
    GET /bend/melt/mix?VALUE  one attribute: {"VALUE": [0.25]}
    GET /?HOST_INFO           server name, OSC port and transport, supported attributes

Unknown paths answer 404, a node without the asked attribute 204, an unknown query 400.
With the optional `zeroconf` package installed, the server is advertised as _oscjson._tcp.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

from ..params import ParamSpace
from .osc import CONTROL_ADDRESSES

log = logging.getLogger(__name__)

DEFAULT_PORT = 9001  # TCP; the OSC messages themselves go to UDP 9000

ATTRIBUTES = ("FULL_PATH", "CONTENTS", "TYPE", "RANGE", "VALUE", "ACCESS", "DESCRIPTION", "UNIT", "CLIPMODE")
EXTENSIONS = {
    "ACCESS": True,
    "VALUE": True,
    "RANGE": True,
    "DESCRIPTION": True,
    "UNIT": True,
    "CLIPMODE": True,
    "TAGS": False,
    "EXTENDED_TYPE": False,
    "CRITICAL": False,
    "OVERLOADS": False,
    "LISTEN": False,
    "PATH_CHANGED": False,
    "PATH_RENAMED": False,
    "PATH_ADDED": False,
    "PATH_REMOVED": False,
}
ACCESS_WRITE = 2
ACCESS_READ_WRITE = 3

_zeroconf_missing_said = False


class OscQueryServer:
    """Serve the OSCQuery description of `params` for an OSC server listening on `osc_port`."""

    def __init__(
        self,
        params: ParamSpace,
        osc_port: int,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        name: str = "instrument",
        osc_host: str | None = None,
        advertise: bool = True,
    ):
        self.params = params
        self.name = name
        self._osc_port = osc_port
        self._osc_host = osc_host
        self._host = host
        self._port = port
        self._advertise = advertise
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._zeroconf = None
        self._service = None

    # -- life -----------------------------------------------------------------------------------
    def start(self) -> OscQueryServer:
        if self._httpd is not None:
            return self
        family, _, _, _, addr = socket.getaddrinfo(self._host, self._port, type=socket.SOCK_STREAM)[0]
        server_class = type("_Server", (ThreadingHTTPServer,), {"address_family": family, "daemon_threads": True})
        try:
            httpd = server_class(addr[:2], _Handler)
        except OSError as e:
            raise OSError(e.errno, f"OSCQuery: cannot listen on {self._host}:{self._port}: {e.strerror or e}") from None
        httpd.query = self
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="oscquery", daemon=True
        )
        self._thread.start()
        log.info("OSCQuery on %s", self.url)
        if self._advertise:
            threading.Thread(target=self._register, name="oscquery-zeroconf", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._unregister()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=2.0)
        self._httpd = None
        self._thread = None

    def __enter__(self) -> OscQueryServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) actually bound; port 0 at construction picks a free one."""
        if self._httpd is None:
            return (self._host, self._port)
        return self._httpd.server_address[:2]

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"

    # -- the description ------------------------------------------------------------------------
    def host_info(self) -> dict:
        info = {
            "NAME": self.name,
            "OSC_PORT": self._osc_port,
            "OSC_TRANSPORT": "UDP",
            "EXTENSIONS": dict(EXTENSIONS),
        }
        if self._osc_host and self._osc_host not in ("0.0.0.0", "::", ""):
            info["OSC_IP"] = self._osc_host
        return info

    def tree(self) -> dict:
        """The whole address space as one OSCQuery root node."""
        root = {"FULL_PATH": "/", "DESCRIPTION": self.name, "CONTENTS": {}}
        values = self.params.values()
        for spec in self.params.specs():
            if spec.name not in values:  # removed by a patch switch meanwhile
                continue
            node = _node(root, spec.name)
            value = values[spec.name]
            node["TYPE"] = "i" if spec.integer else "f"
            cast = int if spec.integer else float
            node["RANGE"] = [{"MIN": cast(spec.lo), "MAX": cast(spec.hi)}]
            node["VALUE"] = [cast(value)]
            node["ACCESS"] = ACCESS_READ_WRITE
            node["CLIPMODE"] = ["both"]
            node["DESCRIPTION"] = spec.doc or spec.name
            if spec.unit:
                node["UNIT"] = [spec.unit]
        for address, (osc_type, doc) in CONTROL_ADDRESSES.items():
            if address == "/describe" or address[1:] in values:
                continue  # /describe is a reply protocol of its own, not a control
            node = _node(root, address[1:])
            node["TYPE"] = osc_type
            node["ACCESS"] = ACCESS_WRITE
            node["DESCRIPTION"] = doc
            if address == "/freeze":
                node["RANGE"] = [{"MIN": 0, "MAX": 1}]
        return root

    def node(self, path: str) -> dict | None:
        """The node at an OSC path ("/" for the root), or None."""
        node = self.tree()
        for part in [p for p in path.split("/") if p]:
            node = node.get("CONTENTS", {}).get(part)
            if node is None:
                return None
        return node

    # -- zeroconf -------------------------------------------------------------------------------
    def _register(self) -> None:
        global _zeroconf_missing_said
        try:
            import zeroconf
        except ImportError:
            if not _zeroconf_missing_said:
                _zeroconf_missing_said = True
                log.info("OSCQuery: the zeroconf package is not installed, so it is not advertised "
                         "(clients connect to %s directly; pip install zeroconf to advertise)", self.url)
            return
        host, port = self.address
        try:
            if host in ("0.0.0.0", "::", ""):
                addresses = None  # zeroconf then announces this machine's interface addresses
            else:
                addresses = [socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)]
            info = zeroconf.ServiceInfo(
                "_oscjson._tcp.local.",
                f"{self.name}._oscjson._tcp.local.",
                port=port,
                addresses=addresses,
                properties={"txtvers": "1"},
                server=f"{socket.gethostname().split('.')[0]}.local.",
            )
            zc = zeroconf.Zeroconf()
            zc.register_service(info, allow_name_change=True)
        except Exception as e:  # noqa: BLE001 - advertising is a convenience, never fatal
            log.warning("OSCQuery: zeroconf advertising failed: %s", e)
            return
        if self._httpd is None:  # stopped while registering
            zc.unregister_service(info)
            zc.close()
            return
        self._zeroconf, self._service = zc, info
        log.info("OSCQuery advertised as %s", info.name)

    def _unregister(self) -> None:
        zc, info = self._zeroconf, self._service
        self._zeroconf = self._service = None
        if zc is not None:
            try:
                zc.unregister_service(info)
            finally:
                zc.close()


def _node(root: dict, name: str) -> dict:
    """The node for a slash name, creating containers on the way."""
    node = root
    path = ""
    for part in name.split("/"):
        path += "/" + part
        contents = node.setdefault("CONTENTS", {})
        node = contents.setdefault(part, {"FULL_PATH": path})
    return node


class _Handler(BaseHTTPRequestHandler):
    server_version = "instrument-oscquery"
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        query: OscQueryServer = self.server.query
        url = urlsplit(self.path)
        path = unquote(url.path) or "/"
        attribute = unquote(url.query).strip()
        try:
            if attribute == "HOST_INFO":
                self._reply(200, query.host_info())
                return
            if attribute and attribute not in ATTRIBUTES:
                self._reply(400, {"error": f"unknown query '{attribute}'"})
                return
            node = query.node(path)
            if node is None:
                self._reply(404, {"error": f"no OSC node at {path}"})
                return
            if not attribute:
                self._reply(200, node)
            elif attribute in node:
                self._reply(200, {attribute: node[attribute]})
            else:
                self._reply(204, None)
        except Exception:  # noqa: BLE001 - a client's request must not take the server down
            log.exception("OSCQuery: error answering %s", self.path)
            self._reply(500, {"error": "internal error"})

    def _reply(self, status: int, body: dict | None) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        if body is not None:
            self.send_header("Content-Type", "application/json")
        if status != 204:  # a 204 must not carry a length
            self.send_header("Content-Length", str(len(data)))
        self.send_header("Access-Control-Allow-Origin", "*")
        self.end_headers()
        if data:
            self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - http.server's signature
        log.debug("OSCQuery %s: %s", self.address_string(), format % args)
