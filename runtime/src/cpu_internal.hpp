// What each architecture's file contributes to the "cpu" section.
#pragma once

#include <map>
#include <string>

#include "fleet_runtime/json.hpp"

namespace fleet {
namespace detail {

struct CpuIdentity {
  std::string vendor;
  std::string model;
  std::string features_source;  // "cpuid" | "hwcap" | "proc_cpuinfo" | "sysctl" | "none"
  Json features = Json::object();  // fixed keys per architecture, all booleans
  Json extra = Json::object();     // architecture-specific identification (family, parts)
  bool fp16_arith = false;  // native fp16 arithmetic (Arm FEAT_FP16 / x86 AVX512-FP16)
  bool int8_dot = false;    // int8 dot-product instructions (Arm dotprod / x86 VNNI)
  std::map<int, std::string> part_by_cpu;  // Arm: core type per logical CPU
};

// Implemented by exactly one of cpu_x86.cpp, cpu_arm.cpp, cpu.cpp (other architectures).
CpuIdentity cpu_identity();

// A user-mode emulator running this program (emulation.cpp): "qemu", "rosetta",
// "unknown" (translated, emulator not named) or "" (native, as far as can be told).
struct Emulation {
  std::string emulator;
  std::string real_executable;      // Linux: the binary the kernel really runs (qemu's)
  Json evidence = Json::array();    // what told, in words
};
Emulation detect_emulation(const std::string& cpuinfo);

// Arm /proc/cpuinfo "Features" parsing, exposed for the fallback path.
bool cpuinfo_has_flag(const std::string& cpuinfo, const std::string& flag);

}  // namespace detail
}  // namespace fleet
