// Metal devices (Apple only; CMake compiles this file only for Apple targets, with ARC).
#import <Foundation/Foundation.h>
#import <Metal/Metal.h>
#include <TargetConditionals.h>

#include <string>

#include "fleet_runtime/probe.hpp"

namespace fleet {

namespace {

Json families(id<MTLDevice> dev) {
  Json out = Json::array();
  if (@available(macOS 10.15, iOS 13.0, *)) {
    struct Named {
      MTLGPUFamily family;
      const char* name;
    };
    const Named known[] = {
        {MTLGPUFamilyApple4, "apple4"}, {MTLGPUFamilyApple5, "apple5"},
        {MTLGPUFamilyApple6, "apple6"}, {MTLGPUFamilyApple7, "apple7"},
        {MTLGPUFamilyMac2, "mac2"},
    };
    for (const auto& k : known) {
      if ([dev supportsFamily:k.family]) out.push(k.name);
    }
  }
  if (@available(macOS 13.0, iOS 16.0, *)) {
    if ([dev supportsFamily:MTLGPUFamilyMetal3]) out.push("metal3");
  }
  return out;
}

}  // namespace

Json probe_metal() {
  @autoreleasepool {
#if TARGET_OS_OSX
    NSArray<id<MTLDevice>>* all = MTLCopyAllDevices();
#else
    id<MTLDevice> only = MTLCreateSystemDefaultDevice();
    NSArray<id<MTLDevice>>* all = only ? @[ only ] : @[];
#endif
    Json devices = Json::array();
    for (id<MTLDevice> dev in all) {
      Json d = Json::object();
      d.set("name", std::string([[dev name] UTF8String]));
      d.set("registry_id", static_cast<long long>([dev registryID]));
      bool unified = false;
      if (@available(macOS 10.15, iOS 13.0, *)) unified = [dev hasUnifiedMemory];
      d.set("unified_memory", unified);
      long long working_set = -1;
      if (@available(macOS 10.12, iOS 16.0, *)) {
        working_set = static_cast<long long>([dev recommendedMaxWorkingSetSize]);
      }
      d.set("recommended_max_working_set_bytes", working_set >= 0 ? Json(working_set) : Json());
#if TARGET_OS_OSX
      d.set("low_power", static_cast<bool>([dev isLowPower]));
#else
      d.set("low_power", false);
#endif
      d.set("families", families(dev));
      // MNN's Metal backend computes in fp16 when precision is low; every Metal GPU does.
      d.set("fp16", true);
      devices.push(d);
    }
    Json r = devices.size() ? api_status("found", "")
                            : api_status("not_found", "no Metal device (simulator or headless)");
    r.set("library", "Metal.framework");
    r.set("devices", devices);
    return r;
  }
}

}  // namespace fleet
