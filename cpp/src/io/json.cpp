// io/json.cpp — a strict RFC 8259 reader (see json.hpp).
//
// Recursive descent over a string_view. The input is untrusted: every check
// throws Error(InvalidModel) "<where>: invalid JSON at byte <offset>: <what>",
// recursion is bounded by kMaxDepth, and strings must be valid UTF-8.
#include "io/json.hpp"

#include "io/file.hpp"


#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstring>

#include "pagedrt/error.hpp"

namespace pagedrt::json {
namespace {

[[noreturn]] void fail(const std::string& msg) { throw Error(ErrorKind::InvalidModel, msg); }

const char* type_name(Value::Type t) {
  switch (t) {
    case Value::Type::Null: return "null";
    case Value::Type::Bool: return "a boolean";
    case Value::Type::Number: return "a number";
    case Value::Type::String: return "a string";
    case Value::Type::Array: return "an array";
    case Value::Type::Object: return "an object";
  }
  return "an unknown value";
}

// Printable rendering of one input byte for messages.
std::string show_byte(unsigned char c) {
  if (c >= 0x20 && c < 0x7f) return std::string("'") + static_cast<char>(c) + "'";
  static const char* hex = "0123456789abcdef";
  return std::string("byte 0x") + hex[c >> 4] + hex[c & 15];
}

void append_utf8(std::string& out, uint32_t cp) {
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

// For a grammatical number that from_chars found out of range: true when its
// decimal exponent is positive (overflow), false when negative (underflow).
bool too_large(std::string_view text) {
  const size_t e = text.find_first_of("eE");
  const std::string_view mant = text.substr(0, e);
  const size_t dot = std::min(mant.find('.'), mant.size());
  // Position of the first nonzero digit relative to the decimal point.
  int64_t mag = 0;
  for (size_t i = 0; i < mant.size(); ++i) {
    if (mant[i] < '1' || mant[i] > '9') continue;
    mag = i < dot ? static_cast<int64_t>(dot - i) : -static_cast<int64_t>(i - dot);
    break;
  }
  int64_t exp = 0;  // saturates: any |exp| past 1e9 decides the sign alone
  if (e != std::string_view::npos) {
    size_t i = e + 1;
    const bool neg = i < text.size() && text[i] == '-';
    if (i < text.size() && (text[i] == '+' || text[i] == '-')) ++i;
    for (; i < text.size(); ++i) exp = std::min<int64_t>(exp * 10 + (text[i] - '0'), 1000000000);
    if (neg) exp = -exp;
  }
  return mag + exp > 0;
}

class Parser {
 public:
  Parser(std::string_view text, const std::string& where) : s_(text), where_(where) {}

  Value document() {
    skip_ws();
    Value v = value(0);
    skip_ws();
    if (pos_ != s_.size()) error("unexpected " + show_byte(peek()) + " after the document");
    return v;
  }

 private:
  [[noreturn]] void error(const std::string& what) const { error_at(pos_, what); }
  [[noreturn]] void error_at(size_t at, const std::string& what) const {
    fail(where_ + ": invalid JSON at byte " + std::to_string(at) + ": " + what);
  }

  bool at_end() const { return pos_ >= s_.size(); }
  unsigned char peek() const { return static_cast<unsigned char>(s_[pos_]); }

  void skip_ws() {
    while (!at_end() && (peek() == ' ' || peek() == '\t' || peek() == '\n' || peek() == '\r')) ++pos_;
  }

  void expect(char c, const char* context) {
    if (at_end()) error(std::string("unexpected end of input, expected '") + c + "' " + context);
    if (peek() != static_cast<unsigned char>(c))
      error(std::string("expected '") + c + "' " + context + ", found " + show_byte(peek()));
    ++pos_;
  }

  Value value(int depth) {
    if (at_end()) error("unexpected end of input, expected a value");
    const unsigned char c = peek();
    if (c == '{') return object(depth + 1);
    if (c == '[') return array(depth + 1);
    if (c == '"') return Value::make_string(string());
    if (c == '-' || (c >= '0' && c <= '9')) return number();
    if (c == 't') return literal("true", Value::make_bool(true));
    if (c == 'f') return literal("false", Value::make_bool(false));
    if (c == 'n') return literal("null", Value::make_null());
    error("unexpected " + show_byte(c) + ", expected a value");
  }

  Value literal(std::string_view word, Value v) {
    if (s_.substr(pos_, word.size()) != word) error("invalid literal, expected '" + std::string(word) + "'");
    pos_ += word.size();
    return v;
  }

  void check_depth(int depth) const {
    if (depth > kMaxDepth) error("nesting deeper than " + std::to_string(kMaxDepth) + " levels");
  }

  Value array(int depth) {
    check_depth(depth);
    ++pos_;  // '['
    std::vector<Value> items;
    skip_ws();
    if (!at_end() && peek() == ']') { ++pos_; return Value::make_array(std::move(items)); }
    for (;;) {
      skip_ws();
      items.push_back(value(depth));
      skip_ws();
      if (!at_end() && peek() == ']') { ++pos_; break; }
      expect(',', "or ']' in array");
    }
    return Value::make_array(std::move(items));
  }

  Value object(int depth) {
    check_depth(depth);
    const size_t start = pos_;
    ++pos_;  // '{'
    std::vector<std::pair<std::string, Value>> members;
    skip_ws();
    if (!at_end() && peek() == '}') { ++pos_; return Value::make_object(std::move(members)); }
    for (;;) {
      skip_ws();
      if (at_end() || peek() != '"') {
        if (at_end()) error("unexpected end of input, expected an object key");
        error("expected a string key, found " + show_byte(peek()));
      }
      std::string key = string();
      skip_ws();
      expect(':', "after object key");
      skip_ws();
      members.emplace_back(std::move(key), value(depth));
      skip_ws();
      if (!at_end() && peek() == '}') { ++pos_; break; }
      expect(',', "or '}' in object");
    }
    reject_duplicates(members, start);
    return Value::make_object(std::move(members));
  }

  // O(n log n): headers of big checkpoints hold tens of thousands of keys.
  void reject_duplicates(const std::vector<std::pair<std::string, Value>>& members, size_t start) const {
    std::vector<std::string_view> keys;
    keys.reserve(members.size());
    for (const auto& m : members) keys.emplace_back(m.first);
    std::sort(keys.begin(), keys.end());
    auto dup = std::adjacent_find(keys.begin(), keys.end());
    if (dup != keys.end()) error_at(start, "duplicate key '" + std::string(*dup) + "' in the object starting here");
  }

  Value number() {
    const size_t start = pos_;
    auto digits = [&] {
      const size_t from = pos_;
      while (!at_end() && peek() >= '0' && peek() <= '9') ++pos_;
      return pos_ - from;
    };
    if (peek() == '-') ++pos_;
    if (at_end() || !(peek() >= '0' && peek() <= '9')) error("expected a digit in number");
    if (peek() == '0') {
      ++pos_;
      if (!at_end() && peek() >= '0' && peek() <= '9') error("leading zero in number");
    } else {
      digits();
    }
    if (!at_end() && peek() == '.') {
      ++pos_;
      if (digits() == 0) error("expected a digit after '.' in number");
    }
    if (!at_end() && (peek() == 'e' || peek() == 'E')) {
      ++pos_;
      if (!at_end() && (peek() == '+' || peek() == '-')) ++pos_;
      if (digits() == 0) error("expected a digit in the exponent of number");
    }
    std::string text(s_.substr(start, pos_ - start));
    double v = 0.0;
    auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
    if (ec == std::errc::result_out_of_range) {
      // Tiny magnitudes round to zero; huge ones are an error rather than inf.
      if (too_large(text)) error_at(start, "number " + text + " is too large for a double");
      v = text[0] == '-' ? -0.0 : 0.0;
    } else if (ec != std::errc() || end != text.data() + text.size()) {
      error_at(start, "malformed number " + text);
    }
    return Value::make_number(v, std::move(text));
  }

  uint32_t hex4() {
    if (s_.size() - pos_ < 4) error("unexpected end of input in \\u escape");
    uint32_t cp = 0;
    for (int i = 0; i < 4; ++i) {
      const unsigned char c = peek();
      uint32_t d;
      if (c >= '0' && c <= '9') d = c - '0';
      else if (c >= 'a' && c <= 'f') d = c - 'a' + 10;
      else if (c >= 'A' && c <= 'F') d = c - 'A' + 10;
      else error("invalid hex digit " + show_byte(c) + " in \\u escape");
      cp = cp * 16 + d;
      ++pos_;
    }
    return cp;
  }

  void escape(std::string& out) {
    const size_t start = pos_;
    ++pos_;  // '\'
    if (at_end()) error("unexpected end of input in escape");
    const unsigned char c = peek();
    ++pos_;
    switch (c) {
      case '"': out += '"'; return;
      case '\\': out += '\\'; return;
      case '/': out += '/'; return;
      case 'b': out += '\b'; return;
      case 'f': out += '\f'; return;
      case 'n': out += '\n'; return;
      case 'r': out += '\r'; return;
      case 't': out += '\t'; return;
      case 'u': break;
      default: error_at(start, "invalid escape '\\" + std::string(1, static_cast<char>(c)) + "'");
    }
    uint32_t cp = hex4();
    if (cp >= 0xDC00 && cp <= 0xDFFF) error_at(start, "unpaired low surrogate in \\u escape");
    if (cp >= 0xD800 && cp <= 0xDBFF) {
      if (s_.substr(pos_, 2) != "\\u") error_at(start, "high surrogate not followed by a \\u low surrogate");
      pos_ += 2;
      const uint32_t lo = hex4();
      if (lo < 0xDC00 || lo > 0xDFFF) error_at(start, "high surrogate not followed by a low surrogate");
      cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
    }
    append_utf8(out, cp);
  }

  // One raw UTF-8 sequence (lead byte >= 0x80), validated and copied.
  void utf8(std::string& out) {
    const size_t start = pos_;
    const unsigned char c = peek();
    size_t len;
    uint32_t cp;
    if (c >= 0xC2 && c <= 0xDF) { len = 2; cp = c & 0x1F; }
    else if (c >= 0xE0 && c <= 0xEF) { len = 3; cp = c & 0x0F; }
    else if (c >= 0xF0 && c <= 0xF4) { len = 4; cp = c & 0x07; }
    else error("invalid UTF-8 lead " + show_byte(c) + " in string");
    if (s_.size() - pos_ < len) error("truncated UTF-8 sequence in string");
    for (size_t i = 1; i < len; ++i) {
      const unsigned char k = static_cast<unsigned char>(s_[pos_ + i]);
      if ((k & 0xC0) != 0x80) error_at(pos_ + i, "invalid UTF-8 continuation " + show_byte(k) + " in string");
      cp = (cp << 6) | (k & 0x3F);
    }
    const uint32_t min = len == 2 ? 0x80 : len == 3 ? 0x800 : 0x10000;
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
      error_at(start, "invalid UTF-8 sequence (overlong, surrogate or above U+10FFFF) in string");
    out.append(s_.substr(pos_, len));
    pos_ += len;
  }

  std::string string() {
    const size_t start = pos_;
    ++pos_;  // '"'
    std::string out;
    for (;;) {
      if (at_end()) error_at(start, "unterminated string");
      const unsigned char c = peek();
      if (c == '"') { ++pos_; return out; }
      if (c == '\\') { escape(out); continue; }
      if (c < 0x20) error("unescaped control character " + show_byte(c) + " in string");
      if (c >= 0x80) { utf8(out); continue; }
      out += static_cast<char>(c);
      ++pos_;
    }
  }

  std::string_view s_;
  const std::string& where_;
  size_t pos_ = 0;
};

[[noreturn]] void mismatch(const std::string& what, const char* want, Value::Type got) {
  fail(what + " must be " + want + ", got " + type_name(got));
}

// Exact parse of an optional '-' followed by digits; false if not that form or out of int64.
bool exact_int(const std::string& text, int64_t& out) {
  if (text.empty() || text.find_first_of(".eE") != std::string::npos) return false;
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), out);
  return ec == std::errc() && end == text.data() + text.size();
}

}  // namespace

