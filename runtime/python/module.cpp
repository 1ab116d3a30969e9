// Thin pybind11 front end over the fleet runtime core (the core has no Python in it).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>

#include "fleet_runtime/clock.hpp"
#include "fleet_runtime/probe.hpp"
#include "fleet_runtime/rss.hpp"

namespace py = pybind11;

PYBIND11_MODULE(_native, m) {
  m.doc() = "mnn-fleet native runtime core: capability probe, clock and memory readings";
  m.attr("PROBE_SCHEMA") = fleet::kProbeSchema;
  m.attr("RUNTIME_VERSION") = fleet::kRuntimeVersion;

  py::register_exception<fleet::ProbeError>(m, "ProbeError", PyExc_RuntimeError);

  m.def("monotonic_ns", &fleet::monotonic_ns, "Monotonic clock in nanoseconds.");
  m.def("peak_rss_bytes", &fleet::peak_rss_bytes,
        "Peak RSS of this process over its whole life, in bytes (getrusage).");
  m.def("current_rss_bytes", &fleet::current_rss_bytes, "Current RSS in bytes, -1 if unknown.");
  m.def("hwm_rss_bytes", &fleet::hwm_rss_bytes,
        "Resettable peak RSS (Linux VmHWM) in bytes, -1 if unknown.");
  m.def("reset_peak_rss", &fleet::reset_peak_rss,
        "Reset the kernel's peak-RSS mark; False where refused or unsupported.");

  m.def(
      "probe_json",
      [](bool isolate, int timeout_ms, int indent) {
        fleet::ProbeOptions options;
        options.isolate = isolate;
        options.timeout_ms = timeout_ms;
        std::string text;
        {
          // GPU drivers may take seconds; other Python threads keep running meanwhile.
          py::gil_scoped_release release;
          text = fleet::probe_json(options, indent);
        }
        return text;
      },
      py::arg("isolate") = true, py::arg("timeout_ms") = 10000, py::arg("indent") = 2,
      "The fleet.probe/1 document as JSON text: the same text fleet-probe prints.");
}
