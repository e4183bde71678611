#include "engine/sampler.hpp"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cmath>
#include <limits>
#include <unordered_map>

#include "backend/cpu/argmax.hpp"

namespace pagedrt {
namespace {

// splitmix64: the n-th value of the sequence that starts at base
uint64_t splitmix64(uint64_t base, uint64_t n) {
  uint64_t z = base + 0x9e3779b97f4a7c15ull * (n + 1);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// 64 bits for a stream without a seed: the process's entropy, read once (a
// std::random_device per call cost 28-42 us on a 2-core VM, twice a request),
// drawn by a counter from a sequence keyed by the process id too, so that
// forked processes part.
uint64_t fresh_bits() {
  static const uint64_t entropy = [] {
    std::random_device rd;
    return (static_cast<uint64_t>(rd()) << 32) ^ rd();
  }();
  static std::atomic<uint64_t> counter{0};
  return splitmix64(entropy ^ (static_cast<uint64_t>(::getpid()) << 32),
                    counter.fetch_add(1, std::memory_order_relaxed));
}

}  // namespace

// distinct, well mixed streams per sample
uint64_t sample_key(uint64_t base, int32_t index) { return splitmix64(base, static_cast<uint64_t>(index)); }

uint64_t sample_base(const SamplingParams& params) { return params.has_seed ? params.seed : fresh_bits(); }

Rng make_rng(const SamplingParams& params, int32_t index) {
  return Rng(params.has_seed ? sample_key(params.seed, index) : fresh_bits());
}

bool Sampler::drawn_on_device(const SamplingParams& p, int64_t generated) {
  if (p.is_beam_search() || !p.speculative.empty() || p.return_logits || p.prompt_logprobs) return false;
  return p.temperature > 0.0f || p.logprobs || needs_processing(p, generated);
}

void TokenHistory::extend(const std::vector<int32_t>& tokens, int64_t prompt_len) {
  if (len > static_cast<int64_t>(tokens.size())) {  // shorter than before (never for a drawn sequence): again
    token.clear(), count.clear(), len = 0;
  }
  if (len == 0 && !tokens.empty()) {  // the first build: one sort, not an insertion a token
    token = tokens;
    std::sort(token.begin(), token.end());
    token.erase(std::unique(token.begin(), token.end()), token.end());
    count.assign(token.size(), 0);
    for (size_t i = static_cast<size_t>(std::max<int64_t>(prompt_len, 0)); i < tokens.size(); ++i)
      ++count[static_cast<size_t>(std::lower_bound(token.begin(), token.end(), tokens[i]) - token.begin())];
    len = static_cast<int64_t>(tokens.size());
    return;
  }
  for (; len < static_cast<int64_t>(tokens.size()); ++len) {
    const int32_t t = tokens[static_cast<size_t>(len)];
    const auto at = std::lower_bound(token.begin(), token.end(), t);
    const size_t i = static_cast<size_t>(at - token.begin());
    if (at == token.end() || *at != t) {
      token.insert(at, t);
      count.insert(count.begin() + static_cast<std::ptrdiff_t>(i), 0);
    }
    if (len >= prompt_len) ++count[i];
  }
}

void Sampler::device_edits(const SamplingParams& p, const std::vector<int32_t>& tokens, int64_t prompt_len,
                           const std::vector<int32_t>& eos_ids, TokenHistory& history,
                           std::vector<LogitEdit>& edits, SampleRow& d) {
  // The few edits not from the history (bias, min_tokens' bans), sorted and merged by token.
  std::vector<LogitEdit> extra;
  for (const auto& [id, bias] : p.logit_bias) extra.push_back(LogitEdit{id, kEditBias, bias, 0});
  const int64_t generated = static_cast<int64_t>(tokens.size()) - prompt_len;
  if (generated < p.min_tokens) {
    if (!p.ignore_eos)
      for (int32_t id : eos_ids) extra.push_back(LogitEdit{id, kEditBan, 0.0f, 0});
    for (int32_t id : p.stop_token_ids) extra.push_back(LogitEdit{id, kEditBan, 0.0f, 0});
  }
  std::sort(extra.begin(), extra.end(), [](const LogitEdit& a, const LogitEdit& b) { return a.token < b.token; });
  size_t kept = 0;  // one edit a token: flags or'ed (bias set once: logit_bias names a token once)
  for (const LogitEdit& e : extra) {
    if (kept > 0 && extra[kept - 1].token == e.token) {
      extra[kept - 1].flags |= e.flags;
      if (e.flags & kEditBias) extra[kept - 1].bias = e.bias;
    } else {
      extra[kept++] = e;
    }
  }
  extra.resize(kept);

  const bool rep = p.repetition_penalty != 1.0f, counts = p.frequency_penalty != 0.0f || p.presence_penalty != 0.0f;
  const size_t first = edits.size();
  size_t h = 0, x = 0, n = 0;
  if (rep || counts) {
    history.extend(tokens, prompt_len);
    n = history.token.size();
  }
  edits.reserve(first + n + extra.size());
  while (h < n || x < extra.size()) {
    // the history's next token that the penalties touch
    while (h < n && !rep && history.count[h] == 0) ++h;
    const int32_t ht = h < n ? history.token[h] : INT32_MAX, xt = x < extra.size() ? extra[x].token : INT32_MAX;
    if (ht == INT32_MAX && xt == INT32_MAX) break;
    LogitEdit e = xt <= ht ? extra[x++] : LogitEdit{ht, 0u, 0.0f, 0};
    if (e.token == ht) {
      if (rep) e.flags |= kEditSeen;
      if (counts) e.count = history.count[h];
      ++h;
    }
    edits.push_back(e);
  }
  d.first_edit = static_cast<int32_t>(first);
  d.num_edits = static_cast<int32_t>(edits.size() - first);
  d.repetition_penalty = p.repetition_penalty;
  d.frequency_penalty = p.frequency_penalty;
  d.presence_penalty = p.presence_penalty;
}

void Sampler::process(float* logits, int64_t vocab, const SamplingParams& p,
                      const std::vector<int32_t>& tokens, int64_t prompt_len,
                      const std::vector<int32_t>& eos_ids) {
  for (const auto& [id, bias] : p.logit_bias) logits[id] += bias;

  const int64_t generated = static_cast<int64_t>(tokens.size()) - prompt_len;
  if (generated < p.min_tokens) {
    const float ninf = -std::numeric_limits<float>::infinity();
    if (!p.ignore_eos)
      for (int32_t id : eos_ids) logits[id] = ninf;
    for (int32_t id : p.stop_token_ids) logits[id] = ninf;
  }

  if (p.repetition_penalty != 1.0f) {
    std::vector<bool> seen(static_cast<size_t>(vocab), false);
    for (int32_t t : tokens) {
      if (seen[t]) continue;
      seen[t] = true;
      logits[t] = logits[t] > 0 ? logits[t] / p.repetition_penalty : logits[t] * p.repetition_penalty;
    }
  }
  if (p.frequency_penalty != 0.0f || p.presence_penalty != 0.0f) {
    std::unordered_map<int32_t, int32_t> counts;
    for (int64_t i = prompt_len; i < static_cast<int64_t>(tokens.size()); ++i) ++counts[tokens[i]];
    for (const auto& [t, c] : counts)  // one rounding of f * c + p, as the device's (LogitEdit)
      logits[t] -= std::fma(p.frequency_penalty, static_cast<float>(c), p.presence_penalty);
  }
}

bool Sampler::apply_mask(float* logits, int64_t vocab, const uint32_t* mask) {
  bool any = false;
  for (int64_t t = 0; t < vocab; ++t) {
    if ((mask[t >> 5] >> (t & 31)) & 1u)
      any = true;
    else
      logits[t] = -std::numeric_limits<float>::infinity();
  }
  return any;
}

bool Sampler::needs_processing(const SamplingParams& p, int64_t generated) {
  return !p.logit_bias.empty() || generated < p.min_tokens || p.repetition_penalty != 1.0f ||
         p.frequency_penalty != 0.0f || p.presence_penalty != 0.0f;
}

namespace {

// Step 4's distribution (temperature > 0): candidates order[0 .. n) with
// unnormalised weights prob[0 .. n) (zero for those min_p drops); -1 when
// every candidate is banned (-inf).
int64_t distribution(const float* logits, int64_t vocab, const SamplingParams& p, std::vector<double>& prob,
                     std::vector<int32_t>& order) {
  // Candidates, most likely first (ties: lower id first). Without top-p the
  // order does not matter and no sort is needed; with it, only the kept
  // prefix is sorted (below).
  order.resize(static_cast<size_t>(vocab));
  for (int64_t i = 0; i < vocab; ++i) order[i] = static_cast<int32_t>(i);
  auto more_likely = [&](int32_t a, int32_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); };
  int64_t n = vocab;
  if (p.top_k > 0 && p.top_k < vocab) {
    std::nth_element(order.begin(), order.begin() + p.top_k, order.end(), more_likely);
    n = p.top_k;
  }

