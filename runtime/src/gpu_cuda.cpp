// CUDA through the driver API (libcuda, shipped with the NVIDIA driver), by dlopen with
// the entry points declared by hand: no toolkit is needed to build or run the probe.
#include <string>
#include <vector>

#include "fleet_runtime/probe.hpp"
#include "util.hpp"

namespace fleet {
namespace {

using CUresult = int;
using CUdevice = int;

constexpr CUresult CUDA_SUCCESS = 0;
constexpr CUresult CUDA_ERROR_NO_DEVICE = 100;
constexpr CUresult CUDA_ERROR_INSUFFICIENT_DRIVER = 35;
constexpr CUresult CUDA_ERROR_NOT_INITIALIZED = 3;
constexpr int kAttrMultiprocessorCount = 16;
constexpr int kAttrClockRateKhz = 13;
constexpr int kAttrComputeCapabilityMajor = 75;
constexpr int kAttrComputeCapabilityMinor = 76;
constexpr int kAttrPciBusId = 33;

using Init = CUresult (*)(unsigned int);
using DriverGetVersion = CUresult (*)(int*);
using DeviceGetCount = CUresult (*)(int*);
using DeviceGet = CUresult (*)(CUdevice*, int);
using DeviceGetName = CUresult (*)(char*, int, CUdevice);
using DeviceTotalMem = CUresult (*)(std::size_t*, CUdevice);
using DeviceGetAttribute = CUresult (*)(int*, int, CUdevice);
using GetErrorName = CUresult (*)(CUresult, const char**);

std::vector<std::string> library_names() {
  std::string env = detail::getenv_str("FLEET_PROBE_CUDA_LIBRARY");
  if (!env.empty()) return {env};
  return {"libcuda.so.1", "libcuda.so"};
}

}  // namespace

Json probe_cuda() {
  auto base = [](const char* status, const std::string& reason, const detail::Library& lib) {
    Json r = api_status(status, reason);
    r.set("library", lib.loaded() ? Json(lib.path()) : Json());
    r.set("driver_version", Json());
    r.set("driver_version_string", Json());
    r.set("devices", Json::array());
    return r;
  };
#if defined(__APPLE__)
  detail::Library none(std::vector<std::string>{});
  return base("not_found", "CUDA is not available on Apple platforms", none);
#else
  detail::Library lib(library_names());
  if (!lib.loaded()) return base("not_found", "no CUDA driver library: " + lib.error(), lib);
  auto init = lib.fn<Init>("cuInit");
  auto driver_version = lib.fn<DriverGetVersion>("cuDriverGetVersion");
  auto get_count = lib.fn<DeviceGetCount>("cuDeviceGetCount");
  auto get_device = lib.fn<DeviceGet>("cuDeviceGet");
  auto get_name = lib.fn<DeviceGetName>("cuDeviceGetName");
  auto total_mem = lib.fn<DeviceTotalMem>("cuDeviceTotalMem_v2");
  if (!total_mem) total_mem = lib.fn<DeviceTotalMem>("cuDeviceTotalMem");
  auto attr = lib.fn<DeviceGetAttribute>("cuDeviceGetAttribute");
  auto error_name = lib.fn<GetErrorName>("cuGetErrorName");
  if (!init || !driver_version || !get_count || !get_device || !get_name || !attr) {
    return base("failed", "library " + lib.path() + " lacks the CUDA driver entry points", lib);
  }
  auto describe = [&](const char* call, CUresult rc) {
    const char* name = nullptr;
    if (error_name) error_name(rc, &name);
    return std::string(call) + " returned " + std::to_string(rc) +
           (name ? std::string(" (") + name + ")" : std::string());
  };

  int version = 0;
  CUresult vrc = driver_version(&version);
  CUresult rc = init(0);
  if (rc != CUDA_SUCCESS) {
    bool absent = rc == CUDA_ERROR_NO_DEVICE || rc == CUDA_ERROR_INSUFFICIENT_DRIVER ||
                  rc == CUDA_ERROR_NOT_INITIALIZED;
    Json r = base(absent ? "not_found" : "failed", describe("cuInit", rc), lib);
    if (vrc == CUDA_SUCCESS && version > 0) {
      r.set("driver_version", version);
      r.set("driver_version_string",
            std::to_string(version / 1000) + "." + std::to_string((version % 1000) / 10));
    }
    return r;
  }
  int count = 0;
  rc = get_count(&count);
  if (rc != CUDA_SUCCESS) return base("failed", describe("cuDeviceGetCount", rc), lib);

  Json devices = Json::array();
  for (int k = 0; k < count; ++k) {
    CUdevice dev = 0;
    if (get_device(&dev, k) != CUDA_SUCCESS) continue;
    char name[256] = {0};
    get_name(name, sizeof name - 1, dev);
    int major = 0, minor = 0, sms = 0, clock = 0, bus = -1;
    attr(&major, kAttrComputeCapabilityMajor, dev);
    attr(&minor, kAttrComputeCapabilityMinor, dev);
    attr(&sms, kAttrMultiprocessorCount, dev);
    attr(&clock, kAttrClockRateKhz, dev);
    attr(&bus, kAttrPciBusId, dev);
    std::size_t bytes = 0;
    bool have_mem = total_mem && total_mem(&bytes, dev) == CUDA_SUCCESS;
    Json d = Json::object();
    d.set("index", k);
    d.set("name", std::string(name));
    d.set("compute_capability", std::to_string(major) + "." + std::to_string(minor));
    d.set("multiprocessors", sms);
    d.set("clock_khz", clock);
    d.set("total_mem_bytes", have_mem ? Json(static_cast<long long>(bytes)) : Json());
    d.set("pci_bus_id", bus);
    devices.push(d);
  }
  Json r = devices.size() ? api_status("found", "")
                          : api_status("not_found", "CUDA driver present but no device");
  r.set("library", lib.path());
  r.set("driver_version", vrc == CUDA_SUCCESS ? Json(version) : Json());
  r.set("driver_version_string", vrc == CUDA_SUCCESS
                                     ? Json(std::to_string(version / 1000) + "." +
                                            std::to_string((version % 1000) / 10))
                                     : Json());
  r.set("devices", devices);
  return r;
#endif
}

}  // namespace fleet
