"""``cxr-node``: a DICOM node a PACS or a modality routes chest X-rays to; the SR goes back.

A DICOM Storage SCP built on pynetdicom (``pip install 'cxr[node]'``). It accepts every storage
SOP class; CR and DX images are queued and classified, anything else is acknowledged, ignored
and logged in one line. Each instance is on disk and in the job table
(:mod:`cxr_hospital.nodequeue`) before the C-STORE response goes back. One worker classifies the
queue and sends each SR by C-STORE (``--send-to``) or STOW-RS (``--send-to-dicomweb``), retrying
with backoff while the destination is down; after a restart it resumes from the table. An image
whose pixel data cannot be read gets an SR saying it could not be read (so the PACS shows the
node had it); one whose header cannot be read gets a log line and no SR. SIGTERM (or Ctrl-C)
finishes the current job and stops. Set-up: docs/integration.md.

Examples:
    $ cxr-node --listen 0.0.0.0:11112 --ae-title CXR --send-to PACS@pacs.example:104 \\
          --state /var/lib/cxr-node --allow PACS@10.1.2.3
    cxr-node: listening on 0.0.0.0:11112 as CXR (TLS off); SRs to PACS@pacs.example:104; 0 jobs pending
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import ssl
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Tuple

from .nodequeue import Job, JobQueue, percentile

#: the storage SOP classes that are classified (CR, DX for presentation, DX for processing)
RADIOGRAPH_CLASSES = {"1.2.840.10008.5.1.4.1.1.1": "CR", "1.2.840.10008.5.1.4.1.1.1.1": "DX",
                      "1.2.840.10008.5.1.4.1.1.1.1.1": "DX"}
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR Storage
EXPLICIT_LE, IMPLICIT_LE = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"  # the SR files' transfer syntaxes

EPILOG = """\
examples:
  cxr-node --listen 0.0.0.0:11112 --ae-title CXR --send-to PACS@pacs.example:104 \\
           --state /var/lib/cxr-node --allow PACS@10.1.2.3 --allow MODALITY1
      receive CR/DX images by C-STORE, send each SR back by C-STORE
  cxr-node --listen 0.0.0.0:11112 --ae-title CXR --state /var/lib/cxr-node \\
           --send-to-dicomweb https://pacs.example/dicom-web --username cxr --password-file pw
      the same, storing SRs by STOW-RS
  cxr-node --listen 0.0.0.0:2762 ... --tls-cert node.pem --tls-key node.key --tls-ca hospital-ca.pem
      DICOM over TLS; with --tls-ca every caller must show a certificate that CA signed
  cxr-node ... --send-to PACS@pacs.example:2762 --send-tls-ca hospital-ca.pem \\
           --send-tls-cert node.pem --send-tls-key node.key
      C-STORE the SRs over TLS: the PACS's certificate checked, the node's shown
  cxr-node --status /var/lib/cxr-node [--json]
      jobs per state and the receipt-to-stored latency (p50, p95)

state folder:
  incoming/ (images until their SR is stored), sr/ (SRs until the destination has them) and
  jobs.sqlite, the job table (UIDs, times and answers; no patient data). Keep it on a local disk.

exit status:
  0 stopped by SIGTERM or Ctrl-C (the current job finished), 2 usage, model, state folder or
  port error at start
"""


class NodeError(Exception):
    """A problem at start (usage, state folder, port, certificate): one line, exit 2."""


class SendError(Exception):
    """The destination did not take an SR (down, or refused it): retried with backoff."""


def _say(message: str) -> None:
    sys.stderr.write(f"cxr-node: {message}\n")
    sys.stderr.flush()


@dataclass(frozen=True)
class Peer:
    """A DICOM application entity: AE title, host and port."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> "Peer":
        """``AET@HOST:PORT`` (raises :class:`NodeError` naming what is wrong)."""
        aet, at, address = text.partition("@")
        host, colon, port = address.rpartition(":")
        if not (aet and at and colon and host and port.isdigit()) or len(aet) > 16:
            raise NodeError(f"--send-to {text!r} is not AET@HOST:PORT (an AE title of at most 16 characters)")
        return cls(aet, host, int(port))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def parse_listen(text: str) -> Tuple[str, int]:
    """``HOST:PORT`` of ``--listen``."""
    host, colon, port = text.rpartition(":")
    if not colon or not port.isdigit() or not 0 < int(port) < 65536:
        raise NodeError(f"--listen {text!r} is not HOST:PORT")
    return host or "0.0.0.0", int(port)


