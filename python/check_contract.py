"""Checks python/tis_reference.py against the contract's independent head fixture.

Usage: python python/check_contract.py [path/to/tis-head-contract-v1.safetensors]

The fixture (shared/fixtures/tis-head-contract-v1.safetensors, written by a second, independent
implementation of shared/design/tis-model.md) holds a head's weights under `tis.` names, its
tis_config in the metadata and cases case{i}.{features,probs,clicks,roi,clicks_used,logits}.
Every case must give the same ROI and clicks_used, and logits within relative L2 error 1e-5.
"""

import json
import re
import sys
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tis_reference import HEAD_PREFIX, TisHead, refine, relative_l2_error  # noqa: E402

DEFAULT_FIXTURE = Path(__file__).resolve().parent.parent / "tests/fixtures/contract/tis-head-contract-v1.safetensors"
MAX_RELATIVE_L2 = 1e-5


def main():
    torch.set_num_threads(2)
    fixture = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_FIXTURE
    with safe_open(fixture, framework="pt") as f:
        cfg = json.loads(f.metadata()["tis_config"])
        tensors = {key: f.get_tensor(key) for key in f.keys()}

    head_state = {k[len(HEAD_PREFIX):]: v for k, v in tensors.items() if k.startswith(HEAD_PREFIX)}
    head = TisHead.from_config(
        cfg,
        feature_channels=head_state["input_proj.weight"].shape[1],
        num_classes=head_state["out_proj.weight"].shape[0],
    )
    head.load_state_dict(head_state, strict=True)
    head.eval()

    case_ids = sorted({int(m.group(1)) for k in tensors if (m := re.match(r"case(\d+)\.", k))})
    if not case_ids:
        raise SystemExit(f"{fixture}: no cases")
    failures = []
    for i in case_ids:
        case = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"case{i}.")}
        roi, clicks_used, logits = refine(
            head, case["features"], case["probs"], case["clicks"], cfg
        )
        error = relative_l2_error(logits, case["logits"]) if logits.shape == case["logits"].shape else None
        print(
            f"case{i}: roi {roi} (expected {case['roi'].tolist()}), clicks_used {clicks_used} "
            f"(expected {int(case['clicks_used'])}), relative L2 error {error}"
        )
        if roi != case["roi"].tolist():
            failures.append(f"case{i}: roi")
        if clicks_used != int(case["clicks_used"]):
            failures.append(f"case{i}: clicks_used")
        if error is None or not error <= MAX_RELATIVE_L2:
            failures.append(f"case{i}: logits")
    if failures:
        raise SystemExit("FAILED: " + ", ".join(failures))
    print(f"all {len(case_ids)} cases pass (relative L2 error <= {MAX_RELATIVE_L2})")


if __name__ == "__main__":
    main()
