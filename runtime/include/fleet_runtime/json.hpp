// A small JSON value: enough to build, print and re-read the probe document.
//
// Why not a library: the core must cross-compile for Android and Apple with nothing but
// the toolchain, and the probe document needs only objects in insertion order (so the
// output is stable and diffable), arrays, strings, integers, doubles, booleans and null.
#pragma once

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace fleet {

class Json {
 public:
  enum class Type { Null, Bool, Int, Double, String, Array, Object };
  using Member = std::pair<std::string, Json>;

  Json() = default;
  Json(std::nullptr_t) {}
  Json(bool b) : type_(Type::Bool), b_(b) {}
  Json(int v) : type_(Type::Int), i_(v) {}
  Json(long v) : type_(Type::Int), i_(v) {}
  Json(long long v) : type_(Type::Int), i_(v) {}
  Json(unsigned v) : type_(Type::Int), i_(v) {}
  Json(unsigned long v) : type_(Type::Int), i_(static_cast<std::int64_t>(v)) {}
  Json(unsigned long long v) : type_(Type::Int), i_(static_cast<std::int64_t>(v)) {}
  Json(double v) : type_(Type::Double), d_(v) {}
  Json(const char* s) : type_(Type::String), s_(s ? s : "") {}
  Json(std::string s) : type_(Type::String), s_(std::move(s)) {}

  static Json array() { Json j; j.type_ = Type::Array; return j; }
  static Json object() { Json j; j.type_ = Type::Object; return j; }

  Type type() const { return type_; }
  bool is_null() const { return type_ == Type::Null; }
  bool is_object() const { return type_ == Type::Object; }
  bool is_array() const { return type_ == Type::Array; }
  bool is_string() const { return type_ == Type::String; }

  bool as_bool() const { return b_; }
  std::int64_t as_int() const { return type_ == Type::Double ? static_cast<std::int64_t>(d_) : i_; }
  double as_double() const { return type_ == Type::Int ? static_cast<double>(i_) : d_; }
  const std::string& as_string() const { return s_; }

  // Object access: set() replaces an existing key (keeping its position) or appends.
  Json& set(const std::string& key, Json value);
  const Json* find(const std::string& key) const;
  const std::vector<Member>& members() const { return obj_; }

  // Array access.
  Json& push(Json value);
  const std::vector<Json>& items() const { return arr_; }
  std::size_t size() const { return type_ == Type::Array ? arr_.size() : obj_.size(); }

  // indent < 0: compact one line; otherwise pretty-printed with that many spaces.
  std::string dump(int indent = -1) const;
  // Parses what dump() prints (and ordinary JSON); throws JsonError on bad input.
  static Json parse(const std::string& text);

 private:
  void dump_to(std::string& out, int indent, int depth) const;

  Type type_ = Type::Null;
  bool b_ = false;
  std::int64_t i_ = 0;
  double d_ = 0.0;
  std::string s_;
  std::vector<Json> arr_;
  std::vector<Member> obj_;
};

class JsonError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace fleet
