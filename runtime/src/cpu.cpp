// The "cpu" section: identity and features (from the architecture's file), logical cores,
// and core clusters grouped by maximum frequency (big.LITTLE and its three-tier cousins).
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <set>

#include "cpu_internal.hpp"
#include "fleet_runtime/probe.hpp"
#include "util.hpp"

#if defined(__APPLE__)
#include <sys/sysctl.h>
#include <sys/types.h>
#endif

namespace fleet {
namespace detail {

bool cpuinfo_has_flag(const std::string& cpuinfo, const std::string& flag) {
  for (const auto& line : split(cpuinfo, '\n')) {
    auto pos = line.find(':');
    if (pos == std::string::npos) continue;
    std::string key = trim(line.substr(0, pos));
    if (key != "Features" && key != "flags") continue;
    for (const auto& word : split(trim(line.substr(pos + 1)), ' ')) {
      if (word == flag) return true;
    }
  }
  return false;
}

#if !defined(__x86_64__) && !defined(__i386__) && !defined(__aarch64__) && !defined(__arm__)
CpuIdentity cpu_identity() {
  CpuIdentity id;
  id.features_source = "none";
  std::string cpuinfo;
  read_text("/proc/cpuinfo", cpuinfo);
  id.model = kv_lookup(cpuinfo, "model name", ':');
  if (id.model.empty()) id.model = kv_lookup(cpuinfo, "cpu model", ':');
  return id;
}
#endif

namespace {

const char* arch_name() {
#if defined(__x86_64__)
  return "x86_64";
#elif defined(__i386__)
  return "x86";
#elif defined(__aarch64__)
  return "arm64";
#elif defined(__arm__)
  return "arm";
#elif defined(__riscv) && __riscv_xlen == 64
  return "riscv64";
#else
  return "unknown";
#endif
}

int usable_cores() {
#if defined(__linux__)
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof set, &set) == 0) return CPU_COUNT(&set);
#endif
  long n = sysconf(_SC_NPROCESSORS_ONLN);
  return n > 0 ? static_cast<int>(n) : 1;
}

Json clusters_linux(const CpuIdentity& id) {
  std::string possible;
  std::vector<int> cpus;
  if (read_text("/sys/devices/system/cpu/possible", possible)) cpus = parse_cpu_list(possible);
  if (cpus.empty()) {
    long n = sysconf(_SC_NPROCESSORS_CONF);
    for (long k = 0; k < n; ++k) cpus.push_back(static_cast<int>(k));
  }
  // max frequency (kHz) -> cpus; a CPU without cpufreq leaves the section empty.
  std::map<long long, std::vector<int>> by_freq;
  for (int cpu : cpus) {
    std::string text;
    std::string base = "/sys/devices/system/cpu/cpu" + std::to_string(cpu) + "/cpufreq/";
    if (!read_text(base + "cpuinfo_max_freq", text)) return Json::array();
    long long khz = std::atoll(trim(text).c_str());
    if (khz <= 0) return Json::array();
    by_freq[khz].push_back(cpu);
  }
  Json out = Json::array();
  // Fastest first: the order MNN's thread binding thinks in ("big cores").
  for (auto it = by_freq.rbegin(); it != by_freq.rend(); ++it) {
    Json c = Json::object();
    c.set("max_freq_khz", it->first);
    Json list = Json::array();
    std::set<std::string> parts;
    for (int cpu : it->second) {
      list.push(cpu);
      auto p = id.part_by_cpu.find(cpu);
      if (p != id.part_by_cpu.end()) parts.insert(p->second);
    }
    c.set("count", static_cast<int>(it->second.size()));
    c.set("cpus", list);
    std::string part;
    for (const auto& p : parts) part += (part.empty() ? "" : "+") + p;
    c.set("core_type", part.empty() ? Json() : Json(part));
    out.push(c);
  }
  return out;
}

#if defined(__APPLE__)
Json clusters_apple() {
  Json out = Json::array();
  int levels = 0;
  size_t size = sizeof levels;
  if (sysctlbyname("hw.nperflevels", &levels, &size, nullptr, 0) != 0) return out;
  for (int k = 0; k < levels; ++k) {
    std::string prefix = "hw.perflevel" + std::to_string(k) + ".";
    int count = 0;
    size = sizeof count;
    sysctlbyname((prefix + "logicalcpu").c_str(), &count, &size, nullptr, 0);
    char name[64] = {0};
    size = sizeof name - 1;
    sysctlbyname((prefix + "name").c_str(), name, &size, nullptr, 0);
    Json c = Json::object();
    c.set("max_freq_khz", Json());  // not exposed by macOS/iOS
    c.set("count", count);
    c.set("cpus", Json::array());
    c.set("core_type", std::string(name));
    out.push(c);
  }
  return out;
}
#endif

}  // namespace
}  // namespace detail

Json probe_cpu() {
  using namespace detail;
  CpuIdentity id = cpu_identity();
  Json cpu = Json::object();
  cpu.set("arch", arch_name());
  cpu.set("vendor", id.vendor.empty() ? Json() : Json(id.vendor));
  cpu.set("model", id.model.empty() ? Json() : Json(id.model));
  long conf = sysconf(_SC_NPROCESSORS_CONF);
  long onln = sysconf(_SC_NPROCESSORS_ONLN);
  cpu.set("logical_cores", static_cast<int>(conf > 0 ? conf : 1));
  cpu.set("online_cores", static_cast<int>(onln > 0 ? onln : 1));
  cpu.set("usable_cores", usable_cores());
#if defined(__APPLE__)
  cpu.set("clusters", clusters_apple());
#else
  cpu.set("clusters", clusters_linux(id));
#endif
  cpu.set("features_source", id.features_source);
  cpu.set("features", id.features);
  cpu.set("fp16_arith", id.fp16_arith);
  cpu.set("int8_dot", id.int8_dot);
  std::string cpuinfo;
  read_text("/proc/cpuinfo", cpuinfo);
  Emulation emu = detect_emulation(cpuinfo);
  cpu.set("emulated", emu.emulator.empty() ? Json() : Json(emu.emulator));
  if (!emu.emulator.empty()) {
    Json e = Json::object();
    e.set("emulator", emu.emulator);
    e.set("real_executable", emu.real_executable.empty() ? Json() : Json(emu.real_executable));
    e.set("evidence", emu.evidence);
    id.extra.set("emulation", e);
  }
  cpu.set("details", id.extra);
  return cpu;
}

}  // namespace fleet
