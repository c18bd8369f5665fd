"""Energy measurement: meters (NVML, RAPL, estimate) and the GO-1 workload.

    >>> from greenopt.measure import select_meter, measure          # doctest: +SKIP
    >>> m = measure(model, tokenizer, protocol_preset("cpu"), select_meter())  # doctest: +SKIP
    >>> m.joules_per_token, m.tier                                   # doctest: +SKIP
"""

from greenopt.measure.base import Meter, Window
from greenopt.measure.estimate import DEFAULT_CPU_WATTS_PER_CORE, EstimateMeter
from greenopt.measure.hwmon import HwmonMeter
from greenopt.measure.nvml import NvmlMeter, foreign_gpu_processes, model_cuda_device
from greenopt.measure.rapl import RaplMeter, ZeusdRaplMeter
from greenopt.measure.select import METER_NAMES, MeterStatus, meter_report, select_meter
from greenopt.measure.workload import compare, compare_repeated, load_prompts, measure

__all__ = [
    "DEFAULT_CPU_WATTS_PER_CORE", "METER_NAMES", "EstimateMeter", "HwmonMeter", "Meter", "MeterStatus", "NvmlMeter",
    "RaplMeter", "Window", "ZeusdRaplMeter", "compare", "compare_repeated", "foreign_gpu_processes", "load_prompts",
    "measure", "meter_report", "model_cuda_device", "select_meter",
]
