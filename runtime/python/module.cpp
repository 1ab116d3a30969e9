// Thin pybind11 front end over the fleet runtime core.
#include <pybind11/pybind11.h>

#include "fleet_runtime/clock.hpp"

namespace py = pybind11;

PYBIND11_MODULE(_native, m) {
  m.doc() = "mnn-fleet native runtime core";
  m.def("monotonic_ns", &fleet::monotonic_ns, "Monotonic clock in nanoseconds.");
  m.def("peak_rss_bytes", &fleet::peak_rss_bytes, "Peak RSS of this process in bytes.");
  m.def("current_rss_bytes", &fleet::current_rss_bytes, "Current RSS in bytes, -1 if unknown.");
}
