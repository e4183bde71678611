#include "engine/engine.hpp"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>

#include "pagedrt/error.hpp"

namespace pagedrt {
namespace {
double now_s() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// Auto's cost estimates: a moving average, the first sample taken whole.
void average_in(double& avg, double sample) { avg = avg > 0.0 ? 0.8 * avg + 0.2 * sample : sample; }
}  // namespace

Engine::Engine(std::shared_ptr<Backend> backend, std::unique_ptr<LlamaModel> model, KvCache kv,
               const EngineConfig& config, DraftModel draft, TensorParallel tp)
    : runner_(backend, std::move(model), std::move(kv), std::move(tp)),
      pool_(static_cast<int32_t>(runner_.kv().num_blocks), static_cast<int32_t>(runner_.kv().block_size)),
      kv_manager_(pool_, config.enable_prefix_caching),
      scheduler_(config.scheduler, kv_manager_),
      outputs_(config.output, kv_manager_, *this),
      stats_(runner_.kv(), runner_.bytes_per_block(), config.scheduler.swap_slots),
      kv_idle_release_s_(config.kv_idle_release_s) {
  if (const char* t = std::getenv("PAGEDRT_STEP_TRACE")) trace_path_ = t;
  if (const std::shared_ptr<KvMemory>& memory = runner_.kv().memory) {  // elastic: chunk 0 mapped, the rest on demand
    // every rank's memory (tensor parallelism), not past the runner's release()
    std::vector<std::weak_ptr<KvMemory>> mems;
    for (const std::shared_ptr<KvMemory>& m : runner_.kv_memories()) mems.push_back(m);
    pool_.set_chunks(
        static_cast<int32_t>(memory->chunk_blocks()),
        [mems](int32_t c) {
          for (size_t i = 0; i < mems.size(); ++i) {
            const std::shared_ptr<KvMemory> m = mems[i].lock();
            if (m && m->map(c)) continue;
            for (size_t j = 0; j < i; ++j)  // all ranks or none
              if (const std::shared_ptr<KvMemory> done = mems[j].lock()) done->unmap(c);
            return false;
          }
          return true;
        },
        [mems](int32_t c) {
          for (const std::weak_ptr<KvMemory>& mem : mems)
            if (const std::shared_ptr<KvMemory> m = mem.lock()) m->unmap(c);
        });
  }
  if (runner_.kv().memory) {
    const char* v = std::getenv("PAGEDRT_KV_MAP_AHEAD");
    if (v == nullptr || std::string(v) != "0")
      map_ahead_blocks_ = static_cast<int32_t>((config.scheduler.max_num_batched_tokens + runner_.kv().block_size - 1) /
                                               runner_.kv().block_size);
  }
  if (draft.model) {
    DrafterConfig dc;
    dc.max_num_batched_tokens = config.scheduler.max_num_batched_tokens;
    dc.max_model_len = config.scheduler.max_model_len;
    dc.draft_max_len = draft.max_len;
    dc.enable_prefix_caching = config.enable_prefix_caching;
    drafter_ = std::make_unique<Drafter>(backend, std::move(draft.model), std::move(draft.kv), dc);
  }
  async_ = config.async_scheduling && !drafter_;  // a draft model's forward runs between steps
  if (const char* v = std::getenv("PAGEDRT_CHECKED_PICKS")) checked_picks_ = std::string(v) != "0";
  if (const char* v = std::getenv("PAGEDRT_CHAINED_FILLS")) chain_fills_ = std::string(v) != "0";
  if (const char* v = std::getenv("PAGEDRT_PIPELINED_MASKS")) pipeline_masks_ = std::string(v) != "0";
  if (const char* v = std::getenv("PAGEDRT_GATED_MASKS")) gate_masks_ = std::string(v) != "0";
  if (config.scheduler.swap_slots > 0) runner_.enable_swap(config.scheduler.swap_slots);
  auto_preemption_ = config.scheduler.preemption == PreemptionMode::Auto;
  publish_stats();  // the pool as it starts (an elastic one: its first chunk mapped)
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
  runner_.release();
  if (drafter_) drafter_->release();
  std::lock_guard<std::mutex> tl(trace_mu_);
  if (!trace_path_.empty() && !trace_.empty()) {
    // Appended: each engine of the process (Runtime) adds its own section.
    if (FILE* f = std::fopen(trace_path_.c_str(), "a")) {
      std::fprintf(f, "# pagedrt step trace: seconds event step\n");
      for (const auto& [what, step, t] : trace_)
        std::fprintf(f, "%.6f %s %llu\n", t, what, static_cast<unsigned long long>(step));
      if (trace_dropped_ > 0) std::fprintf(f, "# %lld later events dropped\n", static_cast<long long>(trace_dropped_));
      std::fclose(f);
    } else {
      std::fprintf(stderr, "pagedrt: PAGEDRT_STEP_TRACE=%s could not be opened to write the step trace\n",
                   trace_path_.c_str());
    }
    trace_.clear();
  }
}

void Engine::trace(const char* what, uint64_t step, double t) {
  if (trace_path_.empty()) return;
  if (t == 0.0) t = now_s();
  std::lock_guard<std::mutex> lk(trace_mu_);
  if (trace_.size() < kMaxTraceEvents)
    trace_.emplace_back(what, step, t);
  else
    ++trace_dropped_;
}

// ---- engine thread ---------------------------------------------------------------

void Engine::loop() {
  for (;;) {
    bool idle = false;
    {
      std::unique_lock<std::mutex> lk(in_mu_);
      auto ready = [&] {
        return stopping_ || !new_requests_.empty() || !aborts_.empty() || scheduler_.has_work() || launched_;
      };
      if (kv_idle_release_s_ > 0.0 && pool_.has_spare_chunks() && !launched_)  // an elastic pool holds more than its first chunk
        idle = !in_cv_.wait_for(lk, std::chrono::duration<double>(kv_idle_release_s_), ready);
      else
        in_cv_.wait(lk, ready);
      if (stopping_) break;
    }
    if (idle) {  // nothing to do for a while: the unused chunks go back to the device
      try {
        runner_.synchronize();
        pool_.release_unused_chunks();
      } catch (const std::exception&) {  // a device error: the next step reports it; keep what is mapped
      }
      publish_stats();
      continue;
    }
    drain_inbox();
    if (scheduler_.has_work() || launched_) step();
    release_retired();
    publish_stats();
    outbox_.notify();  // once per iteration: a wake-up per event cost ~1 ms a step at batch 256
  }
  shutdown();
}

struct Engine::PendingMasks {
  std::vector<uint32_t> words;
  std::vector<MaskRow> rows;
  std::vector<Sequence*> seqs;      // rows[i]'s
  std::vector<const Request*> reqs;  // rows[i]'s (MaskRow::generated is set when filled)
  size_t eager = 0;              // rows filled before the picks (the first), before check_picks adds any
  std::vector<MaskRow> later;    // checked picks: rows without a mask (yet), their sequences and
  std::vector<Sequence*> later_seqs;  // their places in the step's schedule
  std::vector<const Request*> later_reqs;
  std::vector<size_t> later_at;
  std::vector<MaskRow> live;       // plan_ahead: the rows filled (sequences not ended)
  std::vector<size_t> live_at;     // their places in `rows`
  // plan_ahead: the live rows' output tokens, copied before the launch;
  // a row whose last token was the step ahead's pick gets it from that
  // step's results (arena index, OutputProcessor::launched's source).
  std::vector<int32_t> arena;
  std::vector<std::pair<size_t, int32_t>> resolve;
  // The step ahead's results, collected on the helper thread before the fill
  // (finish_launched waits for this instead of collecting them itself).
  struct Ahead {
    int32_t ticket = -1;  // none
    const int32_t* argmax = nullptr;
    const int32_t* sampled = nullptr;
    std::mutex mu;
    std::condition_variable cv;
    bool done = false;
    std::string error;
    void finish(std::string e) {
      {
        std::lock_guard<std::mutex> lock(mu);
        error = std::move(e);
        done = true;
      }
      cv.notify_one();
    }
    void wait() {  // throws the collect's error
      std::unique_lock<std::mutex> lock(mu);
      cv.wait(lock, [&] { return done; });
      if (!error.empty()) throw Error(ErrorKind::Runtime, error);
    }
  } ahead;
  HelperThread* filling = nullptr;  // the engine's, while it runs this step's fill
  uint64_t ticket = 0;              // the fill's job on it
  // fill_ahead with a gate: its id (0: none); the fill copies `words` into
  // the backend's gate buffer before it opens it.
  uint64_t gate = 0;
  double start = 0.0, end = 0.0;    // the fill's (steady clock, seconds; set on the helper thread)
  StepMasks masks;
  PendingMasks() = default;
  PendingMasks(const PendingMasks&) = delete;
  PendingMasks& operator=(const PendingMasks&) = delete;
  ~PendingMasks() {  // a step that threw before wait(): the helper writes into `words`
    if (!filling) return;
    try {
      filling->wait(ticket);
    } catch (...) {
    }
  }
  // Each row's output tokens, where they are now (a launched step's
  // placeholder may have grown `tokens` since the row was planned).
  static void point_to_tokens(std::vector<MaskRow>& rs, const std::vector<Sequence*>& qs,
                              const std::vector<const Request*>& req) {
    for (size_t i = 0; i < rs.size(); ++i) rs[i].generated = qs[i]->tokens.data() + req[i]->prompt_len;
  }
  // `words` sized for every row (zeros for new ones), and each row's mask, by_seq
  // and masks' block pointed into it (again after rows were added).
  void lay_out(int64_t words_per_row) {
    words.resize(rows.size() * static_cast<size_t>(words_per_row), 0u);
    masks.by_seq.clear();
    for (size_t i = 0; i < rows.size(); ++i) {
      rows[i].mask = words.data() + i * words_per_row;
      masks.by_seq.emplace(seqs[i], rows[i].mask);  // a verify step's rows follow its first
    }
    masks.words = words.data();
    masks.count = static_cast<int32_t>(rows.size());
    masks.words_per_row = words_per_row;
  }
  // Waits for the helper thread (also when the forward failed: it writes into `words`).
  void wait() {
    if (!filling) return;
    HelperThread* helper = std::exchange(filling, nullptr);
    try {
      helper->wait(ticket);
    } catch (const std::exception& e) {
      end = now_s();
      masks.error = e.what();
      std::fill(words.begin(), words.end(), 0u);  // its rows allow nothing: they end with the error
    }
    for (size_t k = 0; k < live.size(); ++k) rows[live_at[k]].error = std::move(live[k].error);
    note_errors();
  }
  // The reasons the provider gave for rows that allow nothing (MaskRow::error).
  void note_errors() {
    for (size_t i = 0; i < rows.size(); ++i)
      if (!rows[i].error.empty()) masks.row_errors.emplace(seqs[i], rows[i].error);  // its first row's
  }
};

void Engine::plan_masks(const SchedulerOutput& step, PendingMasks& pm, bool checked) {
  const int64_t vocab = runner_.vocab_size(), words = (vocab + 31) / 32;
  for (size_t at = 0; at < step.scheduled.size(); ++at) {
    const ScheduledSeq& s = step.scheduled[at];
    Sequence& q = *s.seq;
    if (!s.req->params.masked || q.num_computed + s.num_new_tokens != q.num_tokens()) continue;  // not sampling
    MaskRow row;
    row.request_id = s.req->id;
    row.index = q.index;
    row.num_generated = q.num_tokens() - s.req->prompt_len;  // a launched step's placeholder too: known once filled
    if (q.num_draft > 0) {  // a verify step: a row for each position, the i-th after i proposals (token_mask.hpp)
      row.num_generated -= q.num_draft;
      for (int32_t i = 0; i <= q.num_draft; ++i, ++row.num_generated, ++row.num_proposed) {
        pm.rows.push_back(row);
        pm.seqs.push_back(&q);
        pm.reqs.push_back(s.req);
      }
      continue;
    }
    // A sequence's first row is masked first, behind the prompt's forward: a
    // model's first token is seldom the grammar's (SmolLM2's JSON answers
    // opened with "```" or text: 32 of 32 first checks refused, each then
    // masked on the step's path).
    if (checked && q.num_draft == 0 && q.mask_eager == 0 && row.num_generated > 0) {
      pm.later.push_back(std::move(row));
      pm.later_seqs.push_back(&q);
      pm.later_reqs.push_back(s.req);
      pm.later_at.push_back(at);
      continue;
    }
    if (q.mask_eager > 0) --q.mask_eager;
    pm.rows.push_back(std::move(row));
    pm.seqs.push_back(&q);
    pm.reqs.push_back(s.req);
  }
  pm.eager = pm.rows.size();
  if (!pm.rows.empty()) {
    pm.lay_out(words);
    if (!mask_provider()) pm.masks.error = "no TokenMaskProvider is set";
  }
}

void Engine::on_helper(PendingMasks& pm, int lend, std::function<void()> job) {
  // The fill's threads get cores of their own while it runs (a CPU forward
  // that kept every core left the masks to queue behind its team's threads:
  // 16-core Xeon, 32 JSON rows, forwards 7-11 ms longer a step).
  struct GiveBack {
    ModelRunner& runner;
    ~GiveBack() { runner.lend_threads(0); }
  };
  lend = std::max(0, lend);
  runner_.lend_threads(lend);
  try {
    // Lent again as the job starts: a job queued behind another (chained
    // fills) runs after that one's GiveBack.
    pm.ticket = mask_helper_.start([this, lend, job = std::move(job)] {
      runner_.lend_threads(lend);
      GiveBack give_back{runner_};
      job();
    });
    pm.filling = &mask_helper_;
  } catch (...) {  // no thread to be had
    runner_.lend_threads(0);
    throw;
  }
}

void Engine::start_masks(PendingMasks& pm) {
  if (pm.rows.empty() && pm.later.empty()) return;
  const int64_t vocab = runner_.vocab_size();
  const std::shared_ptr<TokenMaskProvider> provider = mask_provider();
  if (!provider) return;  // plan_masks said so; check_picks reports it for checked rows
  PendingMasks::point_to_tokens(pm.rows, pm.seqs, pm.reqs);
  PendingMasks::point_to_tokens(pm.later, pm.later_seqs, pm.later_reqs);
  on_helper(pm, pm.rows.empty() ? 0 : provider->threads(), [&pm, provider, vocab] {
    if (!pm.later.empty()) {
      try {
        provider->prepare(pm.later);  // the checked rows: only their check left for after the forward
      } catch (const std::exception&) {  // validate() catches them up itself
      }
    }
    if (!pm.rows.empty()) {
      pm.start = now_s();  // mask_seconds counts the fill alone
      provider->fill(pm.rows, vocab);
    }
    pm.end = now_s();
  });
}

void Engine::propose_drafts() {
  try {
    drafter_->propose(scheduler_.running());
  } catch (const std::exception& e) {
    std::vector<Request*> drafting;
    for (Request* r : scheduler_.running())
      if (r->params.speculative == "draft") drafting.push_back(r);
    for (Request* r : drafting) finish_request(*r, FinishReason::Error, std::string("draft model forward failed: ") + e.what());
  }
}

void Engine::swap(const SchedulerOutput& step) {
  runner_.ensure_swap_space();  // not timed: auto's estimate is of the copies
  if (auto_preemption_ && launched_) runner_.synchronize();  // nor the launched step's forward
  const double start = now_s();
  runner_.swap(step, auto_preemption_);  // Auto waits for the copies, to time them
  const double seconds = now_s() - start;
  const int64_t blocks = static_cast<int64_t>(step.swap_out.size() + step.swap_in.size());
  stats_.count_swap(static_cast<int64_t>(step.swap_out.size()), static_cast<int64_t>(step.swap_in.size()),
                    step.swapped_out, seconds);
  if (auto_preemption_) {
    average_in(swap_s_per_block_, 2.0 * seconds / static_cast<double>(blocks));  // out and back
    scheduler_.set_costs(recompute_s_per_token_, swap_s_per_block_);
  }
}

struct Engine::Launched {
  SchedulerOutput step;
  ModelOutput out;
  std::vector<int32_t> sources;  // OutputProcessor::launched's
  int32_t ticket = 0;            // ModelRunner::end_results's
  uint64_t id = 0;
  double start = 0.0;            // launch (steady clock, seconds)
  int64_t prompt_tokens = 0;
  // Structured output's rows (masks_later): their masks, filling on the
  // helper thread until complete_launch() has queued the picks and draws
  // that read them (picks_queued) and settle_launch() has waited for them;
  // then the masks (a row that allows none ends its sequence).
  std::unique_ptr<PendingMasks> pm;
  DeviceDraws draws;
  bool device_picks = false;
  bool picks_queued = false;
  std::vector<uint32_t> mask_words;
  StepMasks masks;
};

bool Engine::complete_launch() {
  if (!launched_ || !launched_->pm || launched_->picks_queued) return true;
  Launched& l = *launched_;
  PendingMasks& pm = *l.pm;
  const bool gated = pm.gate != 0;
  if (!gated) wait_fill(pm);
  trace("picks_queue", l.id);
  const double launch_start = now_s();
  try {
    // Gated: the device reads the masks once the fill has opened the gate.
    const uint32_t* words = gated ? runner_.queue_gated_masks(pm.gate, pm.words.size()) : pm.masks.words;
    if (l.device_picks) pick_masked(l.step, l.out, pm, words, gated);
    if (!l.draws.rows.empty()) {
      l.draws.masks.words = words;
      l.draws.masks.gated = gated;
      runner_.sample(l.out, l.draws);
      stats_.count_device_draws(static_cast<int64_t>(l.draws.rows.size()));
    }
    l.ticket = runner_.end_results();
  } catch (const std::exception& e) {
    const std::unique_ptr<Launched> failed = std::move(launched_);
    fail_step(failed->step, e.what());
    steps_processed_ = failed->id;
    return false;
  }
  stats_.count_launch(now_s() - launch_start, gated);
  l.picks_queued = true;
  if (!gated) settle_launch();
  return true;
}

void Engine::wait_fill(PendingMasks& pm) {
  const double wait_start = now_s();
  pm.wait();
  if (pm.start > 0.0)  // waited: what the engine's own work since the fill began did not hide
    stats_.count_masks(static_cast<int64_t>(pm.live.size()), pm.end - pm.start, now_s() - wait_start);
}

void Engine::settle_launch() {
  if (!launched_ || !launched_->pm || !launched_->picks_queued) return;
  Launched& l = *launched_;
  PendingMasks& pm = *l.pm;
  if (pm.gate != 0) {
    trace("settle_wait", l.id);
    wait_fill(pm);
    trace("settled", l.id);
  }
  l.mask_words = std::move(pm.words);  // masks.by_seq points into them (a moved vector keeps its block)
  l.masks = std::move(pm.masks);
  l.pm.reset();
}

void Engine::plan_ahead(PendingMasks& pm) {
  if (pm.rows.empty() || !mask_provider()) return;  // no provider: plan_masks set the error
  // Where each sequence's pending token is in the step ahead's results.
  std::unordered_map<const Sequence*, int32_t> source;
  if (launched_) {
    for (size_t k = 0; k < launched_->step.scheduled.size(); ++k)
      source.emplace(launched_->step.scheduled[k].seq, launched_->sources[k]);
    pm.ahead.ticket = launched_->ticket;
    pm.ahead.argmax = launched_->out.argmax;
    pm.ahead.sampled = launched_->out.sampled;
  }
  std::vector<size_t> offset;
  for (size_t i = 0; i < pm.rows.size(); ++i) {
    const Sequence& q = *pm.seqs[i];
    if (q.done) continue;  // ended: its row is read by no one, left empty
    const auto s = source.find(&q);
    if (q.pending > 1 || (q.pending == 1 && (s == source.end() || s->second == OutputProcessor::kNoSource)))
      continue;  // (never: one launched step at most) left empty, the sequence ends with an error
    const int64_t prompt = pm.reqs[i]->prompt_len;
    offset.push_back(pm.arena.size());
    pm.arena.insert(pm.arena.end(), q.tokens.begin() + prompt, q.tokens.begin() + q.num_known());
    if (q.pending == 1) {
      pm.resolve.emplace_back(pm.arena.size(), s->second);
      pm.arena.push_back(-1);
    }
    pm.live.push_back(pm.rows[i]);
    pm.live_at.push_back(i);
  }
  for (size_t k = 0; k < pm.live.size(); ++k) pm.live[k].generated = pm.arena.data() + offset[k];
}

void Engine::fill_ahead(PendingMasks& pm, bool gate) {
  if (pm.rows.empty() || (pm.live.empty() && pm.ahead.ticket < 0)) return;
  const std::shared_ptr<TokenMaskProvider> provider = mask_provider();
  if (!provider) return;
  const int64_t vocab = runner_.vocab_size();
  const uint64_t gate_id = gate ? last_gate_ + 1 : 0;
  const uint64_t step_id = steps_launched_;
  uint32_t* gate_words = gate ? runner_.mask_gate(pm.words.size()) : nullptr;
  try {
    const int lend = pm.live.empty() ? 0 : provider->threads();
    on_helper(pm, lend, [this, &pm, provider, vocab, gate_id, gate_words, step_id] {
      // However the job ends, a gate opens (its picks would wait for it for
      // ever): with the masks, or with none allowed after a failure.
      struct Open {
        ModelRunner& runner;
        const PendingMasks& pm;
        uint64_t id;
        uint32_t* words;
        bool filled = false;
        Engine* engine;
        uint64_t step;
        ~Open() {
          if (id == 0) return;
          engine->trace("gate_open", step);
          if (filled)
            std::copy(pm.words.begin(), pm.words.end(), words);
          else
            std::fill_n(words, pm.words.size(), 0u);
          runner.open_mask_gate(id);
        }
      } open{runner_, pm, gate_id, gate_words, false, this, step_id};
      trace("job_start", step_id);
      if (pm.ahead.ticket >= 0) {
        std::string error;
        try {
          runner_.collect(pm.ahead.ticket);
        } catch (const std::exception& e) {
          error = e.what();
        }
        const bool failed = !error.empty();
        trace("collected", step_id - 1);
        pm.ahead.finish(std::move(error));
        if (failed) return;  // the step ahead fails (finish_launched); this one's forward will too
        for (const auto& [at, from] : pm.resolve)
          pm.arena[at] = from >= 0 ? pm.ahead.argmax[from] : pm.ahead.sampled[-1 - from];
      }
      if (!pm.live.empty()) {
        pm.start = now_s();
        trace("fill_start", step_id);
        provider->fill(pm.live, vocab);
        pm.end = now_s();
        trace("fill_end", step_id);
      }
      open.filled = true;
    });
  } catch (const std::exception& e) {  // no thread to be had: the rows allow nothing, their sequences end with it
    pm.masks.error = e.what();
    pm.live.clear();
    pm.ahead.ticket = -1;  // finish_launched collects the step ahead itself
    return;
  }
  if (gate) {
    pm.gate = gate_id;
    last_gate_ = gate_id;
  }
  if (pm.ahead.ticket >= 0) collecting_ = &pm;
}

void Engine::finish_launched() {
  if (!complete_launch() || !launched_) {
    collecting_ = nullptr;
    return;
  }
  settle_launch();
  PendingMasks* collector = std::exchange(collecting_, nullptr);
  const std::unique_ptr<Launched> l = std::move(launched_);
  trace("finish_wait", l->id);
  const double wait_start = now_s();
  try {
    if (collector)
      collector->ahead.wait();  // collected on the helper thread, which fills the next step's masks next
    else
      runner_.collect(l->ticket);
  } catch (const std::exception& e) {
    fail_step(l->step, e.what());
    steps_processed_ = l->id;
    return;
  }
  // The device ran this step from its launch or from the end of the one before, whichever came later.
  const double end = now_s(), seconds = end - std::max(l->start, last_collect_);
  stats_.count_collect_wait(end - wait_start);
  last_collect_ = end;
  stats_.count_step(static_cast<int64_t>(l->step.preempted.size()), l->prompt_tokens, seconds, l->out.padded_tokens,
                    true);
  if (auto_preemption_ && l->prompt_tokens > 0) {
    average_in(recompute_s_per_token_, seconds / static_cast<double>(l->step.num_tokens));
    scheduler_.set_costs(recompute_s_per_token_, swap_s_per_block_);
  }
  trace("finish_got", l->id);
  outputs_.process_launched(l->step, l->out, l->sources, l->masks);
  stats_.count_output(now_s() - end);
  trace("processed", l->id);
  steps_processed_ = l->id;
}

void Engine::release_retired() {
  while (!retired_requests_.empty() && retired_requests_.front().first <= steps_processed_) retired_requests_.pop_front();
  while (!retired_seqs_.empty() && retired_seqs_.front().first <= steps_processed_) retired_seqs_.pop_front();
}

void Engine::step() {
  const double scheduled = trace_path_.empty() ? 0.0 : now_s();
  if (drafter_) propose_drafts();
  SchedulerOutput step = scheduler_.schedule();
  for (Request* r : step.unfit)
    finish_request(*r, FinishReason::Error,
                   "preempted by recompute, its " + std::to_string(r->seqs.size()) +
                       " sequences no longer share their prompt's KV blocks and need more than the pool's " +
                       std::to_string(pool_.num_blocks()) +
                       " to compute again; use preemption_mode \"auto\" or \"swap\" (with swap space for them) "
                       "or a larger kv_cache_bytes");
  for (Request* r : step.unmapped)
    finish_request(*r, FinishReason::Error,
                   "out of GPU memory for the KV cache: the elastic pool could not map its next chunk (" +
                       std::to_string(pool_.num_mapped_blocks()) + " of " + std::to_string(pool_.num_blocks()) +
                       " blocks mapped; the device's memory is taken by something else); try again later, or "
                       "take the pool at start with elastic_kv=False");
  // The launched step's structured-output picks (their masks filling on the
  // helper thread since the step ahead's results came in), queued before
  // anything of this step.
  if (!complete_launch()) return fail_step(step, "the step ahead of this one failed");
  if (!step.swap_out.empty() || !step.swap_in.empty()) {
    try {
      swap(step);
    } catch (const std::exception& e) {
      return fail_step(step, std::string("swapping KV blocks failed: ") + e.what());
    }
  }
  if (drafter_)  // a preempted request's shadows: their blocks are better used by the running ones
    for (const Request* r : step.preempted) drafter_->forget(r->arrival);
  if (step.empty()) {  // nothing fits right now; a finishing request will free blocks
    if (launched_) return finish_launched();
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
    return;
  }
  // Every sampled row plain greedy: only the device's picks cross to the host
  // (structured output's rows too: their masks go to the device instead, once
  // the helper thread has them).
  const bool device_greedy = runner_.has_device_argmax() && outputs_.greedy_only(step);
  // Rows drawn on the device where it samples (Sampler::drawn_on_device:
  // sampled ones, greedy ones with processing or logprobs): with only those
  // and plain greedy rows, no logits row leaves the device.
  const bool device_sample = runner_.has_device_sample();
  const bool device_all = !device_greedy && device_sample && outputs_.device_only(step);
  // Async scheduling: launched now, processed in the next iteration (after
  // the next step is launched). Structured output's rows too: their masks
  // need the step ahead's tokens, so the helper thread collects that step's
  // results, then fills them while the device runs this step's forward; their
  // picks are queued once the next step is scheduled (complete_launch).
  const std::shared_ptr<TokenMaskProvider> provider = mask_provider();
  const bool pipelined = async_ && (device_greedy || device_all) &&
                         OutputProcessor::pipelinable(step, pipeline_masks_ && provider != nullptr);
  auto pm_owned = std::make_unique<PendingMasks>();  // masks_later: goes with the launched step
  PendingMasks& pm = *pm_owned;
  // A masked row that follows a launched step's token (a placeholder yet) is
  // filled once that step's results are in: the helper thread collects them
  // first (plan_ahead, fill_ahead), so such a step masks its rows first.
  const bool follows_launched =
      launched_ != nullptr && std::any_of(step.scheduled.begin(), step.scheduled.end(), [](const ScheduledSeq& s) {
        return s.req->params.masked && s.seq->pending > 0;
      });
  plan_masks(step, pm,
             !pipelined && !follows_launched && checked_picks_ && device_greedy && provider && provider->validates());
  const bool masks_later = pipelined && !pm.rows.empty();
  const bool ahead = masks_later || (follows_launched && !pm.rows.empty());
  if (ahead) {
    plan_ahead(pm);
  } else {
    if (!pm.rows.empty() || !pm.later.empty()) settle_launch();  // the helper thread free
    try {
      start_masks(pm);
    } catch (const std::exception& e) {  // the masked rows allow nothing: their sequences end with this error
      pm.masks.error = e.what();
      std::fill(pm.words.begin(), pm.words.end(), 0u);
    }
  }
  // Structured-output rows are picked and drawn once their masks are known
  // (the helper thread fills them while the forward runs): greedy ones by the
  // device argmax, sampled ones with the step's other device draws.
  const bool device_picks = device_greedy || (device_all && OutputProcessor::any_greedy(step));
  const bool defer_picks = device_picks && (!pm.rows.empty() || !pm.later.empty());
  int64_t prompt_tokens = 0;
  for (const ScheduledSeq& s : step.scheduled)
    prompt_tokens += std::max<int64_t>(
        0, std::min<int64_t>(s.req->prompt_len, s.seq->num_computed + s.num_new_tokens) - s.seq->num_computed);
  const uint64_t id = ++steps_launched_;
  ModelOutput out;
  const double forward_start = now_s();
  trace("scheduled", id, scheduled);
  trace("launch", id, forward_start);
  auto draw_on_device = [&] {
    DeviceDraws draws = outputs_.device_draws(step, out, pm.masks);
    if (draws.rows.empty()) return;
    runner_.sample(out, draws);
    out.first_draw = std::move(draws.first_draw);
    stats_.count_device_draws(static_cast<int64_t>(draws.rows.size()));
  };
  DeviceDraws later_draws;  // masks_later: planned now (launched() needs their order), drawn once the masks are in
  std::unique_ptr<Launched> l;
  try {
    out = runner_.run(step, device_greedy || device_all, defer_picks || device_all, pipelined);
    if (device_all && device_picks && !defer_picks) runner_.pick(out, RowMasks{});
    if (device_sample && pm.rows.empty()) draw_on_device();
    if (masks_later && device_sample) {
      later_draws = outputs_.device_draws(step, out, pm.masks);
      out.first_draw = later_draws.first_draw;
    }
    if (pipelined) {
      l = std::make_unique<Launched>();
      if (!masks_later) l->ticket = runner_.end_results();
    }
  } catch (const std::exception& e) {
    pm.wait();
    finish_launched();
    fail_step(step, e.what());
    steps_processed_ = id;
    return;
  }
  const double launch_end = now_s();
  trace("launched", id);
  if (map_ahead_blocks_ > 0) pool_.map_ahead(map_ahead_blocks_);  // while the device runs the step
  if (ahead) {
    // Chained (gated steps): this step's fill is queued on the helper thread
    // behind the launched step's, which may still run; the helper goes from
    // that fill's gate to collecting its step's results and filling this
    // step's at once, not after the engine thread has woken and settled.
    const bool chained = chain_fills_ && masks_later && gate_masks_;
    if (!chained) settle_launch();
    fill_ahead(pm, masks_later && gate_masks_);
    if (chained) settle_launch();
  }
  if (pipelined) {  // counted done now; read after the step ahead of it is processed
    stats_.count_launch(launch_end - forward_start);
    l->sources = outputs_.launched(step, out);
    l->id = id;
    l->start = forward_start;
    l->prompt_tokens = prompt_tokens;
    l->step = std::move(step);
    l->out = std::move(out);
    finish_launched();
    if (masks_later) {  // filling on the helper thread; complete_launch() queues the picks
      l->pm = std::move(pm_owned);
      l->draws = std::move(later_draws);
      l->device_picks = device_picks;
    }
    launched_ = std::move(l);
    return;
  }
  const double forward_end = now_s();
  finish_launched();  // the step ahead of this one (collect waits only for its results, queued before this step)
  pm.wait();
  if (pm.start > 0.0)  // masks were filled for this step
    stats_.count_masks(static_cast<int64_t>(ahead ? pm.live.size() : pm.eager), pm.end - pm.start,
                       std::max(0.0, pm.end - forward_end));
  if (!pm.rows.empty() || !pm.later.empty()) {
    try {
      if (defer_picks) pick_masked(step, out, pm);
      if (!pm.later.empty()) check_picks(step, out, pm);
      if (device_sample) draw_on_device();
    } catch (const std::exception& e) {
      fail_step(step, e.what());
      steps_processed_ = id;
      return;
    }
  }
  stats_.count_step(static_cast<int64_t>(step.preempted.size()), prompt_tokens, forward_end - forward_start,
                    out.padded_tokens);
  if (auto_preemption_ && prompt_tokens > 0) {  // what a token computed again costs
    average_in(recompute_s_per_token_, (forward_end - forward_start) / static_cast<double>(step.num_tokens));
    scheduler_.set_costs(recompute_s_per_token_, swap_s_per_block_);
  }
  const double output_start = now_s();
  outputs_.process(step, out, pm.masks);
  stats_.count_output(now_s() - output_start);
  steps_processed_ = id;
  trace("processed", id);
}

void Engine::pick_masked(const SchedulerOutput& step, ModelOutput& out, const PendingMasks& pm,
                         const uint32_t* words, bool gated) {
  std::vector<int32_t> mask_of_row(static_cast<size_t>(out.num_rows), -1);
  for (size_t i = 0; i < step.scheduled.size(); ++i) {
    const LogitsSlice& slice = (*out.slices)[i];
    const Sequence* q = step.scheduled[i].seq;
    const int32_t mask = pm.masks.index_of(q);
    if (!slice.samples || mask < 0) continue;
    if (q->num_draft > 0) {  // a verify step: each row its own mask, in order
      for (int32_t r = 0; r < slice.num_rows; ++r) mask_of_row[static_cast<size_t>(slice.first_row + r)] = mask + r;
    } else {
      mask_of_row[static_cast<size_t>(slice.first_row + slice.num_rows - 1)] = mask;
    }
  }
  RowMasks masks;
  if (pm.masks.count > 0) {  // else (only checked picks) every row unmasked
    masks.mask_of_row = mask_of_row.data();
    masks.words = words != nullptr ? words : pm.masks.words;
    masks.gated = gated;
    masks.num_masks = pm.masks.count;
    masks.words_per_row = pm.masks.words_per_row;
  }
  runner_.pick(out, masks);
}

void Engine::check_picks(const SchedulerOutput& step, ModelOutput& out, PendingMasks& pm) {
  const std::shared_ptr<TokenMaskProvider> provider = mask_provider();
  const size_t n = pm.later.size();
  std::vector<int32_t> tokens(n);
  for (size_t i = 0; i < n; ++i) {  // each row's unmasked pick: its slice's last row
    const LogitsSlice& slice = (*out.slices)[pm.later_at[i]];
    tokens[i] = out.argmax[slice.first_row + slice.num_rows - 1];
  }
  std::vector<uint8_t> ok(n, 0);
  if (provider) {
    try {
      provider->validate(pm.later, tokens.data(), ok.data());
    } catch (const std::exception&) {
      std::fill(ok.begin(), ok.end(), uint8_t{0});  // every row refused: its mask decides (and reports)
    }
  }
  std::vector<size_t> refused;
  for (size_t i = 0; i < n; ++i) {
    Sequence& q = *pm.later_seqs[i];
    if (ok[i] && tokens[i] >= 0) {
      q.mask_refusals = 0;
      continue;
    }
    refused.push_back(i);
    q.mask_eager = std::min(kMaxEagerMaskSteps, int32_t{1} << std::min(q.mask_refusals, 6));
    ++q.mask_refusals;
  }
  stats_.count_checked_picks(static_cast<int64_t>(n), static_cast<int64_t>(refused.size()));
  if (refused.empty()) return;
  // The refused rows' masks, after the eager rows' (whose masks are filled:
  // pm.wait() came first) in one block, as pick() takes them.
  const int64_t vocab = runner_.vocab_size(), words = (vocab + 31) / 32;
  const size_t eager = pm.rows.size();
  for (size_t i : refused) {
    pm.rows.push_back(pm.later[i]);
    pm.seqs.push_back(pm.later_seqs[i]);
  }
  pm.lay_out(words);
  std::vector<MaskRow> fill(pm.rows.begin() + static_cast<std::ptrdiff_t>(eager), pm.rows.end());
  const double start = now_s();
  if (!provider) {
    pm.masks.error = "no TokenMaskProvider is set";
  } else {
    try {
      provider->fill(fill, vocab);
      for (size_t k = 0; k < fill.size(); ++k) pm.rows[eager + k].error = std::move(fill[k].error);
      pm.note_errors();
    } catch (const std::exception& e) {
      pm.masks.error = e.what();
      std::fill(pm.words.begin() + static_cast<std::ptrdiff_t>(eager * words), pm.words.end(), 0u);
    }
  }
  const double took = now_s() - start;
  // on the step's path: all of it waited for; a step that also filled eagerly is counted once
  stats_.count_masks(static_cast<int64_t>(fill.size()), took, took, pm.eager == 0);
  pick_masked(step, out, pm);
}

void Engine::fail_step(const SchedulerOutput& step, const std::string& what) {
  std::vector<Request*> failed;
  for (const ScheduledSeq& s : step.scheduled)
    if (!s.req->done && std::find(failed.begin(), failed.end(), s.req) == failed.end()) failed.push_back(s.req);
  for (Request* r : failed) finish_request(*r, FinishReason::Error, "forward failed: " + what);
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
        finish_seq(r, *s, FinishReason::Stop, "");
        break;
      }
  }
}

