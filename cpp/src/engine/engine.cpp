#include "engine/engine.hpp"

#include <algorithm>
#include <chrono>

#include "pagedrt/error.hpp"

namespace pagedrt {

Engine::Engine(std::unique_ptr<Backend> backend, std::unique_ptr<LlamaModel> model, KvCache kv,
               const SchedulerConfig& sched, bool enable_prefix_caching)
    : backend_(std::move(backend)),
      model_(std::move(model)),
      kv_(std::move(kv)),
      pool_(static_cast<int32_t>(kv_.num_blocks), static_cast<int32_t>(kv_.block_size)),
      kv_manager_(pool_, enable_prefix_caching),
      scheduler_(sched, kv_manager_),
      sched_config_(sched) {
  stats_.num_blocks = kv_.num_blocks;
  stats_.block_size = kv_.block_size;
  stats_.blocks_free = kv_.num_blocks;
  stats_.kv_cache_bytes = kv_.num_blocks * kv_.bytes_per_block;
  thread_ = std::thread([this] { loop(); });
}

Engine::~Engine() { stop(); }

void Engine::submit(std::unique_ptr<Request> req) {
  {
    std::lock_guard<std::mutex> lk(in_mu_);
    if (stopping_) throw Error(ErrorKind::InvalidArgument, "the runtime is closed");
    if (!live_ids_.insert(req->id).second)
      throw Error(ErrorKind::InvalidArgument, "request_id '" + req->id + "' is already in use");
    req->arrival = next_arrival_++;
    new_requests_.push_back(std::move(req));
  }
  in_cv_.notify_one();
}

bool Engine::abort(const std::string& id) {
  {
    std::lock_guard<std::mutex> lk(in_mu_);
    if (stopping_ || live_ids_.count(id) == 0) return false;
    aborts_.push_back(id);
  }
  in_cv_.notify_one();
  return true;
}

std::vector<Event> Engine::poll(const std::string* id, double timeout_s) {
  std::unique_lock<std::mutex> lk(out_mu_);
  auto ready = [&] {
    if (id == nullptr) return !events_.empty();
    return std::any_of(events_.begin(), events_.end(),
                       [&](const Event& e) { return e.request_id == *id; });
  };
  if (timeout_s > 0) out_cv_.wait_for(lk, std::chrono::duration<double>(timeout_s), ready);
  std::vector<Event> out;
  if (id == nullptr) {
    out.assign(std::make_move_iterator(events_.begin()), std::make_move_iterator(events_.end()));
    events_.clear();
  } else {
    std::deque<Event> rest;
    for (Event& e : events_) (e.request_id == *id ? out.emplace_back(std::move(e)) : rest.emplace_back(std::move(e)));
    events_.swap(rest);
  }
  return out;
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
  if (thread_.joinable()) thread_.join();
}

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
  }
  // Shutdown: whatever is still queued or running ends with an Abort event.
  drain_inbox();
  std::vector<Request*> live;
  for (auto& kv : requests_) live.push_back(kv.second.get());
  std::sort(live.begin(), live.end(), [](Request* a, Request* b) { return a->arrival < b->arrival; });
  for (Request* r : live) finish(r, FinishReason::Abort);
  publish_stats();
}

