#include "engine/engine.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>

#include "pagedrt/error.hpp"

namespace pagedrt {

Engine::Engine(std::unique_ptr<Backend> backend, std::unique_ptr<LlamaModel> model, KvCache kv,
               const SchedulerConfig& sched, bool enable_prefix_caching, int sampler_threads)
    : backend_(std::move(backend)),
      model_(std::move(model)),
      kv_(std::move(kv)),
      pool_(static_cast<int32_t>(kv_.num_blocks), static_cast<int32_t>(kv_.block_size)),
      kv_manager_(pool_, enable_prefix_caching),
      scheduler_(sched, kv_manager_),
      sched_config_(sched),
      sampler_threads_(std::max(1, sampler_threads)) {
  stats_.num_blocks = kv_.num_blocks;
  stats_.block_size = kv_.block_size;
  stats_.blocks_free = kv_.num_blocks;
  stats_.kv_cache_bytes = kv_.num_blocks * kv_.bytes_per_block;
  thread_ = std::thread([this] { loop(); });
}

Engine::~Engine() { stop(); }

// ---- host-thread side ------------------------------------------------------------

void Engine::submit(std::unique_ptr<Request> req, bool owned) {
  if (!outbox_.open(req->id, owned))
    throw Error(ErrorKind::InvalidArgument,
                "request_id '" + req->id + "' is already in use (its final event has not been read)");
  {
    std::lock_guard<std::mutex> lk(in_mu_);
    if (stopping_) {
      outbox_.discard(req->id);
      throw Error(ErrorKind::InvalidArgument, "the runtime is closed");
    }
    req->arrival = next_arrival_++;
    new_requests_.push_back(std::move(req));
  }
  in_cv_.notify_one();
}

namespace {
// abort() and release() answer for a request in `state`: true while it runs.
bool running(Outbox::State state, const std::string& id) {
  if (state == Outbox::State::Unknown) throw Error(ErrorKind::InvalidArgument, "unknown request id '" + id + "'");
  return state == Outbox::State::Running;
}
}  // namespace

bool Engine::abort(const std::string& id, int32_t index) {
  if (!running(outbox_.state(id), id)) return false;
  {
    std::lock_guard<std::mutex> lk(in_mu_);
    if (stopping_) return false;
    aborts_.emplace_back(id, index);
  }
  in_cv_.notify_one();
  return true;
}

bool Engine::release(const std::string& id) {
  if (!running(outbox_.release(id), id)) return false;
  {
    std::lock_guard<std::mutex> lk(in_mu_);
    if (stopping_) return true;  // the shutdown ends it; its events are dropped
    aborts_.emplace_back(id, -1);
  }
  in_cv_.notify_one();
  return true;
}

Stats Engine::stats() const {
  std::lock_guard<std::mutex> lk(stats_mu_);
  return stats_;
}

void Engine::stop() {
  {
    std::lock_guard<std::mutex> lk(in_mu_);
    stopping_ = true;
  }
  in_cv_.notify_all();
  // Two join() calls on one std::thread are undefined (pthread_join on a joined
  // thread hung here when close() ran on two threads at once).
  std::lock_guard<std::mutex> lk(join_mu_);
  if (thread_.joinable()) thread_.join();
  // The engine thread has ended and nothing reads the model, the KV cache or
  // the backend again (poll and stats read only queues and counters): their
  // memory, the GPU's on CUDA, goes now rather than with the Runtime object.
  model_.reset();
  kv_ = KvCache{};
  backend_.reset();
  std::vector<float>().swap(logits_);
}

// ---- engine thread ---------------------------------------------------------------

void Engine::loop() {
  for (;;) {
    {
      std::unique_lock<std::mutex> lk(in_mu_);
      in_cv_.wait(lk, [&] {
        return stopping_ || !new_requests_.empty() || !aborts_.empty() || scheduler_.has_work();
      });
      if (stopping_) break;
    }
    drain_inbox();
    if (scheduler_.has_work()) step();
    publish_stats();
    wake_pollers();
  }
  // Shutdown: whatever is still queued or running ends with an Abort event.
  drain_inbox();
  std::vector<Request*> live;
  for (auto& kv : requests_) live.push_back(kv.second.get());
  std::sort(live.begin(), live.end(), [](Request* a, Request* b) { return a->arrival < b->arrival; });
  for (Request* r : live) finish_request(*r, FinishReason::Abort);
  publish_stats();
  wake_pollers();
}

void Engine::drain_inbox() {
  std::deque<std::unique_ptr<Request>> incoming;
  std::vector<std::pair<std::string, int32_t>> aborts;
  {
    std::lock_guard<std::mutex> lk(in_mu_);
    incoming.swap(new_requests_);
    aborts.swap(aborts_);
  }
  for (auto& req : incoming) {
    Request* r = req.get();
    requests_[r->id] = std::move(req);
    scheduler_.add(r);
  }
  for (const auto& [id, index] : aborts) {
    auto it = requests_.find(id);
    if (it == requests_.end()) continue;
    Request& r = *it->second;
    if (index < 0 || r.params.is_beam_search()) {
      finish_request(r, index < 0 ? FinishReason::Abort : FinishReason::Stop);
      continue;
    }
    for (auto& s : r.seqs)
      if (s->index == index) {
        finish_seq(r, *s, FinishReason::Stop);
        break;
      }
  }
}

void Engine::step() {
  SchedulerOutput out = scheduler_.schedule();
  if (out.empty()) {  // nothing fits right now; a finishing request will free blocks
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
    return;
  }
  batch_.build(out, static_cast<int32_t>(kv_.block_size));
  const BatchView& view = batch_.view();
  const int64_t vocab = model_->config().vocab_size;
  // Every sampled row plain greedy and no logits wanted on the host: the
  // device picks the tokens and only their ids travel (256 x 128K fp32 logits
  // a step otherwise).
  const bool device_greedy = backend_->has_argmax() && greedy_only(out);
  if (device_greedy)
    argmax_.resize(static_cast<size_t>(view.num_logits));
  else
    logits_.resize(static_cast<size_t>(view.num_logits) * vocab);
  const float* logits = device_greedy ? nullptr : logits_.data();
  try {
    if (!out.copies.empty())
      for (size_t l = 0; l < kv_.k.size(); ++l) {
        backend_->copy_blocks(kv_.k[l], out.copies);
        backend_->copy_blocks(kv_.v[l], out.copies);
      }
    model_->forward(view, kv_, logits_.data(), device_greedy ? argmax_.data() : nullptr);
  } catch (const std::exception& e) {
    std::vector<Request*> failed;
    for (const ScheduledSeq& s : out.scheduled)
      if (std::find(failed.begin(), failed.end(), s.req) == failed.end()) failed.push_back(s.req);
    for (Request* r : failed) finish_request(*r, FinishReason::Error, std::string("forward failed: ") + e.what());
    return;
  }
  int64_t prompt_tokens = 0;
  for (const ScheduledSeq& s : out.scheduled)
    prompt_tokens += std::max<int64_t>(
        0, std::min<int64_t>(s.req->prompt_len, s.seq->num_computed + s.num_new_tokens) - s.seq->num_computed);
  {
    std::lock_guard<std::mutex> lk(stats_mu_);
    stats_.num_steps += 1;
    stats_.num_preemptions += static_cast<int64_t>(out.preempted.size());
    stats_.prompt_tokens += prompt_tokens;
  }

  // Phase 1: progress of every sequence. Phase 2: sampling (may end sequences
  // and requests). Phase 3: beam groups whose beams are all at their sampling point.
  std::vector<std::pair<size_t, Sequence*>> to_sample;
  std::vector<Request*> beam_groups;
  for (size_t i = 0; i < out.scheduled.size(); ++i) {
    const ScheduledSeq& s = out.scheduled[i];
    if (!advance(s, batch_.logits()[i], logits)) continue;
    if (s.req->params.is_beam_search()) {
      if (std::find(beam_groups.begin(), beam_groups.end(), s.req) == beam_groups.end()) beam_groups.push_back(s.req);
    } else {
      to_sample.emplace_back(i, s.seq);
    }
  }
  // Picks are independent per sequence (own row, own random stream): made in
  // parallel, then applied in order (which may end sequences and requests).
  std::vector<Pick> picks;
  for (const auto& [i, seq] : to_sample) {
    const LogitsSlice& slice = batch_.logits()[i];
    const int64_t last = slice.first_row + slice.num_rows - 1;
    for (Sequence* q : expand(*out.scheduled[i].req, *seq)) {
      Pick pick;
      pick.req = out.scheduled[i].req;
      pick.seq = q;
      if (device_greedy)
        pick.token = argmax_[last];  // row stays null: pick_all leaves it
      else
        pick.row = logits + last * vocab;
      picks.push_back(std::move(pick));
    }
  }
  pick_all(picks);
  for (Pick& p : picks) apply(p);
  for (Request* r : beam_groups) {
    const bool all_ready = std::all_of(r->seqs.begin(), r->seqs.end(),
                                       [](const std::unique_ptr<Sequence>& s) { return s->at_sampling_point(); });
    if (all_ready) beam_group_step(*r);
  }
}

bool Engine::greedy_only(const SchedulerOutput& out) const {
  for (const ScheduledSeq& s : out.scheduled) {
    const SamplingParams& p = s.req->params;
    if (p.return_logits || p.is_beam_search() || p.logprobs || p.n != 1) return false;
    if (p.temperature != 0.0f || Sampler::needs_processing(p, s.req->num_generated(*s.seq))) return false;
  }
  return true;
}

bool Engine::advance(const ScheduledSeq& sc, const LogitsSlice& slice, const float* logits) {
  Sequence& s = *sc.seq;
  Request& r = *sc.req;
  const int64_t vocab = model_->config().vocab_size;
  s.num_computed += sc.num_new_tokens;
  kv_manager_.cache_full_blocks(s.blocks, s.tokens.data(), s.num_computed);
  if (r.params.return_logits && slice.num_rows > 0) {
    const float* rows = logits + static_cast<int64_t>(slice.first_row) * vocab;
    s.new_logits.insert(s.new_logits.end(), rows, rows + static_cast<int64_t>(slice.num_rows) * vocab);
    s.new_logit_rows += slice.num_rows;
    s.logits_reported = slice.first_pos + slice.num_rows;
  }
  if (!slice.samples) {
    if (s.new_logit_rows > 0 && !r.params.is_beam_search()) emit(r, s, false, false, FinishReason::None, "");
    return false;
  }
  if (r.params.is_beam_search()) {
    Sampler::log_softmax(logits + static_cast<int64_t>(slice.first_row + slice.num_rows - 1) * vocab, vocab,
                         s.beam_logprobs);
  }
  return true;
}

std::vector<Sequence*> Engine::expand(Request& r, Sequence& s) {
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
    child->logits_reported = s.logits_reported;
    kv_manager_.fork(s.blocks, child->blocks);
    all.push_back(child.get());
    r.seqs.push_back(std::move(child));
  }
  return all;
}

