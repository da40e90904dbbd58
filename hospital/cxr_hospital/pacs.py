"""``cxr-pacs``: classify the chest X-rays in an Orthanc PACS and store each result back as a DICOM SR.

Talks to Orthanc's REST API over the standard library's HTTP (``pip install 'cxr[pacs]'``). With
``--once`` every CR/DX/DR image without an SR of this model is classified and its SR stored into
its study; without, it then follows Orthanc's change feed and handles each study when it is stable.
Idempotent (an SR's UID is fixed by image, model, thresholds and answer), retried with backoff when
Orthanc does not answer; images outside the intended use get an SR saying they were not
classified and why. Exit status: 0 done, 1 some images failed or Orthanc went away mid-run,
2 usage, model or connection error at start. Set-up and behaviour: docs/hospital.md.

Examples:
    $ cxr-pacs --url http://orthanc:8042 --username cxr --password-file /run/secrets/orthanc --once
    cxr-pacs: [1/2] instance 1.2.3.4: PNEUMONIA 0.873 -> SR 2.25.1234... stored
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

DEFAULT_URL = "http://localhost:8042"
RADIOGRAPHS = ("CR", "DX", "DR")

EPILOG = """\
examples:
  cxr-pacs --url http://localhost:8042 --once
      one pass over every study, then exit
  CXR_PACS_PASSWORD=... cxr-pacs --url https://pacs.example:8042 --username cxr
      follow Orthanc's change feed and classify each study when it becomes stable
  cxr-pacs --url URL --username cxr --password-file /run/secrets/orthanc --model m.onnx --once
  cxr-pacs --dicomweb https://pacs.example/dicom-web --username cxr --password-file pw --once
      any DICOMweb PACS: QIDO-RS, WADO-RS and STOW-RS instead of Orthanc's REST API

credentials:
  --username (or CXR_PACS_USERNAME) with --password-file FILE (its first line) or the
  CXR_PACS_PASSWORD environment variable; HTTP basic authentication. Never put them in the
  URL; they are never printed.

what is written:
  one DICOM Comprehensive SR per CR/DX/DR image, in the image's study (a cxr series per study
  and model): the finding (SNOMED CT Pneumonia or Normal), the probability, the threshold,
  in or out of the intended use with the reasons, the model as observer device, and that it
  is not a diagnosis. Images outside the model's intended use (DICOM header: age, view,
  modality, body part; or the image check) get an SR saying they were not classified and why.

exit status:
  0 done, 1 some images failed or Orthanc went away mid-run (run again: nothing is lost or
  duplicated), 2 usage, model, credentials or Orthanc not reachable at start
"""


class PacsError(Exception):
    """A fatal problem (Orthanc not reachable at start, credentials refused): one line, exit 2."""


class Unreachable(Exception):
    """Orthanc did not answer after every retry (a connection error or a 5xx answer)."""


class Refused(Exception):
    """Orthanc answered a request with a 4xx status other than 401/403."""


def _say(message: str) -> None:
    sys.stderr.write(f"cxr-pacs: {message}\n")
    sys.stderr.flush()


@dataclass
class Orthanc:
    """A small client of Orthanc's REST API with retries.

    Examples:
        >>> o = Orthanc("http://localhost:8042", ("cxr", "secret"))           # doctest: +SKIP
        >>> o.get_json("/system")["Version"]                                  # doctest: +SKIP
        '1.10.1'
    """

    url: str
    auth: Optional[Tuple[str, str]] = None
    timeout: float = 30.0
    retries: int = 5
    retry_wait: float = 1.0
    max_wait: float = 30.0
    on_retry: Callable[[str], None] = lambda message: None
    retried: int = 0
    _stop: Optional[threading.Event] = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/")

    def _headers(self, content_type: Optional[str]) -> Dict[str, str]:
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        if self.auth:
            token = base64.b64encode(f"{self.auth[0]}:{self.auth[1]}".encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        return headers

    def _once(self, method: str, path: str, body: Optional[bytes], content_type: Optional[str]) -> bytes:
        import http.client
        import urllib.error
        import urllib.request

        req = urllib.request.Request(self.url + path, data=body, method=method, headers=self._headers(content_type))
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.read()
        except urllib.error.HTTPError as exc:
            detail = _orthanc_message(exc)
            if exc.code in (401, 403):
                raise PacsError(f"Orthanc at {self.url} refused the credentials (HTTP {exc.code}); check --username "
                                "and the password (--password-file or CXR_PACS_PASSWORD)") from None
            if exc.code >= 500:
                raise Unreachable(f"HTTP {exc.code} from {method} {path}{detail}") from None
            raise Refused(f"HTTP {exc.code} from {method} {path}{detail}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise Unreachable(f"{method} {path}: {getattr(reason, 'strerror', None) or reason}") from None

    def request(self, method: str, path: str, body: Optional[bytes] = None, content_type: Optional[str] = None,
                retry: bool = True) -> bytes:
        """The body of Orthanc's answer; connection errors and 5xx answers are retried with backoff.

        Raises :class:`Unreachable` after the last try, :class:`Refused` for a 4xx answer and
        :class:`PacsError` when the credentials are refused.
        """
        wait = self.retry_wait
        tries = 1 + (self.retries if retry else 0)
        for attempt in range(1, tries + 1):
            try:
                return self._once(method, path, body, content_type)
            except Unreachable as exc:
                if attempt == tries or (self._stop is not None and self._stop.is_set()):
                    raise Unreachable(f"{exc} (after {attempt} tries)" if attempt > 1 else str(exc)) from None
                self.retried += 1
                self.on_retry(f"Orthanc did not answer ({exc}); retry {attempt}/{tries - 1} in {wait:.1f} s")
                if self._stop is not None:
                    self._stop.wait(wait)
                else:
                    time.sleep(wait)
                wait = min(wait * 2, self.max_wait)
        raise AssertionError("unreachable")  # pragma: no cover

    def get_json(self, path: str, retry: bool = True) -> Any:
        """GET ``path`` and parse its JSON answer."""
        return json.loads(self.request("GET", path, retry=retry) or b"null")

    def store(self, dicom: bytes) -> str:
        """POST a DICOM file to ``/instances``; Orthanc's status (``Success`` or ``AlreadyStored``)."""
        answer = json.loads(self.request("POST", "/instances", dicom, "application/dicom") or b"{}")
        status = str(answer.get("Status", "")) if isinstance(answer, dict) else ""
        if status not in ("Success", "AlreadyStored"):
            raise Refused(f"Orthanc did not store the SR (status {status or 'unknown'})")
        return status


