// Peak memory around a benchmark. The process peak (VmHWM, getrusage's ru_maxrss) covers
// the whole life of the process, so a model loaded after a bigger one would show the
// bigger one's peak. Linux (>= 4.0) can reset that high-water mark through
// /proc/self/clear_refs; where that is refused (Android SELinux, old kernels, macOS) a
// background thread samples the current RSS instead.
#pragma once

#include <atomic>
#include <cstdint>
#include <mutex>
#include <thread>

namespace fleet {

// VmHWM of this process in bytes (resettable peak), -1 where unknown.
std::int64_t hwm_rss_bytes();

// Resets VmHWM to the current RSS; false where the kernel refuses or lacks it.
bool reset_peak_rss();

struct RssReport {
  std::int64_t baseline_bytes = -1;  // current RSS at start()
  std::int64_t peak_bytes = -1;      // highest RSS seen between start() and stop()
  std::int64_t samples = 0;          // background samples taken
  std::int64_t elapsed_ns = 0;
  bool exact = false;  // true: peak from the reset kernel high-water mark, not sampling
};

class RssSampler {
 public:
  explicit RssSampler(int interval_us = 1000);
  ~RssSampler();
  RssSampler(const RssSampler&) = delete;
  RssSampler& operator=(const RssSampler&) = delete;

  void start();       // std::logic_error if already running
  RssReport stop();   // std::logic_error if not running
  bool running() const { return running_.load(); }
  std::int64_t peak_so_far() const { return peak_.load(); }
  int interval_us() const { return interval_us_; }
  // The report of the last stop(); has_report() is false before the first one.
  bool has_report() const { return has_report_; }
  const RssReport& last_report() const { return last_; }

 private:
  void loop();

  int interval_us_;
  std::atomic<bool> running_{false};
  std::atomic<bool> stop_flag_{false};
  std::atomic<std::int64_t> peak_{-1};
  std::atomic<std::int64_t> samples_{0};
  std::int64_t baseline_ = -1;
  std::int64_t t0_ = 0;
  bool reset_ok_ = false;
  bool has_report_ = false;
  RssReport last_;
  std::thread thread_;
  std::mutex mu_;  // start/stop against each other
};

}  // namespace fleet
