#include "fleet_runtime/rss.hpp"

#include <fcntl.h>
#include <time.h>
#include <unistd.h>

#include <cstdlib>
#include <stdexcept>
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

RssSampler::RssSampler(int interval_us) : interval_us_(interval_us) {
  if (interval_us <= 0) throw std::invalid_argument("interval_us must be positive");
}

RssSampler::~RssSampler() {
  if (running_.load()) {
    stop_flag_.store(true);
    if (thread_.joinable()) thread_.join();
  }
}

void RssSampler::loop() {
  struct timespec ts;
  ts.tv_sec = interval_us_ / 1000000;
  ts.tv_nsec = static_cast<long>(interval_us_ % 1000000) * 1000;
  while (!stop_flag_.load(std::memory_order_relaxed)) {
    std::int64_t cur = current_rss_bytes();
    std::int64_t prev = peak_.load();
    while (cur > prev && !peak_.compare_exchange_weak(prev, cur)) {
    }
    samples_.fetch_add(1);
    nanosleep(&ts, nullptr);
  }
}

void RssSampler::start() {
  std::lock_guard<std::mutex> lock(mu_);
  if (running_.load()) throw std::logic_error("RssSampler already running");
  reset_ok_ = reset_peak_rss();
  baseline_ = current_rss_bytes();
  peak_.store(baseline_);
  samples_.store(0);
  stop_flag_.store(false);
  t0_ = monotonic_ns();
  thread_ = std::thread(&RssSampler::loop, this);
  running_.store(true);
}

RssReport RssSampler::stop() {
  std::lock_guard<std::mutex> lock(mu_);
  if (!running_.load()) throw std::logic_error("RssSampler not running");
  stop_flag_.store(true);
  thread_.join();
  running_.store(false);
  RssReport r;
  r.baseline_bytes = baseline_;
  r.elapsed_ns = monotonic_ns() - t0_;
  r.samples = samples_.load();
  std::int64_t cur = current_rss_bytes();
  std::int64_t peak = peak_.load();
  if (cur > peak) peak = cur;
  if (reset_ok_) {
    std::int64_t hwm = hwm_rss_bytes();
    if (hwm > peak) peak = hwm;
    r.exact = hwm >= 0;
  }
  r.peak_bytes = peak;
  last_ = r;
  has_report_ = true;
  return r;
}

}  // namespace fleet