void Engine::pick_all(std::vector<Pick>& picks) {
  const int64_t vocab = model_->config().vocab_size;
  const int64_t n = static_cast<int64_t>(picks.size());
  // Every row picked on the device (greedy on CUDA): no thread team to start.
  if (std::none_of(picks.begin(), picks.end(), [](const Pick& k) { return k.row != nullptr; })) return;
#pragma omp parallel num_threads(sampler_threads_) if (n > 1 && n * vocab > (1 << 16))
  {
    std::vector<float> row, logprobs;  // per thread
    std::vector<double> probs;
    std::vector<int32_t> order;
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < n; ++i) {
      Pick& k = picks[i];
      if (k.row == nullptr) continue;  // picked on the device
      const SamplingParams& p = k.req->params;
      const float* logits = k.row;
      if (Sampler::needs_processing(p, k.req->num_generated(*k.seq))) {
        row.assign(k.row, k.row + vocab);
        Sampler::process(row.data(), vocab, p, k.seq->tokens, k.req->prompt_len, sched_config_.eos_token_ids);
        logits = row.data();
      }
      k.token = Sampler::pick(logits, vocab, p, k.seq->rng, probs, order);
      if (p.logprobs) {
        Sampler::log_softmax(k.row, vocab, logprobs);
        k.logprob = Sampler::token_logprob(logprobs, k.token, *p.logprobs);
      }
    }
  }
}