bool Value::as_bool(const std::string& what) const {
  if (type_ != Type::Bool) mismatch(what, "a boolean", type_);
  return bool_;
}

double Value::as_number(const std::string& what) const {
  if (type_ != Type::Number) mismatch(what, "a number", type_);
  return number_;
}

int64_t Value::as_int(const std::string& what) const {
  if (type_ != Type::Number) mismatch(what, "an integer", type_);
  int64_t v = 0;
  if (exact_int(text_, v)) return v;
  // Written with a fraction or exponent (e.g. 2048.0, 1e3): accept when integral.
  const bool integral = std::isfinite(number_) && std::trunc(number_) == number_;
  if (integral && number_ >= -9223372036854775808.0 && number_ < 9223372036854775808.0)
    return static_cast<int64_t>(number_);
  fail(what + " must be an integer that fits in 64 bits, got " + text_);
}

const std::string& Value::as_string(const std::string& what) const {
  if (type_ != Type::String) mismatch(what, "a string", type_);
  return text_;
}

const std::vector<Value>& Value::as_array(const std::string& what) const {
  if (type_ != Type::Array) mismatch(what, "an array", type_);
  return array_;
}

const std::vector<std::pair<std::string, Value>>& Value::as_object(const std::string& what) const {
  if (type_ != Type::Object) mismatch(what, "an object", type_);
  return object_;
}

const Value* Value::find(std::string_view key) const {
  if (type_ != Type::Object) return nullptr;
  for (const auto& m : object_)
    if (m.first == key) return &m.second;
  return nullptr;
}

Value Value::make_null() { return Value(); }

Value Value::make_bool(bool b) {
  Value v;
  v.type_ = Type::Bool;
  v.bool_ = b;
  return v;
}

Value Value::make_number(double x, std::string text) {
  Value v;
  v.type_ = Type::Number;
  v.number_ = x;
  v.text_ = std::move(text);
  return v;
}

Value Value::make_string(std::string s) {
  Value v;
  v.type_ = Type::String;
  v.text_ = std::move(s);
  return v;
}

Value Value::make_array(std::vector<Value> items) {
  Value v;
  v.type_ = Type::Array;
  v.array_ = std::move(items);
  return v;
}

Value Value::make_object(std::vector<std::pair<std::string, Value>> members) {
  Value v;
  v.type_ = Type::Object;
  v.object_ = std::move(members);
  return v;
}

Value parse(std::string_view text, const std::string& where) { return Parser(text, where).document(); }

Value parse_file(const std::string& path) { return parse(RegularFile(path).read_all(), path); }

}  // namespace pagedrt::json
