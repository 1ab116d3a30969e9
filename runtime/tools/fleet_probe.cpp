// fleet-probe: prints the capability document as JSON; needs no Python.
#include <cstdio>

#include "fleet_runtime/clock.hpp"

int main() {
  std::printf("{\"schema\": \"fleet.probe/0\", \"peak_rss_bytes\": %lld}\n",
              static_cast<long long>(fleet::peak_rss_bytes()));
  return 0;
}
