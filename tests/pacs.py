"""A real PACS for the tests: Debian's Orthanc with its DICOMweb plugin, on free loopback ports.

``OrthancServer(workdir).start()`` writes a configuration of its own (storage in ``workdir``,
HTTP with a user, DICOM on a free port, the DICOMweb plugin at ``/dicom-web/``), starts the
``Orthanc`` binary and waits until its REST API answers. ``stop()`` ends it; ``start()`` again
brings it back with what it had stored (the tests stop it to play a PACS that is down).
"""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

ORTHANC_BIN = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
USER, PASSWORD = "cxr", "orthanc-test-password"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def missing() -> str | None:
    """Why Orthanc cannot run here, or None."""
    if not Path(ORTHANC_BIN).exists():
        return (
            "Debian's orthanc package is not installed (apt-get install orthanc orthanc-dicomweb)"
        )
    if not DICOMWEB_PLUGIN.exists():
        return "Debian's orthanc-dicomweb package is not installed"
    return None


class OrthancServer:
    """One Orthanc process with a generated configuration."""

    def __init__(self, workdir: Path, aet: str = "ORTHANC") -> None:
        self.workdir = workdir
        self.aet = aet
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.config_path = workdir / "orthanc.json"
        self.log_path = workdir / "orthanc.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def config(self) -> dict[str, Any]:
        storage = str(self.workdir / "storage")
        return {
            "Name": "cxr-test-pacs",
            "StorageDirectory": storage,
            "IndexDirectory": storage,
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {USER: PASSWORD},
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowGet": True,
            "UnknownSopClassAccepted": True,
            "DicomModalities": {},
            "DicomModalitiesInDatabase": False,
            "SaveJobs": False,
            "StableAge": 1,
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True},
        }

    def start(self, timeout: float = 30.0) -> OrthancServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config(), indent=1))
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [ORTHANC_BIN, str(self.config_path)], stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited: {self.log_path.read_text()[-2000:]}")
            try:
                if self.get("/system").get("DicomAet") == self.aet:
                    return self
            except OSError:  # connection refused while it starts
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer within {timeout} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    # ------------------------------------------------------------------ REST helpers

    def request(self, method: str, path: str, body: bytes | None = None) -> bytes:
        """One authenticated REST call; raises urllib.error.HTTPError on a 4xx/5xx answer."""
        auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        req = urllib.request.Request(
            self.url + path, data=body, method=method, headers={"Authorization": f"Basic {auth}"}
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            return bytes(r.read())

    def get(self, path: str) -> Any:
        return json.loads(self.request("GET", path))

    def post(self, path: str, body: Any) -> Any:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return json.loads(self.request("POST", path, data))

    def put(self, path: str, body: Any) -> None:
        self.request("PUT", path, json.dumps(body).encode())

    def upload(self, dicom_bytes: bytes) -> str:
        """Store one instance through the REST API; return Orthanc's instance id."""
        return str(self.post("/instances", dicom_bytes)["ID"])

    def add_modality(self, name: str, aet: str, host: str, port: int) -> None:
        """Let Orthanc send (C-MOVE, C-STORE) to this AE."""
        self.put(f"/modalities/{name}", {"AET": aet, "Host": host, "Port": port})

    def instances(self) -> list[dict[str, Any]]:
        """Every stored instance with its main DICOM tags (name -> value)."""
        return [
            {"id": iid, **self.get(f"/instances/{iid}/simplified-tags")}
            for iid in self.get("/instances")
        ]

    def file(self, instance_id: str) -> bytes:
        return self.request("GET", f"/instances/{instance_id}/file")