// Whatever is still queued or running ends with an Abort event, oldest first.
void Engine::shutdown() {
  if (launched_) {  // its results are not needed: every request ends with Abort
    if (launched_->pm) {  // its masks' fill to wait for (it opens a gate its picks wait behind)
      launched_->pm->wait();
      if (!launched_->picks_queued) launched_.reset();  // nothing of it to collect
    }
  }
  if (launched_) {
    try {
      runner_.collect(launched_->ticket);
    } catch (const std::exception&) {
    }
    launched_.reset();
  }
  drain_inbox();
  std::vector<Request*> live;
  for (auto& kv : requests_) live.push_back(kv.second.get());
  std::sort(live.begin(), live.end(), [](Request* a, Request* b) { return a->arrival < b->arrival; });
  for (Request* r : live) finish_request(*r, FinishReason::Abort);
  publish_stats();
  outbox_.notify();
}

// ---- request lifetimes --------------------------------------------------------------

void Engine::push_event(Event ev) {
  ev.time = now_s();
  outbox_.push(std::move(ev));
}

void Engine::finish_seq(Request& r, Sequence& s, FinishReason reason, const std::string& error) {
  // Free first and publish, so that a host that sees the final event also sees
  // the blocks back in stats() and can reuse the id once it read it.
  kv_manager_.free(s.blocks);
  s.num_computed = 0;
  s.done = true;
  s.tokens.resize(static_cast<size_t>(s.num_known()));  // placeholders of launched steps: never read now
  s.pending = 0;
  // The last live sequence ends the request. Before an n > 1 fork it is the
  // prompt's, whose samples then never come (speculation never ends it there:
  // proposal_room); left running without sequences, the request would never end.
  const bool last = r.seqs.size() == 1;
  if (last) drop_request(r);  // r and s stay alive until forget(r)
  push_event(OutputProcessor::make_event(r, s, true, last, reason, error));
  if (last) return forget(r);
  scheduler_.drop_seq(&r, &s);  // a swapped-out request: the host slots only it held
  if (drafter_) drafter_->forget(r.arrival, s.index);
  auto it = std::find_if(r.seqs.begin(), r.seqs.end(), [&](const std::unique_ptr<Sequence>& q) { return q.get() == &s; });
  retire(std::move(*it));
  r.seqs.erase(it);
}

