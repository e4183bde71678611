// bindings/scheduler.cpp — pagedrt._testing._Scheduler, a test hook.
//
// The engine's real Scheduler, KvCacheManager and BlockPool with no model:
// step() schedules, then does what the engine's output processing does to
// the block tables and sequences (computed tokens noted and cached, n > 1
// forked at the sampling point, one made-up token appended per sampling,
// sequences ended at max_tokens and their blocks freed), so that tests can
// assert which requests run, wait and are preempted, step by step, and the
// exact free blocks. Swaps move block ids only (there is no KV data). Beam
// search is not simulated. Not part of the public API.
#include <map>
#include <memory>
#include <string>
#include <tuple>

#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include "engine/scheduler.hpp"
#include "pagedrt/error.hpp"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

[[noreturn]] void bad(const std::string& msg) { throw pagedrt::Error(pagedrt::ErrorKind::InvalidArgument, msg); }

pagedrt::PreemptionMode mode_of(const std::string& mode) {
  const auto m = pagedrt::preemption_mode_of(mode);
  if (!m) bad("preemption_mode '" + mode + "' is not known");
  return *m;
}

struct StepResult {
  std::vector<std::tuple<std::string, int32_t, int32_t>> scheduled;  // (request, sequence index, tokens)
  std::vector<std::string> preempted, finished, unfit, unmapped;
};

class SchedulerHarness {
 public:
  // chunk_blocks > 0: an elastic pool whose maps succeed while fewer than
  // map_limit chunks are mapped (the device's memory, as another tenant leaves it).
  SchedulerHarness(int32_t num_blocks, int32_t block_size, int32_t max_num_seqs, int32_t max_num_batched_tokens,
                   double kv_watermark, bool prefix_caching, const std::string& preemption_mode, int32_t swap_slots,
                   int32_t chunk_blocks)
      : pool_(check(num_blocks, block_size)),
        kv_(pool_, prefix_caching),
        sched_(config(max_num_seqs, max_num_batched_tokens, kv_watermark, num_blocks, preemption_mode, swap_slots),
               kv_) {
    if (chunk_blocks > 0)
      pool_.set_chunks(
          chunk_blocks,
          [this](int32_t) {
            if (mapped_ >= map_limit) return false;
            ++mapped_;
            return true;
          },
          [this](int32_t) { --mapped_; });
  }
  int32_t map_limit = 1 << 30;
  SchedulerHarness(const SchedulerHarness&) = delete;  // (std::map of unique_ptr claims to be copyable)

  void add(const std::string& id, const std::vector<int32_t>& prompt, int32_t max_tokens, int32_t n) {
    if (prompt.empty() || max_tokens < 1 || n < 1) bad("a request needs a prompt, max_tokens >= 1 and n >= 1");
    if (requests_.count(id)) bad("request '" + id + "' exists");
    auto r = std::make_unique<pagedrt::Request>();
    r->id = id;
    r->params.max_tokens = max_tokens;
    r->params.n = n;
    r->prompt_len = static_cast<int64_t>(prompt.size());
    r->arrival = next_arrival_++;
    auto s = std::make_unique<pagedrt::Sequence>();
    s->tokens = prompt;
    r->seqs.push_back(std::move(s));
    sched_.add(r.get());
    requests_[id] = std::move(r);
  }

  StepResult step() {
    StepResult res;
    pagedrt::SchedulerOutput out = sched_.schedule();
    for (pagedrt::Request* r : out.unfit) {
      res.unfit.push_back(r->id);
      end(*r);
    }
    for (pagedrt::Request* r : out.unmapped) {
      res.unmapped.push_back(r->id);
      end(*r);
    }
    for (pagedrt::Request* r : out.preempted) res.preempted.push_back(r->id);
    preemptions_ += static_cast<int64_t>(out.preempted.size());
    // As OutputProcessor::process: every sequence's progress first, then the samplings.
    std::vector<std::pair<pagedrt::Request*, pagedrt::Sequence*>> sampling;
    for (const pagedrt::ScheduledSeq& s : out.scheduled) {
      res.scheduled.emplace_back(s.req->id, s.seq->index, s.num_new_tokens);
      kv_.note_computed(s.seq->blocks, s.seq->num_computed, s.seq->num_computed + s.num_new_tokens);
      s.seq->num_computed += s.num_new_tokens;
      kv_.cache_full_blocks(s.seq->blocks, s.seq->tokens.data(), s.seq->num_computed);
      if (s.seq->at_sampling_point()) sampling.emplace_back(s.req, s.seq);
    }
    std::vector<std::pair<pagedrt::Request*, pagedrt::Sequence*>> picks;
    for (auto [r, s] : sampling) {
      picks.emplace_back(r, s);
      if (r->params.n > 1 && !r->expanded) {  // OutputProcessor::expand
        r->expanded = true;
        for (int32_t i = 1; i < r->params.n; ++i) {
          auto child = std::make_unique<pagedrt::Sequence>();
          child->index = i;
          child->tokens = s->tokens;
          child->num_computed = s->num_computed;
          kv_.fork(s->blocks, child->blocks);
          picks.emplace_back(r, child.get());
          r->seqs.push_back(std::move(child));
        }
      }
    }
    for (auto [r, s] : picks) {
      s->tokens.push_back(1000 + static_cast<int32_t>(r->num_generated(*s)));  // the same in every sequence
      if (r->num_generated(*s) < r->params.max_tokens) continue;
      const std::string id = r->id;
      if (finish_seq(*r, *s)) res.finished.push_back(id);  // r is gone
    }
    return res;
  }

