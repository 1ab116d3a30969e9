// Small internal helpers shared by the probe sections (not part of the public API).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace fleet {
namespace detail {

// Whole file as text; empty optional-like result via the bool.
bool read_text(const std::string& path, std::string& out, std::size_t limit = 1 << 20);
std::string trim(const std::string& s);
std::vector<std::string> split(const std::string& s, char sep);
bool file_exists(const std::string& path);
// "key: value" / "key=value" style files: first value of `key` (trimmed), or "".
std::string kv_lookup(const std::string& text, const std::string& key, char sep);
// Parses a kernel CPU list such as "0-3,6,8-9".
std::vector<int> parse_cpu_list(const std::string& s);
std::string getenv_str(const char* name);

// dlopen of the first library in `names` that loads. The handle stays open for the life
// of the object; `tried` records each name with dlerror() for the report.
class Library {
 public:
  explicit Library(const std::vector<std::string>& names, bool global = false);
  ~Library();
  Library(const Library&) = delete;
  Library& operator=(const Library&) = delete;

  bool loaded() const { return handle_ != nullptr; }
  const std::string& path() const { return path_; }
  const std::string& error() const { return error_; }
  void* symbol(const char* name) const;
  template <typename F>
  F fn(const char* name) const { return reinterpret_cast<F>(symbol(name)); }

 private:
  void* handle_ = nullptr;
  std::string path_;
  std::string error_;
};

}  // namespace detail
}  // namespace fleet