  const double inv_t = 1.0 / static_cast<double>(p.temperature);
  double mx = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < n; ++i) mx = std::max(mx, static_cast<double>(logits[order[i]]) * inv_t);
  auto weight = [&](int32_t t) { return std::exp(static_cast<double>(logits[t]) * inv_t - mx); };
  double sum = 0.0;
  if (p.top_p < 1.0f) {
    for (int64_t i = 0; i < n; ++i) sum += weight(order[i]);
    if (!(sum > 0.0)) {  // every candidate banned: the first, most likely first, is the fallback
      std::sort(order.begin(), order.begin() + n, more_likely);
      return -1;
    }
    // The smallest most-likely-first prefix reaching top_p: the most likely
    // 64, 256, 1024, ... candidates are selected (nth_element) and sorted a
    // band at a time until the running sum gets there; a row whose mass sits
    // in a few tokens (the usual case) never sorts the rest of the vocabulary.
    double cum = 0.0;
    int64_t keep = 0, sorted = 0;
    bool reached = false;
    for (int64_t band = 64; !reached && sorted < n; band *= 4) {
      const int64_t end = std::min(n, sorted + band);
      if (end < n) std::nth_element(order.begin() + sorted, order.begin() + end, order.begin() + n, more_likely);
      std::sort(order.begin() + sorted, order.begin() + end, more_likely);
      sorted = end;
      while (keep < sorted) {
        cum += weight(order[keep++]) / sum;
        if (cum >= p.top_p) {
          reached = true;
          break;
        }
      }
    }
    n = keep;
    prob.resize(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) prob[i] = weight(order[i]);
  } else {
    prob.resize(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) sum += (prob[i] = weight(order[i]));
    if (!(sum > 0.0)) return -1;
  }
  if (p.min_p > 0.0f) {
    double pmax = 0.0;
    for (int64_t i = 0; i < n; ++i) pmax = std::max(pmax, prob[i]);
    for (int64_t i = 0; i < n; ++i)
      if (prob[i] < p.min_p * pmax) prob[i] = 0.0;
  }
  return n;
}

double uniform(Rng& rng) { return static_cast<double>(rng() >> 11) * 0x1.0p-53; }  // [0, 1)

// A draw from the weights prob[0 .. n) (at least one positive).
int32_t draw(Rng& rng, const std::vector<double>& prob, const std::vector<int32_t>& order, int64_t n) {
  double total = 0.0;
  for (int64_t i = 0; i < n; ++i) total += prob[i];
  const double u = uniform(rng) * total;  // in [0, total)
  double acc = 0.0;
  int64_t last = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (prob[i] <= 0.0) continue;
    acc += prob[i];
    last = i;
    if (u < acc) return order[i];
  }
  return order[last];
}

}  // namespace

