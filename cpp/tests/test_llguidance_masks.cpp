// test_llguidance_masks.cpp — structured output from C++ (pagedrt/llguidance_masks.hpp):
// a Runtime whose masked requests follow regexes and Lark grammars given to
// LlguidanceMasks, greedy (checked picks) and sampled, n = 2, a pool of mask
// threads; request ids reused after their final event; the errors.
//
// Needs a model folder in PAGEDRT_TEST_MODEL (a tiny random Llama) and
// llguidance's C API in PAGEDRT_TEST_LLGUIDANCE; exits 77 (skipped) without
// them. tests/test_cpp.py gives it the Python wheel's llguidance/_lib.abi3.so,
// which needs libpython's symbols: PAGEDRT_TEST_LIBPYTHON is opened first
// (globally) where set. A C++ service would use a libllguidance.so built from
// the crate instead.
#include <dlfcn.h>

#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <regex>
#include <string>
#include <vector>

#include "check.hpp"
#include "pagedrt/pagedrt.hpp"

using namespace pagedrt;

namespace {

std::string g_model, g_library;

// A made-up vocabulary over the model's ids: the eos token is special, ids 3…97
// are the printable ASCII characters, and the rest spell "ab" and longer runs
// of a and b (several tokens spell one text, as in a real vocabulary).
LlguidanceTokenizer tokenizer(int64_t vocab, int32_t eos) {
  LlguidanceTokenizer t;
  t.vocab = vocab;
  t.eos = eos;
  for (int64_t i = 0; i < vocab; ++i) {
    if (i == eos) t.tokens.push_back("\xff<eos>");
    else if (i >= 3 && i < 98) t.tokens.push_back(std::string(1, static_cast<char>(' ' + (i - 3))));
    else if (i >= 98) t.tokens.push_back(std::string(static_cast<size_t>(2 + i % 3), i % 2 ? 'a' : 'b'));
    else t.tokens.push_back("\xff<s" + std::to_string(i) + ">");
  }
  return t;
}

// The text of every sequence of a request, and how each ended.
struct Answer {
  std::map<int32_t, std::string> text;
  std::map<int32_t, FinishReason> reason;
};

Answer collect(Runtime& rt, const std::string& id, const LlguidanceTokenizer& tok) {
  Answer a;
  for (bool done = false; !done;) {
    for (const Event& ev : rt.poll(id, 5.0)) {
      for (int32_t t : ev.token_ids)
        if (t != tok.eos) a.text[ev.index] += tok.tokens[static_cast<size_t>(t)];
      if (ev.finished) a.reason[ev.index] = ev.finish_reason;
      done = done || ev.request_finished;
    }
  }
  return a;
}

SamplingParams masked(float temperature, uint64_t seed, int n = 1) {
  SamplingParams p;
  p.masked = true;
  p.temperature = temperature;
  p.has_seed = true;
  p.seed = seed;
  p.n = n;
  p.max_tokens = 24;
  return p;
}

void test_requests_follow_their_constraints(int threads) {
  RuntimeConfig c;
  c.model_path = g_model;
  c.device = "cpu";
  c.num_threads = 2;
  Runtime rt(c);
  const ModelInfo info = rt.model_info();
  const LlguidanceTokenizer tok = tokenizer(info.vocab_size, info.eos_token_ids.at(0));
  auto masks = std::make_shared<LlguidanceMasks>(g_library, tok, threads);
  rt.set_token_mask_provider(masks);
  struct Case {
    std::string kind, data, pattern;  // pattern: what every answer must match
  };
  const std::vector<Case> cases = {
      {"regex", "[ab]{2,6}", "[ab]{2,6}"},
      {"regex", "x=[0-9]{1,3};", "x=[0-9]{1,3};"},
      {"lark", "start: \"yes\" | \"no\" | \"maybe so\"", "yes|no|maybe so"},
      {"regex", "(ab){1,3}!", "(ab){1,3}!"},
  };
  // Round 0 greedy only (its steps' picks are checked against the grammar
  // from each sequence's second token on), round 1 sampled, with n = 2 for
  // some; the same ids again (released before their final events). Round 2:
  // round 0 with speculative n-grams (each verify row masked after the
  // proposals before it; the proposals the grammar refuses not taken): the
  // same answers.
  std::vector<std::string> greedy(cases.size());
  for (int round = 0; round < 3; ++round) {
    std::vector<std::string> ids;
    for (size_t i = 0; i < cases.size(); ++i) {
      const std::string id = "c" + std::to_string(i);
      masks->add(id, cases[i].kind, cases[i].data);
      SamplingParams p = round == 1 ? masked(1.0f, 7 * i, i % 2 ? 2 : 1) : masked(0.0f, 0);
      if (round == 2) {
        p.speculative = "ngram";
        p.ngram_min = 1;
      }
      ids.push_back(rt.submit({5, 6, 7, static_cast<int32_t>(8 + i)}, p, id, Delivery::ById));
    }
    for (size_t i = 0; i < ids.size(); ++i) {
      const Answer a = collect(rt, ids[i], tok);
      if (round == 0) greedy[i] = a.text.at(0);
      if (round == 2) CHECK(a.text.at(0) == greedy[i]);
      CHECK(!a.text.empty());
      for (const auto& [index, text] : a.text) {
        const bool ok = std::regex_match(text, std::regex(cases[i].pattern));
        if (!ok) std::fprintf(stderr, "case %zu sequence %d: '%s'\n", i, index, text.c_str());
        CHECK(ok);
        CHECK(a.reason.at(index) == FinishReason::Stop);
      }
    }
  }
  const LlguidanceMasks::Counters k = masks->counters();
  CHECK(k.compiles == static_cast<int64_t>(cases.size()));  // the later rounds found them compiled
  CHECK(k.compile_hits == 2 * static_cast<int64_t>(cases.size()));
  CHECK(rt.stats().spec_proposed > 0);
  CHECK(k.validate_rows > 0);  // round 0's picks were checked
  CHECK(k.fill_rows > 0);
  rt.close();
}

void test_errors() {
  LlguidanceTokenizer tok = tokenizer(128, 2);
  CHECK_THROWS(LlguidanceMasks("/no/such/libllguidance.so", tok, 0), ErrorKind::Unsupported,
               "/no/such/libllguidance.so");
  LlguidanceMasks masks(g_library, tok, 0);
  CHECK(masks.version().find("llguidance") != std::string::npos);
  CHECK_THROWS(masks.add("r", "regex", "[0-9"), ErrorKind::InvalidArgument, "regex");
  CHECK_THROWS(masks.add("r", "json_schema", "{\"type\": \"nope\"}"), ErrorKind::InvalidArgument, "json_schema");
  masks.add("r", "regex", "[0-9]+");
  CHECK_THROWS(masks.add("r", "regex", "a"), ErrorKind::InvalidArgument, "'r' is already constrained");
  masks.release("r");
  masks.add("r", "regex", "a");  // released: the id is free again
  // A row whose sequence holds a token its grammar forbids allows nothing, and says why.
  std::vector<uint32_t> words(4, 0u);
  const std::vector<int32_t> forbidden = {1};  // "\xff<s1>": not a digit
  masks.add("d", "regex", "[0-9]+");
  std::vector<MaskRow> rows(1);
  rows[0].request_id = "d";
  rows[0].generated = forbidden.data();
  rows[0].num_generated = 1;
  rows[0].mask = words.data();
  masks.fill(rows, 128);
  CHECK(words == std::vector<uint32_t>(4, 0u));
  CHECK(rows[0].error.find("llguidance: ") == 0);
  tok.tokens.pop_back();
  CHECK_THROWS(LlguidanceMasks(g_library, tok, 0), ErrorKind::InvalidArgument, "127 token strings");
}

}  // namespace

int main() {
  const char* model = std::getenv("PAGEDRT_TEST_MODEL");
  const char* library = std::getenv("PAGEDRT_TEST_LLGUIDANCE");
  if (model == nullptr || library == nullptr)
    return check::skip("PAGEDRT_TEST_MODEL and PAGEDRT_TEST_LLGUIDANCE are not both set");
  g_model = model;
  g_library = library;
  if (const char* py = std::getenv("PAGEDRT_TEST_LIBPYTHON"); py != nullptr && *py != '\0') {
    if (dlopen(py, RTLD_NOW | RTLD_GLOBAL) == nullptr) {
      std::fprintf(stderr, "cannot open %s: %s\n", py, dlerror());
      return 1;
    }
  }
  test_errors();
  test_requests_follow_their_constraints(0);
  test_requests_follow_their_constraints(2);
  return check::finish();
}
