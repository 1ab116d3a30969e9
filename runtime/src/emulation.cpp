// Is this CPU emulated? A user-mode emulator (qemu-user run through binfmt_misc) translates
// the program's instructions, so every feature bit it reports is the emulated CPU's and
// timings say nothing about real hardware. What tells, checked on Debian's qemu-user 7.2:
//
// - the real executable: qemu answers readlink("/proc/self/exe") with the guest program,
//   but /proc/thread-self/exe (and /proc/<pid>/task/<tid>/exe) is not intercepted and
//   names the emulator binary (qemu-aarch64-static). On real hardware both are the same.
// - /proc/cpuinfo of another architecture: qemu 7.2 passes the host's file through, so an
//   arm64 process reads x86 "vendor_id"/"flags" lines.
// - Apple: sysctl.proc_translated is 1 under Rosetta 2.
// The AT_PLATFORM/AT_EXECFN auxv entries are not evidence: qemu fills them in as a kernel
// of the emulated architecture would ("aarch64", the program's path).
#include <unistd.h>

#include <string>

#include "cpu_internal.hpp"
#include "util.hpp"

#if defined(__APPLE__)
#include <sys/sysctl.h>
#include <sys/types.h>
#endif

#if defined(__linux__)
#include <sys/syscall.h>
#endif

namespace fleet {
namespace detail {
namespace {

#if defined(__linux__)
std::string read_link(const std::string& path) {
  char buf[4096];
  ssize_t n = ::readlink(path.c_str(), buf, sizeof buf - 1);
  if (n <= 0) return "";
  return std::string(buf, static_cast<std::size_t>(n));
}

std::string basename_of(const std::string& path) {
  auto pos = path.rfind('/');
  return pos == std::string::npos ? path : path.substr(pos + 1);
}

// The architecture /proc/cpuinfo describes, from keys only one family writes.
const char* cpuinfo_family(const std::string& cpuinfo) {
  bool x86 = false, arm = false;
  for (const auto& line : split(cpuinfo, '\n')) {
    auto pos = line.find(':');
    if (pos == std::string::npos) continue;
    std::string key = trim(line.substr(0, pos));
    if (key == "vendor_id" || key == "flags" || key == "cpu family") x86 = true;
    if (key == "CPU implementer" || key == "CPU architecture" || key == "Features") arm = true;
  }
  if (x86 && !arm) return "x86";
  if (arm && !x86) return "arm";
  return "";
}

constexpr const char* kOwnFamily =
#if defined(__x86_64__) || defined(__i386__)
    "x86";
#elif defined(__aarch64__) || defined(__arm__)
    "arm";
#else
    "";
#endif
#endif  // __linux__

}  // namespace

Emulation detect_emulation(const std::string& cpuinfo) {
  Emulation e;
#if defined(__APPLE__)
  int translated = 0;
  size_t size = sizeof translated;
  if (sysctlbyname("sysctl.proc_translated", &translated, &size, nullptr, 0) == 0 &&
      translated == 1) {
    e.emulator = "rosetta";
    e.evidence.push("sysctl.proc_translated=1");
  }
  (void)cpuinfo;
#elif defined(__linux__)
  std::string self_exe = read_link("/proc/self/exe");
  std::string real_exe = read_link("/proc/thread-self/exe");
  if (real_exe.empty()) {
    real_exe = read_link("/proc/" + std::to_string(::getpid()) + "/task/" +
                         std::to_string(static_cast<long>(::syscall(SYS_gettid))) + "/exe");
  }
  if (!self_exe.empty() && !real_exe.empty() && self_exe != real_exe) {
    e.real_executable = real_exe;
    // the program's own path stays out: the module and fleet-probe must print the same
    e.evidence.push("/proc/thread-self/exe is " + real_exe + ", not the program that runs");
    e.emulator = basename_of(real_exe).find("qemu") != std::string::npos ? "qemu" : "unknown";
  }
  const char* family = cpuinfo_family(cpuinfo);
  if (*family && *kOwnFamily && std::string(family) != kOwnFamily) {
    e.evidence.push(std::string("/proc/cpuinfo describes an ") + family + " CPU, this is an " +
                    kOwnFamily + " program");
    if (e.emulator.empty()) e.emulator = "unknown";
  }
#else
  (void)cpuinfo;
#endif
  return e;
}

}  // namespace detail
}  // namespace fleet
