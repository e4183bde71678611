#include "pagedrt/llguidance_masks.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <list>
#include <map>
#include <mutex>
#include <numeric>
#include <unordered_map>
#include <utility>
#include <vector>

#include "engine/rank_threads.hpp"
#include "pagedrt/error.hpp"
#include "structured/llguidance_lib.hpp"

namespace pagedrt {
namespace {

constexpr size_t kCompiledKept = 64;  // distinct constraints whose compiled matchers are kept for reuse

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

}  // namespace

// The model's tokenizer as llguidance calls it (LlgTokenizeFn), with its
// answers kept: a grammar forces the same few texts (its keys, its
// punctuation) again and again, and the tokenizer may be slow to reach (a
// Python one waits for the GIL).
struct Tokenize {
  static constexpr size_t kKept = 1 << 16;  // texts kept (all dropped when full)
  std::function<std::vector<int32_t>(const std::string&)> fn;
  const std::vector<std::string>* tokens = nullptr;  // each id's bytes, for the stand-in (may be null)
  std::mutex mu;
  std::unordered_map<std::string, std::vector<uint32_t>> kept;
  std::unordered_map<std::string, uint32_t> id_of;  // the stand-in's: made at its first use
  size_t longest = 0;
  int64_t calls = 0, misses = 0;

  // Where the tokenizer fails: the longest token that starts the rest of the
  // text, again and again (a spelling of the text, if not the model's own).
  // Needs each id's bytes (LlguidanceTokenizer::tokens); with a tokenizer.json
  // it has none and gives no tokens (llguidance then forces none).
  std::vector<uint32_t> greedy(const std::string& text) {
    std::lock_guard<std::mutex> lock(mu);
    if (id_of.empty() && tokens != nullptr) {
      for (size_t i = tokens->size(); i-- > 0;) {  // the lowest id wins a spelling several have
        const std::string& t = (*tokens)[i];
        if (t.empty() || static_cast<unsigned char>(t[0]) == 0xFF) continue;  // special
        id_of[t] = static_cast<uint32_t>(i);
        longest = std::max(longest, t.size());
      }
    }
    std::vector<uint32_t> ids;
    for (size_t at = 0; at < text.size();) {
      size_t n = std::min(longest, text.size() - at);
      for (; n > 0; --n)
        if (auto it = id_of.find(text.substr(at, n)); it != id_of.end()) {
          ids.push_back(it->second);
          break;
        }
      if (n == 0) return {};  // a byte no token spells
      at += n;
    }
    return ids;
  }

  // Never throws (it is called from inside llguidance).
  static size_t call(const void* self, const uint8_t* bytes, size_t len, uint32_t* out, size_t out_len) noexcept {
    auto& t = *static_cast<Tokenize*>(const_cast<void*>(self));
    try {
      const std::string text(reinterpret_cast<const char*>(bytes), len);
      std::vector<uint32_t> ids;
      bool found = false;
      {
        std::lock_guard<std::mutex> lock(t.mu);
        ++t.calls;
        if (auto it = t.kept.find(text); it != t.kept.end()) {
          ids = it->second;
          found = true;
        }
      }
      if (!found) {
        try {
          for (int32_t id : t.fn(text)) ids.push_back(static_cast<uint32_t>(id));
        } catch (...) {  // kept too: llguidance may ask twice for one text and must get one answer
          ids = t.greedy(text);
        }
        std::lock_guard<std::mutex> lock(t.mu);
        ++t.misses;
        if (t.kept.size() >= kKept) t.kept.clear();
        t.kept.emplace(text, ids);
      }
      std::copy_n(ids.begin(), std::min(ids.size(), out_len), out);
      return ids.size();
    } catch (...) {
      return 0;
    }
  }
};

struct LlguidanceMasks::Impl {
  // A matcher and what guards it where it is shared.
  struct Compiled {
    const llg::Api& api;
    llg::Matcher* matcher = nullptr;  // fresh (no token consumed): only ever cloned
    std::mutex mu;                    // clones of one matcher are made one at a time
    Compiled(const llg::Api& a, llg::Matcher* m) : api(a), matcher(m) {}
    ~Compiled() { api.free_matcher(matcher); }
  };
  // One sequence of a constrained request.
  struct Sequence {
    std::mutex mu;  // one caller at a time (the engine never makes two; other callers might)
    llg::Matcher* matcher = nullptr;
    std::vector<int32_t> taken;  // the tokens the matcher has taken (a refused one too: it broke on it)
    int64_t verified = 0;        // the first `verified` of them are the sequence's (not proposals)
    std::atomic<double> last_seconds{0.0};  // its last row's time: a fill on the pool starts the slowest first
  };
  // A constrained request: its compiled constraint and its sequences' matchers.
  // Freed by its last holder: a fill may hold it when the request is released.
  struct Constrained {
    const llg::Api& api;
    std::shared_ptr<Compiled> compiled;
    std::mutex mu;                        // guards `seqs` (its nodes stay put)
    std::map<int32_t, Sequence> seqs;     // by sequence index
    Constrained(const llg::Api& a, std::shared_ptr<Compiled> c) : api(a), compiled(std::move(c)) {}
    ~Constrained() {
      for (auto& [index, s] : seqs) api.free_matcher(s.matcher);
    }
  };
  // A sequence's matcher, held (its request kept alive, its lock taken) while it is used.
  struct Held {
    std::shared_ptr<Constrained> request;
    std::unique_lock<std::mutex> lock;
    llg::Matcher* matcher = nullptr;  // null: the request was released (or never added)
    bool at_row = true;               // false: it stopped before a proposal the constraint refuses
    Sequence* sequence = nullptr;     // its sequence (kept alive by `request`)
  };

