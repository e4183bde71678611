#include "engine/beam_search.hpp"

#include <algorithm>
#include <cmath>

namespace pagedrt {
namespace {

struct Candidate {
  BeamChoice choice;
  bool stops = false;
};

}  // namespace

std::vector<BeamChoice> beam_step(Request& req, const std::vector<int32_t>& stop_ids, int64_t max_tokens) {
  const SamplingParams& p = req.params;
  const int64_t k = p.beam_width;
  const int64_t K = std::max<int64_t>(2, 1 + static_cast<int64_t>(stop_ids.size())) * k;
  const int64_t gen = req.beam_len + 1;  // generated length once this token is appended
  const bool at_limit = gen >= max_tokens;

  // The global top K lies within the union of each beam's top K.
  std::vector<Candidate> cand;
  std::vector<int32_t> idx;
  for (size_t b = 0; b < req.seqs.size(); ++b) {
    const std::vector<float>& lp = req.seqs[b]->beam_logprobs;
    idx.resize(lp.size());
    for (size_t i = 0; i < idx.size(); ++i) idx[i] = static_cast<int32_t>(i);
    const size_t kk = std::min<size_t>(idx.size(), static_cast<size_t>(K));
    std::partial_sort(idx.begin(), idx.begin() + kk, idx.end(),
                      [&](int32_t x, int32_t y) { return lp[x] > lp[y] || (lp[x] == lp[y] && x < y); });
    for (size_t i = 0; i < kk; ++i) {
      Candidate c;
      c.choice = {static_cast<int32_t>(b), idx[i], req.seqs[b]->cum_logprob + static_cast<double>(lp[idx[i]])};
      c.stops = at_limit || std::find(stop_ids.begin(), stop_ids.end(), idx[i]) != stop_ids.end();
      cand.push_back(c);
    }
  }
  std::stable_sort(cand.begin(), cand.end(), [](const Candidate& a, const Candidate& b) {
    return a.choice.cum_logprob > b.choice.cum_logprob;
  });
  if (static_cast<int64_t>(cand.size()) > K) cand.resize(static_cast<size_t>(K));

  // Finished hypotheses: only the first k candidates may finish.
  const bool full_and_early = p.early_stopping == 1 && static_cast<int64_t>(req.beam_done.size()) == k;
  if (req.beam_improvable && !full_and_early) {
    const double norm = std::pow(static_cast<double>(gen), static_cast<double>(p.length_penalty));
    for (int64_t r = 0; r < std::min<int64_t>(k, static_cast<int64_t>(cand.size())); ++r) {
      if (!cand[r].stops) continue;
      BeamHypothesis h;
      const Sequence& parent = *req.seqs[cand[r].choice.parent];
      h.tokens.assign(parent.tokens.begin() + req.prompt_len, parent.tokens.end());
      h.tokens.push_back(cand[r].choice.token);
      h.cum_logprob = cand[r].choice.cum_logprob;
      h.score = h.cum_logprob / norm;
      req.beam_done.push_back(std::move(h));
    }
    std::stable_sort(req.beam_done.begin(), req.beam_done.end(),
                     [](const BeamHypothesis& a, const BeamHypothesis& b) { return a.score > b.score; });
    if (static_cast<int64_t>(req.beam_done.size()) > k) req.beam_done.resize(static_cast<size_t>(k));
  }

  // Running beams for the next step: the best k that did not stop.
  std::vector<BeamChoice> next;
  for (const Candidate& c : cand)
    if (!c.stops && static_cast<int64_t>(next.size()) < k) next.push_back(c.choice);
  req.beam_len = gen;

  // Early-stop heuristic (sticky once met).
  if (!next.empty()) {
    const bool never = p.early_stopping == 2 && p.length_penalty > 0.0f;
    const double len = static_cast<double>(never ? max_tokens : req.beam_len);
    const double best_possible = next[0].cum_logprob / std::pow(len, static_cast<double>(p.length_penalty));
    const double worst_done = static_cast<int64_t>(req.beam_done.size()) < k ? -1e9 : req.beam_done.back().score;
    req.beam_improvable = req.beam_improvable && best_possible > worst_done;
  }
  const bool all_full = static_cast<int64_t>(req.beam_done.size()) == k;
  const bool go_on = !next.empty() && req.beam_improvable && !(p.early_stopping == 1 && all_full);
  if (!go_on) next.clear();
  return next;
}

}  // namespace pagedrt
