#include "fleet_runtime/json.hpp"

#include <cmath>
#include <cstdio>
#include <cstdlib>

namespace fleet {

Json& Json::set(const std::string& key, Json value) {
  if (type_ != Type::Object) throw JsonError("set() on a non-object");
  for (auto& m : obj_) {
    if (m.first == key) {
      m.second = std::move(value);
      return m.second;
    }
  }
  obj_.emplace_back(key, std::move(value));
  return obj_.back().second;
}

const Json* Json::find(const std::string& key) const {
  for (const auto& m : obj_) {
    if (m.first == key) return &m.second;
  }
  return nullptr;
}

Json& Json::push(Json value) {
  if (type_ != Type::Array) throw JsonError("push() on a non-array");
  arr_.push_back(std::move(value));
  return arr_.back();
}

namespace {

// Length of the valid UTF-8 sequence at s[i], or 0 if it is not valid.
std::size_t utf8_len(const std::string& s, std::size_t i) {
  auto c = static_cast<unsigned char>(s[i]);
  std::size_t n;
  std::uint32_t cp;
  if (c < 0x80) return 1;
  if ((c & 0xE0) == 0xC0) { n = 2; cp = c & 0x1F; }
  else if ((c & 0xF0) == 0xE0) { n = 3; cp = c & 0x0F; }
  else if ((c & 0xF8) == 0xF0) { n = 4; cp = c & 0x07; }
  else return 0;
  if (i + n > s.size()) return 0;
  for (std::size_t k = 1; k < n; ++k) {
    auto cc = static_cast<unsigned char>(s[i + k]);
    if ((cc & 0xC0) != 0x80) return 0;
    cp = (cp << 6) | (cc & 0x3F);
  }
  // Reject overlong forms, surrogates and out-of-range code points.
  if ((n == 2 && cp < 0x80) || (n == 3 && cp < 0x800) || (n == 4 && cp < 0x10000)) return 0;
  if (cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
  return n;
}

// Driver strings are not guaranteed to be UTF-8: invalid bytes become U+FFFD so the
// document always parses.
void dump_string(std::string& out, const std::string& s) {
  out.push_back('"');
  for (std::size_t i = 0; i < s.size();) {
    auto c = static_cast<unsigned char>(s[i]);
    switch (c) {
      case '"': out += "\\\""; ++i; continue;
      case '\\': out += "\\\\"; ++i; continue;
      case '\n': out += "\\n"; ++i; continue;
      case '\r': out += "\\r"; ++i; continue;
      case '\t': out += "\\t"; ++i; continue;
      case '\b': out += "\\b"; ++i; continue;
      case '\f': out += "\\f"; ++i; continue;
      default: break;
    }
    if (c < 0x20 || c == 0x7F) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", c);
      out += buf;
      ++i;
      continue;
    }
    std::size_t n = utf8_len(s, i);
    if (n == 0) {
      out += "\xEF\xBF\xBD";
      ++i;
    } else {
      out.append(s, i, n);
      i += n;
    }
  }
  out.push_back('"');
}

void newline(std::string& out, int indent, int depth) {
  if (indent < 0) return;
  out.push_back('\n');
  out.append(static_cast<std::size_t>(indent) * static_cast<std::size_t>(depth), ' ');
}

}  // namespace

void Json::dump_to(std::string& out, int indent, int depth) const {
  switch (type_) {
    case Type::Null: out += "null"; break;
    case Type::Bool: out += b_ ? "true" : "false"; break;
    case Type::Int: out += std::to_string(i_); break;
    case Type::Double: {
      if (!std::isfinite(d_)) { out += "null"; break; }
      char buf[32];
      std::snprintf(buf, sizeof buf, "%.15g", d_);
      std::string t(buf);
      if (t.find_first_of(".eE") == std::string::npos) t += ".0";
      out += t;
      break;
    }
    case Type::String: dump_string(out, s_); break;
    case Type::Array: {
      if (arr_.empty()) { out += "[]"; break; }
      out.push_back('[');
      for (std::size_t k = 0; k < arr_.size(); ++k) {
        if (k) out.push_back(',');
        newline(out, indent, depth + 1);
        arr_[k].dump_to(out, indent, depth + 1);
      }
      newline(out, indent, depth);
      out.push_back(']');
      break;
    }
    case Type::Object: {
      if (obj_.empty()) { out += "{}"; break; }
      out.push_back('{');
      for (std::size_t k = 0; k < obj_.size(); ++k) {
        if (k) out.push_back(',');
        newline(out, indent, depth + 1);
        dump_string(out, obj_[k].first);
        out += indent < 0 ? ":" : ": ";
        obj_[k].second.dump_to(out, indent, depth + 1);
      }
      newline(out, indent, depth);
      out.push_back('}');
      break;
    }
  }
}

std::string Json::dump(int indent) const {
  std::string out;
  dump_to(out, indent, 0);
  return out;
}

namespace {

class Parser {
 public:
  explicit Parser(const std::string& t) : t_(t) {}

