// Peak memory around a benchmark. The process peak (VmHWM, getrusage's ru_maxrss) covers
// the whole life of the process, so a model loaded after a bigger one would show the
// bigger one's peak. Linux (>= 4.0) can reset that high-water mark through
// /proc/self/clear_refs; where that is refused (Android SELinux, old kernels, macOS)
// reset_peak_rss() returns false and only the whole-life peak is known.
#pragma once

#include <cstdint>

namespace fleet {

// VmHWM of this process in bytes (resettable peak), -1 where unknown.
std::int64_t hwm_rss_bytes();

// Resets VmHWM to the current RSS; false where the kernel refuses or lacks it.
bool reset_peak_rss();

}  // namespace fleet