void Engine::apply(Pick& k) {
  Request& r = *k.req;
  Sequence& s = *k.seq;
  const SamplingParams& p = r.params;
  const int32_t tok = k.token;
  if (p.logprobs) {
    s.cum_logprob += k.logprob.logprob;
    s.new_logprobs.push_back(std::move(k.logprob));
  }
  s.tokens.push_back(tok);
  s.new_tokens.push_back(tok);
  {
    std::lock_guard<std::mutex> lk(stats_mu_);
    stats_.generated_tokens += 1;
  }
  const auto& eos = sched_config_.eos_token_ids;
  const auto& stops = p.stop_token_ids;
  const bool min_reached = r.num_generated(s) > p.min_tokens;
  FinishReason reason = FinishReason::None;
  if (min_reached && !p.ignore_eos && std::find(eos.begin(), eos.end(), tok) != eos.end())
    reason = FinishReason::Stop;
  else if (min_reached && std::find(stops.begin(), stops.end(), tok) != stops.end())
    reason = FinishReason::Stop;
  else if (r.num_generated(s) >= p.max_tokens || s.num_tokens() >= sched_config_.max_model_len)
    reason = FinishReason::Length;
  if (reason != FinishReason::None)
    finish_seq(r, s, reason);
  else
    emit(r, s, false, false, FinishReason::None, "");
}