  Json document() {
    Json v = value(0);
    ws();
    if (p_ != t_.size()) fail("trailing characters");
    return v;
  }

 private:
  [[noreturn]] void fail(const char* what) const {
    throw JsonError(std::string("bad JSON at offset ") + std::to_string(p_) + ": " + what);
  }
  void ws() {
    while (p_ < t_.size() && (t_[p_] == ' ' || t_[p_] == '\n' || t_[p_] == '\r' || t_[p_] == '\t')) ++p_;
  }
  bool eat(char c) {
    ws();
    if (p_ < t_.size() && t_[p_] == c) { ++p_; return true; }
    return false;
  }
  void expect(char c) { if (!eat(c)) fail("unexpected character"); }
  bool word(const char* w) {
    std::string s(w);
    if (t_.compare(p_, s.size(), s) == 0) { p_ += s.size(); return true; }
    return false;
  }

  Json value(int depth) {
    if (depth > 64) fail("nested too deep");
    ws();
    if (p_ >= t_.size()) fail("unexpected end");
    char c = t_[p_];
    if (c == '{') {
      ++p_;
      Json o = Json::object();
      if (eat('}')) return o;
      do {
        ws();
        std::string k = string();
        expect(':');
        o.set(k, value(depth + 1));
      } while (eat(','));
      expect('}');
      return o;
    }
    if (c == '[') {
      ++p_;
      Json a = Json::array();
      if (eat(']')) return a;
      do { a.push(value(depth + 1)); } while (eat(','));
      expect(']');
      return a;
    }
    if (c == '"') return Json(string());
    if (word("true")) return Json(true);
    if (word("false")) return Json(false);
    if (word("null")) return Json();
    return number();
  }

  static void put_utf8(std::string& out, std::uint32_t cp) {
    if (cp < 0x80) { out.push_back(static_cast<char>(cp)); }
    else if (cp < 0x800) {
      out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
      out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    } else if (cp < 0x10000) {
      out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
      out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
      out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    } else {
      out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
      out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
      out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
      out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    }
  }

  std::uint32_t hex4() {
    if (p_ + 4 > t_.size()) fail("short \\u escape");
    std::uint32_t v = 0;
    for (int k = 0; k < 4; ++k) {
      char h = t_[p_++];
      v <<= 4;
      if (h >= '0' && h <= '9') v |= static_cast<std::uint32_t>(h - '0');
      else if (h >= 'a' && h <= 'f') v |= static_cast<std::uint32_t>(h - 'a' + 10);
      else if (h >= 'A' && h <= 'F') v |= static_cast<std::uint32_t>(h - 'A' + 10);
      else fail("bad \\u escape");
    }
    return v;
  }

  std::string string() {
    if (p_ >= t_.size() || t_[p_] != '"') fail("expected a string");
    ++p_;
    std::string out;
    while (true) {
      if (p_ >= t_.size()) fail("unterminated string");
      char c = t_[p_++];
      if (c == '"') return out;
      if (c != '\\') { out.push_back(c); continue; }
      if (p_ >= t_.size()) fail("unterminated escape");
      char e = t_[p_++];
      switch (e) {
        case '"': out.push_back('"'); break;
        case '\\': out.push_back('\\'); break;
        case '/': out.push_back('/'); break;
        case 'n': out.push_back('\n'); break;
        case 'r': out.push_back('\r'); break;
        case 't': out.push_back('\t'); break;
        case 'b': out.push_back('\b'); break;
        case 'f': out.push_back('\f'); break;
        case 'u': {
          std::uint32_t cp = hex4();
          if (cp >= 0xD800 && cp <= 0xDBFF && t_.compare(p_, 2, "\\u") == 0) {
            p_ += 2;
            std::uint32_t lo = hex4();
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          }
          put_utf8(out, cp);
          break;
        }
        default: fail("bad escape");
      }
    }
  }

  Json number() {
    std::size_t start = p_;
    bool is_double = false;
    if (p_ < t_.size() && t_[p_] == '-') ++p_;
    while (p_ < t_.size()) {
      char c = t_[p_];
      if (c >= '0' && c <= '9') { ++p_; continue; }
      if (c == '.' || c == 'e' || c == 'E' || c == '+' || c == '-') { is_double = true; ++p_; continue; }
      break;
    }
    if (p_ == start) fail("unexpected character");
    std::string s = t_.substr(start, p_ - start);
    char* end = nullptr;
    if (is_double) {
      double d = std::strtod(s.c_str(), &end);
      if (*end) fail("bad number");
      return Json(d);
    }
    long long v = std::strtoll(s.c_str(), &end, 10);
    if (*end) fail("bad number");
    return Json(v);
  }

  const std::string& t_;
  std::size_t p_ = 0;
};

}  // namespace

Json Json::parse(const std::string& text) { return Parser(text).document(); }

}  // namespace fleet
