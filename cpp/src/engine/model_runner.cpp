#include "engine/model_runner.hpp"

#include <algorithm>
#include <chrono>
#include <string>
#include <thread>

#include "pagedrt/error.hpp"

namespace pagedrt {

ModelRunner::ModelRunner(std::shared_ptr<Backend> backend, std::unique_ptr<LlamaModel> model, KvCache kv,
                         TensorParallel tp)
    : backend_(std::move(backend)), model_(std::move(model)), kv_(std::move(kv)), tp_(std::move(tp)) {
  if (!tp_.peers.empty()) threads_ = std::make_unique<RankThreads>(tensor_parallel_size());
}

std::vector<std::shared_ptr<KvMemory>> ModelRunner::kv_memories() const {
  std::vector<std::shared_ptr<KvMemory>> out;
  if (kv_.memory) out.push_back(kv_.memory);
  for (const ModelRank& p : tp_.peers)
    if (p.kv.memory) out.push_back(p.kv.memory);
  return out;
}

int64_t ModelRunner::bytes_per_block() const {
  int64_t bytes = kv_.bytes_per_block;
  for (const ModelRank& p : tp_.peers) bytes += p.kv.bytes_per_block;
  return bytes;
}

void ModelRunner::on_peers(const std::function<void(ModelRank&)>& fn) {
  if (tp_.peers.empty()) return;
  try {
    for (ModelRank& p : tp_.peers) {
      p.backend->make_current();
      fn(p);
    }
  } catch (...) {
    backend_->make_current();
    throw;
  }
  backend_->make_current();
}

void ModelRunner::wait_for_ranks() {
  const auto start = std::chrono::steady_clock::now();
  for (;;) {
    bool done = true;
    for (size_t r = 0; r <= tp_.peers.size(); ++r) {
      Backend& b = r == 0 ? *backend_ : *tp_.peers[r - 1].backend;
      try {
        done = b.step_finished() && done;
      } catch (const Error& e) {
        throw Error(e.kind(), "tensor-parallel rank " + std::to_string(r) + ": " + e.what());
      }
    }
    for (const auto& c : tp_.comms) {
      const std::string error = c->async_error();
      if (!error.empty()) throw Error(ErrorKind::Runtime, "tensor-parallel step: " + error);
    }
    if (done) return;
    // As a blocking wait would: spin (yielding) through a step's few
    // milliseconds, then nap (a long prefill, or a rank that hangs without an error).
    if (std::chrono::steady_clock::now() - start < std::chrono::milliseconds(5))
      std::this_thread::yield();
    else
      std::this_thread::sleep_for(std::chrono::microseconds(20));
  }
}

void ModelRunner::recover_group() {
  tp_.comms[0]->recover();  // no rank is inside a step now; NCCL: throws after a failure
  tp_failed_ = false;
}

void ModelRunner::synchronize() {
  // After a rank failed on a GPU, the others' collectives wait for it until
  // release(): nothing may wait for them, so this throws the group's error
  // (on the CPU the group recovers and this goes on).
  if (tp_failed_) recover_group();
  backend_->make_current();
  backend_->synchronize();
  on_peers([](ModelRank& p) { p.backend->synchronize(); });
}

void ModelRunner::lend_threads(int n) {
  // Tensor parallelism: the ranks' teams lend n cores together, rank r
  // n / size of them and one more while r < n % size (Backend::share_host).
  const int size = tensor_parallel_size(), each = std::max(0, n) / size, extra = std::max(0, n) % size;
  backend_->lend_threads(each + (extra > 0 ? 1 : 0));
  for (int r = 1; r < size; ++r) tp_.peers[static_cast<size_t>(r - 1)].backend->lend_threads(each + (r < extra ? 1 : 0));
}

ModelOutput ModelRunner::run(const SchedulerOutput& step, bool device_greedy, bool defer_picks, bool deferred) {
  backend_->make_current();  // the engine thread's GPU is rank 0's (RuntimeConfig::devices)
  cur_ ^= 1;
  backend_->begin_results(deferred);
  batch_.build(step, static_cast<int32_t>(kv_.block_size));
  if (!batch_.feedback().empty()) {
    if (backend_->defers_results()) {
      batch_.feed_from(fed_ticket_);
    } else {  // the results are here already
      const Results& from = results_[fed_];
      for (const TokenFeedback& f : batch_.feedback()) {
        const int32_t t = f.source >= 0 ? from.argmax.at(static_cast<size_t>(f.source))
                                        : from.sampled.at(static_cast<size_t>(-1 - f.source));
        batch_.set_token(f.token, std::max(t, 0));  // none (a mask that allowed nothing): its sequence ends, row unread
      }
      batch_.clear_feedback();
    }
  }
  const int32_t real = batch_.view().num_tokens;
  if (real > 0) {
    const int32_t padded = backend_->padded_tokens(batch_.view());
    if (padded > real) batch_.pad(padded);
  }
  const BatchView& view = batch_.view();
  ModelOutput out;
  out.padded_tokens = view.num_tokens - real;
  out.vocab = model_->config().vocab_size;
  out.slices = &batch_.logits();
  out.num_rows = view.num_logits;
  // 256 x 128K fp32 logits a step would otherwise cross to the host.
  std::vector<int32_t>& argmax = results_[cur_].argmax;
  if (device_greedy)
    argmax.resize(static_cast<size_t>(view.num_logits));
  else
    logits_.resize(static_cast<size_t>(view.num_logits) * out.vocab);
  auto copy_blocks = [&](Backend& backend, KvCache& kv) {
    for (size_t l = 0; l < kv.k.size(); ++l) {
      backend.copy_blocks(kv.k[l], step.copies);
      backend.copy_blocks(kv.v[l], step.copies);
    }
  };
  if (!step.copies.empty()) {
    copy_blocks(*backend_, kv_);
    on_peers([&](ModelRank& p) { copy_blocks(*p.backend, p.kv); });
  }
  const bool picks_later = device_greedy && defer_picks;  // the logits stay on the device for pick()
  float* logits = picks_later || device_greedy ? nullptr : logits_.data();
  int32_t* picks = picks_later || !device_greedy ? nullptr : argmax.data();
  if (tp_.peers.empty()) {
    model_->forward(view, kv_, logits, picks);
  } else {
    // Every rank queues its forward on its own thread; only then does rank 0
    // wait for its logits (on a GPU, a rank that failed leaves the others'
    // collectives waiting for it: nothing here waits on them).
    recover_group();  // after a failed step
    try {
      threads_->run(
          [&](int r) {
            ModelRank* p = r == 0 ? nullptr : &tp_.peers[static_cast<size_t>(r - 1)];
            (p ? *p->backend : *backend_).make_current();  // the rank's thread stays on its GPU
            if (p)
              p->model->forward(view, p->kv, nullptr, nullptr);
            else
              model_->forward(view, kv_, nullptr, nullptr);
            (p ? *p->backend : *backend_).mark_step_end();
          },
          [&] { tp_.comms[0]->abort(); });
      wait_for_ranks();
      if (view.num_logits > 0 && (logits != nullptr || picks != nullptr))
        model_->read_logits(view.num_logits, logits, picks);  // a device error of rank 0's shows here
    } catch (...) {
      tp_failed_ = true;
      tp_.comms[0]->abort();
      throw;
    }
  }
  if (picks_later) return out;
  if (device_greedy)
    out.argmax = argmax.data();
  else
    out.logits = logits_.data();
  return out;
}

void ModelRunner::enable_swap(int64_t slots) { swap_slots_ = slots; }

void ModelRunner::ensure_swap_space() {
  if (!swap_space_.empty()) return;  // at the first swap: a runtime that never preempts holds no host memory for it
  backend_->make_current();
  swap_space_.push_back(backend_->host_alloc(static_cast<size_t>(swap_slots_ * kv_.bytes_per_block)));
  on_peers([&](ModelRank& p) {
    swap_space_.push_back(p.backend->host_alloc(static_cast<size_t>(swap_slots_ * p.kv.bytes_per_block)));
  });
}

void ModelRunner::swap_rank(Backend& backend, KvCache& kv, void* space, const SchedulerOutput& step) {
  const size_t region = static_cast<size_t>(swap_slots_) * (kv.k[0].nbytes() / static_cast<size_t>(kv.num_blocks));
  uint8_t* host = static_cast<uint8_t*>(space);
  for (size_t l = 0; l < kv.k.size(); ++l) {
    uint8_t* hk = host + 2 * l * region;
    uint8_t* hv = hk + region;
    if (!step.swap_out.empty()) {
      backend.swap_blocks(kv.k[l], step.swap_out, hk, true);
      backend.swap_blocks(kv.v[l], step.swap_out, hv, true);
    }
    if (!step.swap_in.empty()) {
      backend.swap_blocks(kv.k[l], step.swap_in, hk, false);
      backend.swap_blocks(kv.v[l], step.swap_in, hv, false);
    }
  }
}

void ModelRunner::swap(const SchedulerOutput& step, bool wait) {
  if (step.swap_out.empty() && step.swap_in.empty()) return;
  ensure_swap_space();
  backend_->make_current();
  swap_rank(*backend_, kv_, swap_space_[0].get(), step);
  size_t r = 0;
  on_peers([&](ModelRank& p) { swap_rank(*p.backend, p.kv, swap_space_[++r].get(), step); });
  if (wait) synchronize();
}

void ModelRunner::pick(ModelOutput& out, const RowMasks& masks) {
  std::vector<int32_t>& argmax = results_[cur_].argmax;
  model_->pick(out.num_rows, argmax.data(), masks);
  out.argmax = argmax.data();
}

void ModelRunner::sample(ModelOutput& out, const DeviceDraws& draws) {
  Results& r = results_[cur_];
  r.sampled.resize(draws.rows.size());
  r.sampled_logprobs.resize(draws.rows.size());  // filled for the draws that ask (SampleRow::logprobs)
  model_->sample(draws.rows, draws.edits, draws.masks, r.sampled.data(), r.sampled_logprobs.data());
  out.sampled = r.sampled.data();
  out.sampled_logprobs = r.sampled_logprobs.data();
}

int32_t ModelRunner::end_results() {
  fed_ = cur_;
  fed_ticket_ = backend_->end_results();
  return fed_ticket_;
}

ModelRunner::~ModelRunner() { release(); }

void ModelRunner::release() {
  threads_.reset();
  if (!tp_.peers.empty() && backend_) {
    // The ranks' recordings go before the collectives, which wait for them
    // (NCCL), and the collectives before the backends, which wait for their
    // streams (after a failed step only an aborted communicator ends the
    // collectives the failed rank never joined).
    // Nothing here throws: forget_steps and the destructors switch to their
    // own GPU themselves.
    try {
      synchronize();  // throws after a failed step
    } catch (const std::exception&) {  // the step that met it has reported it: end the collectives
      tp_.comms[0]->abort();
    }
    backend_->forget_steps();
    for (ModelRank& p : tp_.peers) p.backend->forget_steps();
    tp_.comms.clear();
    tp_.group.reset();
    for (ModelRank& p : tp_.peers) {
      p.model.reset();
      p.kv = KvCache{};
      p.backend.reset();
    }
  }
  tp_ = TensorParallel{};
  model_.reset();
  kv_ = KvCache{};
  backend_.reset();
  std::vector<float>().swap(logits_);
}

}  // namespace pagedrt
