#include "core/json.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <cstdlib>

#include "core/error.h"

namespace helix {
namespace {

const char* type_name(const Json& j) {
  if (j.is_null()) return "null";
  if (j.is_bool()) return "bool";
  if (j.is_number()) return "number";
  if (j.is_string()) return "string";
  if (j.is_array()) return "array";
  return "object";
}

class Parser {
 public:
  Parser(std::string_view s, std::string_view what) : s_(s), what_(what) {}

  Json parse_document() {
    Json v = value(0);
    ws();
    if (i_ != s_.size()) fail("trailing characters after the JSON value");
    return v;
  }

 private:
  [[noreturn]] void fail(const std::string& msg) {
    HELIX_FAIL("{}: malformed JSON at byte {}: {}", what_, i_, msg);
  }
  void ws() {
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\n' || s_[i_] == '\r' || s_[i_] == '\t')) ++i_;
  }
  char peek() {
    ws();
    if (i_ >= s_.size()) fail("unexpected end of input");
    return s_[i_];
  }
  void expect(char c) {
    if (peek() != c) fail(std::string("expected '") + c + "', got '" + s_[i_] + "'");
    ++i_;
  }
  bool literal(std::string_view w) {
    if (s_.substr(i_, w.size()) == w) {
      i_ += w.size();
      return true;
    }
    return false;
  }

  Json value(int depth) {
    if (depth > 64) fail("nesting deeper than 64");
    const char c = peek();
    if (c == '{') return object(depth);
    if (c == '[') return array(depth);
    if (c == '"') return Json(string());
    if (literal("true")) return Json(true);
    if (literal("false")) return Json(false);
    if (literal("null")) return Json();
    if (c == '-' || (c >= '0' && c <= '9')) return number();
    fail(std::string("unexpected character '") + c + "'");
  }

  Json object(int depth) {
    expect('{');
    Json::Object o;
    if (peek() == '}') {
      ++i_;
      return Json(std::move(o));
    }
    while (true) {
      if (peek() != '"') fail("expected a string key");
      std::string k = string();
      expect(':');
      o[k] = value(depth + 1);
      if (peek() == ',') {
        ++i_;
        continue;
      }
      expect('}');
      return Json(std::move(o));
    }
  }

  Json array(int depth) {
    expect('[');
    Json::Array a;
    if (peek() == ']') {
      ++i_;
      return Json(std::move(a));
    }
    while (true) {
      a.push_back(value(depth + 1));
      if (peek() == ',') {
        ++i_;
        continue;
      }
      expect(']');
      return Json(std::move(a));
    }
  }

  static void append_utf8(std::string& out, uint32_t cp) {
    if (cp < 0x80) {
      out += static_cast<char>(cp);
    } else if (cp < 0x800) {
      out += static_cast<char>(0xC0 | (cp >> 6));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += static_cast<char>(0xE0 | (cp >> 12));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (cp >> 18));
      out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    }
  }

  uint32_t hex4() {
    if (i_ + 4 > s_.size()) fail("truncated \\u escape");
    uint32_t v = 0;
    for (int k = 0; k < 4; ++k) {
      const char h = s_[i_++];
      v <<= 4;
      if (h >= '0' && h <= '9') v |= h - '0';
      else if (h >= 'a' && h <= 'f') v |= h - 'a' + 10;
      else if (h >= 'A' && h <= 'F') v |= h - 'A' + 10;
      else fail("bad hex digit in \\u escape");
    }
    return v;
  }

  std::string string() {
    expect('"');
    std::string out;
    while (true) {
      if (i_ >= s_.size()) fail("unterminated string");
      const char c = s_[i_++];
      if (c == '"') return out;
      if (static_cast<unsigned char>(c) < 0x20) fail("control character in string");
      if (c != '\\') {
        out += c;
        continue;
      }
      if (i_ >= s_.size()) fail("unterminated escape");
      const char e = s_[i_++];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          uint32_t cp = hex4();
          if (cp >= 0xD800 && cp < 0xDC00 && s_.substr(i_, 2) == "\\u") {
            i_ += 2;
            const uint32_t lo = hex4();
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          }
          append_utf8(out, cp);
          break;
        }
        default: fail(std::string("unknown escape \\") + e);
      }
    }
  }

  Json number() {
    const size_t start = i_;
    if (s_[i_] == '-') ++i_;
    bool is_float = false;
    while (i_ < s_.size()) {
      const char c = s_[i_];
      if (c >= '0' && c <= '9') {
        ++i_;
      } else if (c == '.' || c == 'e' || c == 'E' || c == '+' || c == '-') {
        is_float = true;
        ++i_;
      } else {
        break;
      }
    }
    const std::string tok(s_.substr(start, i_ - start));
    char* end = nullptr;
    if (!is_float) {
      errno = 0;
      const long long v = std::strtoll(tok.c_str(), &end, 10);
      if (end == tok.c_str() + tok.size() && errno == 0) return Json(static_cast<int64_t>(v));
    }
    const double d = std::strtod(tok.c_str(), &end);
    if (end != tok.c_str() + tok.size()) fail("bad number '" + tok + "'");
    return Json(d);
  }

  std::string_view s_;
  std::string_view what_;
  size_t i_ = 0;
};

