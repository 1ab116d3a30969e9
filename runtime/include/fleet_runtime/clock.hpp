#pragma once
#include <cstdint>

namespace fleet {

// Monotonic clock in nanoseconds (CLOCK_MONOTONIC): for benchmark timing.
std::int64_t monotonic_ns();

// Peak resident set size of this process in bytes (getrusage ru_maxrss).
std::int64_t peak_rss_bytes();

// Current resident set size in bytes (/proc/self/statm), -1 where unknown.
std::int64_t current_rss_bytes();

}  // namespace fleet
