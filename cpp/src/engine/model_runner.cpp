#include "engine/model_runner.hpp"

namespace pagedrt {

ModelRunner::ModelRunner(std::shared_ptr<Backend> backend, std::unique_ptr<LlamaModel> model, KvCache kv)
    : backend_(std::move(backend)), model_(std::move(model)), kv_(std::move(kv)) {}

ModelOutput ModelRunner::run(const SchedulerOutput& step, bool device_greedy, bool defer_picks, bool deferred) {
  cur_ ^= 1;
  backend_->begin_results(deferred);
  batch_.build(step, static_cast<int32_t>(kv_.block_size));
  if (!batch_.feedback().empty()) {
    if (backend_->defers_results()) {
      batch_.feed_from(fed_ticket_);
    } else {  // the results are here already
      const Results& from = results_[fed_];
      for (const TokenFeedback& f : batch_.feedback())
        batch_.set_token(f.token, f.source >= 0 ? from.argmax.at(static_cast<size_t>(f.source))
                                                : from.sampled.at(static_cast<size_t>(-1 - f.source)));
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
  if (!step.copies.empty())
    for (size_t l = 0; l < kv_.k.size(); ++l) {
      backend_->copy_blocks(kv_.k[l], step.copies);
      backend_->copy_blocks(kv_.v[l], step.copies);
    }
  if (device_greedy && defer_picks) {
    model_->forward(view, kv_, nullptr, nullptr);  // the logits stay on the device for pick()
    return out;
  }
  model_->forward(view, kv_, logits_.data(), device_greedy ? argmax.data() : nullptr);
  if (device_greedy)
    out.argmax = argmax.data();
  else
    out.logits = logits_.data();
  return out;
}

void ModelRunner::enable_swap(int64_t slots) { swap_slots_ = slots; }

void ModelRunner::ensure_swap_space() {
  if (!swap_space_)  // at the first swap: a runtime that never preempts holds no host memory for it
    swap_space_ = backend_->host_alloc(static_cast<size_t>(swap_slots_ * kv_.bytes_per_block));
}

void ModelRunner::swap(const SchedulerOutput& step, bool wait) {
  if (step.swap_out.empty() && step.swap_in.empty()) return;
  ensure_swap_space();
  const size_t region = static_cast<size_t>(swap_slots_) * (kv_.k[0].nbytes() / static_cast<size_t>(kv_.num_blocks));
  uint8_t* host = static_cast<uint8_t*>(swap_space_.get());
  for (size_t l = 0; l < kv_.k.size(); ++l) {
    uint8_t* hk = host + 2 * l * region;
    uint8_t* hv = hk + region;
    if (!step.swap_out.empty()) {
      backend_->swap_blocks(kv_.k[l], step.swap_out, hk, true);
      backend_->swap_blocks(kv_.v[l], step.swap_out, hv, true);
    }
    if (!step.swap_in.empty()) {
      backend_->swap_blocks(kv_.k[l], step.swap_in, hk, false);
      backend_->swap_blocks(kv_.v[l], step.swap_in, hv, false);
    }
  }
  if (wait) backend_->synchronize();
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

void ModelRunner::release() {
  model_.reset();
  kv_ = KvCache{};
  backend_.reset();
  std::vector<float>().swap(logits_);
}

}  // namespace pagedrt