  std::vector<std::string> tokens;  // each id's bytes (empty with a tokenizer.json)
  Tokenize tokenize;  // before the tokenizer, which calls it until it is freed
  const llg::Api& api;
  llg::Tokenizer* tokenizer = nullptr;
  llg::ConstraintInit init;
  int threads = 0;
  std::unique_ptr<RankThreads> pool;  // threads - 1 of them (the asking thread is the first)
  std::mutex pool_mu;                 // one fill or validate on the pool at a time
  // A fill on the pool takes its rows slowest first, by each sequence's last
  // row (PAGEDRT_MASK_ORDER=index: in the engine's order). A fill lasts about
  // its longest row plus the rows its thread ran before it; the slow rows are
  // a bounded string's last characters, several steps in a row.
  bool order_by_cost = true;

  std::mutex mu;  // guards `requests` and the cache
  std::unordered_map<std::string, std::shared_ptr<Constrained>> requests;
  std::list<std::pair<std::string, std::shared_ptr<Compiled>>> cache;  // most recently used first
  std::mutex compile_mu;  // one compile at a time (the tokenizer's parser factory is shared)

  mutable std::mutex counters_mu;
  Counters counters;

  explicit Impl(const std::string& library) : api(llg::load(library)) {}

  // Every matcher goes before the tokenizer.
  ~Impl() {
    pool.reset();
    requests.clear();
    cache.clear();
    api.free_tokenizer(tokenizer);
  }

  std::shared_ptr<Compiled> compile(const std::string& kind, const std::string& data) {
    const std::string key = kind + '\0' + data;
    {
      std::lock_guard<std::mutex> lock(mu);
      for (auto it = cache.begin(); it != cache.end(); ++it) {
        if (it->first != key) continue;
        cache.splice(cache.begin(), cache, it);
        std::lock_guard<std::mutex> c(counters_mu);
        ++counters.compile_hits;
        return it->second;
      }
    }
    std::shared_ptr<Compiled> compiled;
    {
      std::lock_guard<std::mutex> lock(compile_mu);
      llg::Matcher* m = api.new_matcher(&init, kind.c_str(), data.c_str());
      if (m == nullptr || api.matcher_is_error(m)) {
        const char* why = m != nullptr ? api.matcher_get_error(m) : nullptr;
        std::string message = why != nullptr ? why : "the library returned no matcher";
        api.free_matcher(m);
        while (!message.empty() && (message.back() == '\n' || message.back() == ' ')) message.pop_back();
        throw Error(ErrorKind::InvalidArgument, kind + ": " + message);
      }
      compiled = std::make_shared<Compiled>(api, m);
    }
    std::lock_guard<std::mutex> lock(mu);
    for (const auto& [k, c] : cache)
      if (k == key) return c;  // compiled meanwhile by another caller: one copy kept
    cache.emplace_front(key, compiled);
    if (cache.size() > kCompiledKept) cache.pop_back();  // requests using it keep it alive
    std::lock_guard<std::mutex> c(counters_mu);
    ++counters.compiles;
    return compiled;
  }

  std::shared_ptr<Constrained> find(const std::string& request_id) {
    std::lock_guard<std::mutex> lock(mu);
    auto it = requests.find(request_id);
    return it == requests.end() ? nullptr : it->second;
  }

