// The capability probe: one JSON document ("schema": "fleet.probe/1", docs/probe.md)
// describing what this device can run MNN on. Both front ends (the pybind11 module and
// the fleet-probe executable) print probe_json(), so they cannot disagree.
#pragma once

#include <stdexcept>
#include <string>

#include "fleet_runtime/json.hpp"

namespace fleet {

constexpr const char* kProbeSchema = "fleet.probe/1";
constexpr const char* kRuntimeVersion = "0.1.0";

// Raised for a probe that cannot produce a document at all (never for a missing or
// broken GPU driver: those are data in the document).
class ProbeError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct ProbeOptions {
  // Probe each GPU API in a forked child with a deadline, so a driver that crashes or
  // hangs becomes {"status": "failed"} instead of taking the caller down. Ignored where
  // fork() is unsafe (Apple: Metal and CoreFoundation refuse to run in a forked child).
  bool isolate = true;
  int timeout_ms = 10000;
};

// Sections, each a JSON object; usable alone (the agent may want only the CPU part).
Json probe_cpu();
Json probe_memory();
Json probe_os();
Json probe_opencl();
Json probe_vulkan();
Json probe_cuda();
Json probe_metal();
Json probe_npu_hints();

// The whole document.
Json probe(const ProbeOptions& options = ProbeOptions());
// indent < 0: one line.
std::string probe_json(const ProbeOptions& options = ProbeOptions(), int indent = 2);

// Helpers used by the API sections to build a status record.
Json api_status(const char* status, const std::string& reason);

}  // namespace fleet