void dump_string(std::string& out, const std::string& s) {
  out += '"';
  for (const char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
        } else {
          out += c;
        }
    }
  }
  out += '"';
}

}  // namespace

bool Json::as_bool(std::string_view what) const {
  HELIX_CHECK(is_bool(), "{}: expected a bool, got {}", what, type_name(*this));
  return std::get<bool>(v_);
}
int64_t Json::as_int(std::string_view what) const {
  if (v_.index() == 3) {
    const double d = std::get<double>(v_);
    HELIX_CHECK(d == std::floor(d), "{}: expected an integer, got {}", what, d);
    return static_cast<int64_t>(d);
  }
  HELIX_CHECK(is_int(), "{}: expected an integer, got {}", what, type_name(*this));
  return std::get<int64_t>(v_);
}
double Json::as_double(std::string_view what) const {
  HELIX_CHECK(is_number(), "{}: expected a number, got {}", what, type_name(*this));
  return is_int() ? static_cast<double>(std::get<int64_t>(v_)) : std::get<double>(v_);
}
const std::string& Json::as_string(std::string_view what) const {
  HELIX_CHECK(is_string(), "{}: expected a string, got {}", what, type_name(*this));
  return std::get<std::string>(v_);
}
const Json::Array& Json::as_array(std::string_view what) const {
  HELIX_CHECK(is_array(), "{}: expected an array, got {}", what, type_name(*this));
  return *std::get<std::shared_ptr<Array>>(v_);
}
const Json::Object& Json::as_object(std::string_view what) const {
  HELIX_CHECK(is_object(), "{}: expected an object, got {}", what, type_name(*this));
  return *std::get<std::shared_ptr<Object>>(v_);
}
Json::Array& Json::mutable_array() {
  if (is_null()) v_ = std::make_shared<Array>();
  HELIX_CHECK(is_array(), "expected a JSON array, got {}", type_name(*this));
  return *std::get<std::shared_ptr<Array>>(v_);
}
Json::Object& Json::mutable_object() {
  if (is_null()) v_ = std::make_shared<Object>();
  HELIX_CHECK(is_object(), "expected a JSON object, got {}", type_name(*this));
  return *std::get<std::shared_ptr<Object>>(v_);
}
bool Json::has(const std::string& key) const { return is_object() && as_object().count(key) > 0; }
const Json& Json::at(const std::string& key, std::string_view what) const {
  const Object& o = as_object(what);
  auto it = o.find(key);
  HELIX_CHECK(it != o.end(), "{}: missing key '{}'", what, key);
  return it->second;
}
Json& Json::operator[](const std::string& key) { return mutable_object()[key]; }

Json Json::parse(std::string_view text, std::string_view what) { return Parser(text, what).parse_document(); }

std::string Json::dump(int indent) const {
  std::string out;
  dump_to(out, indent, 0);
  return out;
}

void Json::dump_to(std::string& out, int indent, int depth) const {
  const auto newline = [&](int d) {
    if (indent < 0) return;
    out += '\n';
    out.append(static_cast<size_t>(indent * d), ' ');
  };
  switch (v_.index()) {
    case 0: out += "null"; break;
    case 1: out += std::get<bool>(v_) ? "true" : "false"; break;
    case 2: out += std::to_string(std::get<int64_t>(v_)); break;
    case 3: {
      const double d = std::get<double>(v_);
      HELIX_CHECK(std::isfinite(d), "JSON cannot hold the non-finite number {}", d);
      // Shortest form that reads back to the same double, always with a '.' or an exponent, so a
      // double stays a double for strict readers (transformers' config classes refuse 0 for 0.0).
      char buf[40];
      for (int digits = 15; digits <= 17; ++digits) {
        std::snprintf(buf, sizeof buf, "%.*g", digits, d);
        if (std::strtod(buf, nullptr) == d) break;
      }
      out += buf;
      if (std::strpbrk(buf, ".eE") == nullptr) out += ".0";
      break;
    }
    case 4: dump_string(out, std::get<std::string>(v_)); break;
    case 5: {
      const Array& a = as_array();
      out += '[';
      for (size_t k = 0; k < a.size(); ++k) {
        if (k) out += indent < 0 ? "," : ",";
        newline(depth + 1);
        a[k].dump_to(out, indent, depth + 1);
      }
      if (!a.empty()) newline(depth);
      out += ']';
      break;
    }
    default: {
      const Object& o = as_object();
      out += '{';
      size_t k = 0;
      for (const auto& [key, val] : o) {
        if (k++) out += ',';
        newline(depth + 1);
        dump_string(out, key);
        out += indent < 0 ? ":" : ": ";
        val.dump_to(out, indent, depth + 1);
      }
      if (!o.empty()) newline(depth);
      out += '}';
    }
  }
}

}  // namespace helix
