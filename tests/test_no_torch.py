"""The runtime never imports torch (nor onnx): cxr-infer and the API work with both unimportable."""
from __future__ import annotations

import json

from conftest import run_cli

BLOCKER = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "onnx"):
            sys.stderr.write(f"IMPORT ATTEMPT {name}\\n")
            raise ImportError(f"{name} is blocked by test_no_torch")
        return None
sys.meta_path.insert(0, _Block())
for name in [m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "onnx")]:
    del sys.modules[name]
"""


def test_cli_runs_with_torch_unimportable(tiny_model, xrays224, tmp_path):
    r = run_cli("--model", str(tiny_model), "--format", "jsonl", str(xrays224[0]), str(tmp_path / "missing.png"),
                prelude=BLOCKER)
    err = r.stderr.decode()
    assert "IMPORT ATTEMPT" not in err, err
    assert r.returncode == 1  # one good input, one missing: both reported
    rows = [json.loads(line) for line in r.stdout.decode().splitlines()]
    assert "label" in rows[0] and rows[1]["error"] == "no such file"


def test_info_and_dicom_with_torch_unimportable(tiny_model, tmp_path, xrays224):
    import numpy as np
    from PIL import Image
    from test_dicom import make_dicom
    dcm = tmp_path / "x.dcm"
    dcm.write_bytes(make_dicom(np.asarray(Image.open(xrays224[0]).convert("L"))))
    r = run_cli("--model", str(tiny_model), str(dcm), prelude=BLOCKER)
    assert r.returncode == 0 and "IMPORT ATTEMPT" not in r.stderr.decode(), r.stderr
    r = run_cli("--model", str(tiny_model), "--info", prelude=BLOCKER)
    assert r.returncode == 0 and "IMPORT ATTEMPT" not in r.stderr.decode()


def test_api_leaves_no_torch_in_sys_modules(tiny_model, xrays224):
    code = (f"import sys\nfrom cxr_infer import Classifier, load_image, ModelSpec\n"
            f"import cxr_infer.cli, cxr_infer.dicom, cxr_infer.metrics\n"
            f"p = Classifier({str(tiny_model)!r}).predict([{str(xrays224[0])!r}])\n"
            f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'onnx'))\n"
            f"assert not heavy, heavy\n"
            f"print(p[0].label)\n")
    r = run_cli(prelude=code + "sys.exit(0)\n", timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().strip() in ("NORMAL", "PNEUMONIA")
