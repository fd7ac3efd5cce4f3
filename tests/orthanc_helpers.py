"""A real Orthanc PACS for tests: loopback only, free ports, its own temporary storage and config, always stopped.

Needs the Debian packages ``orthanc`` and ``orthanc-dicomweb`` (``/usr/sbin/Orthanc`` and the
DICOMweb plugin); tests that use it skip with that reason when they are absent.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
PLUGIN_DIRS = (Path("/usr/share/orthanc/plugins"), Path("/usr/lib/orthanc/plugins"))


def dicomweb_plugin() -> Path | None:
    """The Orthanc DICOMweb plugin library, if installed."""
    for d in PLUGIN_DIRS:
        for name in ("libOrthancDicomWeb.so",):
            if (d / name).is_file():
                return d / name
    return None


def orthanc_missing() -> str | None:
    """Why Orthanc cannot be started here, or None."""
    if not Path(ORTHANC).is_file():
        return "Orthanc is not installed (Debian packages orthanc, orthanc-dicomweb)"
    if dicomweb_plugin() is None:
        return "the Orthanc DICOMweb plugin is not installed (Debian package orthanc-dicomweb)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class OrthancServer:
    http_port: int
    dicom_port: int
    aet: str = "ORTHANC"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dimse(self) -> str:
        return f"dimse://{self.aet}@127.0.0.1:{self.dicom_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def get(self, path: str) -> object:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=10) as r:
            return json.loads(r.read())

    def upload(self, path: Path) -> None:
        """Store one DICOM file through Orthanc's REST API (as a modality or an import would)."""
        req = urllib.request.Request(f"{self.url}/instances", data=Path(path).read_bytes(), method="POST")
        with urllib.request.urlopen(req, timeout=30) as r:
            r.read()


@contextmanager
def orthanc(tmp: Path, *, start_timeout: float = 30.0) -> Iterator[OrthancServer]:
    """Start Orthanc with DICOMweb on loopback in ``tmp``; stop it (terminate, then kill) on exit."""
    server = OrthancServer(http_port=free_port(), dicom_port=free_port())
    storage = tmp / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    config = {
        "Name": "fedsite-test",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "HttpPort": server.http_port,
        "DicomPort": server.dicom_port,
        "DicomAet": server.aet,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "HttpBindAddress": "127.0.0.1",
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowFind": True,
        "DicomAlwaysAllowGet": True,
        "DicomAlwaysAllowStore": True,
        "DicomCheckModalityHost": False,
        "UnknownSopClassAccepted": True,
        "StorageCompression": False,
        "Plugins": [str(dicomweb_plugin())],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False, "Host": "127.0.0.1", "Ssl": False},
        "DicomModalities": {},
    }
    cfg_path = tmp / "orthanc.json"
    cfg_path.write_text(json.dumps(config))
    log = (tmp / "orthanc.log").open("w")
    proc = subprocess.Popen([ORTHANC, str(cfg_path)], stdout=log, stderr=subprocess.STDOUT, cwd=tmp)
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {proc.returncode}; see {tmp / 'orthanc.log'}")
            try:
                server.get("/system")
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"Orthanc did not answer within {start_timeout:.0f}s; see {tmp / 'orthanc.log'}"
                    ) from None
                time.sleep(0.2)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()
