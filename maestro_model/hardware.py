"""Peak dense bf16 tensor-core FLOP/s of common GPUs, by the name ``torch.cuda.get_device_name()`` reports, for MFU.

Vendor datasheet figures without structured sparsity (NVIDIA quotes sparse numbers twice as high). Rules are tried
in order, so a more specific name (H100 PCIe, H200 NVL, L40S) wins over a family (H100, H200, L40).
"""

from __future__ import annotations

import re

PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    (r"GH200", 989e12),
    (r"H200 NVL", 835e12),
    (r"H200", 989e12),                 # SXM
    (r"H100 NVL", 835e12),
    (r"H100.*PCIe", 756e12),
    (r"H100", 989e12),                 # SXM5 ("NVIDIA H100 80GB HBM3")
    (r"B200", 2250e12),
    (r"A100", 312e12),                 # SXM4 and PCIe alike
    (r"L40S", 362e12),
    (r"L40\b", 181e12),
    (r"\bL4\b", 121e12),
    (r"\bA10\b", 125e12),
)


def peak_bf16_flops(device_name: str) -> float | None:
    """Dense bf16 peak of ``device_name`` (e.g. ``"NVIDIA H100 PCIe"``), None for a GPU not in the table."""
    for pattern, peak in PEAK_BF16_FLOPS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return peak
    return None
