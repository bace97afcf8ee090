"""Receivers for the HL7 and FHIR tests: hl7apy's own MLLP server, and a FHIR R4 transaction
endpoint that validates every resource with fhir.resources (R4B models) and honours
``ifNoneExist`` as a FHIR server does.

No pip-installable FHIR server with transactions was found: ``fhirsnake`` 1.1.0 (PyPI) serves
resources from files and takes plain ``POST /{type}`` only, no transaction Bundle and no
conditional create; HAPI FHIR's JPA server needs a Maven build with dozens of modules.
"""
from __future__ import annotations

import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from dicomtools import free_port


# --------------------------------------------------------------------------- MLLP
class MLLPListener:
    """hl7apy's ``MLLPServer`` on a free port. Each ORU^R01 is parsed by hl7apy in STRICT mode
    and validated; its MSH-10 is accepted once: a resend of an accepted control ID is answered
    AA again (the sender may have crashed before recording the first ACK) and counted in
    ``duplicates``, never accepted twice. ``nak`` > 0 answers that many messages AE first."""

    def __init__(self, nak: int = 0):
        from hl7apy.mllp import AbstractHandler, MLLPServer

        self.accepted: dict[str, str] = {}
        self.received: list[str] = []
        self.duplicates = Counter()
        self.invalid: list[str] = []
        self.nak = nak
        self.lock = threading.Lock()
        listener = self

        class ORUHandler(AbstractHandler):
            def reply(self):
                return listener.handle(self.incoming_message)

        self.port = free_port()
        self.server = MLLPServer("127.0.0.1", self.port, {"ORU^R01^ORU_R01": (ORUHandler,)}, timeout=10)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def handle(self, text: str) -> str:
        from hl7apy.consts import VALIDATION_LEVEL
        from hl7apy.core import Message
        from hl7apy.parser import parse_message

        try:
            msg = parse_message(text, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
            msg.validate()
            control = msg.msh.msh_10.value
        except Exception as err:  # noqa: BLE001 - answered AR with the reason
            self.invalid.append(f"{type(err).__name__}: {err}")
            control, code, note = "", "AR", "invalid message"
        else:
            with self.lock:
                self.received.append(control)
                if self.nak > 0:
                    self.nak -= 1
                    code, note = "AE", "receiver busy"
                elif control in self.accepted:
                    self.duplicates[control] += 1
                    code, note = "AA", "duplicate: already accepted"
                else:
                    self.accepted[control] = text
                    code, note = "AA", ""
        ack = Message("ACK", version="2.5.1", validation_level=VALIDATION_LEVEL.STRICT)
        ack.msh.msh_3 = "LISTENER"
        ack.msh.msh_7 = "20260101000000"
        ack.msh.msh_9 = "ACK^R01^ACK"
        ack.msh.msh_10 = ("ACK" + control)[:20] or "ACK"
        ack.msh.msh_11 = "P"
        ack.msh.msh_12 = "2.5.1"
        ack.msa.msa_1 = code
        ack.msa.msa_2 = control
        if note:
            ack.msa.msa_3 = note
        if code != "AA":
            ack.add_segment("ERR")
            ack.err.err_3 = "207^Application internal error^HL70357"
            ack.err.err_4 = "E"
        return "\x0b" + ack.to_er7() + "\r\x1c\r"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --------------------------------------------------------------------------- FHIR
def _matches(resource: dict, system: str, value: str) -> bool:
    return any(i.get("system") == system and i.get("value") == value for i in resource.get("identifier", []))


class FHIRServer:
    """A FHIR R4 transaction endpoint on a free port (``url``): ``POST /`` of a transaction Bundle.

    The Bundle and every resource are validated with fhir.resources (R4B models) and the whole
    transaction refused (400 OperationOutcome) when one does not validate; each entry's
    ``ifNoneExist`` (``identifier=system|value``) finds an existing resource (200) or creates
    one (201); ``urn:uuid`` references are rewritten to the stored resources. ``fail`` > 0
    answers that many transactions 503 first. ``store[type]`` holds what was created."""

    def __init__(self, fail: int = 0):
        self.store: dict[str, list[dict]] = {}
        self.transactions = 0
        self.rejected: list[str] = []
        self.fail = fail
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status, answer = server.transaction(body)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/fhir"
        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @staticmethod
    def outcome(text: str) -> dict:
        return {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "invalid",
                                                               "diagnostics": text}]}

    def transaction(self, body: bytes) -> tuple[int, dict]:
        from fhir.resources.R4B import get_fhir_model_class

        with self.lock:
            if self.fail > 0:
                self.fail -= 1
                return 503, self.outcome("busy")
            try:
                bundle = json.loads(body)
                get_fhir_model_class("Bundle").model_validate(
                    {**bundle, "entry": [{k: v for k, v in e.items() if k != "resource"} for e in bundle["entry"]]})
                assert bundle["type"] == "transaction"
                for entry in bundle["entry"]:
                    res = entry["resource"]
                    get_fhir_model_class(res["resourceType"]).model_validate(res)
            except Exception as err:  # noqa: BLE001 - the whole transaction refused
                self.rejected.append(f"{type(err).__name__}: {err}"[:2000])
                return 400, self.outcome(f"invalid: {type(err).__name__}")
            self.transactions += 1
            ids, out, new = {}, [], []
            for entry in bundle["entry"]:
                res, req = entry["resource"], entry["request"]
                kind = res["resourceType"]
                system, _, value = req.get("ifNoneExist", "").removeprefix("identifier=").partition("|")
                found = next((r for r in self.store.get(kind, []) if _matches(r, system, value)), None)
                if found is not None:
                    ids[entry["fullUrl"]] = f"{kind}/{found['id']}"
                    out.append({"response": {"status": "200 OK", "location": f"{kind}/{found['id']}"}})
                else:
                    res = {**res, "id": str(sum(len(v) for v in self.store.values()) + len(new) + 1)}
                    new.append(res)
                    ids[entry["fullUrl"]] = f"{kind}/{res['id']}"
                    out.append({"response": {"status": "201 Created", "location": f"{kind}/{res['id']}"}})
            for res in new:
                text = json.dumps(res)
                for full, local in ids.items():
                    text = text.replace(f'"{full}"', f'"{local}"')
                res = json.loads(text)
                self.store.setdefault(res["resourceType"], []).append(res)
            answer = {"resourceType": "Bundle", "type": "transaction-response", "entry": out}
            get_fhir_model_class("Bundle").model_validate(answer)
            return 200, answer

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# --------------------------------------------------------------------------- a quick scorer for the node
class Canned:
    """``scorer: {kind: factory, factory: 'hl7fhir_servers:canned'}``: answers the JSON answer in
    ``$CXR_CANNED_RESPONSE`` for every image after ``$CXR_CANNED_SLEEP_S`` (a burst that takes
    a while without loading a model in each restarted node)."""

    def __init__(self, response: dict, sleep_s: float):
        self.response, self.sleep_s = response, sleep_s

    def score(self, image: bytes, prior: bytes | None = None) -> dict:
        import time

        time.sleep(self.sleep_s)
        return self.response


def canned(cfg) -> Canned:
    import os
    from pathlib import Path

    return Canned(json.loads(Path(os.environ["CXR_CANNED_RESPONSE"]).read_text()),
                  float(os.environ.get("CXR_CANNED_SLEEP_S", "0.3")))
