#include "util.hpp"

#include <dlfcn.h>
#include <sys/stat.h>

#include <cstdio>
#include <cstdlib>

namespace fleet {
namespace detail {

bool read_text(const std::string& path, std::string& out, std::size_t limit) {
  out.clear();
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) return false;
  char buf[4096];
  std::size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) {
    out.append(buf, n);
    if (out.size() >= limit) break;
  }
  std::fclose(f);
  return true;
}

std::string trim(const std::string& s) {
  const char* ws = " \t\r\n";
  auto a = s.find_first_not_of(ws);
  if (a == std::string::npos) return "";
  auto b = s.find_last_not_of(ws);
  return s.substr(a, b - a + 1);
}

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::string cur;
  for (char c : s) {
    if (c == sep) {
      out.push_back(cur);
      cur.clear();
    } else {
      cur.push_back(c);
    }
  }
  out.push_back(cur);
  return out;
}

bool file_exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

std::string kv_lookup(const std::string& text, const std::string& key, char sep) {
  for (const auto& line : split(text, '\n')) {
    auto pos = line.find(sep);
    if (pos == std::string::npos) continue;
    if (trim(line.substr(0, pos)) == key) return trim(line.substr(pos + 1));
  }
  return "";
}

std::vector<int> parse_cpu_list(const std::string& s) {
  std::vector<int> out;
  for (const auto& part : split(trim(s), ',')) {
    if (part.empty()) continue;
    auto dash = part.find('-');
    char* end = nullptr;
    long a = std::strtol(part.c_str(), &end, 10);
    long b = a;
    if (dash != std::string::npos) b = std::strtol(part.c_str() + dash + 1, &end, 10);
    if (a < 0 || b < a || b - a > 4096) continue;
    for (long k = a; k <= b; ++k) out.push_back(static_cast<int>(k));
  }
  return out;
}

std::string getenv_str(const char* name) {
  const char* v = std::getenv(name);
  return v ? std::string(v) : std::string();
}

Library::Library(const std::vector<std::string>& names, bool global) {
  std::string errors;
  for (const auto& name : names) {
    dlerror();
    void* h = dlopen(name.c_str(), RTLD_NOW | (global ? RTLD_GLOBAL : RTLD_LOCAL));
    if (h) {
      handle_ = h;
      path_ = name;
      return;
    }
    const char* e = dlerror();
    if (!errors.empty()) errors += "; ";
    errors += e ? e : (name + ": cannot load");
  }
  error_ = errors;
}

Library::~Library() {
  // Deliberately not dlclose()d: several GPU drivers register atexit handlers or
  // threads that crash when their library is unloaded first.
}

void* Library::symbol(const char* name) const {
  if (!handle_) return nullptr;
  return dlsym(handle_, name);
}

}  // namespace detail
}  // namespace fleet