  // The row's matcher, made on first use (a copy of its request's) and
  // brought to the row's tokens: rolled back to where they part from what it
  // took (rejected proposals of an earlier row), then fed the rest. Of the
  // row's proposals it takes only those the constraint allows (a refused one
  // makes the row unreachable, and would break the matcher).
  Held matcher(const MaskRow& row) {
    Held held;
    Sequence* s = sequence(row, held.request);
    if (s == nullptr) return held;
    Constrained& r = *held.request;
    held.lock = std::unique_lock<std::mutex>(s->mu);
    if (s->matcher == nullptr) {
      std::lock_guard<std::mutex> c(r.compiled->mu);
      s->matcher = api.clone_matcher(r.compiled->matcher);
    }
    catch_up(*s, row);
    held.matcher = s->matcher;
    held.sequence = s;
    held.at_row = static_cast<int64_t>(s->taken.size()) >= row.num_generated;
    return held;
  }

  void catch_up(Sequence& s, const MaskRow& row) {
    static_assert(sizeof(int32_t) == sizeof(uint32_t), "token ids are passed as they are");
    const int32_t* tokens = row.generated;
    const int64_t n = row.num_generated, verified = std::max<int64_t>(0, n - row.num_proposed);
    const int64_t had = static_cast<int64_t>(s.taken.size());
    s.verified = std::min(s.verified, n);  // (a sequence cut back: the engine does not today)
    // The sequence's own tokens never change, so only proposals taken since may differ.
    int64_t same = std::min(s.verified, had);
    while (same < std::min(had, n) && s.taken[static_cast<size_t>(same)] == tokens[same]) ++same;
    if (same < had) {  // a matcher broken by a token stays broken (llguidance refuses the rollback)
      (void)api.matcher_rollback(s.matcher, static_cast<size_t>(had - same));
      s.taken.resize(static_cast<size_t>(same));
    }
    if (same < verified) {  // a refused token leaves the matcher in its error state, which stays
      (void)api.matcher_consume_tokens(s.matcher, reinterpret_cast<const uint32_t*>(tokens) + same,
                                       static_cast<size_t>(verified - same));
      s.taken.insert(s.taken.end(), tokens + same, tokens + verified);
    }
    s.verified = std::max(s.verified, verified);
    const int64_t from = static_cast<int64_t>(s.taken.size());
    if (from >= verified && from < n && !api.matcher_is_error(s.matcher)) {  // proposals: the allowed ones
      const uint32_t* p = reinterpret_cast<const uint32_t*>(tokens) + from;
      const int32_t ok = api.matcher_validate_tokens(s.matcher, p, static_cast<size_t>(n - from));
      if (ok > 0 && api.matcher_consume_tokens(s.matcher, p, static_cast<size_t>(ok)) == 0)
        s.taken.insert(s.taken.end(), tokens + from, tokens + from + ok);
    }
  }

  // The row's sequence, made on first use, and its request in `request`
  // (which keeps it alive); null for a request released (or never added).
  Sequence* sequence(const MaskRow& row, std::shared_ptr<Constrained>& request) {
    request = find(row.request_id);
    if (!request) return nullptr;
    std::lock_guard<std::mutex> lock(request->mu);
    return &request->seqs[row.index];
  }

  // The last row's time of the row's sequence (0 for one not seen yet).
  double last_seconds(const MaskRow& row) {
    std::shared_ptr<Constrained> request;
    const Sequence* s = sequence(row, request);
    return s == nullptr ? 0.0 : s->last_seconds.load(std::memory_order_relaxed);
  }

