"""Energy measurement: meters (NVML, RAPL, estimate) and the GO-1 workload."""
