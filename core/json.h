#pragma once
// A small JSON value with a strict parser and a writer: enough for safetensors headers, checkpoint
// metadata and Hugging Face config.json files. Numbers keep their integer value when they have one
// (tensor offsets exceed 2^53 never in practice, but int64 is kept exact anyway).
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

namespace helix {

class Json {
 public:
  using Array = std::vector<Json>;
  using Object = std::map<std::string, Json>;

  Json() = default;  // null
  Json(bool b) : v_(b) {}
  Json(int v) : v_(static_cast<int64_t>(v)) {}
  Json(int64_t v) : v_(v) {}
  Json(uint64_t v) : v_(static_cast<int64_t>(v)) {}
  Json(double v) : v_(v) {}
  Json(const char* s) : v_(std::string(s)) {}
  Json(std::string s) : v_(std::move(s)) {}
  Json(Array a) : v_(std::make_shared<Array>(std::move(a))) {}
  Json(Object o) : v_(std::make_shared<Object>(std::move(o))) {}

  bool is_null() const { return v_.index() == 0; }
  bool is_bool() const { return v_.index() == 1; }
  bool is_int() const { return v_.index() == 2; }
  bool is_number() const { return v_.index() == 2 || v_.index() == 3; }
  bool is_string() const { return v_.index() == 4; }
  bool is_array() const { return v_.index() == 5; }
  bool is_object() const { return v_.index() == 6; }

  // Accessors throw helix::Error naming `what` (e.g. the file) when the type does not match.
  bool as_bool(std::string_view what = "") const;
  int64_t as_int(std::string_view what = "") const;
  double as_double(std::string_view what = "") const;
  const std::string& as_string(std::string_view what = "") const;
  const Array& as_array(std::string_view what = "") const;
  const Object& as_object(std::string_view what = "") const;
  Array& mutable_array();
  Object& mutable_object();

  bool has(const std::string& key) const;
  const Json& at(const std::string& key, std::string_view what = "") const;
  Json& operator[](const std::string& key);  // object access, creating the key (and the object)

  // Throws helix::Error with the byte offset and `what` on malformed input.
  static Json parse(std::string_view text, std::string_view what = "json");
  std::string dump(int indent = -1) const;  // -1: compact

 private:
  void dump_to(std::string& out, int indent, int depth) const;
  std::variant<std::monostate, bool, int64_t, double, std::string, std::shared_ptr<Array>,
               std::shared_ptr<Object>>
      v_;
};

}  // namespace helix