  // job(i) for every i < n, on the pool where there is one and n is worth it.
  template <typename Job>
  void for_rows(size_t n, size_t min_parallel, const Job& job) {
    if (!pool || n < min_parallel) {
      for (size_t i = 0; i < n; ++i) job(i);
      return;
    }
    std::lock_guard<std::mutex> lock(pool_mu);
    std::atomic<size_t> next{0};
    const std::function<void(int)> work = [&](int) {
      for (size_t i = next++; i < n; i = next++) job(i);
    };
    pool->run(work, [] {});
  }
};

LlguidanceMasks::LlguidanceMasks(const std::string& library, const LlguidanceTokenizer& tok, int threads)
    : impl_(std::make_unique<Impl>(library)) {
  Impl& im = *impl_;
  if (tok.vocab <= 0 || tok.vocab > (int64_t{1} << 30))
    throw Error(ErrorKind::InvalidArgument,
                "structured output: vocab " + std::to_string(tok.vocab) + " is not a vocabulary size");
  if (tok.eos < 0 || tok.eos >= tok.vocab)
    throw Error(ErrorKind::InvalidArgument, "structured output: eos token " + std::to_string(tok.eos) +
                                                " is outside the vocabulary of " + std::to_string(tok.vocab));
  llg::TokenizerInit init;
  init.vocab_size = static_cast<uint32_t>(tok.vocab);
  init.tok_eos = static_cast<uint32_t>(tok.eos);
  if (tok.tokenize) {  // text the grammar forces comes in the model's own tokens
    im.tokenize.fn = tok.tokenize;
    im.tokenize.tokens = &im.tokens;
    init.tokenize_fn = &Tokenize::call;
    init.tokenize_user_data = &im.tokenize;
  } else {
    init.use_approximate_greedy_tokenize_fn = true;
  }
  std::vector<const char*> slices;  // argv style: null-terminated (read while the tokenizer is made)
  for (const std::string& r : tok.slices) slices.push_back(r.c_str());
  slices.push_back(nullptr);
  if (!tok.slices.empty()) init.slices = slices.data();
  std::vector<uint32_t> lens;
  std::string bytes;
  if (!tok.tokenizer_json.empty()) {
    init.tokenizer_json = tok.tokenizer_json.c_str();
  } else {
    if (static_cast<int64_t>(tok.tokens.size()) != tok.vocab)
      throw Error(ErrorKind::InvalidArgument, "structured output: " + std::to_string(tok.tokens.size()) +
                                                  " token strings for a vocabulary of " + std::to_string(tok.vocab));
    im.tokens = tok.tokens;
    for (const std::string& t : tok.tokens) {
      lens.push_back(static_cast<uint32_t>(t.size()));
      bytes += t;
    }
    init.token_lens = lens.data();
    init.token_bytes = reinterpret_cast<const uint8_t*>(bytes.data());
  }
  char error[1024] = {};
  im.tokenizer = im.api.new_tokenizer_v2(&init, error, sizeof(error));
  if (im.tokenizer == nullptr)
    throw Error(ErrorKind::InvalidArgument,
                std::string("structured output: llguidance refused the tokenizer: ") + error);
  im.api.constraint_init_set_defaults(&im.init, im.tokenizer);
  // Nothing on the host's stderr: a matcher's error reaches the sequence's
  // error event (MaskRow::error). LlgConstraintInit starts {tokenizer pointer,
  // uint32 log_buffer_level, uint32 log_stderr_level, ...} in every 1.x.
  const uint32_t quiet = 0;
  std::memcpy(im.init.bytes + sizeof(void*) + sizeof(uint32_t), &quiet, sizeof(quiet));
  im.threads = std::max(0, threads);
  if (im.threads > 1) im.pool = std::make_unique<RankThreads>(im.threads);
  if (const char* e = std::getenv("PAGEDRT_MASK_ORDER"); e != nullptr && std::strcmp(e, "index") == 0)
    im.order_by_cost = false;
}

LlguidanceMasks::~LlguidanceMasks() = default;

void LlguidanceMasks::add(const std::string& request_id, const std::string& kind, const std::string& data) {
  Impl& im = *impl_;
  const auto taken = [&] {
    return Error(ErrorKind::InvalidArgument,
                 "request '" + request_id + "' is already constrained (a request with this id is running)");
  };
  if (im.find(request_id)) throw taken();
  auto r = std::make_shared<Impl::Constrained>(im.api, im.compile(kind, data));
  std::lock_guard<std::mutex> lock(im.mu);
  if (!im.requests.emplace(request_id, std::move(r)).second) throw taken();
}

void LlguidanceMasks::release(const std::string& request_id) {
  Impl& im = *impl_;
  std::shared_ptr<Impl::Constrained> r;  // freed outside the lock
  std::lock_guard<std::mutex> lock(im.mu);
  if (auto it = im.requests.find(request_id); it != im.requests.end()) {
    r = std::move(it->second);
    im.requests.erase(it);
  }
}

int LlguidanceMasks::threads() const { return std::max(1, impl_->threads); }

void LlguidanceMasks::fill(std::vector<MaskRow>& rows, int64_t vocab) {
  Impl& im = *impl_;
  const double start = now_s();
  const size_t words = static_cast<size_t>((vocab + 31) / 32);
  std::vector<std::pair<double, double>> when(rows.size());  // (start, end) of each row, from `start`
  std::vector<size_t> order(rows.size());  // the rows as the pool takes them
  std::iota(order.begin(), order.end(), size_t{0});
  if (im.pool && im.order_by_cost && rows.size() > static_cast<size_t>(im.threads)) {
    std::vector<double> last(rows.size());
    for (size_t i = 0; i < rows.size(); ++i) last[i] = im.last_seconds(rows[i]);
    std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return last[a] > last[b]; });
  }
  im.for_rows(rows.size(), 2, [&](size_t j) {
    const size_t i = order[j];
    const double t0 = now_s();
    struct Timed {  // the row's (start, end), whichever return below ends it
      std::pair<double, double>& w;
      double start, t0;
      ~Timed() { w = {t0 - start, now_s() - start}; }
    } timed{when[i], start, t0};
    MaskRow& row = rows[i];
    const Impl::Held held = im.matcher(row);
    struct Kept {  // the row's time for the next fill's order; made after `held`, so gone before it
      std::atomic<double>* seconds;
      double t0;
      ~Kept() {
        if (seconds != nullptr) seconds->store(now_s() - t0, std::memory_order_relaxed);
      }
    } kept{held.sequence != nullptr ? &held.sequence->last_seconds : nullptr, t0};
    llg::Matcher* m = held.matcher;
    if (m == nullptr) return;  // released (the request is ending): the mask stays empty
    const auto broken = [&] {   // the mask stays empty, and the sequence's error says why
      const char* why = im.api.matcher_get_error(m);
      row.error = std::string("llguidance: ") + (why != nullptr ? why : "the matcher failed");
      while (!row.error.empty() && (row.error.back() == '\n' || row.error.back() == ' ')) row.error.pop_back();
    };
    if (im.api.matcher_is_error(m)) return broken();
    if (!held.at_row) {  // after a refused proposal: never used (the row before refuses it), so no mask computed
      std::fill_n(row.mask, words, ~0u);  // every token
      if (vocab % 32) row.mask[words - 1] = (1u << (vocab % 32)) - 1;
      return;
    }
    const size_t size = im.api.matcher_get_mask_byte_size(m);
    int32_t rc;
    if (size == words * 4) {
      rc = im.api.matcher_compute_mask_into(m, row.mask, size);
    } else {  // the tokenizer knows more or fewer ids than the model has rows
      std::vector<uint32_t> all(size / 4);
      rc = im.api.matcher_compute_mask_into(m, all.data(), size);
      std::copy_n(all.begin(), std::min(all.size(), words), row.mask);
    }
    if (rc != 0) {
      std::fill_n(row.mask, words, 0u);
      broken();
    }
  });
  double sum = 0.0, longest = 0.0, first_rows = 0.0;
  const size_t first = std::min(when.size(), static_cast<size_t>(std::max(1, im.threads)));
  for (size_t j = 0; j < when.size(); ++j) {
    const size_t i = order[j];  // the first rows are the first the pool took
    sum += when[i].second - when[i].first;
    longest = std::max(longest, when[i].second - when[i].first);
    if (j < first) first_rows = std::max(first_rows, when[i].first);
  }
  std::lock_guard<std::mutex> lock(im.counters_mu);
  im.counters.fill_seconds += now_s() - start;
  im.counters.fill_row_seconds += sum;
  im.counters.fill_longest_row_seconds += longest;
  im.counters.fill_first_rows_start_seconds += first_rows;
  ++im.counters.fill_calls;
  im.counters.fill_rows += static_cast<int64_t>(rows.size());
}

