"""--device to onnxruntime execution providers: the mapping and its fallbacks (no model)."""

from __future__ import annotations

import pytest

from specli.backends.onnx import CPU, OPENVINO, choose_providers
from specli.errors import SpecliError

CUDA = "CUDAExecutionProvider"
DML = "DmlExecutionProvider"


def names(choice):
    return [(p, o.get("device_type")) for p, o in choice.providers]


def test_plain_wheel_runs_everything_on_the_cpu_provider():
    for device in ("auto", "cpu"):
        assert names(choose_providers(device, [CPU])) == [(CPU, None)]
    with pytest.raises(SpecliError, match="no GPU execution provider"):
        choose_providers("gpu", [CPU])
    with pytest.raises(SpecliError, match="onnxruntime-openvino"):
        choose_providers("npu", [CPU])


def test_auto_prefers_a_gpu_and_may_fall_back_to_the_cpu():
    c = choose_providers("auto", [CUDA, CPU])
    assert names(c) == [(CUDA, None), (CPU, None)] and c.fallback
    assert names(choose_providers("auto", [DML, CPU]))[0] == (DML, None)
    # an explicit device never falls back silently
    assert not choose_providers("gpu", [CUDA, CPU]).fallback


def test_openvino_maps_devices_to_its_plugins():
    ov = [OPENVINO, CPU]
    assert names(choose_providers("cpu", ov))[0] == (OPENVINO, "CPU")
    assert names(choose_providers("gpu", ov, ["CPU", "GPU.0"]))[0] == (OPENVINO, "GPU")
    assert names(choose_providers("npu", ov, ["CPU", "NPU"]))[0] == (OPENVINO, "NPU")
    # auto never picks the NPU (static shapes) and takes OpenVINO's GPU only if it has one
    assert names(choose_providers("auto", ov, ["CPU", "NPU"]))[0] == (CPU, None)
    assert names(choose_providers("auto", ov, ["CPU", "GPU"]))[0] == (OPENVINO, "GPU")
    with pytest.raises(SpecliError, match="no NPU"):
        choose_providers("npu", ov, ["CPU", "GPU"])


def test_unknown_device_is_one_clear_error():
    with pytest.raises(SpecliError, match="unknown --device 'tpu'"):
        choose_providers("tpu", [CPU])