bool Sampler::mask_allows_any(const uint32_t* mask, int64_t vocab) {
  const int64_t full = vocab / 32;
  for (int64_t w = 0; w < full; ++w)
    if (mask[w] != 0) return true;
  const int64_t rest = vocab % 32;
  return rest != 0 && (mask[full] & ((1u << rest) - 1u)) != 0;
}

int32_t Sampler::greedy(const float* logits, int64_t vocab) {
  return static_cast<int32_t>(cpu::first_argmax(logits, vocab));
}

int32_t Sampler::pick(const float* logits, int64_t vocab, const SamplingParams& p, Rng& rng,
                      std::vector<double>& prob, std::vector<int32_t>& order) {
  if (p.temperature == 0.0f) return greedy(logits, vocab);
  const int64_t n = distribution(logits, vocab, p, prob, order);
  if (n < 0) return order[0];  // every candidate banned (-inf): fall back to the first
  return draw(rng, prob, order, n);
}

int32_t Sampler::verify_draft(const float* logits, int64_t vocab, const SamplingParams& p, Rng& rng,
                              int32_t draft, bool& accepted, std::vector<double>& prob,
                              std::vector<int32_t>& order) {
  // The token the host's plain decoding picks here, from the same draw (one
  // uniform when sampling); the proposal is kept when it is that token. A proposal is one
  // token for certain (q = 1 at the draft), so this is rejection sampling:
  // kept with probability p(draft) = min(1, p / q), else a token of p without
  // the draft, renormalised (max(p - q, 0)). Each position takes one draw
  // whatever was proposed, so a seeded stream gives a position the draw it
  // gives without speculation: the same tokens as plain sampling wherever
  // the logits are the same bits, however many proposals a step made.
  const int32_t t = pick(logits, vocab, p, rng, prob, order);
  accepted = t == draft;
  return t;
}

void Sampler::log_softmax(const float* logits, int64_t vocab, std::vector<float>& out) {
  double mx = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < vocab; ++i) mx = std::max(mx, static_cast<double>(logits[i]));
  double sum = 0.0;
  for (int64_t i = 0; i < vocab; ++i) sum += std::exp(static_cast<double>(logits[i]) - mx);
  const double lse = mx + std::log(sum);
  out.resize(static_cast<size_t>(vocab));
  for (int64_t i = 0; i < vocab; ++i) out[i] = static_cast<float>(static_cast<double>(logits[i]) - lse);
}

TokenLogprob Sampler::token_logprob(const std::vector<float>& lp, int32_t token, int32_t k) {
  TokenLogprob t;
  t.token = token;
  t.logprob = lp[token];
  if (k > 0) {
    std::vector<int32_t> idx(lp.size());
    for (size_t i = 0; i < idx.size(); ++i) idx[i] = static_cast<int32_t>(i);
    const size_t kk = std::min(idx.size(), static_cast<size_t>(k));
    std::partial_sort(idx.begin(), idx.begin() + kk, idx.end(),
                      [&](int32_t a, int32_t b) { return lp[a] > lp[b] || (lp[a] == lp[b] && a < b); });
    for (size_t i = 0; i < kk; ++i) {
      t.top_ids.push_back(idx[i]);
      t.top_logprobs.push_back(lp[idx[i]]);
    }
  }
  return t;
}

}  // namespace pagedrt
