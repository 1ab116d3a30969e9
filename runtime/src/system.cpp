// The "memory" and "os" sections: /proc/meminfo and cgroup limits, uname, the distribution,
// and Android system properties (read natively: the agent may run without Python).
#include <sys/utsname.h>
#include <unistd.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "fleet_runtime/probe.hpp"
#include "util.hpp"

#if defined(__ANDROID__)
#include <sys/system_properties.h>
#endif

#if defined(__APPLE__)
#include <TargetConditionals.h>
#include <mach/mach.h>
#include <sys/sysctl.h>
#include <sys/types.h>
#endif

namespace fleet {
namespace {

using detail::kv_lookup;
using detail::read_text;
using detail::trim;

// "12345 kB" -> bytes, -1 if absent.
long long meminfo_bytes(const std::string& text, const char* key) {
  std::string v = kv_lookup(text, key, ':');
  if (v.empty()) return -1;
  return std::atoll(v.c_str()) * 1024LL;
}

Json cgroup_limit() {
  std::string text;
  // cgroup v2, then v1. "max" or a huge v1 sentinel means unlimited.
  if (read_text("/sys/fs/cgroup/memory.max", text) ||
      read_text("/sys/fs/cgroup/memory/memory.limit_in_bytes", text)) {
    text = trim(text);
    if (text.empty() || text == "max") return Json();
    long long v = std::atoll(text.c_str());
    if (v <= 0 || v >= (1LL << 60)) return Json();
    return Json(v);
  }
  return Json();
}

#if defined(__APPLE__)
std::string sysctl_str(const char* name) {
  char buf[256] = {0};
  size_t size = sizeof buf - 1;
  if (sysctlbyname(name, buf, &size, nullptr, 0) != 0) return "";
  return trim(buf);
}
#endif

// Android properties: the real API when built with the NDK; otherwise (or when it yields
// nothing) the build.prop files, which glibc builds running in a chroot on Android and the
// tests (FLEET_PROBE_PROP_FILES, colon separated) use.
const char* const kAndroidProps[] = {
    "ro.product.model",        "ro.product.manufacturer", "ro.product.brand",
    "ro.board.platform",       "ro.hardware",             "ro.soc.manufacturer",
    "ro.soc.model",            "ro.build.version.sdk",    "ro.build.version.release",
    "ro.product.cpu.abi",      "ro.build.fingerprint",
};

Json android_props() {
  Json props = Json::object();
  std::string source;
#if defined(__ANDROID__)
  for (const char* name : kAndroidProps) {
    char value[PROP_VALUE_MAX] = {0};
    if (__system_property_get(name, value) > 0) props.set(name, std::string(value));
  }
  if (props.size()) source = "system_property_get";
#endif
  if (!props.size()) {
    std::string files = detail::getenv_str("FLEET_PROBE_PROP_FILES");
    if (files.empty()) {
      files = "/system/build.prop:/vendor/build.prop:/product/build.prop:"
              "/odm/etc/build.prop:/vendor/odm/etc/build.prop";
    }
    std::vector<std::string> used;
    for (const auto& path : detail::split(files, ':')) {
      std::string text;
      if (path.empty() || !read_text(path, text)) continue;
      bool any = false;
      for (const char* name : kAndroidProps) {
        if (props.find(name)) continue;
        std::string v = kv_lookup(text, name, '=');
        if (!v.empty()) {
          props.set(name, v);
          any = true;
        }
      }
      if (any) used.push_back(path);
    }
    if (props.size()) {
      source = "build_prop:";
      for (std::size_t k = 0; k < used.size(); ++k) source += (k ? "," : "") + used[k];
    }
  }
  if (!props.size()) return Json();
  Json out = Json::object();
  auto get = [&](const char* k) -> Json {
    const Json* v = props.find(k);
    return v ? *v : Json();
  };
  out.set("model", get("ro.product.model"));
  out.set("manufacturer", get("ro.product.manufacturer"));
  out.set("board_platform", get("ro.board.platform"));
  out.set("soc_model", get("ro.soc.model"));
  const Json* sdk = props.find("ro.build.version.sdk");
  out.set("sdk", sdk ? Json(std::atoi(sdk->as_string().c_str())) : Json());
  out.set("release", get("ro.build.version.release"));
  out.set("abi", get("ro.product.cpu.abi"));
  out.set("source", source);
  out.set("properties", props);
  return out;
}

}  // namespace

Json probe_memory() {
  Json mem = Json::object();
#if defined(__APPLE__)
  long long total = 0;
  size_t size = sizeof total;
  sysctlbyname("hw.memsize", &total, &size, nullptr, 0);
  mem.set("total_bytes", total > 0 ? Json(total) : Json());
  vm_statistics64_data_t vm;
  mach_msg_type_number_t count = HOST_VM_INFO64_COUNT;
  long long avail = -1;
  if (host_statistics64(mach_host_self(), HOST_VM_INFO64, reinterpret_cast<host_info64_t>(&vm),
                        &count) == KERN_SUCCESS) {
    avail = (static_cast<long long>(vm.free_count) + vm.inactive_count + vm.purgeable_count) *
            static_cast<long long>(vm_page_size);
  }
  mem.set("available_bytes", avail >= 0 ? Json(avail) : Json());
  mem.set("swap_total_bytes", Json());
  mem.set("cgroup_limit_bytes", Json());
  mem.set("source", "sysctl");
#else
  std::string text;
  if (!read_text("/proc/meminfo", text)) {
    mem.set("total_bytes", Json());
    mem.set("available_bytes", Json());
    mem.set("swap_total_bytes", Json());
    mem.set("cgroup_limit_bytes", cgroup_limit());
    mem.set("source", "none");
    return mem;
  }
  long long total = meminfo_bytes(text, "MemTotal");
  long long avail = meminfo_bytes(text, "MemAvailable");
  if (avail < 0) {  // kernels before 3.14
    long long free_b = meminfo_bytes(text, "MemFree");
    long long cached = meminfo_bytes(text, "Cached");
    long long buffers = meminfo_bytes(text, "Buffers");
    if (free_b >= 0) avail = free_b + (cached > 0 ? cached : 0) + (buffers > 0 ? buffers : 0);
  }
  long long swap = meminfo_bytes(text, "SwapTotal");
  mem.set("total_bytes", total >= 0 ? Json(total) : Json());
  mem.set("available_bytes", avail >= 0 ? Json(avail) : Json());
  mem.set("swap_total_bytes", swap >= 0 ? Json(swap) : Json());
  mem.set("cgroup_limit_bytes", cgroup_limit());
  mem.set("source", "proc_meminfo");
#endif
  return mem;
}

Json probe_os() {
  Json os = Json::object();
  struct utsname u;
  bool have_uname = uname(&u) == 0;
  std::string name = "unknown";
#if defined(__APPLE__)
#if TARGET_OS_IPHONE
  name = "ios";
#else
  name = "macos";
#endif
#elif defined(__ANDROID__)
  name = "android";
#elif defined(__linux__)
  name = "linux";
#endif
  Json android = android_props();
  if (!android.is_null() && name == "linux") name = "android";  // glibc build on Android
  os.set("name", name);
  os.set("kernel", have_uname ? Json(std::string(u.sysname)) : Json());
  os.set("kernel_release", have_uname ? Json(std::string(u.release)) : Json());
  os.set("kernel_version", have_uname ? Json(std::string(u.version)) : Json());
  os.set("machine", have_uname ? Json(std::string(u.machine)) : Json());
  std::string distro;
#if defined(__APPLE__)
  distro = sysctl_str("kern.osproductversion");
  if (!distro.empty()) distro = (name == "ios" ? "iOS " : "macOS ") + distro;
  os.set("device_model", sysctl_str(name == "ios" ? "hw.machine" : "hw.model"));
#else
  std::string rel;
  if (read_text("/etc/os-release", rel)) {
    distro = kv_lookup(rel, "PRETTY_NAME", '=');
    if (distro.size() >= 2 && distro.front() == '"' && distro.back() == '"') {
      distro = distro.substr(1, distro.size() - 2);
    }
  }
  // Android's product model, else the board's DMI or device-tree name.
  std::string model;
  if (!android.is_null() && android.find("model")->is_string()) {
    model = android.find("model")->as_string();
  }
  if (model.empty() && read_text("/sys/devices/virtual/dmi/id/product_name", rel)) {
    model = trim(rel);
  }
  if (model.empty() && read_text("/proc/device-tree/model", rel)) model = trim(rel.c_str());
  os.set("device_model", model.empty() ? Json() : Json(model));
#endif
  os.set("distribution", distro.empty() ? Json() : Json(distro));
#if defined(__ANDROID__)
  os.set("libc", "bionic");
#elif defined(__GLIBC__)
  os.set("libc", "glibc " + std::to_string(__GLIBC__) + "." + std::to_string(__GLIBC_MINOR__));
#elif defined(__APPLE__)
  os.set("libc", "libSystem");
#else
  os.set("libc", Json());
#endif
  os.set("android", android);
  return os;
}

}  // namespace fleet