def _orthanc_message(exc: Any) -> str:
    try:
        body = json.loads(exc.read() or b"{}")
        detail = body.get("Details") or body.get("Message") or ""
    except Exception:
        detail = ""
    return f": {detail}" if detail else ""


@dataclass
class Counts:
    """What a run did (the summary line)."""

    classified: int = 0
    not_classified: int = 0
    failed: int = 0
    already: int = 0
    not_images: int = 0
    stored: int = 0

    def summary(self, retries: int) -> str:
        images = self.classified + self.not_classified + self.failed
        return (f"{images} images: {self.classified} classified, {self.not_classified} not classified (outside the "
                f"intended use), {self.failed} failed; {self.stored} SRs stored; {self.already} already had an SR; "
                f"{self.not_images} other instances skipped (not CR/DX/DR images); {retries} retries")


@dataclass
class Job:
    """One image instance to handle: Orthanc's id, its SOP Instance UID and the UIDs in its study."""

    instance: str
    sop_instance_uid: str
    present: frozenset = frozenset()


class Runner:
    """Finds the images without an SR, classifies them and stores their SRs (one pass or following)."""

    def __init__(self, orthanc: Orthanc, classifier: Any, modalities: Sequence[str] = RADIOGRAPHS,
                 stop: Optional[threading.Event] = None) -> None:
        from .report import model_identity

        self.orthanc = orthanc
        self.classifier = classifier
        self.model = model_identity(classifier)
        self.modalities = {m.upper() for m in modalities}
        self.counts = Counts()
        self.stop = stop or threading.Event()

    def jobs(self, study: str) -> List[Job]:
        """The image instances of a study (in series and instance order), each with the SOP Instance
        UIDs its study holds: an SR's UID depends on the answer, so whether the study already has
        this answer is known once the image is classified."""
        series = self.orthanc.get_json(f"/studies/{study}/series")
        instances = {i["ID"]: i for i in self.orthanc.get_json(f"/studies/{study}/instances")}
        present = {str(i.get("MainDicomTags", {}).get("SOPInstanceUID", "")) for i in instances.values()}

        def number(tags: Dict[str, Any], key: str) -> float:
            try:
                return float(tags.get(key) or 0)
            except (TypeError, ValueError):
                return 0.0

        todo: List[Job] = []
        for s in sorted(series, key=lambda s: number(s.get("MainDicomTags", {}), "SeriesNumber")):
            ids = sorted(s.get("Instances", []),
                         key=lambda i: number(instances.get(i, {}).get("MainDicomTags", {}), "InstanceNumber"))
            if str(s.get("MainDicomTags", {}).get("Modality", "")).upper() not in self.modalities:
                self.counts.not_images += len(ids)
                continue
            for i in ids:
                uid = str(instances.get(i, {}).get("MainDicomTags", {}).get("SOPInstanceUID", ""))
                todo.append(Job(i, uid or i, frozenset(present)))
        return todo

    def handle(self, job: Job, position: str) -> None:
        """Classify one instance and store its SR; per-image problems are logged and counted."""
        from cxr_infer.dicom import read_header
        from cxr_infer.errors import InputError

        from .sr import sr_bytes, sr_of_result

        name = f"{position} instance {job.sop_instance_uid}"
        try:
            data = self.orthanc.request("GET", f"/instances/{job.instance}/file")
        except Refused as exc:  # deleted meanwhile
            self.counts.failed += 1
            _say(f"{name}: cannot download it ({exc})")
            return
        try:
            header = read_header(data)
            if "Rows" not in header and "PixelData" not in header:
                self.counts.not_images += 1
                _say(f"{name}: skipped, not an image ({header.get('SOPClassUID', 'unknown SOP class')})")
                return
            sr, answer, verdict = sr_of_result(self.classifier.predict(data, errors="return"), header, self.model)
        except InputError as exc:
            self.counts.failed += 1
            _say(f"{name}: {str(exc).removeprefix('<bytes>: ')}")
            return
        if sr.SOPInstanceUID in job.present:  # this answer is in the PACS already (a rerun)
            self.counts.already += 1
            return
        try:
            status = self.orthanc.store(sr_bytes(sr))
        except Refused as exc:
            self.counts.failed += 1
            _say(f"{name}: {exc}")
            return
        if answer.classified:
            self.counts.classified += 1
        else:
            self.counts.not_classified += 1
        self.counts.stored += 1  # "AlreadyStored": an earlier try stored it and its answer was lost, or a twin run
        already = "" if status == "Success" else " (already stored)"
        _say(f"{name}: {verdict} -> SR {sr.SOPInstanceUID} stored{already}")

    def run_studies(self, studies: Sequence[str]) -> None:
        """Handle every image of ``studies`` that has no SR yet (raises :class:`Unreachable`)."""
        todo: List[Job] = []
        for study in studies:
            try:
                todo += self.jobs(study)
            except Refused:  # the study was deleted meanwhile
                continue
        for k, job in enumerate(todo, 1):
            if self.stop.is_set():
                return
            self.handle(job, f"[{k}/{len(todo)}]")

    def once(self) -> None:
        """One pass over every study in Orthanc."""
        self.run_studies(self.orthanc.get_json("/studies"))

    def follow(self, poll: float) -> None:
        """A pass over every study, then each study Orthanc reports stable, until :attr:`stop` is set."""
        last = int(self.orthanc.get_json("/changes?last").get("Last", 0))
        pending: List[str] = []
        try:
            self.once()
        except Unreachable as exc:
            _say(f"Orthanc went away ({exc}); waiting for it")
            pending.append("*")
        while not self.stop.is_set():
            try:
                if pending:
                    if "*" in pending:
                        self.once()
                    else:
                        self.run_studies(list(dict.fromkeys(pending)))
                    pending = []
                feed = self.orthanc.get_json(f"/changes?since={last}&limit=100")
                stable = [c["ID"] for c in feed.get("Changes", []) if c.get("ChangeType") == "StableStudy"]
                last = int(feed.get("Last", last))
                if stable:
                    pending = list(dict.fromkeys(stable))
                    self.run_studies(pending)
                    pending = []
                if feed.get("Done", True) and not pending:
                    self.stop.wait(poll)
            except Unreachable as exc:
                _say(f"Orthanc went away ({exc}); trying again in {poll:g} s")
                pending = pending or ["*"]
                self.stop.wait(poll)


