#include "engine/output_processor.hpp"

#include <algorithm>

#include "backend/team.hpp"
#include "engine/beam_search.hpp"
#include "engine/sampler.hpp"

namespace pagedrt {

OutputProcessor::OutputProcessor(const OutputConfig& config, KvCacheManager& kv, OutputSink& sink)
    : config_(config), kv_(kv), sink_(sink) {
  config_.sampler_threads = std::max(1, config_.sampler_threads);
}

namespace {

// A row whose pick is the plain argmax of its raw logits (a structured-output
// row's: of the allowed ones): greedy, n = 1, nothing processed, no logprobs,
// returned logits or beams.
bool plain_greedy(const ScheduledSeq& s) {
  const SamplingParams& p = s.req->params;
  return !(p.return_logits || p.prompt_logprobs || p.is_beam_search() || p.logprobs || p.n != 1) &&
         p.temperature == 0.0f && !Sampler::needs_processing(p, s.req->num_generated(*s.seq));
}

// A device draw's logprobs (Backend::sample) as an event carries them.
TokenLogprob drawn_logprob(const DrawLogprobs& lp, int32_t token) {
  TokenLogprob t;
  t.token = token;
  t.logprob = lp.logprob;
  t.top_ids.assign(lp.top_ids, lp.top_ids + lp.count);
  t.top_logprobs.assign(lp.top_logprobs, lp.top_logprobs + lp.count);
  return t;
}

}  // namespace

bool OutputProcessor::greedy_only(const SchedulerOutput& step) const {
  return std::all_of(step.scheduled.begin(), step.scheduled.end(), plain_greedy);
}

bool OutputProcessor::device_only(const SchedulerOutput& step) const {
  return std::all_of(step.scheduled.begin(), step.scheduled.end(), [](const ScheduledSeq& s) {
    return plain_greedy(s) || Sampler::drawn_on_device(s.req->params, s.req->num_generated(*s.seq));
  });
}

bool OutputProcessor::any_greedy(const SchedulerOutput& step) {
  return std::any_of(step.scheduled.begin(), step.scheduled.end(), plain_greedy);
}

// process() below takes these tokens in this order: scheduled order, the
// sampling rows only, n draws (indices 0 .. n - 1) where expand() forks.
DeviceDraws OutputProcessor::device_draws(const SchedulerOutput& step, const ModelOutput& out,
                                          const StepMasks& masks) {
  DeviceDraws draws;
  draws.masks.words = masks.words;
  draws.masks.num_masks = masks.count;
  draws.first_draw.assign(step.scheduled.size(), -1);
  for (size_t i = 0; i < step.scheduled.size(); ++i) {
    const ScheduledSeq& s = step.scheduled[i];
    const LogitsSlice& slice = (*out.slices)[i];
    const SamplingParams& p = s.req->params;
    const int64_t generated = s.req->num_generated(*s.seq);
    if (s.seq->done || s.seq->num_draft > 0 || !slice.samples || !Sampler::drawn_on_device(p, generated)) continue;
    draws.first_draw[i] = static_cast<int32_t>(draws.rows.size());
    SampleRow d;
    d.row = slice.first_row + slice.num_rows - 1;
    d.temperature = p.temperature;
    d.top_k = p.top_k;
    d.top_p = p.top_p;
    d.min_p = p.min_p;
    d.counter = static_cast<uint64_t>(s.seq->num_tokens());
    d.logprobs = p.logprobs ? *p.logprobs : -1;
    d.mask = masks.index_of(s.seq);  // n > 1: the forks take the prompt sequence's mask
    if (Sampler::needs_processing(p, generated)) {  // one edit range for the row's forks
      Sampler::device_edits(p, s.seq->tokens, s.req->prompt_len, config_.eos_token_ids, s.seq->history, draws.edits,
                            d);
    }
    const bool forks = !s.req->expanded && p.n > 1;
    for (int32_t k = 0; k < (forks ? p.n : 1); ++k) {
      d.key = sample_key(s.req->sample_base, forks ? k : s.seq->index);
      draws.rows.push_back(d);
    }
  }
  return draws;
}

void OutputProcessor::process(const SchedulerOutput& step, const ModelOutput& out, const StepMasks& masks) {
  masks_ = &masks;
  // Phase 1: progress of every sequence. Phase 2: sampling (may end sequences
  // and requests). Phase 3: beam groups whose beams are all at their sampling point.
  std::vector<Pick> picks;
  std::vector<Request*> beam_groups;
  for (size_t i = 0; i < step.scheduled.size(); ++i) {
    const ScheduledSeq& s = step.scheduled[i];
    const LogitsSlice& slice = (*out.slices)[i];
    if (s.seq->done) continue;  // ended since the step was launched (async scheduling)
    if (s.seq->num_draft > 0) {
      verify(s, slice, out);
      continue;
    }
    if (!advance(s, slice, out)) continue;
    if (s.req->params.is_beam_search()) {
      if (std::find(beam_groups.begin(), beam_groups.end(), s.req) == beam_groups.end()) beam_groups.push_back(s.req);
      continue;
    }
    const int64_t last = slice.first_row + slice.num_rows - 1;
    // n > 1: the samples forked here all take the prompt sequence's mask (no output yet).
    const auto m = masks.by_seq.find(s.seq);
    const uint32_t* mask = m != masks.by_seq.end() ? m->second : nullptr;
    int32_t next_draw = out.first_draw.empty() ? -1 : out.first_draw[i];  // into out.sampled
    const bool drawn = out.sampled && next_draw >= 0;
    // Picked on the device, a row whose mask allows no token ends (-1), once for its forks.
    const bool none_allowed = mask && (drawn || out.argmax) && !Sampler::mask_allows_any(mask, out.vocab);
    for (Sequence* q : expand(*s.req, *s.seq)) {
      Pick pick;
      pick.req = s.req;
      pick.seq = q;
      pick.row = out.row(last);
      pick.mask = mask;
      if (drawn) {  // drawn on the device (device_draws' order)
        pick.row = nullptr;
        pick.token = none_allowed ? -1 : out.sampled[next_draw];
        if (s.req->params.logprobs) pick.logprob = drawn_logprob(out.sampled_logprobs[next_draw], pick.token);
        ++next_draw;
      } else if (out.argmax) {  // picked on the device (a masked row: with its mask, when it allows a token)
        pick.token = none_allowed ? -1 : out.argmax[last];
      }
      picks.push_back(std::move(pick));
    }
  }
  // Picks are independent per sequence (own row, own random stream): made in
  // parallel, then applied in order (which may end sequences and requests).
  pick_all(picks, out.vocab);
  for (Pick& p : picks)
    if (!apply(p)) sink_.push_event(make_event(*p.req, *p.seq, false, false, FinishReason::None, ""));
  for (Request* r : beam_groups) {
    const bool all_ready = std::all_of(r->seqs.begin(), r->seqs.end(),
                                       [](const std::unique_ptr<Sequence>& s) { return s->at_sampling_point(); });
    if (all_ready) beam_group_step(*r);
  }
}

bool OutputProcessor::advance(const ScheduledSeq& sc, const LogitsSlice& slice, const ModelOutput& out) {
  Sequence& s = *sc.seq;
  Request& r = *sc.req;
  count_computed(sc);
  if ((r.params.return_logits || r.params.prompt_logprobs) && slice.num_rows > 0) {
    const float* rows = out.row(slice.first_row);
    if (r.params.prompt_logprobs) {
      // Row i holds the logits at position first_pos + i, which predict the
      // token after it: prompt tokens only (the sampled row predicts output).
      std::vector<float> lp;
      for (int32_t i = 0; i < slice.num_rows; ++i) {
        const int64_t next = slice.first_pos + i + 1;
        if (next >= r.prompt_len) break;
        Sampler::log_softmax(rows + static_cast<int64_t>(i) * out.vocab, out.vocab, lp);
        s.new_prompt_logprobs.push_back(Sampler::token_logprob(lp, s.tokens[next], *r.params.prompt_logprobs));
      }
    }
    if (r.params.return_logits) {
      s.new_logits.insert(s.new_logits.end(), rows, rows + static_cast<int64_t>(slice.num_rows) * out.vocab);
      s.new_logit_rows += slice.num_rows;
    }
    s.logits_reported = slice.first_pos + slice.num_rows;
  }
  if (!slice.samples) {
    if (s.new_logit_rows > 0 && !r.params.is_beam_search())
      sink_.push_event(make_event(r, s, false, false, FinishReason::None, ""));
    return false;
  }
  if (r.params.is_beam_search()) Sampler::log_softmax(out.row(slice.first_row + slice.num_rows - 1), out.vocab, s.beam_logprobs);
  return true;
}

std::vector<Sequence*> OutputProcessor::expand(Request& r, Sequence& s) {
  if (r.expanded || r.params.n == 1) return {&s};
  // The prompt is computed once; fork it into n sequences that share its blocks.
  r.expanded = true;
  std::vector<Sequence*> all = {&s};
  for (int32_t i = 1; i < r.params.n; ++i) {
    auto child = std::make_unique<Sequence>();
    child->index = i;
    child->tokens = s.tokens;
    child->num_computed = s.num_computed;
    child->rng = make_rng(r.params, i);
    child->history = s.history;
    child->logits_reported = s.logits_reported;
    kv_.fork(s.blocks, child->blocks);
    all.push_back(child.get());
    r.seqs.push_back(std::move(child));
  }
  return all;
}

void OutputProcessor::pick_all(std::vector<Pick>& picks, int64_t vocab) {
  const int64_t n = static_cast<int64_t>(picks.size());
  // Every row picked on the device (greedy on CUDA): no thread team to start.
  if (std::none_of(picks.begin(), picks.end(), [](const Pick& k) { return k.row != nullptr; })) return;
  const int threads = n > 1 && n * vocab > (1 << 16) ? config_.sampler_threads : 1;
  parallel_for_dynamic(n, threads, [&](int64_t i) {
    thread_local std::vector<float> row, logprobs;  // the thread's, kept between steps
    thread_local std::vector<double> probs;
    thread_local std::vector<int32_t> order;
    Pick& k = picks[i];
    if (k.row == nullptr) return;  // picked on the device
    const SamplingParams& p = k.req->params;
    const float* logits = k.row;
    const bool process = Sampler::needs_processing(p, k.req->num_generated(*k.seq));
    if (process || k.mask) {
      row.assign(k.row, k.row + vocab);
      if (k.mask && !Sampler::apply_mask(row.data(), vocab, k.mask)) {
        k.token = -1;
        return;
      }
      if (process) Sampler::process(row.data(), vocab, p, k.seq->tokens, k.req->prompt_len, config_.eos_token_ids);
      logits = row.data();
    }
    k.token = Sampler::pick(logits, vocab, p, k.seq->rng, probs, order);
    if (p.logprobs) {
      Sampler::log_softmax(k.row, vocab, logprobs);
      k.logprob = Sampler::token_logprob(logprobs, k.token, *p.logprobs);
    }
  });
}

void OutputProcessor::count_computed(const ScheduledSeq& sc) {
  Sequence& s = *sc.seq;
  kv_.note_computed(s.blocks, s.num_computed, s.num_computed + sc.num_new_tokens);
  s.num_computed += sc.num_new_tokens;
  cache_known(s);
}

void OutputProcessor::cache_known(Sequence& s) {
  // A sequence swapped out since its step was launched has no blocks now
  // (cache_full_blocks stops at the table's end); they are cached again after
  // they come back.
  kv_.cache_full_blocks(s.blocks, s.tokens.data(), std::min(s.num_computed, s.num_known()));
}

bool OutputProcessor::pipelinable(const SchedulerOutput& step, bool masked_ok) {
  return std::all_of(step.scheduled.begin(), step.scheduled.end(), [masked_ok](const ScheduledSeq& s) {
    const SamplingParams& p = s.req->params;
    const int64_t generated = s.req->num_generated(*s.seq);
    return (!p.masked || masked_ok) && p.speculative.empty() && s.seq->num_draft == 0 && (p.n == 1 || s.req->expanded) &&
           !p.is_beam_search() && !p.return_logits && !p.prompt_logprobs &&
           !Sampler::needs_processing(p, generated) && (plain_greedy(s) || Sampler::drawn_on_device(p, generated));
  });
}

std::vector<int32_t> OutputProcessor::launched(const SchedulerOutput& step, const ModelOutput& out) {
  std::vector<int32_t> sources(step.scheduled.size(), kNoSource);
  for (size_t i = 0; i < step.scheduled.size(); ++i) {
    const ScheduledSeq& sc = step.scheduled[i];
    Sequence& s = *sc.seq;
    const LogitsSlice& slice = (*out.slices)[i];
    count_computed(sc);
    if (!slice.samples) continue;
    const int32_t draw = out.first_draw.empty() ? -1 : out.first_draw[i];
    sources[i] = draw >= 0 ? -1 - draw : slice.first_row + slice.num_rows - 1;
    s.tokens.push_back(-1);
    ++s.pending;
    s.pending_source = sources[i];
    s.ends_pending = sc.req->num_generated(s) >= sc.req->params.max_tokens || s.num_tokens() >= config_.max_model_len;
  }
  return sources;
}

void OutputProcessor::process_launched(const SchedulerOutput& step, const ModelOutput& out,
                                       const std::vector<int32_t>& sources, const StepMasks& masks) {
  masks_ = &masks;
  for (size_t i = 0; i < step.scheduled.size(); ++i) {
    const ScheduledSeq& sc = step.scheduled[i];
    const int32_t source = sources[i];
    if (sc.seq->done || source == kNoSource) continue;
    Pick pick;
    pick.req = sc.req;
    pick.seq = sc.seq;
    const auto m = masks.by_seq.find(sc.seq);
    if (m != masks.by_seq.end() && !Sampler::mask_allows_any(m->second, out.vocab)) {
      pick.token = -1;  // apply() ends it with the mask's error
    } else if (source >= 0) {
      pick.token = out.argmax[source];
    } else {
      const int32_t draw = -1 - source;
      pick.token = out.sampled[draw];
      if (sc.req->params.logprobs) pick.logprob = drawn_logprob(out.sampled_logprobs[draw], pick.token);
    }
    if (apply(pick)) continue;  // ended (and may be gone)
    cache_known(*sc.seq);
    sink_.push_event(make_event(*sc.req, *sc.seq, false, false, FinishReason::None, ""));
  }
  static const StepMasks kNoMasks;
  masks_ = &kNoMasks;  // `masks` goes with its step
}

bool OutputProcessor::apply(Pick& k) {
  Request& r = *k.req;
  Sequence& s = *k.seq;
  const SamplingParams& p = r.params;
  const int32_t tok = k.token;
  if (tok < 0) {
    const std::string& why = masks_->error_of(&s);
    sink_.finish_seq(r, s, FinishReason::Error,
                     why.empty() ? "the token mask allows no token" : "token mask: " + why);
    return true;
  }
  if (p.logprobs) {
    s.cum_logprob += k.logprob.logprob;
    s.new_logprobs.push_back(std::move(k.logprob));
  }
  if (s.pending > 0) {  // async scheduling: the oldest placeholder is this token
    s.tokens[static_cast<size_t>(s.num_tokens() - s.pending)] = tok;
    --s.pending;
  } else {
    s.tokens.push_back(tok);
  }
  s.new_tokens.push_back(tok);
  sink_.count_generated(1);  // before the event: a host that sees it sees the count
  const auto& eos = config_.eos_token_ids;
  const auto& stops = p.stop_token_ids;
  const int64_t length = s.num_known(), generated = length - r.prompt_len;  // up to this token
  const bool min_reached = generated > p.min_tokens;
  FinishReason reason = FinishReason::None;
  if (min_reached && !p.ignore_eos && std::find(eos.begin(), eos.end(), tok) != eos.end())
    reason = FinishReason::Stop;
  else if (min_reached && std::find(stops.begin(), stops.end(), tok) != stops.end())
    reason = FinishReason::Stop;
  else if (generated >= p.max_tokens || length >= config_.max_model_len)
    reason = FinishReason::Length;
  if (reason != FinishReason::None) {
    sink_.finish_seq(r, s, reason, "");
    return true;
  }
  return false;
}

// Rows slice.first_row + i, i = 0 .. k, hold the logits at positions P + i,
// P being the sequence's last token before its k proposals d_1 .. d_k: row i
// decides the token at P + i + 1 (d_{i+1} proposed). Tokens are decided in
// order, each row processed with the tokens before it (penalties), until one
// differs from its proposal (greedy) or is rejected (sampling); the last row
// gives one more token when every proposal was kept. The K/V of positions P
// .. P + accepted came from verified inputs: they count as computed (and may
// enter the prefix cache); the rest is rolled back, and the blocks that held
// only rolled-back positions return to the pool. Structured output: row i
// takes the i-th of the sequence's masks (the grammar's after i proposals),
// before any processing; a proposal its mask refuses is never accepted.
void OutputProcessor::verify(const ScheduledSeq& sc, const LogitsSlice& slice, const ModelOutput& out) {
  Sequence& s = *sc.seq;
  Request& r = *sc.req;
  const SamplingParams& p = r.params;
  const int32_t k = s.num_draft;
  const int64_t P = s.num_tokens() - k - 1;
  const std::vector<int32_t> draft(s.tokens.end() - k, s.tokens.end());
  s.tokens.resize(static_cast<size_t>(P + 1));
  s.num_draft = 0;
  std::vector<float> row, lp;
  std::vector<double> prob;
  std::vector<int32_t> order;
  std::vector<Pick> picks;
  int32_t accepted = 0;
  const auto m = masks_->by_seq.find(&s);
  const uint32_t* masks = m != masks_->by_seq.end() ? m->second : nullptr;  // k + 1 of them
  for (int32_t i = 0; i <= k; ++i) {
    const uint32_t* mask = masks ? masks + i * masks_->words_per_row : nullptr;
    if (out.argmax != nullptr) {  // plain greedy (greedy_only): the device's picks, no logits
      Pick pick;
      pick.req = &r;
      pick.seq = &s;
      pick.token = mask && !Sampler::mask_allows_any(mask, out.vocab) ? -1 : out.argmax[slice.first_row + i];
      s.tokens.push_back(pick.token);
      picks.push_back(std::move(pick));
      if (i == k || s.tokens.back() != draft[i]) break;
      ++accepted;
      continue;
    }
    const float* raw = out.row(slice.first_row + i);
    const float* logits = raw;
    bool kept = false;
    Pick pick;
    pick.req = &r;
    pick.seq = &s;
    const bool process = Sampler::needs_processing(p, r.num_generated(s));
    if (process || mask) {  // s.tokens: the tokens before position P + i + 1
      row.assign(raw, raw + out.vocab);
      if (mask && !Sampler::apply_mask(row.data(), out.vocab, mask)) {
        pick.token = -1;  // apply() ends the sequence with the mask's error
        picks.push_back(std::move(pick));
        break;
      }
      if (process) Sampler::process(row.data(), out.vocab, p, s.tokens, r.prompt_len, config_.eos_token_ids);
      logits = row.data();
    }
    pick.token = i < k ? Sampler::verify_draft(logits, out.vocab, p, s.rng, draft[i], kept, prob, order)
                       : Sampler::pick(logits, out.vocab, p, s.rng, prob, order);
    if (p.logprobs) {
      Sampler::log_softmax(raw, out.vocab, lp);
      pick.logprob = Sampler::token_logprob(lp, pick.token, *p.logprobs);
    }
    s.tokens.push_back(pick.token);
    picks.push_back(std::move(pick));
    if (!kept) break;
    ++accepted;
  }
  // Positions P .. P + accepted are computed (s.tokens holds them, the kept
  // proposals, then the one token more); the next step computes that last token.
  const int64_t computed = P + accepted + 1;
  kv_.note_computed(s.blocks, s.num_computed, computed);
  s.num_computed = computed;
  kv_.cache_full_blocks(s.blocks, s.tokens.data(), s.num_computed);
  kv_.truncate(s.blocks, computed + 1);
  s.tokens.resize(static_cast<size_t>(P + 1));  // apply() appends them again, checking each
  s.spec_proposed += k;
  s.spec_accepted += accepted;
  sink_.count_speculative(k, accepted);
  adapt_proposals(s, k, accepted, p.num_speculative_tokens);
  for (Pick& pick : picks)
    if (apply(pick)) return;  // the sequence ended (and may be gone)
  sink_.push_event(make_event(r, s, false, false, FinishReason::None, ""));
}

void OutputProcessor::beam_group_step(Request& r) {
  std::vector<int32_t> stop_ids = r.params.stop_token_ids;
  if (!r.params.ignore_eos)
    for (int32_t id : config_.eos_token_ids)
      if (std::find(stop_ids.begin(), stop_ids.end(), id) == stop_ids.end()) stop_ids.push_back(id);
  const int64_t limit = std::min<int64_t>(r.params.max_tokens, config_.max_model_len - r.prompt_len);
  const std::vector<BeamChoice> next = beam_step(r, stop_ids, limit);
  sink_.count_generated(static_cast<int64_t>(r.seqs.size()));
  if (next.empty()) {  // the search is over: the best n finished beams, best first
    const size_t n = std::min<size_t>(static_cast<size_t>(r.params.n), r.beam_done.size());
    std::vector<Event> finals;
    for (size_t i = 0; i < n; ++i) {
      const BeamHypothesis& h = r.beam_done[i];
      Event ev;
      ev.request_id = r.id;
      ev.index = static_cast<int32_t>(i);
      ev.token_ids = h.tokens;
      ev.finished = true;
      ev.request_finished = i + 1 == n;
      const bool stopped = !h.tokens.empty() &&
                           std::find(stop_ids.begin(), stop_ids.end(), h.tokens.back()) != stop_ids.end();
      ev.finish_reason = stopped ? FinishReason::Stop : FinishReason::Length;
      ev.num_preemptions = r.num_preemptions;
      ev.cumulative_logprob = h.cum_logprob;
      ev.score = h.score;
      finals.push_back(std::move(ev));
    }
    sink_.finish_beams(r, std::move(finals));
    return;
  }
  // New beams fork their parents' blocks; then the old beams let go of theirs.
  std::vector<std::unique_ptr<Sequence>> beams;
  for (size_t i = 0; i < next.size(); ++i) {
    const Sequence& parent = *r.seqs[next[i].parent];
    auto b = std::make_unique<Sequence>();
    b->index = static_cast<int32_t>(i);
    b->tokens = parent.tokens;
    b->tokens.push_back(next[i].token);
    b->num_computed = parent.num_computed;
    b->cum_logprob = next[i].cum_logprob;
    kv_.fork(parent.blocks, b->blocks);
    beams.push_back(std::move(b));
  }
  for (auto& s : r.seqs) kv_.free(s->blocks);
  r.seqs.swap(beams);
}

Event OutputProcessor::make_event(Request& r, Sequence& s, bool finished, bool request_finished,
                                  FinishReason reason, const std::string& error) {
  Event ev;
  ev.request_id = r.id;
  ev.index = s.index;
  ev.token_ids.swap(s.new_tokens);
  ev.logprobs.swap(s.new_logprobs);
  ev.prompt_logprobs.swap(s.new_prompt_logprobs);
  ev.logits.swap(s.new_logits);
  ev.logit_rows = s.new_logit_rows;
  s.new_logit_rows = 0;
  ev.finished = finished;
  ev.request_finished = request_finished;
  ev.finish_reason = finished ? reason : FinishReason::None;
  ev.error = error;
  ev.num_preemptions = r.num_preemptions;
  ev.cumulative_logprob = s.cum_logprob;
  ev.spec_proposed = s.spec_proposed;
  ev.spec_accepted = s.spec_accepted;
  return ev;
}

}  // namespace pagedrt
