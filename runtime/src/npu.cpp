// NPU and vendor AI runtimes, reported as hints from the presence of their libraries.
// Presence only: loading a vendor library runs its constructors (some open DSP channels),
// which a probe has no business doing. MNN backends for these (NNAPI, QNN, HiAI) need the
// runtime *and* a matching MNN build; the agent checks the latter.
#include <string>
#include <vector>

#include "fleet_runtime/probe.hpp"
#include "util.hpp"

namespace fleet {
namespace {

struct Hint {
  const char* name;
  const char* vendor;
  const char* library;
  const char* mnn_backend;  // MNN forward type that can use it, or nullptr
};

const Hint kHints[] = {
    {"nnapi", "Android", "libneuralnetworks.so", "NN"},
    {"qnn_htp", "Qualcomm", "libQnnHtp.so", "QNN"},
    {"qnn_cpu", "Qualcomm", "libQnnCpu.so", "QNN"},
    {"hexagon_nn", "Qualcomm", "libhexagon_nn_skel.so", "HEXAGON"},
    {"cdsp_rpc", "Qualcomm", "libcdsprpc.so", nullptr},
    {"hiai", "Huawei", "libhiai.so", "HIAI"},
    {"hiai_ir", "Huawei", "libhiai_ir.so", "HIAI"},
    {"neuron", "MediaTek", "libneuron_adapter.so", nullptr},
    {"rknn", "Rockchip", "librknnrt.so", nullptr},
};

std::vector<std::string> search_dirs() {
  std::vector<std::string> dirs;
  std::string extra = detail::getenv_str("FLEET_PROBE_LIBRARY_DIRS");
  for (const auto& d : detail::split(extra, ':')) {
    if (!d.empty()) dirs.push_back(d);
  }
  for (const auto& d : detail::split(detail::getenv_str("LD_LIBRARY_PATH"), ':')) {
    if (!d.empty()) dirs.push_back(d);
  }
  const char* fixed[] = {
      // Android: system, vendor and ODM partitions, 64-bit then 32-bit.
      "/vendor/lib64", "/system/vendor/lib64", "/odm/lib64", "/system/lib64",
      "/vendor/lib64/egl", "/vendor/dsp/cdsp", "/vendor/lib/rfsa/adsp", "/apex/com.android.neuralnetworks/lib64",
      "/vendor/lib", "/system/vendor/lib", "/system/lib",
      // Linux boards.
      "/usr/lib", "/usr/local/lib", "/usr/lib/aarch64-linux-gnu", "/usr/lib/x86_64-linux-gnu",
      "/lib", "/lib64", "/usr/lib64",
  };
  for (const char* d : fixed) dirs.push_back(d);
  return dirs;
}

}  // namespace

Json probe_npu_hints() {
  Json out = Json::array();
  auto dirs = search_dirs();
  for (const auto& h : kHints) {
    for (const auto& dir : dirs) {
      std::string path = dir + "/" + h.library;
      if (!detail::file_exists(path)) continue;
      Json j = Json::object();
      j.set("name", h.name);
      j.set("vendor", h.vendor);
      j.set("library", h.library);
      j.set("path", path);
      j.set("mnn_backend", h.mnn_backend ? Json(h.mnn_backend) : Json());
      out.push(j);
      break;
    }
  }
  return out;
}

}  // namespace fleet