void LlguidanceMasks::validate(std::vector<MaskRow>& rows, const int32_t* tokens, uint8_t* ok) {
  Impl& im = *impl_;
  const double start = now_s();
  im.for_rows(rows.size(), 16, [&](size_t i) {
    const Impl::Held held = im.matcher(rows[i]);
    llg::Matcher* m = held.matcher;
    const uint32_t token = static_cast<uint32_t>(tokens[i]);
    ok[i] = m != nullptr && tokens[i] >= 0 && !im.api.matcher_is_error(m) &&
            im.api.matcher_validate_tokens(m, &token, 1) == 1;
  });
  std::lock_guard<std::mutex> lock(im.counters_mu);
  im.counters.validate_seconds += now_s() - start;
  im.counters.validate_rows += static_cast<int64_t>(rows.size());
}

void LlguidanceMasks::prepare(std::vector<MaskRow>& rows) {
  Impl& im = *impl_;
  const double start = now_s();
  for (const MaskRow& row : rows) im.matcher(row);
  std::lock_guard<std::mutex> lock(im.counters_mu);
  im.counters.prepare_seconds += now_s() - start;
}

LlguidanceMasks::Counters LlguidanceMasks::counters() const {
  Counters c;
  {
    std::lock_guard<std::mutex> lock(impl_->counters_mu);
    c = impl_->counters;
  }
  std::lock_guard<std::mutex> lock(impl_->tokenize.mu);
  c.tokenize_calls = impl_->tokenize.calls;
  c.tokenize_misses = impl_->tokenize.misses;
  return c;
}

std::string LlguidanceMasks::version() const { return impl_->api.get_version(); }

}  // namespace pagedrt