def build_parser() -> argparse.ArgumentParser:
    from cxr_infer import cliargs

    p = argparse.ArgumentParser(
        prog="cxr-pacs", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Classify the chest X-rays (CR/DX/DR) in an Orthanc PACS and store a DICOM SR of each result "
                    "into its study.")
    p.add_argument("--url", default=os.environ.get("CXR_PACS_URL", DEFAULT_URL),
                   help=f"Orthanc's REST API (default: CXR_PACS_URL or {DEFAULT_URL})")
    p.add_argument("--dicomweb", metavar="URL",
                   help="any DICOMweb PACS instead of Orthanc's REST API: QIDO-RS finds the images, WADO-RS "
                        "fetches them, STOW-RS stores the SRs (without --once: a pass every --poll seconds)")
    p.add_argument("--username", default=os.environ.get("CXR_PACS_USERNAME"),
                   help="HTTP basic authentication user (default: CXR_PACS_USERNAME)")
    p.add_argument("--password-file", metavar="FILE",
                   help="file whose first line is the password (default: the CXR_PACS_PASSWORD variable)")
    p.add_argument("--once", action="store_true", help="one pass over every study, then exit")
    p.add_argument("--poll", type=float, default=5.0, metavar="S", help="seconds between change-feed polls (5)")
    cliargs.add_model_arguments(p)
    p.add_argument("--modalities", default=",".join(RADIOGRAPHS),
                   help="series modalities to classify, comma-separated (default CR,DX,DR)")
    p.add_argument("--retries", type=int, default=5, metavar="N",
                   help="retries of a request Orthanc does not answer (default 5)")
    p.add_argument("--retry-wait", type=float, default=1.0, metavar="S",
                   help="first wait before a retry, doubled each time up to 30 s (default 1)")
    p.add_argument("--timeout", type=float, default=30.0, metavar="S", help="HTTP timeout per request (default 30)")
    return p


