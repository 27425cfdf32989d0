"""What this process runs on: the device's name and its bf16 peak for MFU (the trainer's metrics and every
benchmark use the same table)."""
import os
import platform

import torch

# bf16 dense peak TFLOP/s, torchtitan's table (tools/utils.py get_peak_flops)
PEAK_BF16_TFLOPS = {"A100": 312.0, "H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "B200": 2250.0}


def device_name(device=None):
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def peak_tflops(device=None):
    """bf16 dense peak of this GPU per the torchtitan table; None on CPU or an unknown GPU."""
    name = device_name(device)
    if name.startswith("cpu"):
        return None
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key in name and (key != "H100" or "PCIe" not in name):
            return PEAK_BF16_TFLOPS[key]
    return None