def parse_allow(entries: Sequence[str]) -> List[Tuple[str, str]]:
    """``--allow AET[@HOST]`` entries as ``(AE title, host or "")``."""
    out = []
    for entry in entries:
        aet, _, host = entry.partition("@")
        if not aet.strip() or len(aet.strip()) > 16:
            raise NodeError(f"--allow {entry!r} is not AET or AET@HOST (an AE title of at most 16 characters)")
        out.append((aet.strip(), host.strip()))
    return out


class DimseSender:
    """Sends SRs by C-STORE to one peer, keeping the association open between SRs."""

    def __init__(self, own_ae_title: str, peer: Peer, timeout: float = 30.0,
                 tls: Optional[ssl.SSLContext] = None) -> None:
        from pynetdicom import AE

        self.peer, self.tls = peer, tls
        self.ae = AE(ae_title=own_ae_title)
        self.ae.add_requested_context(SR_CLASS, [EXPLICIT_LE, IMPLICIT_LE])
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = timeout
        self.assoc: Any = None

    def send(self, path: Path) -> None:
        """C-STORE one SR file (raises :class:`SendError`)."""
        if self.assoc is None or not self.assoc.is_established:
            self.assoc = self.ae.associate(self.peer.host, self.peer.port, ae_title=self.peer.ae_title,
                                           tls_args=(self.tls, self.peer.host) if self.tls else None)
            if not self.assoc.is_established:
                self.assoc = None
                raise SendError(f"no association with {self.peer}" + (
                    " over TLS (is it up, with a certificate for that host signed by --send-tls-ca?)" if self.tls
                    else ""))
        status = self.assoc.send_c_store(str(path))
        code = getattr(status, "Status", None)
        if code is None:
            self.assoc.abort()
            self.assoc = None
            raise SendError(f"{self.peer} did not answer the C-STORE")
        if code != 0 and code not in (0xB000, 0xB006, 0xB007):
            raise SendError(f"{self.peer} refused the SR (status 0x{code:04X})")

    def close(self) -> None:
        """Release the association."""
        if self.assoc is not None and self.assoc.is_established:
            self.assoc.release()
        self.assoc = None


class StowSender:
    """Sends SRs by STOW-RS to a DICOMweb service."""

    def __init__(self, url: str, auth: Optional[Tuple[str, str]], timeout: float = 30.0) -> None:
        from .dicomweb import DicomWeb

        self.web = DicomWeb(url, auth, timeout=timeout)

    def send(self, path: Path) -> None:
        """STOW-RS one SR file (raises :class:`SendError`)."""
        from .dicomweb import WebError

        try:
            self.web.stow(path.read_bytes())
        except WebError as exc:
            raise SendError(str(exc)) from None

    def close(self) -> None:
        """Nothing to release."""


class Worker(threading.Thread):
    """Classifies the queued images and sends their SRs, oldest first, until :attr:`stop` is set."""

    def __init__(self, queue: JobQueue, classifier: Any, sender: Any, stop: threading.Event,
                 retry_wait: float = 1.0, max_wait: float = 60.0) -> None:
        super().__init__(name="cxr-node-worker", daemon=True)
        from .report import model_identity

        self.queue, self.classifier, self.sender, self.stop = queue, classifier, sender, stop
        self.model = model_identity(classifier)
        self.retry_wait, self.max_wait = retry_wait, max_wait
        self.wake = threading.Event()

    def run(self) -> None:
        """Work the queue; wait for a receipt or a retry's time when there is nothing to do."""
        while not self.stop.is_set():
            job = self.queue.next_job()
            if job is None:
                due = self.queue.next_due()
                self.wake.wait(1.0 if due is None else min(1.0, max(0.01, due - time.time())))
                self.wake.clear()
                continue
            try:
                if job.state == "received":
                    job = self.classify(job)
                if job is not None:
                    self.send(job)
            except Exception as exc:  # never let one job stop the node; it stays queued and is tried again
                _say(f"{job.sop_instance_uid if job else '?'}: unexpected error {type(exc).__name__}: {exc}")
                self.stop.wait(1.0)
        self.sender.close()

    def classify(self, job: Job) -> Optional[Job]:
        """Classify one received image and keep its SR (None when it cannot give one)."""
        from cxr_infer.dicom import read_header
        from cxr_infer.errors import InputError

        from .sr import sr_bytes, sr_of_result

        uid = job.sop_instance_uid
        try:
            data = self.queue.image_path(uid).read_bytes()
        except OSError as exc:
            self.queue.failed(uid, f"the received file is gone: {exc.strerror or exc}")
            _say(f"{uid}: the received file is gone; no SR")
            return None
        try:
            header = read_header(data)
            result = self.classifier.predict(data, errors="return")
            sr, answer, words = sr_of_result(result, header, self.model, unreadable_sr=True)
        except InputError as exc:
            problem = str(exc).removeprefix("<bytes>: ")
            self.queue.failed(uid, problem)
            _say(f"{uid}: cannot be read ({problem}); no SR")
            return None
        self.queue.classified(uid, sr_bytes(sr), sr.SOPInstanceUID, answer.key)
        _say(f"{uid}: {words} -> SR {sr.SOPInstanceUID}")
        return Job(uid, "classified", job.received, sr.SOPInstanceUID, 0)

    def send(self, job: Job) -> None:
        """Send one SR; on failure it waits in the queue (backoff doubling up to ``max_wait``)."""
        uid = job.sop_instance_uid
        try:
            self.sender.send(self.queue.sr_path(uid))
        except SendError as exc:
            wait = min(self.max_wait, self.retry_wait * 2 ** min(job.tries, 16))
            self.queue.retry_later(uid, wait, str(exc))
            _say(f"{uid}: SR not stored ({exc}); retry {job.tries + 1} in {wait:.1f} s")
            return
        except OSError as exc:
            self.queue.retry_later(uid, self.max_wait, f"cannot read the SR file: {exc}")
            _say(f"{uid}: cannot read its SR file ({exc.strerror or exc}); retry in {self.max_wait:.0f} s")
            return
        self.queue.stored(uid)
        _say(f"{uid}: SR {job.sr_uid} stored")