void Engine::drain_inbox() {
  std::deque<std::unique_ptr<Request>> incoming;
  std::vector<std::string> aborts;
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
  for (const std::string& id : aborts) {
    auto it = requests_.find(id);
    if (it != requests_.end()) finish(it->second.get(), FinishReason::Abort);
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
  logits_.resize(static_cast<size_t>(view.num_logits) * vocab);
  try {
    if (!out.copies.empty())
      for (size_t l = 0; l < kv_.k.size(); ++l) {
        backend_->copy_blocks(kv_.k[l], out.copies);
        backend_->copy_blocks(kv_.v[l], out.copies);
      }
    model_->forward(view, kv_, logits_.data());
  } catch (const std::exception& e) {
    for (const ScheduledRequest& s : out.scheduled)
      finish(s.req, FinishReason::Error, std::string("forward failed: ") + e.what());
    return;
  }
  int64_t prompt_tokens = 0;
  for (const ScheduledRequest& s : out.scheduled)
    prompt_tokens += std::max<int64_t>(0, std::min<int64_t>(s.req->prompt_len, s.req->num_computed + s.num_new_tokens) -
                                              s.req->num_computed);
  for (size_t i = 0; i < out.scheduled.size(); ++i)
    update(out.scheduled[i], batch_.logits()[i], logits_.data());

  std::lock_guard<std::mutex> lk(stats_mu_);
  stats_.num_steps += 1;
  stats_.num_preemptions += static_cast<int64_t>(out.preempted.size());
  stats_.prompt_tokens += prompt_tokens;
}

void Engine::update(const ScheduledRequest& s, const LogitsSlice& slice, const float* logits) {
  Request* r = s.req;
  const int64_t vocab = model_->config().vocab_size;
  r->num_computed += s.num_new_tokens;
  kv_manager_.cache_full_blocks(r->blocks, r->tokens.data(), r->num_computed);
  if (r->params.return_logits && slice.num_rows > 0) {
    const float* rows = logits + static_cast<int64_t>(slice.first_row) * vocab;
    r->new_logits.insert(r->new_logits.end(), rows, rows + static_cast<int64_t>(slice.num_rows) * vocab);
    r->new_logit_rows += slice.num_rows;
    r->logits_reported = slice.first_pos + slice.num_rows;
  }
  if (!slice.samples) {
    if (r->new_logit_rows > 0) emit(r, false);
    return;
  }
  const float* row = logits + static_cast<int64_t>(slice.first_row + slice.num_rows - 1) * vocab;
  const int32_t tok = sampler_.sample(row, vocab, r->params);
  r->tokens.push_back(tok);
  r->new_tokens.push_back(tok);
  {
    std::lock_guard<std::mutex> lk(stats_mu_);
    stats_.generated_tokens += 1;
  }
  const auto& eos = sched_config_.eos_token_ids;
  const auto& stops = r->params.stop_token_ids;
  FinishReason reason = FinishReason::None;
  if (!r->params.ignore_eos && std::find(eos.begin(), eos.end(), tok) != eos.end())
    reason = FinishReason::Stop;
  else if (std::find(stops.begin(), stops.end(), tok) != stops.end())
    reason = FinishReason::Stop;
  else if (r->num_generated() >= r->params.max_tokens || r->num_tokens() >= sched_config_.max_model_len)
    reason = FinishReason::Length;
  if (reason != FinishReason::None)
    finish(r, reason);
  else
    emit(r, false);
}

void Engine::emit(Request* r, bool finished, const std::string& error) {
  Event ev;
  ev.request_id = r->id;
  ev.token_ids.swap(r->new_tokens);
  ev.logits.swap(r->new_logits);
  ev.logit_rows = r->new_logit_rows;
  r->new_logit_rows = 0;
  ev.finished = finished;
  ev.finish_reason = finished ? r->finish : FinishReason::None;
  ev.error = error;
  ev.num_preemptions = r->num_preemptions;
  {
    std::lock_guard<std::mutex> lk(out_mu_);
    events_.push_back(std::move(ev));
  }
  out_cv_.notify_all();
}

void Engine::finish(Request* r, FinishReason reason, const std::string& error) {
  // Free first and publish, so that a host that sees the final event also sees
  // the blocks back in stats() and can reuse the id at once.
  r->finish = reason;
  scheduler_.remove(r);
  r->num_computed = 0;
  {
    std::lock_guard<std::mutex> lk(in_mu_);
    live_ids_.erase(r->id);
  }
  publish_stats();
  emit(r, true, error);
  const std::string id = r->id;
  requests_.erase(id);  // destroys r
}

void Engine::publish_stats() {
  // Token slots holding K/V, counted per physical block (a block shared by
  // forks or prefix hits counts once, as filled as its fullest owner).
  const int64_t bs = kv_.block_size;
  filled_.assign(static_cast<size_t>(pool_.num_blocks()), 0);
  for (auto& kv : requests_) {
    const Request& r = *kv.second;
    for (size_t i = 0; i < r.blocks.table.size(); ++i) {
      const int64_t n = std::min<int64_t>(bs, std::max<int64_t>(0, r.num_computed - static_cast<int64_t>(i) * bs));
      int32_t& f = filled_[r.blocks.table[i]];
      f = std::max<int32_t>(f, static_cast<int32_t>(n));
    }
  }
  int64_t slots = 0;
  for (int32_t f : filled_) slots += f;
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
