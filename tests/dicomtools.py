"""Real DICOM software for the node's tests: Orthanc (with DICOMweb), dcmtk, dicom3tools.

Installed by ``make dicomtools`` (apt, as ``make browser`` installs Chromium); tests skip
cleanly when the binaries are absent. Orthanc runs on free loopback ports with a temp
configuration and storage folder, one per test module.
"""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import requests

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def have(*tools: str) -> list[str]:
    return [t for t in tools if shutil.which(t) is None]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Orthanc:
    def __init__(self, workdir: Path, modalities: dict[str, tuple[str, int]], aet: str = "ORTHANC",
                 dicom_port: int | None = None):
        self.workdir = Path(workdir)
        self.aet = aet
        self.http_port, self.dicom_port = free_port(), dicom_port or free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.dicomweb = f"{self.url}/dicom-web"
        storage = self.workdir / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "cxrserve-test", "StorageDirectory": str(storage), "IndexDirectory": str(storage),
            "HttpPort": self.http_port, "DicomPort": self.dicom_port, "DicomAet": aet,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomModalities": {name.lower(): {"AET": ae, "Host": "127.0.0.1", "Port": port,
                                               "AllowEcho": True, "AllowFind": True, "AllowGet": True,
                                               "AllowMove": True, "AllowStore": True}
                                for name, (ae, port) in modalities.items()},
            "DicomAlwaysAllowStore": True, "DicomCheckCalledAet": False,
            "Plugins": [str(DICOMWEB_PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "StableAge": 1, "OverwriteInstances": False, "ConcurrentJobs": 1, "HttpThreadsCount": 10,
        }
        self.config_path = self.workdir / "orthanc.json"
        self.config_path.write_text(json.dumps(config, indent=2))
        self.log = open(self.workdir / "orthanc.log", "wb")
        self.proc = subprocess.Popen(["Orthanc", str(self.config_path)], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                if requests.get(f"{self.url}/system", timeout=1).ok:
                    return
            except requests.RequestException:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"Orthanc did not start: {(self.workdir / 'orthanc.log').read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    # ------------------------------------------------------------------ REST
    def get(self, path: str):
        r = requests.get(f"{self.url}{path}", timeout=30)
        r.raise_for_status()
        return r.json() if "json" in r.headers.get("content-type", "") else r.content

    def upload(self, data: bytes) -> dict:
        r = requests.post(f"{self.url}/instances", data=data, timeout=30)
        r.raise_for_status()
        return r.json()

    def instances(self) -> list[dict]:
        """Every instance with its main tags (SOPInstanceUID, SeriesInstanceUID, Study...)."""
        out = []
        for oid in self.get("/instances"):
            tags = self.get(f"/instances/{oid}/simplified-tags")
            out.append({"id": oid, **tags})
        return out

    def file(self, oid: str) -> bytes:
        r = requests.get(f"{self.url}/instances/{oid}/file", timeout=30)
        r.raise_for_status()
        return r.content

    def clear(self) -> None:
        for pid in self.get("/patients"):
            requests.delete(f"{self.url}/patients/{pid}", timeout=30).raise_for_status()


#: storescu's flag to propose a compressed transfer syntax (it never transcodes on its own).
STORESCU_TS_FLAG = {"1.2.840.10008.1.2.4.50": "-xy", "1.2.840.10008.1.2.4.51": "-xx", "1.2.840.10008.1.2.4.70": "-xs",
                    "1.2.840.10008.1.2.4.90": "-xv", "1.2.840.10008.1.2.4.91": "-xw", "1.2.840.10008.1.2.4.80": "-xt",
                    "1.2.840.10008.1.2.5": "-xr"}


def storescu(port: int, files: list[Path], *, calling: str, called: str = "CXRSERVE",
             timeout: float = 120) -> subprocess.CompletedProcess:
    """dcmtk storescu of ``files`` (one association, or one per compressed transfer syntax)."""
    import pydicom

    groups: dict[str, list[str]] = {}
    for f in files:
        ts = str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        groups.setdefault(STORESCU_TS_FLAG.get(ts, ""), []).append(str(f))
    last = None
    for flag, group in groups.items():
        args = ["storescu", *([flag] if flag else []), "-aet", calling, "-aec", called, "127.0.0.1", str(port), *group]
        last = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
        if last.returncode != 0:
            return last
    return last


def echoscu(port: int, *, calling: str, called: str = "CXRSERVE") -> subprocess.CompletedProcess:
    return subprocess.run(["echoscu", "-aet", calling, "-aec", called, "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=30)


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) lines of dicom3tools' validator."""
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    lines = (proc.stdout + proc.stderr).splitlines()
    return [ln for ln in lines if ln.startswith("Error")], [ln for ln in lines if ln.startswith("Warning")]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")
