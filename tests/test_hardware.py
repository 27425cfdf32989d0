"""The bf16 peak table behind MFU (training metrics and benchmarks): torchtitan's numbers by GPU name."""
import pytest

from celldino import hardware


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                        ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0),
                                        ("NVIDIA B200", 2250.0), ("NVIDIA L4", None),
                                        ("cpu (x86_64, 2 cores, 2 threads)", None)])
def test_peak_tflops_by_device_name(monkeypatch, name, peak):
    monkeypatch.setattr(hardware, "device_name", lambda device=None: name)
    assert hardware.peak_tflops("cuda") == peak


def test_this_cpu_has_no_peak():
    assert hardware.device_name("cpu").startswith("cpu (") and hardware.peak_tflops("cpu") is None
