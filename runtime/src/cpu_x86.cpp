// x86 identification and ISA features by cpuid, checked against what the OS enabled
// (XCR0), so the answer matches what code may really execute (and /proc/cpuinfo).
#if defined(__x86_64__) || defined(__i386__)

#include <cpuid.h>

#include <cstdint>
#include <cstring>

#include "cpu_internal.hpp"
#include "util.hpp"

namespace fleet {
namespace detail {
namespace {

struct Regs {
  unsigned a = 0, b = 0, c = 0, d = 0;
};

Regs cpuid(unsigned leaf, unsigned sub = 0) {
  Regs r;
  if (!__get_cpuid_count(leaf, sub, &r.a, &r.b, &r.c, &r.d)) r = Regs();
  return r;
}

std::uint64_t xgetbv0() {
  std::uint32_t lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<std::uint64_t>(hi) << 32) | lo;
}

bool bit(unsigned v, int n) { return ((v >> n) & 1u) != 0; }

}  // namespace

CpuIdentity cpu_identity() {
  CpuIdentity id;
  id.features_source = "cpuid";

  Regs r0 = cpuid(0);
  unsigned max_leaf = r0.a;
  char vendor[13] = {0};
  std::memcpy(vendor + 0, &r0.b, 4);
  std::memcpy(vendor + 4, &r0.d, 4);
  std::memcpy(vendor + 8, &r0.c, 4);
  id.vendor = vendor;

  std::string brand;
  if (cpuid(0x80000000).a >= 0x80000004) {
    char buf[49] = {0};
    for (unsigned k = 0; k < 3; ++k) {
      Regs r = cpuid(0x80000002 + k);
      std::memcpy(buf + 16 * k + 0, &r.a, 4);
      std::memcpy(buf + 16 * k + 4, &r.b, 4);
      std::memcpy(buf + 16 * k + 8, &r.c, 4);
      std::memcpy(buf + 16 * k + 12, &r.d, 4);
    }
    brand = trim(buf);
  }
  id.model = brand.empty() ? id.vendor : brand;

  Regs r1 = max_leaf >= 1 ? cpuid(1) : Regs();
  Regs r7 = max_leaf >= 7 ? cpuid(7, 0) : Regs();
  Regs r71 = (max_leaf >= 7 && r7.a >= 1) ? cpuid(7, 1) : Regs();

  unsigned family = (r1.a >> 8) & 0xF;
  unsigned model = (r1.a >> 4) & 0xF;
  if (family == 0xF) family += (r1.a >> 20) & 0xFF;
  if (family == 0x6 || family >= 0xF) model |= ((r1.a >> 16) & 0xF) << 4;
  id.extra.set("family", static_cast<int>(family));
  id.extra.set("model_id", static_cast<int>(model));
  id.extra.set("stepping", static_cast<int>(r1.a & 0xF));
  id.extra.set("hypervisor", bit(r1.c, 31));

  // State the OS saves on context switch: without it the instructions fault.
  bool osxsave = bit(r1.c, 27);
  std::uint64_t xcr0 = osxsave ? xgetbv0() : 0;
  bool os_avx = (xcr0 & 0x6) == 0x6;                 // XMM | YMM
  bool os_avx512 = os_avx && (xcr0 & 0xE0) == 0xE0;  // opmask | ZMM_Hi256 | Hi16_ZMM
  bool os_amx = (xcr0 & 0x60000) == 0x60000;         // XTILECFG | XTILEDATA

  bool avx = bit(r1.c, 28) && os_avx;
  bool avx512f = bit(r7.b, 16) && os_avx512;
  bool amx_tile = bit(r7.d, 24) && os_amx;

  Json& f = id.features;
  f.set("sse4_1", bit(r1.c, 19));
  f.set("sse4_2", bit(r1.c, 20));
  f.set("avx", avx);
  f.set("avx2", avx && bit(r7.b, 5));
  f.set("fma", avx && bit(r1.c, 12));
  f.set("f16c", avx && bit(r1.c, 29));
  f.set("avx512f", avx512f);
  f.set("avx512bw", avx512f && bit(r7.b, 30));
  f.set("avx512vl", avx512f && bit(r7.b, 31));
  f.set("avx512_vnni", avx512f && bit(r7.c, 11));
  f.set("avx512_bf16", avx512f && bit(r71.a, 5));
  f.set("avx512_fp16", avx512f && bit(r7.d, 23));
  f.set("avx_vnni", avx && bit(r71.a, 4));
  f.set("amx", amx_tile);
  f.set("amx_int8", amx_tile && bit(r7.d, 25));
  f.set("amx_bf16", amx_tile && bit(r7.d, 22));

  id.fp16_arith = f.find("avx512_fp16")->as_bool();
  id.int8_dot = f.find("avx512_vnni")->as_bool() || f.find("avx_vnni")->as_bool();
  return id;
}

}  // namespace detail
}  // namespace fleet

#endif  // x86
