#include "fleet_runtime/rss.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cstdlib>
#include <string>

#include "fleet_runtime/clock.hpp"
#include "util.hpp"

namespace fleet {

std::int64_t hwm_rss_bytes() {
#if defined(__linux__)
  std::string text;
  if (!detail::read_text("/proc/self/status", text)) return -1;
  std::string v = detail::kv_lookup(text, "VmHWM", ':');
  if (v.empty()) return -1;
  return std::atoll(v.c_str()) * 1024LL;
#else
  return peak_rss_bytes();
#endif
}

bool reset_peak_rss() {
#if defined(__linux__)
  int fd = ::open("/proc/self/clear_refs", O_WRONLY | O_CLOEXEC);
  if (fd < 0) return false;
  bool ok = ::write(fd, "5", 1) == 1;  // "5": reset the peak RSS only (Linux >= 4.0)
  ::close(fd);
  if (!ok) return false;
  // Older kernels accept the write but ignore "5": check that the mark really moved.
  std::int64_t hwm = hwm_rss_bytes();
  std::int64_t cur = current_rss_bytes();
  return hwm >= 0 && cur >= 0 && hwm <= cur + 64 * 1024 * 1024;
#else
  return false;
#endif
}

}  // namespace fleet
