// Assembles the probe document. GPU APIs run in forked children when isolation is on,
// because their drivers are the one part of the probe that can crash or hang the caller.
#include "fleet_runtime/probe.hpp"

#include <poll.h>
#include <signal.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include "fleet_runtime/clock.hpp"

namespace fleet {

Json api_status(const char* status, const std::string& reason) {
  Json r = Json::object();
  r.set("status", status);
  r.set("reason", reason.empty() ? Json() : Json(reason));
  return r;
}

#if !defined(__APPLE__)
Json probe_metal() {
  Json r = api_status("not_found", "Metal exists only on Apple platforms");
  r.set("library", Json());
  r.set("devices", Json::array());
  return r;
}
#endif

namespace {

struct Section {
  const char* key;
  Json (*fn)();
};

// A failure record with the same keys the section has on success, so readers of the
// document never meet a missing key.
Json failed_record(const std::string& key, const std::string& reason) {
  Json r = api_status("failed", reason);
  r.set("library", Json());
  if (key == "opencl") {
    r.set("platforms", Json::array());
  } else if (key == "vulkan") {
    r.set("instance_version", Json());
    r.set("devices", Json::array());
  } else if (key == "cuda") {
    r.set("driver_version", Json());
    r.set("driver_version_string", Json());
    r.set("devices", Json::array());
  } else {
    r.set("devices", Json::array());
  }
  return r;
}

Json run_inline(const Section& s) {
  try {
    return s.fn();
  } catch (const std::exception& e) {
    return failed_record(s.key, std::string("probe raised: ") + e.what());
  } catch (...) {
    return failed_record(s.key, "probe raised an unknown exception");
  }
}

#if !defined(__APPLE__)

struct Child {
  pid_t pid = -1;
  int fd = -1;
  std::string out;
  bool done = false;  // EOF seen
};

void write_all(int fd, const std::string& s) {
  std::size_t off = 0;
  while (off < s.size()) {
    ssize_t n = ::write(fd, s.data() + off, s.size() - off);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;
    off += static_cast<std::size_t>(n);
  }
}

std::string signal_name(int sig) {
  const char* d = strsignal(sig);
  return std::to_string(sig) + (d ? std::string(" (") + d + ")" : std::string());
}

// waitpid with a bounded wait: a child stuck in the kernel must not hang the probe.
bool reap(pid_t pid, int& status, int wait_ms) {
  for (int waited = 0;; waited += 10) {
    pid_t r = waitpid(pid, &status, WNOHANG);
    if (r == pid) return true;
    if (r < 0 && errno != EINTR) return false;
    if (waited >= wait_ms) return false;
    struct timespec ts {0, 10 * 1000 * 1000};
    nanosleep(&ts, nullptr);
  }
}

std::vector<Json> run_isolated(const std::vector<Section>& sections, int timeout_ms) {
  std::vector<Child> kids(sections.size());
  std::vector<Json> results(sections.size());
  for (std::size_t k = 0; k < sections.size(); ++k) {
    int fds[2];
    if (pipe(fds) != 0) {
      results[k] = run_inline(sections[k]);
      kids[k].done = true;
      continue;
    }
    pid_t pid = fork();
    if (pid < 0) {
      close(fds[0]);
      close(fds[1]);
      results[k] = run_inline(sections[k]);
      kids[k].done = true;
      continue;
    }
    if (pid == 0) {
      // Child: driver chatter on stdout would corrupt the caller's JSON; send it to stderr.
      close(fds[0]);
      dup2(2, 1);
      std::string text = run_inline(sections[k]).dump(-1);
      write_all(fds[1], text);
      _exit(0);
    }
    close(fds[1]);
    kids[k].pid = pid;
    kids[k].fd = fds[0];
  }

  const std::int64_t deadline = monotonic_ns() + static_cast<std::int64_t>(timeout_ms) * 1000000;
  while (true) {
    std::vector<pollfd> pfds;
    std::vector<std::size_t> which;
    for (std::size_t k = 0; k < kids.size(); ++k) {
      if (!kids[k].done) {
        pfds.push_back(pollfd{kids[k].fd, POLLIN, 0});
        which.push_back(k);
      }
    }
    if (pfds.empty()) break;
    std::int64_t left_ms = (deadline - monotonic_ns()) / 1000000;
    if (left_ms <= 0) break;
    int n = poll(pfds.data(), pfds.size(), static_cast<int>(left_ms));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    for (std::size_t j = 0; j < pfds.size(); ++j) {
      if (!(pfds[j].revents & (POLLIN | POLLHUP | POLLERR))) continue;
      Child& c = kids[which[j]];
      char buf[8192];
      ssize_t got = read(c.fd, buf, sizeof buf);
      if (got > 0) {
        c.out.append(buf, static_cast<std::size_t>(got));
      } else if (got == 0 || errno != EINTR) {
        c.done = true;
      }
    }
  }

  for (std::size_t k = 0; k < kids.size(); ++k) {
    Child& c = kids[k];
    if (c.pid < 0) continue;  // ran inline
    close(c.fd);
    const std::string key = sections[k].key;
    if (!c.done) {
      kill(c.pid, SIGKILL);
      int st = 0;
      reap(c.pid, st, 2000);
      results[k] = failed_record(key, "probe timed out after " + std::to_string(timeout_ms) +
                                          " ms (driver hung?)");
      continue;
    }
    int st = 0;
    bool reaped = reap(c.pid, st, 2000);
    if (reaped && WIFSIGNALED(st)) {
      results[k] = failed_record(key, "probe crashed with signal " + signal_name(WTERMSIG(st)));
      continue;
    }
    if (reaped && WIFEXITED(st) && WEXITSTATUS(st) != 0) {
      results[k] = failed_record(key, "probe exited with status " +
                                          std::to_string(WEXITSTATUS(st)) + " (driver called exit?)");
      continue;
    }
    try {
      results[k] = Json::parse(c.out);
    } catch (const std::exception& e) {
      results[k] = failed_record(key, std::string("probe output unreadable: ") + e.what());
    }
  }
  return results;
}

#endif  // !__APPLE__

}  // namespace

Json probe(const ProbeOptions& options) {
  if (options.timeout_ms <= 0) throw ProbeError("timeout_ms must be positive");
  const std::int64_t t0 = monotonic_ns();
  Json doc = Json::object();
  doc.set("schema", kProbeSchema);
  doc.set("runtime_version", kRuntimeVersion);
  try {
    doc.set("cpu", probe_cpu());
    doc.set("memory", probe_memory());
    doc.set("os", probe_os());
  } catch (const std::exception& e) {
    // These read /proc and cpuid only; failing here means no document is possible.
    throw ProbeError(std::string("system probe failed: ") + e.what());
  }

  std::vector<Section> gpu = {
      {"opencl", &probe_opencl},
      {"vulkan", &probe_vulkan},
      {"cuda", &probe_cuda},
      {"metal", &probe_metal},
  };
  std::vector<Json> results;
  bool isolated = false;
#if !defined(__APPLE__)
  if (options.isolate) {
    results = run_isolated(gpu, options.timeout_ms);
    isolated = true;
  }
#endif
  if (!isolated) {
    for (const auto& s : gpu) results.push_back(run_inline(s));
  }
  Json g = Json::object();
  for (std::size_t k = 0; k < gpu.size(); ++k) g.set(gpu[k].key, results[k]);
  doc.set("gpu", g);
  doc.set("npu_hints", probe_npu_hints());
  doc.set("isolated", isolated);
  doc.set("elapsed_ms", static_cast<double>((monotonic_ns() - t0) / 1000) / 1000.0);
  return doc;
}

std::string probe_json(const ProbeOptions& options, int indent) {
  return probe(options).dump(indent) + "\n";
}

}  // namespace fleet
