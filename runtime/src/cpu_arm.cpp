// Arm identification and ISA features. Linux/Android: getauxval(AT_HWCAP/AT_HWCAP2), with
// /proc/cpuinfo "Features" as the fallback (old kernels, seccomp'd auxv); Apple: sysctl
// hw.optional.arm.FEAT_*. Compiled only for Arm targets.
#if defined(__aarch64__) || defined(__arm__)

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "cpu_internal.hpp"
#include "util.hpp"

#if defined(__APPLE__)
#include <sys/sysctl.h>
#include <sys/types.h>
#else
#include <sys/auxv.h>
#endif

namespace fleet {
namespace detail {
namespace {

#if defined(__APPLE__)

bool sysctl_flag(const char* name) {
  int value = 0;
  size_t size = sizeof value;
  if (sysctlbyname(name, &value, &size, nullptr, 0) != 0) return false;
  return value != 0;
}

std::string sysctl_string(const char* name) {
  char buf[256] = {0};
  size_t size = sizeof buf - 1;
  if (sysctlbyname(name, buf, &size, nullptr, 0) != 0) return "";
  return trim(buf);
}

#else

// Bit numbers from the kernel's uapi asm/hwcap.h, spelled out so that old NDK and libc
// headers still build.
#if defined(__aarch64__)
constexpr std::uint64_t kHwcapAsimd = 1ULL << 1;
constexpr std::uint64_t kHwcapFphp = 1ULL << 9;
constexpr std::uint64_t kHwcapAsimdhp = 1ULL << 10;
constexpr std::uint64_t kHwcapCpuid = 1ULL << 11;  // EL0 reads of ID registers (MIDR_EL1)
constexpr std::uint64_t kHwcapAsimddp = 1ULL << 20;
constexpr std::uint64_t kHwcapSve = 1ULL << 22;
constexpr std::uint64_t kHwcap2Sve2 = 1ULL << 1;
constexpr std::uint64_t kHwcap2I8mm = 1ULL << 13;
constexpr std::uint64_t kHwcap2Bf16 = 1ULL << 14;
constexpr std::uint64_t kHwcap2Sme = 1ULL << 23;
constexpr std::uint64_t kHwcap2Sme2 = 1ULL << 37;
#else
constexpr std::uint64_t kHwcapArmNeon = 1ULL << 12;
#endif

#ifndef AT_HWCAP2
#define AT_HWCAP2 26
#endif

const char* implementer_name(int imp) {
  switch (imp) {
    case 0x00: return "software";  // reserved for software use: QEMU's "max" CPU
    case 0x41: return "ARM";
    case 0x42: return "Broadcom";
    case 0x43: return "Cavium";
    case 0x46: return "Fujitsu";
    case 0x48: return "HiSilicon";
    case 0x4e: return "NVIDIA";
    case 0x50: return "APM";
    case 0x51: return "Qualcomm";
    case 0x53: return "Samsung";
    case 0x56: return "Marvell";
    case 0x61: return "Apple";
    case 0x69: return "Intel";
    case 0x6d: return "Microsoft";
    case 0xc0: return "Ampere";
    default: return "";
  }
}

std::string arm_part_name(int part) {
  switch (part) {
    case 0xd03: return "Cortex-A53";
    case 0xd04: return "Cortex-A35";
    case 0xd05: return "Cortex-A55";
    case 0xd07: return "Cortex-A57";
    case 0xd08: return "Cortex-A72";
    case 0xd09: return "Cortex-A73";
    case 0xd0a: return "Cortex-A75";
    case 0xd0b: return "Cortex-A76";
    case 0xd0c: return "Neoverse-N1";
    case 0xd0d: return "Cortex-A77";
    case 0xd40: return "Neoverse-V1";
    case 0xd41: return "Cortex-A78";
    case 0xd44: return "Cortex-X1";
    case 0xd46: return "Cortex-A510";
    case 0xd47: return "Cortex-A710";
    case 0xd48: return "Cortex-X2";
    case 0xd49: return "Neoverse-N2";
    case 0xd4d: return "Cortex-A715";
    case 0xd4e: return "Cortex-X3";
    case 0xd4f: return "Neoverse-V2";
    case 0xd80: return "Cortex-A520";
    case 0xd81: return "Cortex-A720";
    case 0xd82: return "Cortex-X4";
    default: return "";
  }
}

// /proc/cpuinfo on Arm: "processor : N" blocks with "CPU implementer" / "CPU part".
void parse_cpuinfo_parts(const std::string& text, CpuIdentity& id, int& implementer) {
  int cpu = -1;
  int imp = -1;
  for (const auto& line : split(text, '\n')) {
    auto pos = line.find(':');
    if (pos == std::string::npos) continue;
    std::string key = trim(line.substr(0, pos));
    std::string val = trim(line.substr(pos + 1));
    if (key == "processor") {
      cpu = std::atoi(val.c_str());
    } else if (key == "CPU implementer") {
      imp = static_cast<int>(std::strtol(val.c_str(), nullptr, 0));
      if (implementer < 0) implementer = imp;
    } else if (key == "CPU part" && cpu >= 0) {
      int part = static_cast<int>(std::strtol(val.c_str(), nullptr, 0));
      std::string name = imp == 0x41 ? arm_part_name(part) : "";
      if (name.empty()) {
        char buf[32];
        std::snprintf(buf, sizeof buf, "0x%02x:0x%03x", imp < 0 ? 0 : imp, part);
        name = buf;
      }
      id.part_by_cpu[cpu] = name;
    }
  }
}

#if defined(__aarch64__)
// MIDR_EL1 of the core this thread runs on. Linux (4.11+) traps the EL0 read and answers
// it when it sets HWCAP_CPUID; qemu-user answers with the emulated CPU's MIDR (cortex-a53:
// 0x410fd034; max: 0x000f0510). Never called without the hwcap bit (SIGILL otherwise).
std::uint64_t read_midr() {
  std::uint64_t midr = 0;
  __asm__ volatile("mrs %0, MIDR_EL1" : "=r"(midr));
  return midr;
}
#endif

#endif  // !__APPLE__

}  // namespace

CpuIdentity cpu_identity() {
  CpuIdentity id;
  Json& f = id.features;
#if defined(__APPLE__)
  id.features_source = "sysctl";
  id.vendor = "Apple";
  id.model = sysctl_string("machdep.cpu.brand_string");
  f.set("asimd", true);  // every Apple arm64 core
  f.set("fphp", sysctl_flag("hw.optional.arm.FEAT_FP16") || sysctl_flag("hw.optional.neon_fp16"));
  f.set("asimdhp", f.find("fphp")->as_bool());
  f.set("asimddp", sysctl_flag("hw.optional.arm.FEAT_DotProd"));
  f.set("i8mm", sysctl_flag("hw.optional.arm.FEAT_I8MM"));
  f.set("bf16", sysctl_flag("hw.optional.arm.FEAT_BF16"));
  f.set("sve", false);  // no Apple core implements SVE outside streaming mode
  f.set("sve2", false);
  f.set("sme", sysctl_flag("hw.optional.arm.FEAT_SME"));
  f.set("sme2", sysctl_flag("hw.optional.arm.FEAT_SME2"));
#else
  std::string cpuinfo;
  read_text("/proc/cpuinfo", cpuinfo);
  int implementer = -1;
  parse_cpuinfo_parts(cpuinfo, id, implementer);
  id.vendor = implementer_name(implementer);
  if (id.vendor.empty() && implementer >= 0) {
    char buf[16];
    std::snprintf(buf, sizeof buf, "0x%02x", implementer);
    id.vendor = buf;
  }
  std::uint64_t hw = getauxval(AT_HWCAP);
  std::uint64_t hw2 = getauxval(AT_HWCAP2);
  std::string midr_part;
#if defined(__aarch64__)
  if (id.part_by_cpu.empty() && (hw & kHwcapCpuid) != 0) {
    // /proc/cpuinfo without "CPU part" lines (qemu-user passes the host's through): the
    // core's own ID register names it.
    std::uint64_t midr = read_midr();
    int imp = static_cast<int>((midr >> 24) & 0xff);
    int part = static_cast<int>((midr >> 4) & 0xfff);
    char buf[32];
    std::snprintf(buf, sizeof buf, "0x%08llx", static_cast<unsigned long long>(midr));
    id.extra.set("midr", std::string(buf));
    id.extra.set("midr_source", "mrs MIDR_EL1 (this thread's core)");
    midr_part = imp == 0x41 ? arm_part_name(part) : "";
    if (midr_part.empty()) {
      std::snprintf(buf, sizeof buf, "0x%02x:0x%03x", imp, part);
      midr_part = buf;
    }
    implementer = imp;
    id.vendor = implementer_name(imp);
    if (id.vendor.empty()) {
      std::snprintf(buf, sizeof buf, "0x%02x", imp);
      id.vendor = buf;
    }
  }
#endif
  std::string hardware = kv_lookup(cpuinfo, "Hardware", ':');
  std::string dt_model;
  read_text("/proc/device-tree/model", dt_model);
  dt_model = trim(dt_model.c_str());  // device-tree strings end in NUL
  if (!hardware.empty()) {
    id.model = hardware;
  } else if (!dt_model.empty()) {
    id.model = dt_model;
  } else if (!midr_part.empty()) {
    id.model = midr_part;
  } else {
    std::string parts;
    for (const auto& kv : id.part_by_cpu) {
      if (parts.find(kv.second) == std::string::npos) parts += (parts.empty() ? "" : "+") + kv.second;
    }
    id.model = parts;
  }
  if (!dt_model.empty()) id.extra.set("device_tree_model", dt_model);

#if defined(__aarch64__)
  if (hw != 0) {
    id.features_source = "hwcap";
    f.set("asimd", (hw & kHwcapAsimd) != 0);
    f.set("fphp", (hw & kHwcapFphp) != 0);
    f.set("asimdhp", (hw & kHwcapAsimdhp) != 0);
    f.set("asimddp", (hw & kHwcapAsimddp) != 0);
    f.set("i8mm", (hw2 & kHwcap2I8mm) != 0);
    f.set("bf16", (hw2 & kHwcap2Bf16) != 0);
    f.set("sve", (hw & kHwcapSve) != 0);
    f.set("sve2", (hw2 & kHwcap2Sve2) != 0);
    f.set("sme", (hw2 & kHwcap2Sme) != 0);
    f.set("sme2", (hw2 & kHwcap2Sme2) != 0);
  } else {
    id.features_source = "proc_cpuinfo";
    for (const char* name : {"asimd", "fphp", "asimdhp", "asimddp", "i8mm", "bf16", "sve",
                             "sve2", "sme", "sme2"}) {
      f.set(name, cpuinfo_has_flag(cpuinfo, name));
    }
  }
#else  // 32-bit Arm: NEON only; ARMv8.2 extensions are not reachable from AArch32 here.
  (void)hw2;
  bool neon = hw != 0 ? (hw & kHwcapArmNeon) != 0 : cpuinfo_has_flag(cpuinfo, "neon");
  id.features_source = hw != 0 ? "hwcap" : "proc_cpuinfo";
  f.set("asimd", neon);
  for (const char* name : {"fphp", "asimdhp", "asimddp", "i8mm", "bf16", "sve", "sve2", "sme",
                           "sme2"}) {
    f.set(name, false);
  }
#endif
#endif  // __APPLE__
  f.set("neon", f.find("asimd")->as_bool());
  id.fp16_arith = f.find("asimdhp")->as_bool();
  id.int8_dot = f.find("asimddp")->as_bool();
  Json parts = Json::array();
  for (const auto& kv : id.part_by_cpu) {
    bool seen = false;
    for (const auto& p : parts.items()) seen = seen || p.as_string() == kv.second;
    if (!seen) parts.push(kv.second);
  }
#if !defined(__APPLE__)
  if (!parts.size() && !midr_part.empty()) parts.push(midr_part);
#endif
  if (parts.size()) id.extra.set("core_types", parts);
  return id;
}

}  // namespace detail
}  // namespace fleet

#endif  // Arm
