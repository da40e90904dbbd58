"""DICOMweb for ``cxr-pacs --dicomweb`` and ``cxr-node --send-to-dicomweb``: QIDO-RS, WADO-RS, STOW-RS.

A small client over the standard library's HTTP (no extra package), so any DICOMweb PACS works:
QIDO-RS finds the CR/DX instances, WADO-RS fetches one as ``application/dicom``, STOW-RS stores
an SR. :class:`WebRunner` is ``cxr-pacs --dicomweb URL``: one pass (``--once``) or a pass every
``--poll`` seconds, each new instance classified and its SR stored into its study, unless the
study already holds that SR (same image, model, settings and answer: same UID).

Examples:
    >>> web = DicomWeb("http://localhost:8042/dicom-web")                     # doctest: +SKIP
    >>> [i["00080018"]["Value"][0] for i in web.qido("/instances", {"Modality": "DX"})]  # doctest: +SKIP
    ['1.2.826.0.1.3680043.8.498.1003']
"""
from __future__ import annotations

import base64
import json
import threading
import uuid
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

STUDY, SERIES, INSTANCE, MODALITY = "0020000D", "0020000E", "00080018", "00080060"


class WebError(Exception):
    """A DICOMweb request failed: no answer, an HTTP error or a refused instance (one line)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


def tag(item: Dict[str, Any], key: str) -> str:
    """The first value of ``key`` in a DICOM JSON dataset ('' when absent)."""
    values = item.get(key, {}).get("Value") or [""]
    return str(values[0])


class DicomWeb:
    """A DICOMweb client: ``qido``, ``wado_instance`` and ``stow`` with basic authentication."""

    def __init__(self, url: str, auth: Optional[Tuple[str, str]] = None, timeout: float = 30.0) -> None:
        self.url, self.auth, self.timeout = url.rstrip("/"), auth, timeout

    def _request(self, method: str, path: str, body: Optional[bytes] = None,
                 headers: Optional[Dict[str, str]] = None) -> Tuple[bytes, str]:
        import http.client
        import urllib.error
        import urllib.request

        headers = dict(headers or {})
        if self.auth:
            headers["Authorization"] = "Basic " + base64.b64encode(f"{self.auth[0]}:{self.auth[1]}".encode()).decode()
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.read(), resp.headers.get("Content-Type", "")
        except urllib.error.HTTPError as exc:
            raise WebError(f"HTTP {exc.code} from {method} {path}", exc.code) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise WebError(f"{method} {path}: {getattr(reason, 'strerror', None) or reason}") from None

    def qido(self, path: str, params: Optional[Dict[str, str]] = None) -> List[Dict[str, Any]]:
        """QIDO-RS: the DICOM JSON datasets that ``path`` (e.g. ``/instances``) finds."""
        from urllib.parse import urlencode

        query = f"?{urlencode(params)}" if params else ""
        body, _ = self._request("GET", path + query, headers={"Accept": "application/dicom+json"})
        return json.loads(body or b"[]") or []

    def wado_instance(self, study: str, series: str, instance: str) -> bytes:
        """WADO-RS: one instance as a DICOM Part 10 file."""
        body, content_type = self._request(
            "GET", f"/studies/{study}/series/{series}/instances/{instance}",
            headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
        parts = multipart_parts(body, content_type)
        if not parts:
            raise WebError(f"WADO-RS gave no DICOM part for instance {instance}")
        return parts[0]

    def stow(self, dicom: bytes, study: str = "") -> None:
        """STOW-RS one DICOM file (into ``study`` where given); raises :class:`WebError` when refused."""
        boundary = uuid.uuid4().hex
        body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + dicom
                + f"\r\n--{boundary}--\r\n".encode())
        headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                   "Accept": "application/dicom+json"}
        answer, _ = self._request("POST", f"/studies/{study}" if study else "/studies", body, headers)
        try:
            result = json.loads(answer or b"{}")
        except ValueError:
            return
        failed = (result.get("00081198") or {}).get("Value") if isinstance(result, dict) else None
        if failed:
            reason = tag(failed[0], "00081197")
            raise WebError(f"the DICOMweb service refused the SR (failure reason {reason or 'not given'})")


def multipart_parts(body: bytes, content_type: str) -> List[bytes]:
    """The bodies of a ``multipart/related`` answer (the whole body when it is not multipart)."""
    boundary = ""
    for param in content_type.split(";"):
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary":
            boundary = value.strip('"')
    if not boundary:
        return [body] if body else []
    parts = []
    for chunk in body.split(b"--" + boundary.encode())[1:]:
        if chunk.startswith(b"--"):
            break
        _, sep, payload = chunk.partition(b"\r\n\r\n")
        if sep:
            parts.append(payload[:-2] if payload.endswith(b"\r\n") else payload)
    return parts


class WebRunner:
    """``cxr-pacs --dicomweb``: classify every CR/DX instance without its SR and STOW the SR."""

    def __init__(self, web: DicomWeb, classifier: Any, modalities: Sequence[str], say: Any,
                 stop: Optional[threading.Event] = None) -> None:
        from .pacs import Counts
        from .report import model_identity

        self.web, self.classifier, self.say = web, classifier, say
        self.model = model_identity(classifier)
        self.modalities = [m.upper() for m in modalities]
        self.counts = Counts()
        self.stop = stop or threading.Event()
        self.done: Set[str] = set()

    def instances(self) -> List[Dict[str, Any]]:
        """QIDO-RS: every instance of the modalities (paged), in study order."""
        found: List[Dict[str, Any]] = []
        for modality in self.modalities:
            offset = 0
            while True:
                page = self.web.qido("/instances", {"Modality": modality, "limit": "500", "offset": str(offset),
                                                    "includefield": f"{STUDY},{SERIES},{INSTANCE}"})
                found += page
                if len(page) < 500:
                    break
                offset += len(page)
        return sorted(found, key=lambda i: (tag(i, STUDY), tag(i, SERIES), tag(i, INSTANCE)))

    def present(self, study: str) -> Set[str]:
        """The SOP Instance UIDs of the SRs a study holds."""
        return {tag(i, INSTANCE) for i in self.web.qido(f"/studies/{study}/instances", {"Modality": "SR"})}

    def handle(self, item: Dict[str, Any], present: Set[str], position: str) -> None:
        """Fetch, classify and store the SR of one instance (per-image problems: one line, counted)."""
        from cxr_infer.dicom import read_header
        from cxr_infer.errors import InputError

        from .sr import sr_bytes, sr_of_result

        study, series, uid = tag(item, STUDY), tag(item, SERIES), tag(item, INSTANCE)
        name = f"{position} instance {uid}"
        try:
            data = self.web.wado_instance(study, series, uid)
            sr, answer, verdict = sr_of_result(self.classifier.predict(data, errors="return"), read_header(data),
                                               self.model)
        except InputError as exc:
            self.counts.failed += 1
            self.say(f"{name}: {str(exc).removeprefix('<bytes>: ')}")
            return
        self.done.add(uid)
        if sr.SOPInstanceUID in present:
            self.counts.already += 1
            return
        self.web.stow(sr_bytes(sr), study)
        present.add(sr.SOPInstanceUID)
        self.counts.stored += 1
        if answer.classified:
            self.counts.classified += 1
        else:
            self.counts.not_classified += 1
        self.say(f"{name}: {verdict} -> SR {sr.SOPInstanceUID} stored")

    def once(self) -> None:
        """One pass: every instance not handled yet in this run (raises :class:`WebError`)."""
        todo = [i for i in self.instances() if tag(i, INSTANCE) not in self.done]
        studies: Dict[str, Set[str]] = {}
        for k, item in enumerate(todo, 1):
            if self.stop.is_set():
                return
            study = tag(item, STUDY)
            if study not in studies:
                studies[study] = self.present(study)
            self.handle(item, studies[study], f"[{k}/{len(todo)}]")

    def follow(self, poll: float) -> None:
        """A pass every ``poll`` seconds until :attr:`stop` is set (DICOMweb has no change feed)."""
        while not self.stop.is_set():
            try:
                self.once()
            except WebError as exc:
                self.say(f"the DICOMweb service went away ({exc}); trying again in {poll:g} s")
            self.stop.wait(poll)


def web_runner(args: Any, auth: Optional[Tuple[str, str]], classifier: Any, modalities: List[str], say: Any,
               stop: threading.Event) -> "WebRunner":
    """``cxr-pacs --dicomweb URL``'s runner, once the service answers a query."""
    from .pacs import PacsError

    web = DicomWeb(args.dicomweb, auth, timeout=args.timeout)
    try:
        web.qido("/studies", {"limit": "1"})
    except WebError as exc:
        raise PacsError(f"the DICOMweb service is not reachable at {args.dicomweb} ({exc}); is the URL right?") \
            from None
    return WebRunner(web, classifier, modalities, say, stop)