  std::vector<std::string> running() const {
    std::vector<std::string> ids;
    for (const pagedrt::Request* r : sched_.running()) ids.push_back(r->id);
    return ids;
  }
  int32_t num_free() const { return pool_.num_free(); }
  int32_t num_blocks() const { return pool_.num_blocks(); }
  int64_t num_waiting() const { return static_cast<int64_t>(sched_.num_waiting()); }
  int64_t num_swapped() const { return static_cast<int64_t>(sched_.num_swapped()); }
  int64_t preemptions() const { return preemptions_; }
  int32_t watermark_blocks() const { return watermark_; }

 private:
  static pagedrt::BlockPool check(int32_t num_blocks, int32_t block_size) {
    if (num_blocks < 1 || block_size < 1) bad("num_blocks and block_size must be >= 1");
    return pagedrt::BlockPool(num_blocks, block_size);
  }
  pagedrt::SchedulerConfig config(int32_t max_num_seqs, int32_t max_num_batched_tokens, double kv_watermark,
                                  int32_t num_blocks, const std::string& mode, int32_t swap_slots) {
    if (max_num_seqs < 1 || max_num_batched_tokens < 1 || swap_slots < 0) bad("bad scheduler limits");
    pagedrt::SchedulerConfig c;
    c.max_num_seqs = max_num_seqs;
    c.max_num_batched_tokens = max_num_batched_tokens;
    c.preemption = mode_of(mode);
    c.swap_slots = c.preemption == pagedrt::PreemptionMode::Recompute ? 0 : swap_slots;
    c.watermark_blocks = watermark_ = pagedrt::watermark_blocks(kv_watermark, num_blocks);
    return c;
  }
  // As Engine::finish_seq; true when it was the request's last sequence.
  bool finish_seq(pagedrt::Request& r, pagedrt::Sequence& s) {
    kv_.free(s.blocks);
    if (r.seqs.size() == 1 && (r.expanded || r.params.n == 1)) {
      end(r);
      return true;
    }
    sched_.drop_seq(&r, &s);
    for (auto it = r.seqs.begin(); it != r.seqs.end(); ++it)
      if (it->get() == &s) {
        r.seqs.erase(it);
        break;
      }
    return false;
  }
  void end(pagedrt::Request& r) {
    sched_.remove(&r);
    requests_.erase(r.id);  // destroys r
  }

  pagedrt::BlockPool pool_;
  pagedrt::KvCacheManager kv_;
  int32_t watermark_ = 0;  // set by config(), before sched_ is made
  pagedrt::Scheduler sched_;
  std::map<std::string, std::unique_ptr<pagedrt::Request>> requests_;
  uint64_t next_arrival_ = 0;
  int64_t preemptions_ = 0;
  int32_t mapped_ = 1;  // chunks; the first is mapped from the start
};

}  // namespace

void register_scheduler(nb::module_& m) {
  nb::class_<StepResult>(m, "_SchedulerStep")
      .def_ro("scheduled", &StepResult::scheduled, "(request id, sequence index, tokens) computed this step")
      .def_ro("preempted", &StepResult::preempted)
      .def_ro("finished", &StepResult::finished)
      .def_ro("unfit", &StepResult::unfit)
      .def_ro("unmapped", &StepResult::unmapped);
  nb::class_<SchedulerHarness>(m, "_Scheduler")
      .def(nb::init<int32_t, int32_t, int32_t, int32_t, double, bool, const std::string&, int32_t, int32_t>(),
           "num_blocks"_a, "block_size"_a, "max_num_seqs"_a = 64, "max_num_batched_tokens"_a = 2048,
           "kv_watermark"_a = 0.0, "enable_prefix_caching"_a = false, "preemption_mode"_a = "recompute",
           "swap_slots"_a = 0, "chunk_blocks"_a = 0)
      .def_rw("map_limit", &SchedulerHarness::map_limit)
      .def("add", &SchedulerHarness::add, "request_id"_a, "prompt"_a, "max_tokens"_a, "n"_a = 1)
      .def("step", &SchedulerHarness::step)
      .def_prop_ro("running", &SchedulerHarness::running)
      .def_prop_ro("num_free", &SchedulerHarness::num_free)
      .def_prop_ro("num_blocks", &SchedulerHarness::num_blocks)
      .def_prop_ro("num_waiting", &SchedulerHarness::num_waiting)
      .def_prop_ro("num_swapped", &SchedulerHarness::num_swapped)
      .def_prop_ro("preemptions", &SchedulerHarness::preemptions)
      .def_prop_ro("watermark_blocks", &SchedulerHarness::watermark_blocks);
}
