// Vulkan by dlopen of the loader, entry points fetched through vkGetInstanceProcAddr. The
// structs are declared here by hand from the Vulkan 1.0 ABI; the large ones (properties
// with their limits) are read from a buffer bigger than the real struct, so only the
// leading fields this probe reads need to be spelled out.
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "fleet_runtime/probe.hpp"
#include "util.hpp"

// VKAPI_ATTR: 32-bit Android Arm uses the hard-float calling convention for Vulkan.
#if defined(__ANDROID__) && defined(__ARM_ARCH) && __ARM_ARCH >= 7 && defined(__ARM_32BIT_STATE)
#define FLEET_VKAPI __attribute__((pcs("aapcs-vfp")))
#else
#define FLEET_VKAPI
#endif

namespace fleet {
namespace {

using VkResult = std::int32_t;
using VkInstance = struct VkInstance_T*;
using VkPhysicalDevice = struct VkPhysicalDevice_T*;
using PFN_vkVoidFunction = void(FLEET_VKAPI*)();

constexpr VkResult VK_SUCCESS = 0;
constexpr VkResult VK_INCOMPLETE = 5;
constexpr VkResult VK_ERROR_INITIALIZATION_FAILED = -3;
constexpr VkResult VK_ERROR_INCOMPATIBLE_DRIVER = -9;
constexpr std::int32_t kStructAppInfo = 0;
constexpr std::int32_t kStructInstanceCreateInfo = 1;
constexpr std::uint32_t kPortabilityEnumerationBit = 0x1;
constexpr std::uint32_t kHeapDeviceLocalBit = 0x1;

struct VkApplicationInfo {
  std::int32_t sType;
  const void* pNext;
  const char* pApplicationName;
  std::uint32_t applicationVersion;
  const char* pEngineName;
  std::uint32_t engineVersion;
  std::uint32_t apiVersion;
};

struct VkInstanceCreateInfo {
  std::int32_t sType;
  const void* pNext;
  std::uint32_t flags;
  const VkApplicationInfo* pApplicationInfo;
  std::uint32_t enabledLayerCount;
  const char* const* ppEnabledLayerNames;
  std::uint32_t enabledExtensionCount;
  const char* const* ppEnabledExtensionNames;
};

struct VkExtensionProperties {
  char extensionName[256];
  std::uint32_t specVersion;
};

// Leading fields of VkPhysicalDeviceProperties (limits and sparse properties follow).
struct VkPhysicalDevicePropertiesHead {
  std::uint32_t apiVersion;
  std::uint32_t driverVersion;
  std::uint32_t vendorID;
  std::uint32_t deviceID;
  std::int32_t deviceType;
  char deviceName[256];
};

struct VkMemoryType {
  std::uint32_t propertyFlags;
  std::uint32_t heapIndex;
};
struct VkMemoryHeap {
  std::uint64_t size;
  std::uint32_t flags;
};
struct VkPhysicalDeviceMemoryProperties {
  std::uint32_t memoryTypeCount;
  VkMemoryType memoryTypes[32];
  std::uint32_t memoryHeapCount;
  VkMemoryHeap memoryHeaps[16];
};

using GetInstanceProcAddr = PFN_vkVoidFunction(FLEET_VKAPI*)(VkInstance, const char*);
using EnumerateInstanceVersion = VkResult(FLEET_VKAPI*)(std::uint32_t*);
using EnumerateInstanceExtensionProperties =
    VkResult(FLEET_VKAPI*)(const char*, std::uint32_t*, VkExtensionProperties*);
using CreateInstance = VkResult(FLEET_VKAPI*)(const VkInstanceCreateInfo*, const void*, VkInstance*);
using DestroyInstance = void(FLEET_VKAPI*)(VkInstance, const void*);
using EnumeratePhysicalDevices = VkResult(FLEET_VKAPI*)(VkInstance, std::uint32_t*, VkPhysicalDevice*);
using GetPhysicalDeviceProperties = void(FLEET_VKAPI*)(VkPhysicalDevice, void*);
using GetPhysicalDeviceMemoryProperties =
    void(FLEET_VKAPI*)(VkPhysicalDevice, VkPhysicalDeviceMemoryProperties*);
using EnumerateDeviceExtensionProperties =
    VkResult(FLEET_VKAPI*)(VkPhysicalDevice, const char*, std::uint32_t*, VkExtensionProperties*);

std::string version_string(std::uint32_t v) {
  return std::to_string(v >> 22) + "." + std::to_string((v >> 12) & 0x3FF) + "." +
         std::to_string(v & 0xFFF);
}

// Drivers encode driverVersion their own way; decode the known ones.
std::string driver_version_string(std::uint32_t vendor, std::uint32_t v) {
  if (vendor == 0x10DE) {  // NVIDIA: 10.8.8.6 bits
    return std::to_string(v >> 22) + "." + std::to_string((v >> 14) & 0xFF) + "." +
           std::to_string((v >> 6) & 0xFF) + "." + std::to_string(v & 0x3F);
  }
  return version_string(v);
}

const char* device_type_name(std::int32_t t) {
  switch (t) {
    case 1: return "integrated_gpu";
    case 2: return "discrete_gpu";
    case 3: return "virtual_gpu";
    case 4: return "cpu";
    default: return "other";
  }
}

std::vector<std::string> library_names() {
  std::string env = detail::getenv_str("FLEET_PROBE_VULKAN_LIBRARY");
  if (!env.empty()) return {env};
#if defined(__APPLE__)
  return {"libvulkan.1.dylib", "libvulkan.dylib", "libMoltenVK.dylib"};
#elif defined(__ANDROID__)
  return {"libvulkan.so"};
#else
  return {"libvulkan.so.1", "libvulkan.so"};
#endif
}

Json result(const char* status, const std::string& reason, const detail::Library& lib) {
  Json r = api_status(status, reason);
  r.set("library", lib.loaded() ? Json(lib.path()) : Json());
  r.set("instance_version", Json());
  r.set("devices", Json::array());
  return r;
}

}  // namespace

Json probe_vulkan() {
  detail::Library lib(library_names());
  if (!lib.loaded()) return result("not_found", "no Vulkan loader: " + lib.error(), lib);
  auto gipa = lib.fn<GetInstanceProcAddr>("vkGetInstanceProcAddr");
  if (!gipa) return result("failed", "loader lacks vkGetInstanceProcAddr", lib);

  std::uint32_t instance_version = (1u << 22);  // 1.0 when the query does not exist
  if (auto eiv = reinterpret_cast<EnumerateInstanceVersion>(gipa(nullptr, "vkEnumerateInstanceVersion"))) {
    eiv(&instance_version);
  }
  // Portability drivers (MoltenVK) are listed only when the instance asks for them.
  std::vector<const char*> extensions;
  std::uint32_t flags = 0;
  auto eie = reinterpret_cast<EnumerateInstanceExtensionProperties>(
      gipa(nullptr, "vkEnumerateInstanceExtensionProperties"));
  std::vector<VkExtensionProperties> inst_ext;
  if (eie) {
    std::uint32_t n = 0;
    if (eie(nullptr, &n, nullptr) == VK_SUCCESS && n > 0 && n < 4096) {
      inst_ext.resize(n);
      if (eie(nullptr, &n, inst_ext.data()) < 0) n = 0;
      inst_ext.resize(n);
    }
  }
  for (const auto& e : inst_ext) {
    if (std::strcmp(e.extensionName, "VK_KHR_portability_enumeration") == 0) {
      extensions.push_back("VK_KHR_portability_enumeration");
      flags |= kPortabilityEnumerationBit;
    }
  }

  auto create = reinterpret_cast<CreateInstance>(gipa(nullptr, "vkCreateInstance"));
  if (!create) return result("failed", "loader lacks vkCreateInstance", lib);
  VkApplicationInfo app{};
  app.sType = kStructAppInfo;
  app.pApplicationName = "fleet-probe";
  app.pEngineName = "mnn-fleet";
  // Ask for 1.1 where the loader has it: a 1.0 loader rejects anything above 1.0.
  app.apiVersion = instance_version >= (1u << 22 | 1u << 12) ? (1u << 22 | 1u << 12) : (1u << 22);
  VkInstanceCreateInfo ci{};
  ci.sType = kStructInstanceCreateInfo;
  ci.flags = flags;
  ci.pApplicationInfo = &app;
  ci.enabledExtensionCount = static_cast<std::uint32_t>(extensions.size());
  ci.ppEnabledExtensionNames = extensions.empty() ? nullptr : extensions.data();
  VkInstance instance = nullptr;
  VkResult rc = create(&ci, nullptr, &instance);
  if (rc == VK_ERROR_INCOMPATIBLE_DRIVER || rc == VK_ERROR_INITIALIZATION_FAILED) {
    Json r = result("not_found", "the Vulkan loader found no driver (vkCreateInstance returned " +
                                     std::to_string(rc) + ")", lib);
    r.set("instance_version", version_string(instance_version));
    return r;
  }
  if (rc != VK_SUCCESS || !instance) {
    return result("failed", "vkCreateInstance returned " + std::to_string(rc), lib);
  }

  auto destroy = reinterpret_cast<DestroyInstance>(gipa(instance, "vkDestroyInstance"));
  auto enum_devices = reinterpret_cast<EnumeratePhysicalDevices>(gipa(instance, "vkEnumeratePhysicalDevices"));
  auto get_props = reinterpret_cast<GetPhysicalDeviceProperties>(gipa(instance, "vkGetPhysicalDeviceProperties"));
  auto get_mem = reinterpret_cast<GetPhysicalDeviceMemoryProperties>(
      gipa(instance, "vkGetPhysicalDeviceMemoryProperties"));
  auto dev_ext = reinterpret_cast<EnumerateDeviceExtensionProperties>(
      gipa(instance, "vkEnumerateDeviceExtensionProperties"));
  if (!enum_devices || !get_props) {
    if (destroy) destroy(instance, nullptr);
    return result("failed", "instance lacks vkEnumeratePhysicalDevices", lib);
  }
  std::uint32_t n = 0;
  rc = enum_devices(instance, &n, nullptr);
  std::vector<VkPhysicalDevice> phys(n);
  if (rc == VK_SUCCESS && n > 0) rc = enum_devices(instance, &n, phys.data());
  if (rc != VK_SUCCESS && rc != VK_INCOMPLETE) {
    if (destroy) destroy(instance, nullptr);
    return result("failed", "vkEnumeratePhysicalDevices returned " + std::to_string(rc), lib);
  }
  phys.resize(n);

  Json devices = Json::array();
  for (VkPhysicalDevice pd : phys) {
    // VkPhysicalDeviceProperties is 824 bytes on LP64; 4 KiB leaves room for any ABI.
    alignas(16) unsigned char buf[4096];
    std::memset(buf, 0, sizeof buf);
    get_props(pd, buf);
    VkPhysicalDevicePropertiesHead head;
    std::memcpy(&head, buf, sizeof head);
    head.deviceName[sizeof head.deviceName - 1] = '\0';
    Json d = Json::object();
    d.set("name", std::string(head.deviceName));
    d.set("type", device_type_name(head.deviceType));
    d.set("api_version", version_string(head.apiVersion));
    d.set("driver_version", driver_version_string(head.vendorID, head.driverVersion));
    d.set("driver_version_raw", static_cast<long long>(head.driverVersion));
    d.set("vendor_id", static_cast<long long>(head.vendorID));
    d.set("device_id", static_cast<long long>(head.deviceID));
    Json heap = Json();
    if (get_mem) {
      VkPhysicalDeviceMemoryProperties mem;
      std::memset(&mem, 0, sizeof mem);
      get_mem(pd, &mem);
      std::uint64_t local = 0;
      for (std::uint32_t k = 0; k < mem.memoryHeapCount && k < 16; ++k) {
        if (mem.memoryHeaps[k].flags & kHeapDeviceLocalBit) local += mem.memoryHeaps[k].size;
      }
      heap = Json(static_cast<long long>(local));
    }
    d.set("device_local_bytes", heap);
    bool fp16 = false;
    if (dev_ext) {
      std::uint32_t m = 0;
      if (dev_ext(pd, nullptr, &m, nullptr) == VK_SUCCESS && m > 0 && m < 4096) {
        std::vector<VkExtensionProperties> exts(m);
        if (dev_ext(pd, nullptr, &m, exts.data()) >= 0) {
          for (std::uint32_t k = 0; k < m; ++k) {
            fp16 = fp16 || std::strcmp(exts[k].extensionName, "VK_KHR_shader_float16_int8") == 0;
          }
        }
      }
    }
    // The extension says the driver knows fp16 shaders; Vulkan 1.2 folds it into core, so
    // this is a hint, not a feature bit.
    d.set("fp16_extension", fp16);
    devices.push(d);
  }
  if (destroy) destroy(instance, nullptr);

  Json r = devices.size() ? api_status("found", "")
                          : api_status("not_found", "Vulkan instance created but no physical device");
  r.set("library", lib.path());
  r.set("instance_version", version_string(instance_version));
  r.set("devices", devices);
  return r;
}

}  // namespace fleet