class Receiver:
    """The C-STORE side: keeps CR/DX instances in the queue before answering, ignores the rest."""

    def __init__(self, queue: JobQueue, allow: List[Tuple[str, str]], wake: Callable[[], None]) -> None:
        self.queue, self.allow, self.wake = queue, allow, wake

    def on_store(self, event: Any) -> int:
        """EVT_C_STORE: 0x0000 once the instance is on disk; 0xA700 when it cannot be kept."""
        uid = str(event.request.AffectedSOPInstanceUID or "")
        sop_class = str(event.request.AffectedSOPClassUID or "")
        caller = str(event.assoc.requestor.ae_title).strip()
        modality = RADIOGRAPH_CLASSES.get(sop_class)
        if modality is None:
            self.queue.note(uid, "ignored", "", caller, f"SOP class {sop_class}")
            _say(f"{uid}: ignored, SOP class {sop_class} is neither CR nor DX (from {caller})")
            return 0x0000
        try:
            new = self.queue.receive(uid, event.encoded_dataset(), modality, caller)
        except OSError as exc:
            _say(f"{uid}: cannot keep it ({exc.strerror or exc}); refused with status 0xA700")
            return 0xA700
        except Exception as exc:  # a dataset that cannot be encoded again: refuse it, the node goes on
            _say(f"{uid}: cannot keep it ({type(exc).__name__}: {exc}); refused with status 0xC000")
            return 0xC000
        _say(f"{uid}: received {modality} from {caller}" + ("" if new else " again (one job)"))
        self.wake()
        return 0x0000

    def on_accepted(self, event: Any) -> None:
        """EVT_ACCEPTED: an AE title allowed only from some hosts is aborted from any other."""
        caller = str(event.assoc.requestor.ae_title).strip()
        host = str(event.assoc.requestor.address)
        hosts = {h for aet, h in self.allow if aet == caller}
        if hosts and "" not in hosts and host not in hosts:
            _say(f"rejected an association from {caller} at {host}: not on the allow-list from that address")
            event.assoc.abort()

    def on_rejected(self, event: Any) -> None:
        """EVT_REJECTED: one line naming the caller."""
        _say(f"rejected an association from {str(event.assoc.requestor.ae_title).strip()} at "
             f"{event.assoc.requestor.address}: calling AE title not on the allow-list")