def _credentials(args: argparse.Namespace) -> Optional[Tuple[str, str]]:
    from urllib.parse import urlsplit

    if urlsplit(args.url).username or "@" in urlsplit(args.url).netloc:
        raise PacsError("put credentials in --username and --password-file (or CXR_PACS_PASSWORD), not in --url")
    password: Optional[str] = None
    if args.password_file:
        try:
            with open(args.password_file, encoding="utf-8") as fh:
                password = fh.readline().rstrip("\r\n")
        except OSError as exc:
            raise PacsError(f"cannot read the password file {args.password_file}: {exc.strerror or exc}") from None
    elif os.environ.get("CXR_PACS_PASSWORD") is not None:
        password = os.environ["CXR_PACS_PASSWORD"]
    if password is not None and not args.username:
        raise PacsError("a password was given without --username (or CXR_PACS_USERNAME)")
    if args.username and password is None:
        raise PacsError("--username needs a password: --password-file FILE or CXR_PACS_PASSWORD")
    return (args.username, password) if args.username else None


def run(args: argparse.Namespace) -> int:
    """Connect, load the model, run one pass or follow; the exit status."""
    from urllib.parse import urlsplit

    url = args.dicomweb or args.url
    if urlsplit(url).scheme not in ("http", "https"):
        what = "--dicomweb" if args.dicomweb else "--url"
        raise PacsError(f"{what} {url!r} is not an http(s) URL")
    args.url = url
    auth = _credentials(args)
    stop = threading.Event()
    orthanc = Orthanc(args.url, auth, timeout=args.timeout, retries=max(0, args.retries),
                      retry_wait=max(0.0, args.retry_wait), on_retry=_say, _stop=stop)
    version = "" if args.dicomweb else _orthanc_version(orthanc, args.url)
    from cxr_infer.classifier import Classifier

    from .sr import missing

    problem = missing()
    if problem:
        raise PacsError(problem.replace("cxr[dicom]", "cxr[pacs]"))
    classifier = Classifier(args.model, device=args.device, threads=args.threads, threshold=args.threshold,
                            domain_threshold=args.domain_threshold, domain_flag_rate=args.domain_flag_rate)

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    modalities = [m.strip() for m in args.modalities.split(",") if m.strip()]
    try:
        if args.dicomweb:
            from .dicomweb import WebError, web_runner

            runner: Any = web_runner(args, auth, classifier, modalities, _say, stop)
            where, gone, service = f"DICOMweb at {args.dicomweb}", WebError, "the DICOMweb service"
        else:
            runner = Runner(orthanc, classifier, modalities, stop)
            where, gone, service = f"Orthanc {version} at {args.url}", Unreachable, "Orthanc"
        _say(f"connected to {where}; model {runner.model.title} ({runner.model.name}, "
             f"threshold {runner.model.threshold:g})")
        status = _drive(runner, args, gone, service)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    _say(runner.counts.summary(orthanc.retried))
    return 1 if status or runner.counts.failed else 0


def _drive(runner: Any, args: argparse.Namespace, gone: type, service: str) -> int:
    """One pass or follow the source (``--once``/``--poll``); 1 when ``service`` went away mid-run (raising
    ``gone``): the next run does what is left, since an image whose SR is at the source is not done again."""
    start = time.monotonic()
    try:
        if args.once:
            runner.once()
        else:
            runner.follow(max(0.05, args.poll))
    except gone as exc:
        _say(f"{service} went away mid-run ({exc}) after {time.monotonic() - start:.0f} s; the images left are "
             "done by the next run (nothing is lost or duplicated)")
        return 1
    return 0


def _orthanc_version(orthanc: Orthanc, url: str) -> str:
    try:
        return str(orthanc.get_json("/system", retry=False).get("Version", "?"))
    except (Unreachable, Refused) as exc:
        raise PacsError(f"Orthanc is not reachable at {url} ({exc}); is it running, and is the URL right?") \
            from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``cxr-pacs``; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except PacsError as exc:
        _say(str(exc))
        return 2
    except KeyboardInterrupt:
        _say("interrupted")
        return 130
    except Exception as exc:  # CXRError (model, device) and anything unforeseen: one line, no traceback
        from cxr_infer.errors import one_line

        _say(one_line(exc))
        return 2


if __name__ == "__main__":
    sys.exit(main())
