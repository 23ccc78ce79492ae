"""What this machine can run models on, for `specli devices`.

Two runtimes, asked separately: llama.cpp (GGUF) offloads to a GPU only when the
installed llama-cpp-python was built with a GPU backend; onnxruntime (ONNX) runs on
whatever execution providers its wheel carries (CPU always; CUDA, DirectML or
OpenVINO's CPU/GPU/NPU plugins when installed).  OpenVINO's own runtime (the `openvino`
package) runs static-shape exports: `--device npu`, and `specli export --static` graphs
on its CPU plugin (backends/openvino_static.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .backends.base import DEVICES
from .backends.onnx import choose_providers, openvino_devices
from .cpu_load import census
from .errors import SpecliError
from .threads import available_cores, cpu_quota, default_cores


@dataclass
class DeviceReport:
    cpu_cores: int  # those specli may use: its CPU affinity, within a cgroup's limit
    cpu_quota: int | None  # a cgroup's CPU limit in cores (a container's --cpus); None: none
    cpu_busy_elsewhere: float | None  # cores' worth other processes used as specli started
    default_threads: int  # what a model on the CPU gets without --threads
    llama_version: str
    llama_gpu_offload: bool
    llama_system: str  # llama.cpp's own system-info line (backends, CPU features)
    onnxruntime_version: str | None = None  # None: not installed
    onnx_providers: list[str] = field(default_factory=list)
    openvino_devices: list[str] = field(default_factory=list)
    device_map: dict[str, str] = field(default_factory=dict)  # --device value -> provider
    openvino_version: str | None = None  # the openvino runtime (static shapes); None: absent
    openvino_runtime_devices: list[str] = field(default_factory=list)
    static: dict[str, str] = field(default_factory=dict)  # --device value -> static path

    @property
    def npu(self) -> bool:
        """Whether OpenVINO's runtime sees an Intel NPU."""
        return "NPU" in {d.split(".")[0] for d in self.openvino_runtime_devices}

    def as_dict(self) -> dict[str, Any]:
        return {
            "cpu_cores": self.cpu_cores,
            "cpu_quota": self.cpu_quota,
            "cpu_busy_elsewhere": (None if self.cpu_busy_elsewhere is None
                                   else round(self.cpu_busy_elsewhere, 2)),
            "default_threads": self.default_threads,
            "llama.cpp": {"llama_cpp_python": self.llama_version,
                          "gpu_offload": self.llama_gpu_offload,
                          "system_info": self.llama_system},
            "onnxruntime": None if self.onnxruntime_version is None else {
                "version": self.onnxruntime_version,
                "providers": self.onnx_providers,
                "openvino_devices": self.openvino_devices,
                "device": self.device_map,
            },
            "openvino": None if self.openvino_version is None else {
                "version": self.openvino_version,
                "devices": self.openvino_runtime_devices,
                "npu": self.npu,
                "static": self.static,
            },
        }


def probe() -> DeviceReport:
    import llama_cpp

    info = llama_cpp.llama_print_system_info()
    report = DeviceReport(
        cpu_cores=available_cores(),
        cpu_quota=cpu_quota(),
        cpu_busy_elsewhere=census.read(),
        default_threads=default_cores(),
        llama_version=llama_cpp.__version__,
        llama_gpu_offload=bool(llama_cpp.llama_supports_gpu_offload()),
        llama_system=(info.decode() if isinstance(info, bytes) else str(info)).strip(),
    )
    _probe_openvino(report)
    try:
        import onnxruntime as ort
    except ImportError:
        return report
    report.onnxruntime_version = ort.__version__
    report.onnx_providers = list(ort.get_available_providers())
    report.openvino_devices = openvino_devices(ort)
    for device in DEVICES:
        try:
            choice = choose_providers(device, report.onnx_providers, report.openvino_devices)
            name, opts = choice.providers[0]
            report.device_map[device] = name + (f" ({opts['device_type']})" if opts else "")
        except SpecliError as e:
            report.device_map[device] = f"unavailable: {e}"
    return report


def _probe_openvino(report: DeviceReport) -> None:
    """Whether OpenVINO's runtime is there, which devices it sees (an NPU?), and what
    static-shape decoding would run on for each --device."""
    try:
        import openvino
    except ImportError:
        return
    from .backends.openvino_static import openvino_devices, pick_device

    report.openvino_version = openvino.__version__.split("-")[0]
    report.openvino_runtime_devices = openvino_devices()
    for device in ("npu", "cpu", "gpu"):
        try:
            where = pick_device(device, report.openvino_runtime_devices)
            report.static[device] = f"OpenVINO {where} plugin, static shapes"
        except SpecliError as e:
            report.static[device] = f"unavailable: {e}"
