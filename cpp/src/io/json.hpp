// io/json.hpp — a small, strict JSON reader for model files.
//
// Used for config.json, the safetensors header and the sharded-checkpoint
// index. It is fed untrusted bytes: every error throws
// pagedrt::Error(InvalidModel) naming `where` (usually the file) and the byte
// offset; nesting deeper than kMaxDepth is an error, not a stack overflow.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace pagedrt::json {

class Value {
 public:
  enum class Type { Null, Bool, Number, String, Array, Object };

  Type type() const { return type_; }
  bool is_null() const { return type_ == Type::Null; }
  bool is_bool() const { return type_ == Type::Bool; }
  bool is_number() const { return type_ == Type::Number; }
  bool is_string() const { return type_ == Type::String; }
  bool is_array() const { return type_ == Type::Array; }
  bool is_object() const { return type_ == Type::Object; }

  // Accessors throw pagedrt::Error(InvalidModel) on a type mismatch; the
  // message names `what` (e.g. "config.json: field 'hidden_size'").
  bool as_bool(const std::string& what) const;
  double as_number(const std::string& what) const;
  int64_t as_int(const std::string& what) const;  // must be integral and fit int64
  const std::string& as_string(const std::string& what) const;
  const std::vector<Value>& as_array(const std::string& what) const;
  const std::vector<std::pair<std::string, Value>>& as_object(const std::string& what) const;

  // Object lookup: nullptr when absent (or when this is not an object).
  // Duplicate keys are rejected at parse time.
  const Value* find(std::string_view key) const;

  // Exact text of a number as written (for integers beyond 2^53, e.g. offsets).
  const std::string& number_text() const { return text_; }

  static Value make_null();
  static Value make_bool(bool b);
  static Value make_number(double v, std::string text);
  static Value make_string(std::string s);
  static Value make_array(std::vector<Value> items);
  static Value make_object(std::vector<std::pair<std::string, Value>> members);

 private:
  Type type_ = Type::Null;
  bool bool_ = false;
  double number_ = 0.0;
  std::string text_;  // string value, or the literal text of a number
  std::vector<Value> array_;
  std::vector<std::pair<std::string, Value>> object_;
};

constexpr int kMaxDepth = 64;

// Parses a whole document (trailing bytes other than whitespace are an error).
Value parse(std::string_view text, const std::string& where);

// Reads and parses a file; a missing or unreadable file is InvalidModel naming it.
Value parse_file(const std::string& path);

}  // namespace pagedrt::json
