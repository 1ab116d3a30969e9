// OpenCL by dlopen, with the few C entry points and constants declared here by hand
// (from the Khronos cl.h ABI), so no SDK is needed where the probe is built or run.
#include <cstdint>
#include <string>
#include <vector>

#include "fleet_runtime/probe.hpp"
#include "util.hpp"

namespace fleet {
namespace {

using cl_int = std::int32_t;
using cl_uint = std::uint32_t;
using cl_ulong = std::uint64_t;
using cl_bitfield = cl_ulong;
using cl_device_type = cl_bitfield;
using cl_platform_id = struct _cl_platform_id*;
using cl_device_id = struct _cl_device_id*;

constexpr cl_int CL_SUCCESS = 0;
constexpr cl_int CL_DEVICE_NOT_FOUND = -1;
constexpr cl_int CL_PLATFORM_NOT_FOUND_KHR = -1001;
constexpr cl_uint CL_PLATFORM_PROFILE = 0x0900;
constexpr cl_uint CL_PLATFORM_VERSION = 0x0901;
constexpr cl_uint CL_PLATFORM_NAME = 0x0902;
constexpr cl_uint CL_PLATFORM_VENDOR = 0x0903;
constexpr cl_device_type CL_DEVICE_TYPE_ALL = 0xFFFFFFFF;
constexpr cl_uint CL_DEVICE_TYPE_INFO = 0x1000;
constexpr cl_uint CL_DEVICE_MAX_COMPUTE_UNITS = 0x1002;
constexpr cl_uint CL_DEVICE_MAX_CLOCK_FREQUENCY = 0x100C;
constexpr cl_uint CL_DEVICE_GLOBAL_MEM_SIZE = 0x101F;
constexpr cl_uint CL_DEVICE_NAME = 0x102B;
constexpr cl_uint CL_DEVICE_VENDOR = 0x102C;
constexpr cl_uint CL_DRIVER_VERSION = 0x102D;
constexpr cl_uint CL_DEVICE_VERSION = 0x102F;
constexpr cl_uint CL_DEVICE_EXTENSIONS = 0x1030;
constexpr cl_uint CL_DEVICE_OPENCL_C_VERSION = 0x103D;

using GetPlatformIDs = cl_int (*)(cl_uint, cl_platform_id*, cl_uint*);
using GetPlatformInfo = cl_int (*)(cl_platform_id, cl_uint, std::size_t, void*, std::size_t*);
using GetDeviceIDs = cl_int (*)(cl_platform_id, cl_device_type, cl_uint, cl_device_id*, cl_uint*);
using GetDeviceInfo = cl_int (*)(cl_device_id, cl_uint, std::size_t, void*, std::size_t*);

std::vector<std::string> library_names() {
  std::string env = detail::getenv_str("FLEET_PROBE_OPENCL_LIBRARY");
  if (!env.empty()) return {env};
#if defined(__APPLE__)
  return {"/System/Library/Frameworks/OpenCL.framework/OpenCL"};
#else
  // The ICD loader first; then the places Android vendors put their driver (the same list
  // MNN's OpenCL backend tries).
  return {"libOpenCL.so.1",
          "libOpenCL.so",
          "/system/vendor/lib64/libOpenCL.so",
          "/vendor/lib64/libOpenCL.so",
          "/system/lib64/libOpenCL.so",
          "/system/vendor/lib64/egl/libGLES_mali.so",
          "/vendor/lib64/egl/libGLES_mali.so",
          "/system/lib64/egl/libGLES_mali.so",
          "/vendor/lib64/libPVROCL.so",
          "/system/vendor/lib/libOpenCL.so",
          "/vendor/lib/libOpenCL.so",
          "/system/lib/libOpenCL.so"};
#endif
}

template <typename Fn, typename H>
std::string info_string(Fn fn, H handle, cl_uint param) {
  std::size_t size = 0;
  if (fn(handle, param, 0, nullptr, &size) != CL_SUCCESS || size == 0 || size > (1 << 20)) {
    return "";
  }
  std::string out(size, '\0');
  if (fn(handle, param, size, &out[0], nullptr) != CL_SUCCESS) return "";
  while (!out.empty() && out.back() == '\0') out.pop_back();
  return detail::trim(out);
}

template <typename T>
Json info_number(GetDeviceInfo fn, cl_device_id dev, cl_uint param) {
  T value = 0;
  if (fn(dev, param, sizeof value, &value, nullptr) != CL_SUCCESS) return Json();
  return Json(static_cast<long long>(value));
}

const char* device_type_name(cl_device_type t) {
  if (t & 4) return "gpu";
  if (t & 8) return "accelerator";
  if (t & 2) return "cpu";
  if (t & 16) return "custom";
  return "default";
}

bool has_word(const std::string& list, const std::string& word) {
  for (const auto& w : detail::split(list, ' ')) {
    if (w == word) return true;
  }
  return false;
}

}  // namespace

Json probe_opencl() {
  detail::Library lib(library_names());
  if (!lib.loaded()) {
    Json r = api_status("not_found", "no OpenCL library: " + lib.error());
    r.set("library", Json());
    r.set("platforms", Json::array());
    return r;
  }
  auto get_platforms = lib.fn<GetPlatformIDs>("clGetPlatformIDs");
  auto platform_info = lib.fn<GetPlatformInfo>("clGetPlatformInfo");
  auto get_devices = lib.fn<GetDeviceIDs>("clGetDeviceIDs");
  auto device_info = lib.fn<GetDeviceInfo>("clGetDeviceInfo");
  auto fail = [&](const std::string& reason) {
    Json r = api_status("failed", reason);
    r.set("library", lib.path());
    r.set("platforms", Json::array());
    return r;
  };
  if (!get_platforms || !platform_info || !get_devices || !device_info) {
    return fail("library " + lib.path() + " lacks the OpenCL 1.0 entry points");
  }
  cl_uint count = 0;
  cl_int rc = get_platforms(0, nullptr, &count);
  if (rc == CL_PLATFORM_NOT_FOUND_KHR || (rc == CL_SUCCESS && count == 0)) {
    Json r = api_status("not_found", "the OpenCL loader found no platform (no ICD installed)");
    r.set("library", lib.path());
    r.set("platforms", Json::array());
    return r;
  }
  if (rc != CL_SUCCESS) return fail("clGetPlatformIDs returned " + std::to_string(rc));
  std::vector<cl_platform_id> ids(count);
  rc = get_platforms(count, ids.data(), nullptr);
  if (rc != CL_SUCCESS) return fail("clGetPlatformIDs returned " + std::to_string(rc));

  Json platforms = Json::array();
  int total_devices = 0;
  for (cl_platform_id pid : ids) {
    Json p = Json::object();
    p.set("name", info_string(platform_info, pid, CL_PLATFORM_NAME));
    p.set("vendor", info_string(platform_info, pid, CL_PLATFORM_VENDOR));
    p.set("version", info_string(platform_info, pid, CL_PLATFORM_VERSION));
    p.set("profile", info_string(platform_info, pid, CL_PLATFORM_PROFILE));
    Json devices = Json::array();
    cl_uint ndev = 0;
    cl_int drc = get_devices(pid, CL_DEVICE_TYPE_ALL, 0, nullptr, &ndev);
    if (drc == CL_SUCCESS && ndev > 0) {
      std::vector<cl_device_id> dids(ndev);
      drc = get_devices(pid, CL_DEVICE_TYPE_ALL, ndev, dids.data(), nullptr);
      for (cl_uint k = 0; drc == CL_SUCCESS && k < ndev; ++k) {
        cl_device_id d = dids[k];
        Json dev = Json::object();
        cl_device_type type = 0;
        device_info(d, CL_DEVICE_TYPE_INFO, sizeof type, &type, nullptr);
        std::string ext = info_string(device_info, d, CL_DEVICE_EXTENSIONS);
        dev.set("name", info_string(device_info, d, CL_DEVICE_NAME));
        dev.set("vendor", info_string(device_info, d, CL_DEVICE_VENDOR));
        dev.set("type", device_type_name(type));
        dev.set("version", info_string(device_info, d, CL_DEVICE_VERSION));
        dev.set("opencl_c_version", info_string(device_info, d, CL_DEVICE_OPENCL_C_VERSION));
        dev.set("driver_version", info_string(device_info, d, CL_DRIVER_VERSION));
        dev.set("compute_units", info_number<cl_uint>(device_info, d, CL_DEVICE_MAX_COMPUTE_UNITS));
        dev.set("max_clock_mhz", info_number<cl_uint>(device_info, d, CL_DEVICE_MAX_CLOCK_FREQUENCY));
        dev.set("global_mem_bytes", info_number<cl_ulong>(device_info, d, CL_DEVICE_GLOBAL_MEM_SIZE));
        dev.set("fp16", has_word(ext, "cl_khr_fp16"));
        dev.set("int8_dot", has_word(ext, "cl_khr_integer_dot_product") ||
                                has_word(ext, "cl_arm_integer_dot_product_int8"));
        devices.push(dev);
        ++total_devices;
      }
    }
    if (drc != CL_SUCCESS && drc != CL_DEVICE_NOT_FOUND) {
      p.set("error", "clGetDeviceIDs returned " + std::to_string(drc));
    }
    p.set("devices", devices);
    platforms.push(p);
  }
  Json r = total_devices > 0
               ? api_status("found", "")
               : api_status("not_found", "OpenCL platforms present but no device");
  r.set("library", lib.path());
  r.set("platforms", platforms);
  return r;
}

}  // namespace fleet