void Engine::finish_beams(Request& r, std::vector<Event> finals) {
  if (finals.empty()) return finish_request(r, FinishReason::Length);  // defensive: no hypothesis at all
  drop_request(r);  // frees the live beams' blocks
  for (auto& b : r.seqs) retire(std::move(b));
  r.seqs.clear();
  for (Event& ev : finals) push_event(std::move(ev));
  forget(r);
}

void Engine::finish_request(Request& r, FinishReason reason, const std::string& error) {
  drop_request(r);
  if (r.params.is_beam_search() || r.seqs.empty()) {
    // One final event for the whole search (no beam is complete).
    Event ev;
    ev.request_id = r.id;
    ev.finished = ev.request_finished = true;
    ev.finish_reason = reason;
    ev.error = error;
    ev.num_preemptions = r.num_preemptions;
    push_event(std::move(ev));
  } else {
    for (size_t i = 0; i < r.seqs.size(); ++i)
      push_event(OutputProcessor::make_event(r, *r.seqs[i], true, i + 1 == r.seqs.size(), reason, error));
  }
  forget(r);
}

void Engine::drop_request(Request& r) {
  scheduler_.remove(&r);  // frees every live sequence's blocks
  if (drafter_) drafter_->forget(r.arrival);
  // The mask provider's state for it may go: before the final event, so that
  // a host that read it may constrain a new request of the same id at once.
  if (r.params.masked) {
    if (const std::shared_ptr<TokenMaskProvider> provider = mask_provider()) {
      try {
        provider->release(r.id);
      } catch (const std::exception&) {  // its state leaks; the engine goes on
      }
    }
  }
  r.done = true;
  for (auto& s : r.seqs) {
    s->num_computed = 0;
    s->done = true;
  }
  publish_stats();
}

void Engine::forget(Request& r) {
  const std::string id = r.id;
  auto it = requests_.find(id);
  if (it == requests_.end()) return;
  retire(std::move(it->second));  // destroyed once no launched step names it
  requests_.erase(it);
}

}  // namespace pagedrt