def server_tls(cert: Optional[str], key: Optional[str], ca: Optional[str]) -> Optional[ssl.SSLContext]:
    """The TLS context of the listening side (None without ``--tls-cert``); with ``ca``, callers
    must show a certificate it signed."""
    if not cert and not key and not ca:
        return None
    if not cert or not key:
        raise NodeError("TLS needs both --tls-cert and --tls-key")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
        if ca:
            ctx.load_verify_locations(ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise NodeError(f"cannot load the TLS certificate, key or CA ({getattr(exc, 'strerror', None) or exc})") \
            from None
    return ctx


def client_tls(ca: Optional[str], cert: Optional[str], key: Optional[str]) -> Optional[ssl.SSLContext]:
    """The TLS context of C-STORE to ``--send-to`` (None without ``--send-tls-*``): the peer's
    certificate must be signed by ``ca`` and name its host; ``cert`` and ``key`` are the node's own
    for a peer that asks callers for one."""
    if not ca and not cert and not key:
        return None
    if not ca:
        raise NodeError("TLS to the destination needs --send-tls-ca: the CA that signed its certificate")
    if bool(cert) != bool(key):
        raise NodeError("--send-tls-cert and --send-tls-key go together")
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if cert:
            ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise NodeError(f"cannot load --send-tls-ca, --send-tls-cert or --send-tls-key "
                        f"({getattr(exc, 'strerror', None) or exc})") from None
    return ctx


def start_server(args: argparse.Namespace, receiver: Receiver, tls: Optional[ssl.SSLContext]) -> Any:
    """Start the Storage SCP in the background (raises :class:`NodeError` when the port is taken)."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt
    from pynetdicom.sop_class import Verification

    host, port = parse_listen(args.listen)
    ae = AE(ae_title=args.ae_title)
    ae.maximum_associations = 32
    ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = 60
    from pynetdicom import ALL_TRANSFER_SYNTAXES
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification)
    if receiver.allow:
        ae.require_calling_aet = sorted({aet for aet, _ in receiver.allow})
    handlers = [(evt.EVT_C_STORE, receiver.on_store), (evt.EVT_ACCEPTED, receiver.on_accepted),
                (evt.EVT_REJECTED, receiver.on_rejected)]
    try:
        return ae.start_server((host, port), block=False, evt_handlers=handlers, ssl_context=tls)
    except OSError as exc:
        raise NodeError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None


def status(folder: str, as_json: bool = False) -> int:
    """``cxr-node --status DIR``: jobs per state and the receipt-to-stored latency."""
    try:
        queue = JobQueue(folder, create=False)
    except (FileNotFoundError, OSError) as exc:
        raise NodeError(str(exc)) from None
    counts, lat = queue.counts(), queue.latencies()
    queue.close()
    p50, p95 = percentile(lat, 50), percentile(lat, 95)
    if as_json:
        print(json.dumps({"counts": counts, "stored": len(lat), "latency_p50_s": p50, "latency_p95_s": p95}))
        return 0
    print(" ".join(f"{state} {n}" for state, n in counts.items()))
    if lat:
        print(f"receipt to stored: p50 {p50:.2f} s, p95 {p95:.2f} s over {len(lat)} SRs")
    else:
        print("receipt to stored: no SR stored yet")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from cxr_infer import cliargs

    p = argparse.ArgumentParser(
        prog="cxr-node", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="A DICOM node (Storage SCP): classify the chest X-rays (CR/DX) routed to it and send a DICOM "
                    "SR of each result to a PACS by C-STORE or STOW-RS.")
    p.add_argument("--status", metavar="DIR", help="print the jobs per state of a state folder and exit")
    p.add_argument("--json", action="store_true", help="with --status: one JSON object")
    p.add_argument("--listen", default="0.0.0.0:11112", metavar="HOST:PORT", help="where to listen (0.0.0.0:11112)")
    p.add_argument("--ae-title", default="CXR", metavar="AET", help="this node's AE title (CXR)")
    dest = p.add_mutually_exclusive_group()
    dest.add_argument("--send-to", metavar="AET@HOST:PORT", help="C-STORE the SRs to this AE")
    dest.add_argument("--send-to-dicomweb", metavar="URL", help="STOW-RS the SRs to this DICOMweb service")
    p.add_argument("--username", default=os.environ.get("CXR_PACS_USERNAME"),
                   help="with --send-to-dicomweb: HTTP basic authentication user (default: CXR_PACS_USERNAME)")
    p.add_argument("--password-file", metavar="FILE", help="its password's file (default: CXR_PACS_PASSWORD)")
    p.add_argument("--state", metavar="DIR", help="the state folder: received images, SRs and the job table")
    p.add_argument("--allow", action="append", default=[], metavar="AET[@HOST]",
                   help="a calling AE title (from HOST only) that may send; repeat it; default: anyone")
    p.add_argument("--tls-cert", metavar="FILE", help="PEM certificate: listen with DICOM over TLS")
    p.add_argument("--tls-key", metavar="FILE", help="PEM private key of --tls-cert")
    p.add_argument("--tls-ca", metavar="FILE", help="PEM CA: callers must show a certificate it signed")
    p.add_argument("--send-tls-ca", metavar="FILE",
                   help="with --send-to: C-STORE over TLS, the destination's certificate signed by this PEM CA")
    p.add_argument("--send-tls-cert", metavar="FILE", help="with --send-tls-ca: this node's PEM certificate")
    p.add_argument("--send-tls-key", metavar="FILE", help="PEM private key of --send-tls-cert")
    p.add_argument("--retry-wait", type=float, default=1.0, metavar="S",
                   help="first wait before sending an SR again, doubled up to --max-wait (1)")
    p.add_argument("--max-wait", type=float, default=60.0, metavar="S", help="longest wait between tries (60)")
    cliargs.add_model_arguments(p)
    return p


def _sender(args: argparse.Namespace) -> Any:
    tls = client_tls(args.send_tls_ca, args.send_tls_cert, args.send_tls_key)
    if args.send_to:
        return DimseSender(args.ae_title, Peer.parse(args.send_to), tls=tls)
    if tls:
        raise NodeError("--send-tls-* is for --send-to; an https:// --send-to-dicomweb URL is TLS already")
    from urllib.parse import urlsplit

    from .pacs import PacsError, _credentials

    if urlsplit(args.send_to_dicomweb).scheme not in ("http", "https"):
        raise NodeError(f"--send-to-dicomweb {args.send_to_dicomweb!r} is not an http(s) URL")
    try:
        auth = _credentials(argparse.Namespace(url=args.send_to_dicomweb, username=args.username,
                                               password_file=args.password_file))
    except PacsError as exc:
        raise NodeError(str(exc)) from None
    return StowSender(args.send_to_dicomweb, auth)


def _check(args: argparse.Namespace) -> None:
    if not args.state:
        raise NodeError("--state DIR is needed: the folder that keeps received images until their SR is stored")
    if not args.send_to and not args.send_to_dicomweb:
        raise NodeError("say where the SRs go: --send-to AET@HOST:PORT or --send-to-dicomweb URL")
    if not args.ae_title.strip() or len(args.ae_title) > 16:
        raise NodeError(f"--ae-title {args.ae_title!r} must be 1 to 16 characters")
    parse_listen(args.listen)


def run(args: argparse.Namespace) -> int:
    """Start the worker and the Storage SCP; serve until SIGTERM or Ctrl-C; the exit status."""
    _check(args)
    allow = parse_allow(args.allow)
    tls = server_tls(args.tls_cert, args.tls_key, args.tls_ca)
    try:
        import pynetdicom  # noqa: F401
    except ImportError:
        raise NodeError("cxr-node needs pynetdicom: pip install 'cxr[node]'") from None
    from cxr_infer.classifier import Classifier

    from .sr import missing

    problem = missing()
    if problem:
        raise NodeError(problem.replace("cxr[dicom]", "cxr[node]"))
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # its errors become our one-line messages
    sender = _sender(args)
    try:
        queue = JobQueue(args.state)
    except (OSError, Exception) as exc:
        raise NodeError(f"cannot use the state folder {args.state} ({exc})") from None
    classifier = Classifier(args.model, device=args.device, threads=args.threads, threshold=args.threshold,
                            domain_threshold=args.domain_threshold, domain_flag_rate=args.domain_flag_rate)
    stop = threading.Event()
    worker = Worker(queue, classifier, sender, stop, max(0.01, args.retry_wait), max(0.01, args.max_wait))
    receiver = Receiver(queue, allow, worker.wake.set)
    server = start_server(args, receiver, tls)
    previous = {s: signal.signal(s, lambda signum, frame: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    worker.start()
    where = f"{args.send_to}{' over TLS' if args.send_tls_ca else ''}" if args.send_to else args.send_to_dicomweb
    _say(f"listening on {args.listen} as {args.ae_title} (TLS {'on' if tls else 'off'}); SRs to {where}; "
         f"model {worker.model.title} ({worker.model.name}); {queue.pending()} jobs pending")
    if not allow:
        _say("warning: no --allow given, so every calling AE title is accepted")
    try:
        while not stop.is_set():
            stop.wait(1.0)
    finally:
        server.shutdown()  # no new associations; the worker finishes its current job
        worker.join()
        for s, handler in previous.items():
            signal.signal(s, handler)
        counts = queue.counts()
        queue.close()
    _say("stopped; " + ", ".join(f"{n} {state}" for state, n in counts.items()))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``cxr-node``; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        if args.status:
            return status(args.status, args.json)
        return run(args)
    except NodeError as exc:
        _say(str(exc))
        return 2
    except Exception as exc:  # CXRError (model, device) and anything unforeseen: one line, no traceback
        from cxr_infer.errors import one_line

        _say(one_line(exc))
        return 2


if __name__ == "__main__":
    sys.exit(main())