void Engine::beam_group_step(Request& r) {
  std::vector<int32_t> stop_ids = r.params.stop_token_ids;
  if (!r.params.ignore_eos)
    for (int32_t id : sched_config_.eos_token_ids)
      if (std::find(stop_ids.begin(), stop_ids.end(), id) == stop_ids.end()) stop_ids.push_back(id);
  const int64_t limit = std::min<int64_t>(r.params.max_tokens, sched_config_.max_model_len - r.prompt_len);
  const std::vector<BeamChoice> next = beam_step(r, stop_ids, limit);
  {
    std::lock_guard<std::mutex> lk(stats_mu_);
    stats_.generated_tokens += static_cast<int64_t>(r.seqs.size());
  }
  if (next.empty()) {  // the search is over: the best n finished beams, best first
    scheduler_.remove(&r);  // frees the live beams' blocks
    r.seqs.clear();
    const size_t n = std::min<size_t>(static_cast<size_t>(r.params.n), r.beam_done.size());
    if (n == 0) return finish_request(r, FinishReason::Length);  // defensive: no hypothesis at all
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
      if (i + 1 == n) drop_request(r);  // before the last event: stats and ids are current when it lands
      push_event(std::move(ev));
    }
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
    kv_manager_.fork(parent.blocks, b->blocks);
    beams.push_back(std::move(b));
  }
  for (auto& s : r.seqs) kv_manager_.free(s->blocks);
  r.seqs.swap(beams);
}

void Engine::emit(Request& r, Sequence& s, bool finished, bool request_finished, FinishReason reason,
                  const std::string& error) {
  Event ev;
  ev.request_id = r.id;
  ev.index = s.index;
  ev.token_ids.swap(s.new_tokens);
  ev.logprobs.swap(s.new_logprobs);
  ev.logits.swap(s.new_logits);
  ev.logit_rows = s.new_logit_rows;
  s.new_logit_rows = 0;
  ev.finished = finished;
  ev.request_finished = request_finished;
  ev.finish_reason = finished ? reason : FinishReason::None;
  ev.error = error;
  ev.num_preemptions = r.num_preemptions;
  ev.cumulative_logprob = s.cum_logprob;
  push_event(std::move(ev));
}

void Engine::push_event(Event ev) {
  ev.time = std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
  outbox_.push(std::move(ev));
}

void Engine::wake_pollers() { outbox_.notify(); }

