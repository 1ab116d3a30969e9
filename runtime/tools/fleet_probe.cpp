// fleet-probe: prints the capability document (docs/probe.md) as JSON on stdout.
// Needs no Python: this is what the agent runs on Android shells and bare boards.
//
// Exit status: 0 with a document (missing or broken GPU drivers are data in it),
// 1 when no document could be made, 2 for bad usage.
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

#include "fleet_runtime/probe.hpp"

namespace {

const char kUsage[] =
    "usage: fleet-probe [--compact | --indent N] [--no-isolate] [--timeout-ms N]\n"
    "                   [--version] [--help]\n"
    "Prints the fleet.probe/1 capability document as JSON.\n"
    "  --compact        one line\n"
    "  --indent N       pretty-print with N spaces (default 2)\n"
    "  --no-isolate     probe GPU drivers in this process (default: a forked child each)\n"
    "  --timeout-ms N   deadline for each isolated GPU probe (default 10000)\n";

bool parse_int(const char* s, int& out) {
  if (!s || !*s) return false;
  char* end = nullptr;
  long v = std::strtol(s, &end, 10);
  if (*end || v < -1 || v > 10000000) return false;
  out = static_cast<int>(v);
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  fleet::ProbeOptions options;
  int indent = 2;
  for (int k = 1; k < argc; ++k) {
    std::string a = argv[k];
    if (a == "--help" || a == "-h") {
      std::fputs(kUsage, stdout);
      return 0;
    } else if (a == "--version") {
      std::printf("fleet-probe %s (%s)\n", fleet::kRuntimeVersion, fleet::kProbeSchema);
      return 0;
    } else if (a == "--compact") {
      indent = -1;
    } else if (a == "--indent" && k + 1 < argc && parse_int(argv[k + 1], indent)) {
      ++k;
    } else if (a == "--no-isolate") {
      options.isolate = false;
    } else if (a == "--timeout-ms" && k + 1 < argc && parse_int(argv[k + 1], options.timeout_ms)) {
      ++k;
    } else {
      std::fprintf(stderr, "fleet-probe: bad argument %s\n%s", a.c_str(), kUsage);
      return 2;
    }
  }
  // Drivers probed in this process may print to stdout; keep it for the document alone.
  std::fflush(stdout);
  int saved = dup(1);
  if (saved >= 0) dup2(2, 1);
  std::string text;
  int rc = 0;
  try {
    text = fleet::probe_json(options, indent);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fleet-probe: %s\n", e.what());
    rc = 1;
  }
  std::fflush(stdout);
  if (saved >= 0) {
    dup2(saved, 1);
    close(saved);
  }
  if (rc == 0) {
    std::fwrite(text.data(), 1, text.size(), stdout);
    std::fflush(stdout);
  }
  return rc;
}
