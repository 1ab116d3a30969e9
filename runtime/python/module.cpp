// Thin pybind11 front end over the fleet runtime core (the core has no Python in it).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>

#include "fleet_runtime/clock.hpp"
#include "fleet_runtime/probe.hpp"
#include "fleet_runtime/rss.hpp"

namespace py = pybind11;

namespace {

py::dict report_dict(const fleet::RssReport& r) {
  py::dict d;
  d["baseline_bytes"] = r.baseline_bytes;
  d["peak_bytes"] = r.peak_bytes;
  d["samples"] = r.samples;
  d["elapsed_ns"] = r.elapsed_ns;
  d["exact"] = r.exact;
  return d;
}

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "mnn-fleet native runtime core: capability probe, clock and memory sampling";
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

  py::class_<fleet::RssSampler>(m, "RssSampler",
                                "Peak RSS between start() and stop(), sampled in a thread.")
      .def(py::init<int>(), py::arg("interval_us") = 1000)
      .def("start", &fleet::RssSampler::start)
      .def(
          "stop",
          [](fleet::RssSampler& s) {
            fleet::RssReport r;
            {
              py::gil_scoped_release release;
              r = s.stop();
            }
            return report_dict(r);
          },
          "Stop sampling; returns baseline_bytes, peak_bytes, samples, elapsed_ns, exact.")
      .def_property_readonly("running", &fleet::RssSampler::running)
      .def_property_readonly("peak_so_far", &fleet::RssSampler::peak_so_far)
      .def_property_readonly("interval_us", &fleet::RssSampler::interval_us)
      .def_property_readonly(
          "report",
          [](const fleet::RssSampler& s) -> py::object {
            if (!s.has_report()) return py::none();
            return report_dict(s.last_report());
          },
          "The last stop()'s report (also after a with-block), or None.")
      .def("__enter__",
           [](fleet::RssSampler& s) -> fleet::RssSampler& {
             s.start();
             return s;
           },
           py::return_value_policy::reference)
      .def("__exit__", [](fleet::RssSampler& s, py::object, py::object, py::object) {
        if (s.running()) {
          py::gil_scoped_release release;
          s.stop();
        }
      });
}