void Engine::finish_seq(Request& r, Sequence& s, FinishReason reason, const std::string& error) {
  // Free first and publish, so that a host that sees the final event also sees
  // the blocks back in stats() and can reuse the id at once.
  kv_manager_.free(s.blocks);
  s.num_computed = 0;
  const bool last = r.seqs.size() == 1 && (r.expanded || r.params.n == 1);
  if (last) drop_request(r);  // r and s stay alive until requests_ lets go, below
  emit(r, s, true, last, reason, error);
  if (last) {
    const std::string id = r.id;
    requests_.erase(id);  // destroys r and s
    return;
  }
  auto it = std::find_if(r.seqs.begin(), r.seqs.end(), [&](const std::unique_ptr<Sequence>& q) { return q.get() == &s; });
  r.seqs.erase(it);
}

void Engine::finish_request(Request& r, FinishReason reason, const std::string& error) {
  if (r.params.is_beam_search() || r.seqs.empty()) {
    // One final event for the whole search (no beam is complete).
    drop_request(r);
    Event ev;
    ev.request_id = r.id;
    ev.finished = ev.request_finished = true;
    ev.finish_reason = reason;
    ev.error = error;
    ev.num_preemptions = r.num_preemptions;
    push_event(std::move(ev));
  } else {
    drop_request(r);
    for (size_t i = 0; i < r.seqs.size(); ++i)
      emit(r, *r.seqs[i], true, i + 1 == r.seqs.size(), reason, error);
  }
  const std::string id = r.id;
  requests_.erase(id);  // destroys r
}

void Engine::drop_request(Request& r) {
  scheduler_.remove(&r);  // frees every live sequence's blocks
  for (auto& s : r.seqs) s->num_computed = 0;
  publish_stats();
}

void Engine::publish_stats() {
  // Token slots holding K/V, counted per physical block (a block shared by
  // forks or prefix hits counts once, as filled as its fullest owner).
  const int64_t bs = kv_.block_size;
  filled_.assign(static_cast<size_t>(pool_.num_blocks()), 0);
  for (auto& kv : requests_) {
    for (const auto& sq : kv.second->seqs) {
      const Sequence& s = *sq;
      for (size_t i = 0; i < s.blocks.table.size(); ++i) {
        const int64_t n = std::min<int64_t>(bs, std::max<int64_t>(0, s.num_computed - static_cast<int64_t>(i) * bs));
        int32_t& f = filled_[s.blocks.table[i]];
        f = std::max<int32_t>(f, static_cast<int32_t>(n));
      }
    }
  }
  int64_t slots = 0, logical = 0;
  for (int32_t f : filled_) slots += f;
  for (auto& kv : requests_)
    for (const auto& sq : kv.second->seqs) logical += static_cast<int64_t>(sq->blocks.table.size());
  const double now = std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();

  std::lock_guard<std::mutex> lk(stats_mu_);
  stats_.blocks_used = pool_.num_used();
  stats_.blocks_free = pool_.num_free();
  stats_.blocks_cached_free = pool_.num_cached_free();
  stats_.slots_used = slots;
  stats_.waste = stats_.blocks_used ? 1.0 - double(slots) / double(stats_.blocks_used * bs) : 0.0;
  if (stats_.blocks_used > stats_.peak_blocks_used) {
    stats_.peak_blocks_used = stats_.blocks_used;
    stats_.waste_at_peak = stats_.waste;
  }
  stats_.blocks_logical = logical;
  stats_.peak_blocks_logical = std::max(stats_.peak_blocks_logical, logical);
  stats_.num_waiting = static_cast<int64_t>(scheduler_.num_waiting());
  stats_.num_running = static_cast<int64_t>(scheduler_.num_running());
  stats_.prefix_queries = kv_manager_.prefix_queries();
  stats_.prefix_hits = kv_manager_.prefix_hits();
  stats_.num_copies = kv_manager_.num_copies();
  // generation rate over the last five seconds of steps
  rate_window_.emplace_back(now, stats_.generated_tokens);
  while (rate_window_.size() > 2 && now - rate_window_.front().first > 5.0) rate_window_.pop_front();
  const double span = now - rate_window_.front().first;
  stats_.tokens_per_s = span > 0 ? double(stats_.generated_tokens - rate_window_.front().second) / span : 0.0;
}

}  // namespace pagedrt
